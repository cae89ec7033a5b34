"""Attention both models use: kinds, RoPE, masks, grouped-query attention
and the KV cache (Flax NNX). Shape letters as in ``distill.nn.layers``.

Attention is split so that a KV-cache decode path can reuse it:
``Attention.project`` (projections, QK-norm, clipping, RoPE), ``attention_mask``
(which keys each query sees, from segment ids and token indices) and
``attend`` (the grouped-query attention core), then ``o_proj``.

A whole sequence (training, the cache pass, scoring) goes through
``self_attention``, the one entry point that picks a kernel
(``kernels.ATTENTION_IMPLS``): ``xla`` is ``attention_mask`` + ``attend`` (scores
materialised, any backend) for rows of up to ``blockwise.BLOCK`` tokens and
``blockwise.flash_attention`` beyond: tiles of queries visit only the key
tiles the mask leaves visible, with an online softmax and recomputation in
the backward pass, so memory grows linearly in T and a local layer's work
too (a global layer's as T^2 / 2).
``cudnn`` is cuDNN's fused flash attention through
``jax.nn.dot_product_attention``: causal and the sliding window are native
there, grouped-query heads are read without copies, and packed rows'
segment ids become a boolean mask so documents never see each other. cuDNN
needs a CUDA GPU and bfloat16/float16 inputs; ``auto`` takes it when those
hold. ``splash`` is jax's splash attention Pallas kernel for TPUs
(``kernels.splash_attention``): causal or windowed masks, packed rows' segment ids
and grouped-query heads are native, and blocks the mask hides entirely are
skipped, so a local layer costs O(T x window) and a global one half the
square; ``auto`` takes it on a TPU (the mesh's platform, so a plan made on
a CPU host for a TPU compiles it) when the row splits into its 128-token
blocks and head_dim is a multiple of 128. Elsewhere ``auto`` is the XLA
path (the CPU, float32 compute on a GPU). The KV-cache
decode path always uses ``attend`` (a few query rows per call, where a flash
kernel gains nothing).

KV cache (``Attention.init_cache`` / ``Attention.decode``), one dict per layer::

    k, v  [B, S, K, H]   keys (after RoPE) and values of past tokens
    pos   [B, S] int32   the position each slot holds; -1 = empty

A global layer has ``S = max_len`` slots (slot = position); a local layer a
ring of ``S = window + rollback`` slots (slot = position mod S), so its memory
is bounded by the window, not the context. A decode call feeds a chunk of t
tokens at explicit positions (consecutive per row; -1 marks left padding):
the chunk attends to the cache entries *before* its first position plus
itself, then its keys/values are written. Entries at or after the chunk's
first position are stale (a rolled-back draft) and never visible, so taking
back the last tokens is just decoding again from an earlier position; the
``rollback`` extra ring slots keep the keys the window still needs after up
to ``rollback`` tokens are taken back.
"""

from __future__ import annotations

import enum
import functools

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from distill.core.errors import ConfigError
from distill.nn import blockwise, kernels, layers


class AttentionKind(enum.StrEnum):
  """What a layer attends to: a sliding window of ``window`` tokens
  (``local``) or the whole causal prefix (``global``).

  Configs hold the plain strings (they are JSON); a ``StrEnum`` member equals
  its string, so code branches on ``AttentionKind.LOCAL`` either way.
  """

  LOCAL = "local"
  GLOBAL = "global"


ATTENTION_KINDS = tuple(k.value for k in AttentionKind)
QK_NORMS = ("none", "head", "full")
#: Kernels ``self_attention`` can use (see the module docstring).
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def check_kind(kind: str) -> AttentionKind:
  """The ``AttentionKind`` named ``kind``; a ConfigError for an unknown one."""
  try:
    return AttentionKind(kind)
  except ValueError:
    raise ConfigError(
        f"unknown attention kind {kind!r}; expected one of {ATTENTION_KINDS}"
    ) from None


# ----------------------------------------------------------------------------
# Rotary position embedding


def rope_inv_freq(
    head_dim: int, base: float, scaling_factor: float = 1.0
) -> jax.Array:
  """Inverse frequencies [H/2] in float32: ``base^(-2i/H) / scaling_factor``.

  Linear scaling divides the positions by the factor; dividing the
  frequencies instead is the same map and matches transformers' rounding.
  """
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  return 1.0 / (jnp.float32(base) ** exponents) / jnp.float32(scaling_factor)


def apply_rope(
    x: jax.Array,
    positions: jax.Array,
    *,
    base: float,
    scaling_factor: float = 1.0,
) -> jax.Array:
  """Rotates x by its positions, transformers' "rotate_half" convention.

  Feature i of the first half and feature i of the second half form one pair
  (not interleaved neighbours), rotated by angle ``position * inv_freq[i]``.

  x [B, T, N, H], positions [B, T] (int; restart per packed document)
  -> [B, T, N, H] in x's dtype.
  """
  head_dim = x.shape[-1]
  inv_freq = rope_inv_freq(head_dim, base, scaling_factor)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, H/2]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


