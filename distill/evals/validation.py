"""One pass over the held-out split: the eval hook and the evaluate stage.

For each model: cross-entropy (nats/token), bits per byte (the same loss
over the UTF-8 bytes the predicted tokens stand for, in bits: models with
different tokenizers compare on it), perplexity, top-1 expected
calibration error and cross-entropy by position in the document
(``loss_by_position``, buckets of ``metrics.POSITION_EDGES``); with a
teacher also KL(teacher || model) over the full vocabulary and top-1
agreement with the teacher. The sums come from
``metrics.token_sums`` (sequence chunks, never a whole [B, T, V] tensor) and
are divided by the token count at the end, so batches weigh by their tokens.

``validation_pass`` evaluates several models on the same batches and runs the
teacher's forward once per batch for all of them (it is usually the most
expensive model there); ``make_validation_fn`` is the training-time hook for
one model.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data import pipeline
from distill.core import sharding
from distill.evals import metrics


def summarize(totals: dict) -> dict[str, float]:
  """Per-token metrics from summed ``token_sums`` (numpy, summed over batches)."""
  count = max(float(totals["count"]), 1.0)
  out = {
      "loss": float(totals["ce"]) / count,
      "tokens": float(totals["count"]),
      "ece": metrics.expected_calibration_error(totals["bins"]),
  }
  out["perplexity"] = float(np.exp(min(out["loss"], 50.0)))
  if float(totals.get("bytes", 0)) > 0:
    out["bytes"] = float(totals["bytes"])
    out["bits_per_byte"] = float(totals["ce"]) / (np.log(2) * out["bytes"])
  if "by_position" in totals:  # loss per position bucket that has tokens
    ce, counts = (np.asarray(totals["by_position"][k]) for k in ("ce", "count"))
    labels = metrics.position_labels()
    out["loss_by_position"] = {
        label: float(c / n) for label, c, n in zip(labels, ce, counts) if n
    }
    out["tokens_by_position"] = {
        label: float(n) for label, n in zip(labels, counts) if n
    }
  for key in ("kl_to_teacher", "top1_agreement"):
    if key in totals:
      out[key] = float(totals[key]) / count
  return out


@functools.partial(
    nnx.jit, static_argnames=("chunk_size", "num_bins"), graph_updates=False
)
def scores(
    model,
    teacher,
    batch,
    t_hidden,
    hidden,
    byte_lengths=None,
    *,
    chunk_size: int,
    num_bins: int,
):
  """token_sums of one batch; teacher None: the model alone.
  ``byte_lengths`` [V] (``data.token_bytes``): also the ``bytes`` the
  predicted tokens stand for."""
  inputs = pipeline.model_inputs(batch)
  sums = metrics.token_sums(
      model,
      teacher,
      inputs,
      chunk_size,
      num_bins,
      teacher_hidden=t_hidden,
      hidden=hidden,
  )
  if byte_lengths is not None:
    sums["bytes"] = metrics.label_bytes(inputs, byte_lengths)
  return sums


@functools.partial(nnx.jit, graph_updates=False)
def _hidden(model, batch):
  return metrics.hidden_of(model, pipeline.model_inputs(batch))


def validation_pass(
    models: dict[str, nnx.Module],
    teacher: nnx.Module | None,
    data_dir: str,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int,
    chunk_size: int,
    num_bins: int = 15,
    progress: Callable | None = None,
    byte_lengths: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
  """``{name: metrics}`` of every model over the first ``max_batches`` batches.

  A model that *is* ``teacher`` is scored alone (no KL to itself); the others
  against the teacher when there is one. Rows are shuffled with a fixed seed,
  so ``max_batches`` takes a sample of the whole split; 0: all of it.
  ``progress(batch_index)`` is called after each batch. ``byte_lengths``
  [V] (``data.token_bytes.byte_lengths`` of the tokenizer): bits per byte
  too. On the active mesh
  (``distill.core.sharding.use``) each process reads its rows of every batch
  and the batch is split over the mesh like a training batch.
  """
  sizes = dict(chunk_size=chunk_size, num_bins=num_bins)
  # Shuffled with a fixed seed: every model and every call sees the same
  # rows, and a capped pass is a sample of the whole split, not its first
  # files.
  ds = pipeline.make_dataset(
      data_dir,
      "validation",
      seq_len=seq_len,
      batch_size=batch_size,
      shuffle=True,
      seed=0,
      num_epochs=1,
      drop_remainder=True,
  )
  mesh = sharding.active()
  table = None if byte_lengths is None else jnp.asarray(byte_lengths)
  totals: dict[str, dict] = {}
  for i, batch in enumerate(ds):
    if max_batches and i >= max_batches:
      break
    if mesh is not None:  # this process's rows -> the global batch
      batch = sharding.put_batch(batch, mesh)
    t_hidden = None if teacher is None else _hidden(teacher, batch)
    for name, model in models.items():
      if teacher is None:
        sums = scores(model, None, batch, None, None, table, **sizes)
      elif model is teacher:  # scored alone, from the pass already made
        sums = scores(model, None, batch, None, t_hidden, table, **sizes)
      else:
        sums = scores(model, teacher, batch, t_hidden, None, table, **sizes)
      sums = jax.device_get(sums)
      totals[name] = (
          sums
          if name not in totals
          else jax.tree.map(np.add, totals[name], sums)
      )
    if progress is not None:
      progress(i)
  if not totals:
    raise ValueError(
        f"The validation split under {data_dir} has no full batch of"
        f" {batch_size} rows of {seq_len + 1} tokens; lower the batch size."
    )
  return {name: summarize(t) for name, t in totals.items()}


def make_validation_fn(
    data_dir: str,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int,
    chunk_size: int,
    teacher: nnx.Module | None = None,
    num_bins: int = 15,
    byte_lengths: np.ndarray | None = None,
) -> Callable[[nnx.Module, int], dict[str, float]]:
  """``fn(model, step) -> metrics`` over the first ``max_batches`` batches.

  ``max_batches=0`` uses the whole validation split.
  """

  def fn(model: nnx.Module, step: int = 0) -> dict[str, float]:
    del step
    return validation_pass(
        {"model": model},
        teacher,
        data_dir,
        seq_len=seq_len,
        batch_size=batch_size,
        max_batches=max_batches,
        chunk_size=chunk_size,
        num_bins=num_bins,
        byte_lengths=byte_lengths,
    )["model"]

  return fn
