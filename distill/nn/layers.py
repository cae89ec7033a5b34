"""The one set of layers both models are built from (Flax NNX).

Letters in einsum strings and shapes:

    B batch            T query positions     S key/value positions
    D d_model          N query heads         K key/value heads
    G N // K (query heads per kv head)       H head_dim
    F MLP hidden       V vocabulary

Parameters are float32 by default (``param_dtype``); ``dtype`` is the compute
dtype (None: the promoted dtype of the input and the parameter). Norms, RoPE
and softmax always compute in float32. Parameter shapes keep one axis per
logical dimension so that a sharding rule can name them:

    Embed.embedding [V, D]      Unembed.kernel [D, V]
    q_proj.kernel   [D, N, H]   k_proj/v_proj.kernel [D, K, H]
    o_proj.kernel   [N, H, D]   q/k/v bias [N, H] / [K, H]
    gate/up kernel  [D, F]      down kernel [F, D]
    RMSNorm.scale   [dim]

Attention is split so that a KV-cache decode path can reuse it:
``Attention.project`` (projections, QK-norm, clipping, RoPE), ``attention_mask``
(which keys each query sees, from segment ids and token indices) and
``attend`` (the grouped-query attention core), then ``o_proj``.

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
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from distill.core.errors import ConfigError

Dtype = Any  # a jnp dtype or a name such as "bfloat16"


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
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def check_kind(kind: str) -> AttentionKind:
  """The ``AttentionKind`` named ``kind``; a ConfigError for an unknown one."""
  try:
    return AttentionKind(kind)
  except ValueError:
    raise ConfigError(
        f"unknown attention kind {kind!r}; expected one of {ATTENTION_KINDS}"
    ) from None


def _dtype(dtype: Dtype | None):
  return None if dtype is None else jnp.dtype(dtype)


def _compute_dtype(dtype, *arrays):
  return dtype if dtype is not None else jnp.result_type(*arrays)


# ----------------------------------------------------------------------------
# Activations


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    # transformers' "gelu_pytorch_tanh" / "gelu_new": the tanh approximation.
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(
        f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}"
    )
  return ACTIVATIONS[name]


# ----------------------------------------------------------------------------
# Linear maps


class Einsum(nnx.Module):
  """A linear map written as an einsum with a named-axis kernel.

  ``Einsum("BTD,DNH->BTNH", (D, N, H), in_axes=(0,))`` is a query projection.
  The kernel is initialised with variance scaling (fan-in over ``in_axes``).
  ``bias_shape`` (broadcast against the output's trailing axes) adds a bias.
  """

  def __init__(
      self,
      eqn: str,
      kernel_shape: Sequence[int],
      *,
      in_axes: Sequence[int],
      rngs: nnx.Rngs,
      bias_shape: Sequence[int] | None = None,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      init_scale: float = 1.0,
  ):
    self.eqn = eqn
    self.dtype = _dtype(dtype)
    in_axes = tuple(in_axes)
    out_axes = tuple(i for i in range(len(kernel_shape)) if i not in in_axes)
    init = nnx.initializers.variance_scaling(
        init_scale,
        "fan_in",
        "truncated_normal",
        in_axis=in_axes,
        out_axis=out_axes,
    )
    self.kernel = nnx.Param(
        init(rngs.params(), tuple(kernel_shape), jnp.dtype(param_dtype))
    )
    self.bias = (
        nnx.Param(jnp.zeros(tuple(bias_shape), param_dtype))
        if bias_shape is not None
        else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...]
    dtype = _compute_dtype(self.dtype, x, kernel)
    y = jnp.einsum(self.eqn, x.astype(dtype), kernel.astype(dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y


# ----------------------------------------------------------------------------
# Normalisation


class RMSNorm(nnx.Module):
  """RMS normalisation over the last axis, computed in float32.

  ``offset_one=True`` is Gemma's ``x_hat * (1 + scale)`` with scale initialised
  to 0; ``False`` is ``x_hat * scale`` with scale initialised to 1 (Llama,
  Mixtral, Qwen, OLMoE). ``x_hat = x / sqrt(mean(x^2) + eps)``.

  x [..., dim] -> [..., dim] in ``dtype`` (default: x's dtype).
  """

  def __init__(
      self,
      dim: int,
      *,
      eps: float = 1e-6,
      offset_one: bool = False,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      rngs: nnx.Rngs | None = None,
  ):
    del rngs  # deterministic initialisation
    self.eps = eps
    self.offset_one = offset_one
    self.dtype = _dtype(dtype)
    init = jnp.zeros if offset_one else jnp.ones
    self.scale = nnx.Param(init((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    out_dtype = self.dtype if self.dtype is not None else x.dtype
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(
        jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps
    )
    scale = self.scale[...].astype(jnp.float32)
    y = y * (1.0 + scale) if self.offset_one else y * scale
    return y.astype(out_dtype)


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
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
  ):
    kind = check_kind(kind)
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
        Einsum, rngs=rngs, dtype=dtype, param_dtype=param_dtype
    )
    self.q_proj = proj(
        "BTD,DNH->BTNH",
        (d, n, h),
        in_axes=(0,),
        bias_shape=(n, h) if qkv_bias else None,
    )
    self.k_proj = proj(
        "BSD,DKH->BSKH",
        (d, k, h),
        in_axes=(0,),
        bias_shape=(k, h) if qkv_bias else None,
    )
    self.v_proj = proj(
        "BSD,DKH->BSKH",
        (d, k, h),
        in_axes=(0,),
        bias_shape=(k, h) if qkv_bias else None,
    )
    self.o_proj = proj("BTNH,NHD->BTD", (n, h, d), in_axes=(0, 1))
    norm = functools.partial(
        RMSNorm,
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

  def _norm(self, norm: RMSNorm | None, x: jax.Array) -> jax.Array:
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
    index = default_positions(x)
    mask = attention_mask(
        segment_ids, segment_ids, index, index, window=self.window
    )
    out = attend(q, k, v, mask, scale=self.query_scale)
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
      dtype: Dtype | None = None,
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


# ----------------------------------------------------------------------------
# MLP and embeddings


class MLP(nnx.Module):
  """Gated MLP without bias: ``down(act(gate(x)) * up(x))``.

  x [..., D] -> [..., D]. ``activation``: 'silu' or 'gelu_tanh' (Gemma).
  """

  def __init__(
      self,
      d_model: int,
      d_ff: int,
      *,
      rngs: nnx.Rngs,
      activation: str = "silu",
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
  ):
    self.activation = activation
    self._act = get_activation(activation)
    proj = functools.partial(
        Einsum, rngs=rngs, dtype=dtype, param_dtype=param_dtype, in_axes=(0,)
    )
    self.gate_proj = proj("...D,DF->...F", (d_model, d_ff))
    self.up_proj = proj("...D,DF->...F", (d_model, d_ff))
    self.down_proj = proj("...F,FD->...D", (d_ff, d_model))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(self._act(self.gate_proj(x)) * self.up_proj(x))


class Embed(nnx.Module):
  """Token embedding [V, D]; ``attend`` is the tied output head.

  ``__call__``: tokens [B, T] int -> [B, T, D] (``dtype``, default the
  parameter's). ``attend``: h [B, T, D] -> logits [B, T, V] float32
  (``h @ embedding^T``). Initialised N(0, 1/D).
  """

  def __init__(
      self,
      vocab_size: int,
      d_model: int,
      *,
      rngs: nnx.Rngs,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      init_stddev: float | None = None,
  ):
    self.vocab_size, self.d_model = vocab_size, d_model
    self.dtype = _dtype(dtype)
    std = d_model**-0.5 if init_stddev is None else init_stddev
    self.embedding = nnx.Param(
        std
        * jax.random.normal(rngs.params(), (vocab_size, d_model), param_dtype)
    )

  def __call__(self, tokens: jax.Array) -> jax.Array:
    table = self.embedding[...]
    out = jnp.take(table, tokens, axis=0)
    return out.astype(self.dtype) if self.dtype is not None else out

  def attend(self, h: jax.Array) -> jax.Array:
    table = self.embedding[...]
    dtype = _compute_dtype(self.dtype, h, table)
    return jnp.einsum(
        "BTD,VD->BTV",
        h.astype(dtype),
        table.astype(dtype),
        preferred_element_type=jnp.float32,
    )


class Unembed(nnx.Module):
  """Untied output head: h [B, T, D] -> logits [B, T, V] float32, kernel [D, V]."""

  def __init__(
      self,
      d_model: int,
      vocab_size: int,
      *,
      rngs: nnx.Rngs,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
  ):
    self.dtype = _dtype(dtype)
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    self.kernel = nnx.Param(
        init(rngs.params(), (d_model, vocab_size), jnp.dtype(param_dtype))
    )

  def __call__(self, h: jax.Array) -> jax.Array:
    kernel = self.kernel[...]
    dtype = _compute_dtype(self.dtype, h, kernel)
    return jnp.einsum(
        "BTD,DV->BTV",
        h.astype(dtype),
        kernel.astype(dtype),
        preferred_element_type=jnp.float32,
    )


def softcap(logits: jax.Array, cap: float | None) -> jax.Array:
  """``cap * tanh(logits / cap)``; identity when cap is None."""
  return logits if cap is None else cap * jnp.tanh(logits / cap)


def count_params(module: nnx.Module) -> int:
  """Number of parameters (works on abstract modules from ``nnx.eval_shape``)."""
  leaves = jax.tree.leaves(nnx.state(module, nnx.Param))
  return int(sum(math.prod(leaf.shape) for leaf in leaves))
