"""Validation metrics on the held-out split: the training-time eval hook.

For a model alone: cross-entropy (nats/token) and perplexity. With a teacher:
also KL(teacher || model) over the full vocabulary and top-1 agreement with
the teacher. Everything is computed over sequence chunks (``chunk_size``) so
no [B, T, V] tensor is held at once, and summed over tokens before dividing,
so batches of different sizes weigh by their tokens.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data import pipeline
from distill import losses


def _sums(model, teacher, batch, chunk_size):
  x = pipeline.model_inputs(batch)
  mask = x["mask"]
  count = jnp.sum(mask.astype(jnp.float32))
  hidden, _ = model.hidden(x["inputs"], x["segment_ids"], x["positions"])
  def total(per_token, targets):
    mean = losses.chunked_loss(hidden, model.logits_from_hidden, per_token,
                               targets, mask, chunk_size)
    return mean * count
  out = {"count": count,
         "ce": total(losses.cross_entropy_per_token, x["labels"])}
  if teacher is not None:
    t_hidden, _ = teacher.hidden(x["inputs"], x["segment_ids"], x["positions"])
    def kl(logits, t_h):
      return losses.dense_kd_per_token(logits, teacher.logits_from_hidden(t_h))
    def agree(logits, t_h):
      t_logits = teacher.logits_from_hidden(t_h)
      return (jnp.argmax(logits, -1) == jnp.argmax(t_logits, -1)).astype(jnp.float32)
    out["kl_to_teacher"] = total(kl, t_hidden)
    out["top1_agreement"] = total(agree, t_hidden)
  return out


def make_validation_fn(data_dir: str, *, seq_len: int, batch_size: int,
                       max_batches: int, chunk_size: int,
                       teacher: nnx.Module | None = None
                       ) -> Callable[[nnx.Module, int], dict[str, float]]:
  """``fn(model, step) -> metrics`` over the first ``max_batches`` batches.

  ``max_batches=0`` uses the whole validation split.
  """
  with_teacher = nnx.jit(lambda m, t, b: _sums(m, t, b, chunk_size))
  alone = nnx.jit(lambda m, b: _sums(m, None, b, chunk_size))

  def fn(model: nnx.Module, step: int = 0) -> dict[str, float]:
    del step
    ds = pipeline.make_dataset(data_dir, "validation", seq_len=seq_len,
                               batch_size=batch_size, shuffle=False,
                               num_epochs=1, drop_remainder=True)
    totals: dict[str, float] = {}
    for i, batch in enumerate(ds):
      if max_batches and i >= max_batches:
        break
      sums = with_teacher(model, teacher, batch) if teacher is not None else alone(model, batch)
      for key, value in jax.device_get(sums).items():
        totals[key] = totals.get(key, 0.0) + float(value)
    if not totals:
      raise ValueError(
          f"The validation split under {data_dir} has no full batch of"
          f" {batch_size} rows of {seq_len + 1} tokens; lower the batch size.")
    count = max(totals.pop("count"), 1.0)
    metrics = {("loss" if k == "ce" else k): v / count for k, v in totals.items()}
    metrics["perplexity"] = float(np.exp(min(metrics["loss"], 50.0)))
    metrics["tokens"] = count
    return metrics
  return fn
