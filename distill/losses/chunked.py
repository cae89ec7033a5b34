"""A per-token loss over sequence chunks, never holding [B, T, V] logits.

Full-vocabulary logits do not fit in memory at V = 150k-262k; ``chunked_loss``
computes any per-token loss chunk by chunk with rematerialisation, so only one
[B, C, V] chunk of logits exists at a time, in the forward and the backward
pass.
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

  A lax.scan over T / chunk_size chunks whose body is wrapped in
  jax.checkpoint, so the backward pass recomputes each chunk's logits
  instead of storing them. T need not divide chunk_size: the last chunk is
  padded (hidden with zeros, targets by repeating the last position, which
  keeps them valid) and the padding is masked out. Same value and gradients
  as `masked_mean(per_token_loss_fn(logits_fn(hidden), targets), mask)`.
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
  xs = (
      split(hidden, "constant"),
      jax.tree.map(lambda x: split(jnp.asarray(x), "edge"), targets),
      split(weights, "constant"),
  )

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def chunk_total(h, t, w):
    loss = per_token_loss_fn(logits_fn(h), t)
    return jnp.sum(jnp.where(w != 0, loss, 0.0) * w)

  def body(total, x):
    return total + chunk_total(*x), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
  count = jnp.sum(weights)
  return total / jnp.where(count != 0, count, 1.0)
