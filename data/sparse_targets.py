"""Sparse targets from a teacher's full distribution, on the device.

What the logit cache stores per position (``data.cache_format`` encodes it),
computed from log-probabilities [B, T, V] at the cache's temperature:

- ``topk_targets``: the k most likely ids, their log-probs, and the tail mass
  1 - sum p over them;
- ``sample_targets``: n i.i.d. (or stratified) draws by inverse-CDF sampling,
  as unique ids and counts;
- ``topk_tail_targets``: the top k, plus m draws from the rest.

The ``*_at`` forms take the uniforms of the draws instead of a key, so a pass
over chunks of positions makes exactly the targets of a pass over the row.

``topk_from_log_probs`` and ``sample_from_log_probs`` are numpy references.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def topk_from_log_probs(log_probs: np.ndarray, k: int):
  """Numpy reference. log_probs [L, V] -> ids [L, k] int32 (descending, ties by
  lower id), log_probs [L, k] float32, tail [L] float32 = 1 - sum p_topk (float64).
  """
  lp = np.asarray(log_probs)
  ids = np.argsort(-lp, axis=-1, kind="stable")[:, :k]
  vals = np.take_along_axis(lp, ids, -1)
  tail = np.clip(1.0 - np.exp(vals.astype(np.float64)).sum(-1), 0.0, 1.0)
  return ids.astype(np.int32), vals.astype(np.float32), tail.astype(np.float32)


def sample_from_log_probs(
    rng: np.random.Generator, log_probs: np.ndarray, n: int
):
  """Numpy reference: n draws with replacement per position. log_probs [L, V] ->
  ids, counts [L, n] int32 (unique ids ascending, then padding id 0, count 0).
  """
  lp = np.asarray(log_probs, np.float64)
  ids = np.zeros((len(lp), n), np.int32)
  counts = np.zeros((len(lp), n), np.int32)
  for t, row in enumerate(lp):
    p = np.exp(row - row.max())
    drawn = rng.multinomial(n, p / p.sum())
    nz = np.flatnonzero(drawn)
    ids[t, : len(nz)], counts[t, : len(nz)] = nz, drawn[nz]
  return ids, counts


@functools.partial(jax.jit, static_argnames="k")
def topk_targets(log_probs: jax.Array, k: int):
  """log_probs [B, T, V] -> ids [B, T, k] int32, log_probs [B, T, k], tail [B, T].

  tail = 1 - sum p over the k ids, in float32 (absolute error ~1e-6, below the
  7.6e-6 storage step), clipped to [0, 1].
  """
  vals, ids = jax.lax.top_k(log_probs.astype(jnp.float32), k)
  tail = jnp.clip(1.0 - jnp.sum(jnp.exp(vals), axis=-1), 0.0, 1.0)
  return ids.astype(jnp.int32), vals, tail


def _unique_counts(sorted_ids: jax.Array):
  """[n] ascending ids -> unique ids [n] (padding 0) and their counts [n] (padding 0)."""
  n = sorted_ids.shape[0]
  new = jnp.concatenate(
      [jnp.ones((1,), bool), sorted_ids[1:] != sorted_ids[:-1]]
  )
  rank = jnp.cumsum(new) - 1
  ids = jnp.zeros((n,), jnp.int32).at[rank].max(sorted_ids)
  counts = jnp.zeros((n,), jnp.int32).at[rank].add(1)
  return ids, counts


@functools.partial(jax.jit, static_argnames=("k", "m", "stratified"))
def topk_tail_targets(
    key: jax.Array,
    log_probs: jax.Array,
    k: int,
    m: int,
    stratified: bool = False,
):
  """The top k ids as ``topk_targets`` makes them, and m draws from the
  teacher restricted to the other ids (its tail, renormalised).

  log_probs [B, T, V] -> ids [B, T, k], log_probs [B, T, k], tail [B, T],
  tail_ids / tail_counts [B, T, m] (as ``sample_targets``). Where the tail
  holds no probability (tail == 0) the draws are meaningless and carry no
  weight in the loss.
  """
  uniforms = jax.random.uniform(key, (*log_probs.shape[:-1], m))
  return topk_tail_targets_at(uniforms, log_probs, k, stratified)


@functools.partial(jax.jit, static_argnames=("k", "stratified"))
def topk_tail_targets_at(
    uniforms: jax.Array, log_probs: jax.Array, k: int, stratified: bool = False
):
  """``topk_tail_targets`` with its uniforms given ([B, T, m] in [0, 1)), so
  that a pass over chunks of positions draws what one pass over the whole
  row draws."""
  ids, vals, tail = topk_targets(log_probs, k)
  rest = jnp.put_along_axis(
      log_probs.astype(jnp.float32), ids, -jnp.inf, axis=-1, inplace=False
  )
  tail_ids, tail_counts = sample_targets_at(uniforms, rest, stratified)
  return ids, vals, tail, tail_ids, tail_counts


@functools.partial(jax.jit, static_argnames=("n", "stratified"))
def sample_targets(
    key: jax.Array, log_probs: jax.Array, n: int, stratified: bool = False
):
  """n draws per position by inverse-CDF sampling (one cumsum, n binary searches).

  log_probs [B, T, V] -> ids [B, T, n] int32 (unique ids ascending, then
  padding 0) and counts [B, T, n] int32 (summing to n; padding 0). Draws are
  i.i.d. by default; `stratified=True` puts one uniform in each [i/n, (i+1)/n)
  (still unbiased, lower variance). float32 CDF: each id's probability is
  resolved to about 2^-24; zero-probability ids are never drawn.
  """
  uniforms = jax.random.uniform(key, (*log_probs.shape[:-1], n))
  return sample_targets_at(uniforms, log_probs, stratified)


@functools.partial(jax.jit, static_argnames=("stratified",))
def sample_targets_at(
    uniforms: jax.Array, log_probs: jax.Array, stratified: bool = False
):
  """``sample_targets`` with its uniforms given: [B, T, n] in [0, 1), one
  per draw (the draws of a chunk of positions are a slice of the row's)."""
  p = jnp.exp(log_probs.astype(jnp.float32))
  cdf = jnp.cumsum(p, axis=-1)
  n = uniforms.shape[-1]
  u = (jnp.arange(n) + uniforms) / n if stratified else jnp.sort(uniforms, -1)
  x = u * cdf[..., -1:]
  search = jnp.vectorize(
      lambda c, v: jnp.searchsorted(c, v, side="right"),
      signature="(v),(n)->(n)",
  )
  idx = search(cdf, x)
  last_positive = p.shape[-1] - 1 - jnp.argmax(jnp.flip(p > 0, -1), axis=-1)
  idx = jnp.minimum(idx, last_positive[..., None]).astype(jnp.int32)
  return jnp.vectorize(_unique_counts, signature="(n)->(n),(n)")(idx)
