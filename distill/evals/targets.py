"""What each cached target keeps of the teacher: figures that explain why a
method wins or loses.

Per position, from the teacher's full distribution p (at the cache's
temperature) and the target a method makes of it (the targets are the ones
``data.cache_format`` makes, before the cache's quantisation):

- ``teacher_entropy``: H(p), nats;
- ``topk_coverage`` / ``topk_tail_coverage``: the mass p puts on the top-k
  ids (the head of ``topk_tail``);
- ``sample_unique`` / ``topk_tail_unique``: distinct ids among the N draws
  (the M tail draws);
- ``<method>_kl``: KL(t || p), how far the decoded target t is from the
  teacher (0: exact). ``topk`` renormalised (``topk_sparse``'s target):
  -log coverage. ``sample``: t = counts / N on the drawn ids.
  ``topk_tail``: the head exactly, and ``tail x counts / M`` on the drawn
  tail ids. (``topk_ghost``'s target is exact on its k + 1 classes, the
  tail lumped into one: 0 there; what it loses is the tail's shape.)
- ``<method>_missing``: the teacher's mass on ids the target gives no
  probability (for top-k: the tail).

All are means over real (non-padding) positions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data import pipeline, sparse_targets
from distill.core import sharding
from distill.evals import metrics


def _xlogy_ratio(t, log_p):
  """sum t * (log t - log_p) over the last axis, t == 0 counting 0."""
  safe = jnp.where(t > 0, t, 1.0)
  return jnp.sum(jnp.where(t > 0, t * (jnp.log(safe) - log_p), 0.0), -1)


def _mass(log_p, ids, weights):
  """Teacher mass on the ids where weights > 0: [..., V], [..., W] -> [...]."""
  p = jnp.exp(jnp.take_along_axis(log_p, ids, -1))
  return jnp.sum(jnp.where(weights > 0, p, 0.0), -1)


@functools.partial(
    jax.jit, static_argnames=("methods", "k", "n", "tail_k", "m")
)
def target_sums(
    key, log_p, mask, *, methods, k: int, n: int, tail_k: int, m: int
):
  """Sums over the real positions of every figure above, and their count.

  log_p [B, T, V] teacher log-probs at the cache temperature, mask [B, T]
  (True = a real position). -> {name: scalar sum} with "count".
  """
  log_p = log_p.astype(jnp.float32)
  w = mask.astype(jnp.float32)
  total = lambda x: jnp.sum(x * w)
  p = jnp.exp(log_p)
  out = {
      "count": jnp.sum(w),
      "teacher_entropy": total(-jnp.sum(jnp.where(p > 0, p * log_p, 0.0), -1)),
  }
  if "topk" in methods:
    _, _, tail = sparse_targets.topk_targets(log_p, k)
    coverage = 1.0 - tail
    out["topk_coverage"] = total(coverage)
    out["topk_kl"] = total(-jnp.log(jnp.maximum(coverage, 1e-30)))
    out["topk_missing"] = total(tail)
  if "sample" in methods:
    ids, counts = sparse_targets.sample_targets(key, log_p, n)
    t = counts / n
    out["sample_unique"] = total(jnp.sum(counts > 0, -1).astype(jnp.float32))
    out["sample_kl"] = total(
        _xlogy_ratio(t, jnp.take_along_axis(log_p, ids, -1))
    )
    out["sample_missing"] = total(1.0 - _mass(log_p, ids, counts))
  if "topk_tail" in methods:
    head_ids, head_lp, tail, t_ids, t_counts = sparse_targets.topk_tail_targets(
        jax.random.fold_in(key, 1), log_p, tail_k, m
    )
    del head_ids, head_lp  # exact: no KL, no missing mass on the head
    t = tail[..., None] * t_counts / m
    out["topk_tail_coverage"] = total(1.0 - tail)
    out["topk_tail_unique"] = total(
        jnp.sum(t_counts > 0, -1).astype(jnp.float32)
    )
    out["topk_tail_kl"] = total(
        _xlogy_ratio(t, jnp.take_along_axis(log_p, t_ids, -1))
    )
    out["topk_tail_missing"] = total(
        jnp.maximum(tail - _mass(log_p, t_ids, t_counts), 0.0)
    )
  return out


def means(sums: dict) -> dict[str, float]:
  """Per-position means of summed ``target_sums``."""
  count = max(float(sums["count"]), 1.0)
  return {
      name: float(value) / count
      for name, value in sums.items()
      if name != "count"
  }


@functools.partial(nnx.jit, graph_updates=False)
def _teacher_log_probs(teacher, batch, temperature):
  x = pipeline.model_inputs(batch)
  logits = teacher.logits_from_hidden(metrics.hidden_of(teacher, x))
  return jax.nn.log_softmax(logits / temperature, axis=-1), x["mask"]


def target_figures(
    teacher: nnx.Module,
    data_dir: str,
    manifest: dict,
    *,
    batch_size: int,
    max_batches: int,
    seed: int = 0,
) -> dict[str, float]:
  """The figures above for the cache's methods and sizes (``manifest``),
  over the first ``max_batches`` batches of the shuffled validation split
  (the rows ``validation_pass`` reads first)."""
  ds = pipeline.make_dataset(
      data_dir,
      "validation",
      seq_len=manifest["seq_len"],
      batch_size=batch_size,
      shuffle=True,
      seed=0,
      num_epochs=1,
      drop_remainder=True,
  )
  settings = dict(
      methods=tuple(sorted(manifest["methods"])),
      k=manifest.get("k") or 1,
      n=manifest.get("num_samples") or 1,
      tail_k=manifest.get("tail_k") or 1,
      m=manifest.get("tail_samples") or 1,
  )
  mesh = sharding.active()
  totals = None
  for i, batch in enumerate(ds):
    if i >= max_batches:
      break
    if mesh is not None:
      batch = sharding.put_batch(batch, mesh)
    log_p, mask = _teacher_log_probs(
        teacher, batch, jnp.float32(manifest["temperature"])
    )
    sums = jax.device_get(
        target_sums(
            jax.random.fold_in(jax.random.key(seed), i),
            log_p,
            mask,
            **settings,
        )
    )
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  return {} if totals is None else means(totals)