# ----------------------------------------------------------------------------
# Attention


def default_positions(tokens_or_x: jax.Array) -> jax.Array:
  """arange(T) broadcast to [B, T] int32."""
  b, t = tokens_or_x.shape[:2]
  return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def default_segment_ids(tokens_or_x: jax.Array) -> jax.Array:
  """All ones [B, T] int32: one document per row, no padding."""
  return jnp.ones(tokens_or_x.shape[:2], jnp.int32)


def attention_mask(
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    q_index: jax.Array,
    kv_index: jax.Array,
    *,
    window: int | None = None,
) -> jax.Array:
  """Which keys each query may attend to.

  A query sees a key iff it is not in the future (``kv_index <= q_index``),
  it has the same segment id, and, with a window, it is one of the last
  ``window`` tokens including the query itself (``q_index - kv_index <
  window``, transformers' sliding-window convention). Segment id 0 marks
  padding: padding only sees padding, so no row is ever fully masked.

  q_segment_ids [B, T], kv_segment_ids [B, S], q_index [B, T], kv_index [B, S]
  (token indices in the sequence / cache) -> mask [B, T, S] bool.
  """
  qi = q_index[:, :, None]
  ki = kv_index[:, None, :]
  mask = (ki <= qi) & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
  if window is not None:
    mask &= (qi - ki) < window
  return mask


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float
) -> jax.Array:
  """Grouped-query attention core, softmax in float32.

  Query head n reads key/value head ``n // G`` (transformers' repeat_kv).

  q [B, T, N, H], k [B, S, K, H], v [B, S, K, H], mask [B, T, S] bool
  -> [B, T, N, H] in v's dtype.
  """
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  if n % kv_heads:
    raise ValueError(f"{n} query heads do not group over {kv_heads} kv heads")
  q = q.reshape(b, t, kv_heads, n // kv_heads, h)
  scores = (
      jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
      * scale
  )
  scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
  return out.reshape(b, t, n, h)


@functools.cache
def _warn_once(message: str) -> None:
  logging.warning(message)


#: Compute dtypes cuDNN's flash attention takes.
def self_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    window: int | None,
    scale: float,
    impl: str = "auto",
) -> jax.Array:
  """Attention of a whole (packed) sequence over itself, by the kernel
  ``resolve_impl`` picks for ``impl``.

  A query at index i sees keys j <= i of its own segment (and, with a
  window, i - j < window), as ``attention_mask`` says.

  q [B, T, N, H], k/v [B, T, K, H], segment_ids [B, T] (0 = padding)
  -> [B, T, N, H] in v's dtype.
  """
  kernel = kernels.resolve_impl(impl, v.dtype, q.shape[-1], q.shape[1])
  if kernel == "splash":
    return kernels.splash_attention(
        q, k, v, segment_ids, window=window, scale=scale
    )
  if kernel == "cudnn":
    dtype = v.dtype
    try:
      return kernels.fused_attention(
          q.astype(dtype),
          k.astype(dtype),
          v,
          segment_ids,
          window=window,
          scale=scale,
      )
    except (ValueError, NotImplementedError, RuntimeError) as e:
      # cuDNN checks shapes, versions and the GPU while tracing; ``auto``
      # then runs the XLA path instead, an explicit "cudnn" fails.
      if impl == "cudnn":
        raise
      _warn_once(f"cuDNN attention cannot run here ({e}); using XLA's")
  if q.shape[1] > blockwise.BLOCK:
    return blockwise.flash_attention(
        q, k, v, segment_ids, window=window, scale=scale
    )
  index = default_positions(q)
  mask = attention_mask(segment_ids, segment_ids, index, index, window=window)
  return attend(q, k, v, mask, scale=scale)


