"""Cross-tokenizer distillation: approximate likelihood matching (ALM).

Minixhofer, Vulić and Ponti (2025), "Universal Cross-Tokenizer Distillation
via Approximate Likelihood Matching". A teacher and a student with different
tokenizers agree on the text, not on the tokens; ``data.align`` cuts each
row into chunks where both tokenizations have a boundary at the same byte,
and for each chunk both models give a likelihood of the same bytes from the
same prefix: the product of their token probabilities over the chunk. ALM
makes the student's chunk likelihood match the teacher's, chunk by chunk,
with a binary divergence between ``p_T = exp(log p_T(chunk) / tau)`` and
``p_S = exp(log p_S(chunk) / tau)``:

    KL(Bern(p_T) || Bern(p_S)) = p_T log(p_T / p_S)
                                 + (1 - p_T) log((1 - p_T) / (1 - p_S))

Only the teacher's likelihood of each label token is needed (the cache's
``label`` method, 4 bytes a position), not its distribution, so one cache
serves students of any tokenizer. With identical tokenizers every token is
its own chunk and ALM is the per-token binary divergence of the two
models' label probabilities.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

#: Chunk likelihoods are kept at most this close to 1 (log p <= -EPS), where
#: log(1 - p) is finite.
EPS = 1e-6


def _log1mexp(x: jax.Array) -> jax.Array:
  """log(1 - e^x) for x < 0, accurate at both ends."""
  return jnp.where(x > -0.6931, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def binary_kl(
    teacher_log_p: jax.Array, student_log_p: jax.Array, temperature=1.0
) -> jax.Array:
  """KL(Bern(p_T) || Bern(p_S)) of chunk log-likelihoods (elementwise),
  each divided by ``temperature`` first."""
  a = jnp.minimum(teacher_log_p / temperature, -EPS)
  b = jnp.minimum(student_log_p / temperature, -EPS)
  p = jnp.exp(a)
  return p * (a - b) + (1.0 - p) * (_log1mexp(a) - _log1mexp(b))


def label_log_probs(
    hidden: jax.Array,
    logits_fn: Callable[[jax.Array], jax.Array],
    labels: jax.Array,
    chunk_size: int,
) -> jax.Array:
  """[B, T] log p(label) under the model, never holding [B, T, V] logits:
  ``chunk_size`` positions at a time, each chunk's logits recomputed in
  the backward pass."""
  batch, length = labels.shape
  size = max(1, min(int(chunk_size), length))
  num = -(-length // size)
  pad = num * size - length
  hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
  labels = jnp.pad(labels, ((0, 0), (0, pad)))

  @jax.checkpoint
  def one(args):
    h, y = args
    log_q = jax.nn.log_softmax(logits_fn(h).astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_q, y[..., None], -1)[..., 0]

  split = lambda x: jnp.moveaxis(
      x.reshape(batch, num, size, *x.shape[2:]), 1, 0
  )
  out = jax.lax.map(one, (split(hidden), split(labels)))  # [num, B, size]
  return jnp.moveaxis(out, 0, 1).reshape(batch, num * size)[:, :length]


def chunk_log_likelihoods(
    token_log_p: jax.Array, chunk: jax.Array, num_chunks: int
) -> jax.Array:
  """[B, C]: each row's token log-probs summed per chunk (``chunk`` [B, T]
  int; ids >= C are dropped)."""
  return jax.vmap(
      lambda lp, c: jax.ops.segment_sum(lp, c, num_segments=num_chunks + 1)
  )(token_log_p, chunk)[:, :num_chunks]


def alm_loss(
    token_log_p: jax.Array,
    chunk: jax.Array,
    teacher_chunk_log_p: jax.Array,
    chunk_valid: jax.Array,
    temperature=1.0,
) -> tuple[jax.Array, jax.Array]:
  """Mean binary divergence over the valid chunks, and their count.

  token_log_p [B, T]: the student's log-prob of each label; chunk [B, T]:
  its chunk (>= C: none); teacher_chunk_log_p, chunk_valid [B, C].
  """
  num_chunks = teacher_chunk_log_p.shape[1]
  student = chunk_log_likelihoods(token_log_p, chunk, num_chunks)
  weight = chunk_valid.astype(jnp.float32)
  per_chunk = binary_kl(teacher_chunk_log_p, student, temperature)
  count = jnp.sum(weight)
  total = jnp.sum(jnp.where(chunk_valid, per_chunk, 0.0))
  return total / jnp.maximum(count, 1.0), count
