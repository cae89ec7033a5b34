"""The one set of layers both models are built from (Flax NNX).

Letters in einsum strings and shapes:

    B batch            T query positions     S key/value positions
    D d_model          N query heads         K key/value heads
    G N // K (query heads per kv head)       H head_dim
    F MLP hidden       V vocabulary

Parameters are float32 by default (``param_dtype``); ``dtype`` is the compute
dtype (None: the promoted dtype of the input and the parameter). Norms, RoPE
and softmax always compute in float32. Parameter shapes keep one axis per
logical dimension, and each parameter carries the logical names of its axes
(``nnx.Param(..., logical_axes=...)`` metadata, which optimizer states
inherit) that ``distill.core.sharding.RULES`` maps onto a device mesh:

    Embed.embedding [V, D]  (vocab, embed)
    Unembed.kernel  [D, V]  (embed, vocab)
    q_proj.kernel   [D, N, H] (embed, heads, -)     bias [N, H] (heads, -)
    k/v_proj.kernel [D, K, H] (embed, kv_heads, -)  bias [K, H] (kv_heads, -)
    o_proj.kernel   [N, H, D] (heads, -, embed)
    gate/up kernel  [D, F]  (embed, mlp)      down kernel [F, D] (mlp, embed)
    RMSNorm.scale   [dim]   (-)

Attention, RoPE and the KV cache are in ``distill.nn.attention``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from distill.core import sharding

Dtype = Any  # a jnp dtype or a name such as "bfloat16"


def param(value: jax.Array, *names: str | None) -> nnx.Param:
  """A parameter whose axes have the logical names ``names`` (one per axis;
  none: replicated). Placement happens later, by the mesh's rules."""
  if names and len(names) != value.ndim:
    raise ValueError(f"{len(names)} axis names for a {value.ndim}-d parameter")
  # Not flax's own ``sharding_names``: flax would apply those itself (at
  # creation and in ``nnx.eval_shape``) without our rules' fallback for
  # dimensions a mesh axis does not divide.
  return nnx.Param(value, logical_axes=tuple(names))


def is_quantized(value) -> bool:
  """A weight that post-training quantisation (``student.quantize``, Qwix)
  replaced: not an array but a wrapper of one, read by Qwix's own einsum."""
  return not isinstance(value, jax.Array) and hasattr(value, "array")


def _dtype(dtype: Dtype | None):
  return None if dtype is None else jnp.dtype(dtype)


def _operands(dtype, x: jax.Array, weight) -> tuple[Any, jax.Array, Any]:
  """(compute dtype, x, weight) of a matmul, both operands in that dtype.

  A Qwix-quantised weight (``is_quantized``) is left as it is, for Qwix's
  einsum to dequantise; the compute dtype is then the layer's or x's.
  """
  if is_quantized(weight):
    dtype = dtype if dtype is not None else x.dtype
    return dtype, x.astype(dtype), weight
  dtype = dtype if dtype is not None else jnp.result_type(x, weight)
  return dtype, x.astype(dtype), weight.astype(dtype)


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
  ``axes`` names the kernel's axes (see the module docstring); the bias takes
  the names of the kernel's last ``len(bias_shape)`` axes.
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
      axes: Sequence[str | None] = (),
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
    axes = tuple(axes)
    self.kernel = param(
        init(rngs.params(), tuple(kernel_shape), jnp.dtype(param_dtype)), *axes
    )
    if bias_shape is not None:
      bias_axes = axes[len(axes) - len(bias_shape) :] if axes else ()
      self.bias = param(jnp.zeros(tuple(bias_shape), param_dtype), *bias_axes)
    else:
      self.bias = None

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype, x, kernel = _operands(self.dtype, x, self.kernel[...])
    y = jnp.einsum(self.eqn, x, kernel)
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
    self.scale = param(init((dim,), param_dtype))

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
    self.gate_proj = proj(
        "...D,DF->...F", (d_model, d_ff), axes=("embed", "mlp")
    )
    self.up_proj = proj("...D,DF->...F", (d_model, d_ff), axes=("embed", "mlp"))
    self.down_proj = proj(
        "...F,FD->...D", (d_ff, d_model), axes=("mlp", "embed")
    )

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
    self.embedding = param(
        std
        * jax.random.normal(rngs.params(), (vocab_size, d_model), param_dtype),
        "vocab",
        "embed",
    )

  def __call__(self, tokens: jax.Array) -> jax.Array:
    table = self.embedding[...]
    if is_quantized(table):  # the rows' codes and scales, then dequantised
      out = _take_quantized(table.array, tokens)
    else:
      out = jnp.take(table, tokens, axis=0)
    return out.astype(self.dtype) if self.dtype is not None else out

  def attend(self, h: jax.Array) -> jax.Array:
    _, h, table = _operands(self.dtype, h, self.embedding[...])
    logits = jnp.einsum(
        "BTD,VD->BTV",
        h,
        table,
        preferred_element_type=jnp.float32,
    ).astype(jnp.float32)
    return sharding.constrain(logits, "batch", None, "vocab")


def _take_quantized(qarray, tokens: jax.Array) -> jax.Array:
  """Rows ``tokens`` of a Qwix-quantised [V, D] table, dequantised."""
  # Imported only for a quantised table (Qwix is a dependency of student
  # quantisation, not of the layers).
  import qwix  # pylint: disable=import-outside-toplevel

  take = lambda a: None if a is None else jnp.take(a, tokens, axis=0)
  rows = dataclasses.replace(
      qarray,
      qvalue=take(qarray.qvalue),
      scale=take(qarray.scale),
      zero_point=take(qarray.zero_point),
  )
  return qwix.dequantize(rows)


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
    self.kernel = param(
        init(rngs.params(), (d_model, vocab_size), jnp.dtype(param_dtype)),
        "embed",
        "vocab",
    )

  def __call__(self, h: jax.Array) -> jax.Array:
    _, h, kernel = _operands(self.dtype, h, self.kernel[...])
    logits = jnp.einsum(
        "BTD,DV->BTV",
        h,
        kernel,
        preferred_element_type=jnp.float32,
    )
    return sharding.constrain(logits, "batch", None, "vocab")


def softcap(logits: jax.Array, cap: float | None) -> jax.Array:
  """``cap * tanh(logits / cap)``; identity when cap is None."""
  return logits if cap is None else cap * jnp.tanh(logits / cap)


def count_params(module: nnx.Module) -> int:
  """Number of parameters (works on abstract modules from ``nnx.eval_shape``)."""
  leaves = jax.tree.leaves(nnx.state(module, nnx.Param))
  return int(sum(math.prod(leaf.shape) for leaf in leaves))