class Attention(nnx.Module):
  """Multi-head attention with GQA, optional QK-norm, RoPE and a layer kind.

  ``kind='local'`` attends to a sliding window of ``window`` tokens,
  ``'global'`` to the whole causal prefix; ``rope_base`` and
  ``rope_scaling_factor`` are this layer's (models pass the per-kind values).
  ``qk_norm``: ``'none'``; ``'head'`` RMSNorm over H per head (Gemma 3,
  Qwen3-MoE); ``'full'`` RMSNorm over the whole projected q [N*H] and k
  [K*H] (OLMoE). ``norm_eps``/``norm_offset_one`` configure those norms.
  ``query_scale`` multiplies the scores (default ``head_dim**-0.5``);
  ``clip_qkv`` clamps q, k, v after the QK-norm (OLMoE's order).
  ``impl``: the whole-sequence kernel (``kernels.ATTENTION_IMPLS``; see
  ``self_attention``).
  """

  def __init__(
      self,
      d_model: int,
      num_heads: int,
      num_kv_heads: int,
      head_dim: int,
      *,
      rngs: nnx.Rngs,
      kind: str = "global",
      window: int | None = None,
      rope_base: float = 10_000.0,
      rope_scaling_factor: float = 1.0,
      qkv_bias: bool = False,
      qk_norm: str = "none",
      norm_eps: float = 1e-6,
      norm_offset_one: bool = False,
      query_scale: float | None = None,
      clip_qkv: float | None = None,
      impl: str = "auto",
      dtype: layers.Dtype | None = None,
      param_dtype: layers.Dtype = jnp.float32,
  ):
    kind = check_kind(kind)
    self.impl = kernels.check_impl(impl)
    if kind == AttentionKind.LOCAL and (window is None or window < 1):
      raise ValueError(
          f"a local attention layer needs window >= 1, got {window}"
      )
    if num_heads % num_kv_heads:
      raise ValueError(
          f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}"
      )
    if qk_norm not in QK_NORMS:
      raise ValueError(
          f"unknown qk_norm {qk_norm!r}; expected one of {QK_NORMS}"
      )
    self.num_heads, self.num_kv_heads, self.head_dim = (
        num_heads,
        num_kv_heads,
        head_dim,
    )
    self.kind = kind
    self.window = window if kind == AttentionKind.LOCAL else None
    self.rope_base = rope_base
    self.rope_scaling_factor = rope_scaling_factor
    self.query_scale = head_dim**-0.5 if query_scale is None else query_scale
    self.clip_qkv = clip_qkv
    self.qk_norm = qk_norm
    d, n, k, h = d_model, num_heads, num_kv_heads, head_dim
    proj = functools.partial(
        layers.Einsum, rngs=rngs, dtype=dtype, param_dtype=param_dtype
    )
    self.q_proj = proj(
        "BTD,DNH->BTNH",
        (d, n, h),
        in_axes=(0,),
        bias_shape=(n, h) if qkv_bias else None,
        axes=("embed", "heads", None),
    )
    self.k_proj = proj(
        "BSD,DKH->BSKH",
        (d, k, h),
        in_axes=(0,),
        bias_shape=(k, h) if qkv_bias else None,
        axes=("embed", "kv_heads", None),
    )
    self.v_proj = proj(
        "BSD,DKH->BSKH",
        (d, k, h),
        in_axes=(0,),
        bias_shape=(k, h) if qkv_bias else None,
        axes=("embed", "kv_heads", None),
    )
    self.o_proj = proj(
        "BTNH,NHD->BTD",
        (n, h, d),
        in_axes=(0, 1),
        axes=("heads", None, "embed"),
    )
    norm = functools.partial(
        layers.RMSNorm,
        eps=norm_eps,
        offset_one=norm_offset_one,
        param_dtype=param_dtype,
    )
    if qk_norm == "head":
      self.q_norm, self.k_norm = norm(h), norm(h)
    elif qk_norm == "full":
      self.q_norm, self.k_norm = norm(n * h), norm(k * h)
    else:
      self.q_norm = self.k_norm = None

  def _norm(self, norm: layers.RMSNorm | None, x: jax.Array) -> jax.Array:
    if norm is None:
      return x
    if self.qk_norm == "full":  # over all heads at once, as before the reshape
      return norm(x.reshape(*x.shape[:-2], -1)).reshape(x.shape)
    return norm(x)

  def project(self, x: jax.Array, positions: jax.Array):
    """Projections, QK-norm, clipping and RoPE.

    x [B, T, D], positions [B, T]
    -> q [B, T, N, H], k [B, T, K, H], v [B, T, K, H].
    """
    q = self._norm(self.q_norm, self.q_proj(x))
    k = self._norm(self.k_norm, self.k_proj(x))
    v = self.v_proj(x)
    if self.clip_qkv is not None:
      c = self.clip_qkv
      q, k, v = (jnp.clip(a, -c, c) for a in (q, k, v))
    rope = functools.partial(
        apply_rope,
        positions=positions,
        base=self.rope_base,
        scaling_factor=self.rope_scaling_factor,
    )
    return rope(q), rope(k), v

  def __call__(
      self,
      x: jax.Array,
      segment_ids: jax.Array | None = None,
      positions: jax.Array | None = None,
  ) -> jax.Array:
    """x [B, T, D], segment_ids [B, T] (0 = padding), positions [B, T] -> [B, T, D]."""
    segment_ids = default_segment_ids(x) if segment_ids is None else segment_ids
    positions = default_positions(x) if positions is None else positions
    q, k, v = self.project(x, positions)
    out = self_attention(
        q,
        k,
        v,
        segment_ids,
        window=self.window,
        scale=self.query_scale,
        impl=self.impl,
    )
    return self.o_proj(out)

  # -- KV-cache decoding ------------------------------------------------------

  def cache_size(self, max_len: int, rollback: int = 0) -> int:
    """Slots S of this layer's cache: max_len (global) or window + rollback (local)."""
    if self.window is None:
      return max_len
    return min(self.window + rollback, max_len)

  def init_cache(
      self,
      batch: int,
      max_len: int,
      *,
      rollback: int = 0,
      dtype: layers.Dtype | None = None,
  ) -> dict[str, jax.Array]:
    """An empty cache: {"k", "v": [B, S, K, H], "pos": [B, S] int32 of -1}.

    ``max_len``: positions are < max_len. ``rollback``: how many of the
    latest tokens a caller may take back (decode again from an earlier
    position); local layers keep that many extra ring slots. ``dtype`` of
    k/v: default the layer's compute dtype, else float32.
    """
    size = self.cache_size(max_len, rollback)
    if dtype is None:
      dtype = (
          self.k_proj.dtype if self.k_proj.dtype is not None else jnp.float32
      )
    dtype = jnp.dtype(dtype)
    shape = (batch, size, self.num_kv_heads, self.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "pos": jnp.full((batch, size), -1, jnp.int32),
    }

  def decode(
      self, x: jax.Array, positions: jax.Array, cache: dict[str, jax.Array]
  ) -> tuple[jax.Array, dict]:
    """Attention of a chunk of new tokens over the cache, then the cache update.

    x [B, t, D], positions [B, t] int (consecutive per row; -1 = padding,
    which is neither seen nor stored), cache from ``init_cache``
    -> (out [B, t, D], the updated cache). Equals ``__call__`` on the whole
    sequence at the chunk's rows (see the module docstring).
    """
    positions = positions.astype(jnp.int32)
    q, k, v = self.project(x, positions)
    keys, values, kv_pos = cached_keys(cache, k, v, positions)
    valid_q = (positions >= 0).astype(jnp.int32)
    mask = attention_mask(
        valid_q,
        (kv_pos >= 0).astype(jnp.int32),
        positions,
        kv_pos,
        window=self.window,
    )
    out = attend(q, keys, values, mask, scale=self.query_scale)
    cache = write_cache(cache, k, v, positions, ring=self.window is not None)
    return self.o_proj(out), cache


