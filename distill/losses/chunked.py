"""A per-token loss over sequence chunks, never holding [B, T, V] logits.

Full-vocabulary logits do not fit in memory at V = 150k-262k; ``chunked_loss``
computes any per-token loss chunk by chunk, so only one [B, C, V] chunk of
logits exists at a time. Its gradient is made in the same pass: each chunk's
logits are used once for the loss and for its gradients with respect to the
hidden states and the head's parameters, and the backward pass only scales
what the forward pass kept. That is three products with the head per token
(the logits, the hidden states' gradient, the head's gradient), where
differentiating a rematerialised chunk costs four (the logits again).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp


def chunked_loss(
    hidden: jax.Array,
    logits_fn: Callable[[jax.Array], jax.Array],
    per_token_loss_fn: Callable[[jax.Array, Any], jax.Array],
    targets: Any,
    mask: jax.Array,
    chunk_size: int,
) -> jax.Array:
  """Masked mean of a per-token loss, never holding all [B, T, V] logits.

  hidden [B, T, D]; logits_fn: hidden chunk [B, C, D] -> logits [B, C, V]
  (close over the head weights; gradients w.r.t. them flow through);
  per_token_loss_fn(logits [B, C, V], targets_chunk) -> [B, C]; targets: a
  pytree of [B, T, ...] arrays, sliced along T like hidden; mask [B, T].

  A lax.scan over T / chunk_size chunks. Differentiated, each chunk computes
  its loss and its gradients together (see the module's docstring); the
  targets, the mask and whatever ``per_token_loss_fn`` closes over (a
  teacher, a temperature) get no gradient: they are the data, or held fixed.
  T need not divide chunk_size: the last chunk is padded (hidden with zeros,
  targets by repeating the last position, which keeps them valid) and the
  padding is masked out. Same value and gradients as
  `masked_mean(per_token_loss_fn(logits_fn(hidden), targets), mask)`.
  """
  batch, length = hidden.shape[:2]
  size = max(1, min(int(chunk_size), length))
  num = -(-length // size)
  pad = num * size - length

  def split(x, mode):  # [B, T, ...] -> [num, B, C, ...]
    widths = [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
    x = jnp.pad(x, widths, mode=mode) if pad else x
    return jnp.moveaxis(x.reshape(batch, num, size, *x.shape[2:]), 1, 0)

  weights = mask.astype(jnp.float32)
  chunks = split(hidden, "constant")
  # The head's parameters become explicit arguments, so that the gradient
  # made in the forward pass can be handed back to them.
  head, params = jax.closure_convert(logits_fn, chunks[0])
  total = _summed(
      head,
      per_token_loss_fn,
      chunks,
      jax.tree.map(lambda x: split(jnp.asarray(x), "edge"), targets),
      split(weights, "constant"),
      tuple(params),
  )
  count = jnp.sum(weights)
  return total / jnp.where(count != 0, count, 1.0)


def _chunk_total(head, per_token, h, t, w, params):
  loss = per_token(head(h, *params), t)
  return jnp.sum(jnp.where(w != 0, loss, 0.0) * w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _summed(head, per_token, hidden, targets, weights, params):
  """The weighted loss summed over the chunks [num, B, C, ...]."""

  def body(total, x):
    h, t, w = x
    return total + _chunk_total(head, per_token, h, t, w, params), None

  xs = (hidden, targets, weights)
  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
  return total


def _summed_fwd(head, per_token, hidden, targets, weights, params):
  """The sum and its gradients, a chunk's logits made once for both."""

  def body(carry, x):
    total, d_params = carry
    h, t, w = x
    value, vjp = jax.vjp(
        lambda h, p: _chunk_total(head, per_token, h, t, w, p), h, params
    )
    d_h, d_p = vjp(jnp.ones_like(value))
    d_params = jax.tree.map(
        lambda a, b: a + b.astype(jnp.float32), d_params, d_p
    )
    return (total + value, d_params), d_h

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  init = (jnp.zeros((), jnp.float32), zeros)
  xs = (hidden, targets, weights)
  (total, d_params), d_hidden = jax.lax.scan(body, init, xs)
  d_params = jax.tree.map(lambda g, p: g.astype(p.dtype), d_params, params)
  return total, (d_hidden, d_params)


def _summed_bwd(head, per_token, residuals, g):
  del head, per_token
  d_hidden, d_params = residuals
  scale = lambda x: (g * x).astype(x.dtype)
  # None: no gradient for the targets and the weights.
  return scale(d_hidden), None, None, jax.tree.map(scale, d_params)


_summed.defvjp(_summed_fwd, _summed_bwd)
