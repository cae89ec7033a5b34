"""The fused attention kernels a whole sequence may take, and which one.

``ATTENTION_IMPLS`` names them; ``resolve_impl`` turns ``auto`` (or a
kernel that cannot run) into the one that runs on the mesh's platform;
``fused_attention`` is cuDNN's flash attention (``jax.nn.dot_product_attention``)
and ``splash_attention`` jax's splash attention Pallas kernel for TPUs.
``attention.self_attention`` is their one caller.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from distill.core import sharding
from distill.core.errors import ConfigError

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")


def check_impl(impl: str) -> str:
  """``impl`` if it is one of ATTENTION_IMPLS; a ConfigError otherwise."""
  if impl not in ATTENTION_IMPLS:
    raise ConfigError(
        f"unknown attention_impl {impl!r}; expected one of {ATTENTION_IMPLS}"
    )
  return impl


_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def resolve_impl(
    impl: str, dtype, head_dim: int, length: int | None = None
) -> str:
  """The kernel ``self_attention`` runs for ``impl`` on this backend (the
  active mesh's platform, ``sharding.platform``): 'xla', 'cudnn' or
  'splash'. ``auto`` is cuDNN on a CUDA GPU when the compute dtype is
  bfloat16/float16 and head_dim a multiple of 8 up to 256 (what its flash
  kernel takes); splash on a TPU when ``length`` (the row's tokens, if
  known) is a multiple of 128 and head_dim of 128; else XLA. An explicit
  kernel that cannot run here is a ConfigError that says why."""
  check_impl(impl)
  if impl == "xla":
    return "xla"
  backend = sharding.platform()
  if impl == "splash" or (impl == "auto" and backend == "tpu"):
    why = None
    if backend != "tpu":
      why = f"it needs a TPU and the backend is {backend!r}"
    elif head_dim % SPLASH_LANES:
      why = f"it takes head_dim a multiple of {SPLASH_LANES}, not {head_dim}"
    elif length is not None and length % SPLASH_LANES:
      why = f"it takes rows a multiple of {SPLASH_LANES} tokens, not {length}"
    if why is None:
      return "splash"
    if impl == "splash":
      raise ConfigError(f"attention_impl='splash' cannot run: {why}")
    return "xla"
  why = None
  if backend != "gpu":
    why = f"it needs a CUDA GPU and the backend is {backend!r}"
  elif jnp.dtype(dtype) not in [jnp.dtype(d) for d in _CUDNN_DTYPES]:
    why = (
        f"it takes bfloat16 or float16 and the compute dtype is"
        f" {jnp.dtype(dtype).name} (set the model's dtype to bfloat16)"
    )
  elif head_dim % 8 or head_dim > 256:
    why = f"it takes head_dim a multiple of 8 up to 256, not {head_dim}"
  if why is None:
    return "cudnn"
  if impl == "cudnn":
    raise ConfigError(f"attention_impl='cudnn' cannot run: {why}")
  return "xla"


#: Splash attention's tiles are multiples of a TPU vector's 128 lanes.
SPLASH_LANES = 128
SPLASH_BLOCKS = (512, 256, 128)


#: The fused backward kernel writes one partial dq per key block ([key blocks,
#: heads, T, head_dim], summed after it): memory quadratic in the row. Past
#: this many key blocks in a row, two backward kernels run instead (dq's
#: recomputes QK^T: two more matmuls per visited block) and memory stays
#: linear (found planning gemma3_1b on v5p: a 2-layer step on a 32k-token
#: row per chip held 17.5 GiB of temporaries fused, 3.3 GiB with two kernels).
SPLASH_FUSED_MAX_KEY_BLOCKS = 16


def splash_fused_backward(length: int, block: int) -> bool:
  """Whether splash's backward is the one fused kernel for rows of
  ``length`` tokens in tiles of ``block``: up to
  ``SPLASH_FUSED_MAX_KEY_BLOCKS`` key blocks."""
  return length // block <= SPLASH_FUSED_MAX_KEY_BLOCKS


def splash_block(length: int, window: int | None) -> int | None:
  """The query and key tile of a row: the largest of ``SPLASH_BLOCKS`` that
  divides it, and for a local layer at most a quarter of the window (a
  query block then visits about ``window + block`` keys, not twice the
  window); None if none divides the row."""
  limit = SPLASH_BLOCKS[0] if window is None else max(window // 4, SPLASH_LANES)
  return next(
      (b for b in SPLASH_BLOCKS if b <= limit and length % b == 0), None
  )


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    window: int | None,
    scale: float,
    interpret: bool = False,
    block: int | None = None,
    fused: bool | None = None,
) -> jax.Array:
  """Causal (optionally windowed) GQA by jax's splash attention TPU kernel.

  Blocks of queries and keys that the causal or window mask hides entirely
  are never visited (forward or backward); segment ids keep packed
  documents apart (padding, id 0, sees padding). On the active mesh the
  kernel runs per device (``shard_map``) on its rows and, when the tensor
  axis divides both head counts, its heads. ``interpret=True`` runs the
  kernel's Pallas program on any backend (how the CPU tests check it).

  q [B, T, N, H], k/v [B, T, K, H], segment_ids [B, T] -> [B, T, N, H] in
  v's dtype. T must be a multiple of 128; ``block``: the query and key
  tiles (default ``splash_block``); ``fused``: one backward kernel for dq,
  dk and dv, or one for dq and one for dk and dv (default
  ``splash_fused_backward``: fused on rows of few key blocks).
  """
  # pylint: disable=import-outside-toplevel
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as splash,
      splash_attention_mask as masks,
  )

  length = q.shape[1]
  if block is None:
    block = splash_block(length, window)
  if block is None or length % block:
    raise ValueError(
        f"splash attention takes rows a multiple of 128, not {length}"
    )
  if fused is None:
    fused = splash_fused_backward(length, block)
  # Fused, QK^T and dO V^T are computed once in the backward pass (two
  # kernels compute each twice), at the price of the dq partials.
  backward = (
      dict(use_fused_bwd_kernel=True)
      if fused
      else dict(block_q_dq=block, block_kv_dq=block)
  )

  def local(q, k, v, segment_ids):  # one device's rows and heads
    heads = q.shape[2]
    shape = (length, length)
    if window is None:
      mask = masks.CausalMask(shape)
    else:
      mask = masks.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        **backward,
    )  # fmt: skip
    kernel = splash.make_splash_mha(
        masks.MultiHeadMask([mask] * heads),
        head_shards=1,
        q_seq_shards=1,
        block_sizes=sizes,
        interpret=interpret,
    )
    dtype = v.dtype
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, N, T, H]
    out = jax.vmap(kernel)(
        heads_first((q.astype(jnp.float32) * scale).astype(dtype)),
        heads_first(k.astype(dtype)),
        heads_first(v),
        segment_ids=splash.SegmentIds(segment_ids, segment_ids),
    )
    return heads_first(out)

  mesh = sharding.current()
  if mesh is None:
    return local(q, k, v, segment_ids)
  rows = sharding.spec(("batch",), q.shape[:1], mesh)[0]
  tensor = mesh.shape["tensor"]
  split = q.shape[2] % tensor == 0 and k.shape[2] % tensor == 0
  heads = "tensor" if split and tensor > 1 else None
  qkv = jax.P(rows, None, heads, None)
  return jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(qkv, qkv, qkv, jax.P(rows, None)),
      out_specs=qkv,
      check_vma=False,
  )(q, k, v, segment_ids)


def fused_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    window: int | None,
    scale: float,
    implementation: str = "cudnn",
) -> jax.Array:
  """Causal (optionally windowed) GQA of a whole sequence in one
  ``jax.nn.dot_product_attention`` call: the call ``self_attention`` makes
  for cuDNN (``implementation='xla'`` runs the same call through jax's own
  reference, which is how the CPU tests check it).

  The window ``q - k < window`` is ``local_window_size=(window - 1, 0)``;
  segment ids enter as a [B, 1, T, T] mask (same segment only; padding, id
  0, sees padding), and causality as ``is_causal``.

  q [B, T, N, H], k/v [B, T, K, H], segment_ids [B, T] -> [B, T, N, H].
  """
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return jax.nn.dot_product_attention(
      q,
      k,
      v,
      mask=same[:, None],
      scale=scale,
      is_causal=True,
      local_window_size=None if window is None else (window - 1, 0),
      implementation=implementation,
  )