def cached_keys(
    cache: dict[str, jax.Array],
    k: jax.Array,
    v: jax.Array,
    positions: jax.Array,
):
  """Keys a chunk attends to: the cache's past (before the chunk) + the chunk.

  cache {"k", "v": [B, S, K, H], "pos": [B, S]}, k/v [B, t, K, H], positions
  [B, t] -> keys, values [B, S + t, K, H], kv_pos [B, S + t] (-1 = unseen).
  """
  big = jnp.iinfo(jnp.int32).max
  start = jnp.min(
      jnp.where(positions >= 0, positions, big), axis=1, keepdims=True
  )  # [B, 1]
  past = cache["pos"]
  past = jnp.where((past >= 0) & (past < start), past, -1)
  dtype = cache["k"].dtype
  keys = jnp.concatenate([cache["k"], k.astype(dtype)], axis=1)
  values = jnp.concatenate([cache["v"], v.astype(dtype)], axis=1)
  kv_pos = jnp.concatenate([past, jnp.where(positions >= 0, positions, -1)], 1)
  return keys, values, kv_pos


def write_cache(
    cache: dict[str, jax.Array],
    k: jax.Array,
    v: jax.Array,
    positions: jax.Array,
    *,
    ring: bool,
) -> dict[str, jax.Array]:
  """Stores a chunk's keys/values at slot ``position`` (mod S when ``ring``).

  Padding (position < 0) and, without a ring, positions >= S are dropped.
  A chunk longer than a ring keeps its last S tokens (the rest could never
  be seen again). k/v [B, t, K, H], positions [B, t].
  """
  size = cache["pos"].shape[1]
  if ring and k.shape[1] > size:
    k, v, positions = k[:, -size:], v[:, -size:], positions[:, -size:]
  slots = positions % size if ring else positions
  slots = jnp.where(positions >= 0, slots, size)  # size: dropped
  rows = jnp.arange(k.shape[0])[:, None]
  put = lambda buf, new: buf.at[rows, slots].set(
      new.astype(buf.dtype), mode="drop"
  )
  return {
      "k": put(cache["k"], k),
      "v": put(cache["v"], v),
      "pos": put(cache["pos"], positions),
  }
