"""Evaluation metrics: pure functions, and a chunked accumulator for them.

- ``calibration_bins`` / ``expected_calibration_error``: top-1 ECE from
  per-bin sums, which add up across chunks and batches.
- ``kv_cache_bytes_per_token``: what a model's KV cache costs per token of
  context, from its layer kinds (a sliding-window layer holds at most
  ``window`` positions).
- ``token_sums``: one pass over the validation tokens in sequence chunks
  (never a whole [B, T, V] tensor) that returns the sums every metric here
  needs: cross-entropy, KL to a teacher, top-1 agreement and calibration bins,
  and cross-entropy by position bucket (``POSITION_EDGES``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from distill.losses import terms as losses

DEFAULT_CONTEXTS = (1024, 8192, 32768, 131072)
#: Left edges of the position buckets of ``token_sums``: [0, 512), [512,
#: 2k), [2k, 8k), [8k, 32k), [32k, ...). A token's position is how many
#: tokens of its own document precede it in the row: the context it is
#: predicted from.
POSITION_EDGES = (0, 512, 2048, 8192, 32768)


def position_labels(edges=POSITION_EDGES) -> list[str]:
  """``["0-512", "512-2k", ..., "32k+"]``: the buckets' names in reports."""
  short = lambda n: f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)
  ends = [short(e) for e in edges]
  return [f"{a}-{b}" for a, b in zip(ends, ends[1:])] + [f"{ends[-1]}+"]


def position_buckets(positions: jax.Array, edges=POSITION_EDGES) -> jax.Array:
  """The bucket index of each position (int32, same shape)."""
  index = jnp.searchsorted(jnp.asarray(edges), positions, side="right") - 1
  return index.astype(jnp.int32)


def calibration_bins(
    confidence: jax.Array, correct: jax.Array, weight: jax.Array, num_bins: int
) -> dict[str, jax.Array]:
  """Per-bin sums of weight, confidence and correctness ([num_bins] each).

  Bins split [0, 1] evenly; confidence 1.0 falls in the last bin.
  """
  index = jnp.clip((confidence * num_bins).astype(jnp.int32), 0, num_bins - 1)
  weight = weight.astype(jnp.float32)

  def total(values):
    return (
        jnp.zeros(num_bins, jnp.float32)
        .at[index.ravel()]
        .add((values * weight).ravel())
    )

  return {
      "count": total(jnp.ones_like(confidence)),
      "confidence": total(confidence.astype(jnp.float32)),
      "correct": total(correct.astype(jnp.float32)),
  }


def expected_calibration_error(bins: dict[str, Any]) -> float:
  """ECE = sum_b (n_b / n) |accuracy_b - confidence_b| from calibration_bins."""
  count = np.asarray(bins["count"], np.float64)
  n = count.sum()
  if n == 0:
    return float("nan")
  gap = np.abs(
      np.asarray(bins["correct"], np.float64)
      - np.asarray(bins["confidence"], np.float64)
  )
  return float(gap.sum() / n)  # sum_b |n_b acc_b - n_b conf_b| / n


def kv_cache_bytes_per_token(
    layer_kinds: tuple[str, ...],
    num_kv_heads: int,
    head_dim: int,
    window: int | None,
    context: int,
    bytes_per_value: int = 2,
) -> float:
  """Bytes of K and V cache per token when ``context`` tokens are cached.

  Global layers store every position; local (sliding-window) layers at most
  ``window``. ``bytes_per_value=2`` is a bfloat16 cache, the usual choice when
  serving.
  """
  per_position = 2 * num_kv_heads * head_dim * bytes_per_value  # K and V
  total = 0
  for kind in layer_kinds:
    if kind == "global" or window is None:
      kept = context
    elif kind == "local":
      kept = min(context, window)
    else:
      raise ValueError(f"unknown layer kind {kind!r}")
    total += kept * per_position
  return total / context


def model_kv_bytes(config, contexts=DEFAULT_CONTEXTS) -> dict[str, float]:
  """``kv_cache_bytes_per_token`` of a student or teacher config per context."""
  if hasattr(config, "layer_kinds"):  # The student: pattern of local/global.
    kinds, window = tuple(config.layer_kinds), config.window
  else:  # The teacher: every layer global, or every layer sliding.
    window = config.sliding_window
    kinds = ("local" if window else "global",) * config.num_layers
  return {
      str(c): kv_cache_bytes_per_token(
          kinds, config.num_kv_heads, config.head_dim, window, c
      )
      for c in contexts
  }


def hidden_of(model, inputs: dict[str, jax.Array]) -> jax.Array:
  """The model's final hidden states [B, T, D] for ``model_inputs(batch)``."""
  hidden, _ = model.hidden(
      inputs["inputs"], inputs["segment_ids"], inputs["positions"]
  )
  return hidden


def label_bytes(inputs: dict[str, jax.Array], byte_lengths) -> jax.Array:
  """How many bytes of text the predicted labels stand for (float32 sum;
  ``byte_lengths`` [V], ``data.token_bytes.byte_lengths``)."""
  size = jnp.take(jnp.asarray(byte_lengths), inputs["labels"], mode="clip")
  return jnp.sum(jnp.where(inputs["mask"], size, 0).astype(jnp.float32))


def token_sums(
    model,
    teacher,
    inputs: dict[str, jax.Array],
    chunk_size: int,
    num_bins: int,
    teacher_hidden: jax.Array | None = None,
    hidden: jax.Array | None = None,
) -> dict[str, Any]:
  """Sums over the valid tokens of one batch (see module doc).

  ``inputs`` is ``data.pipeline.model_inputs(batch)``. Returns ``count``,
  ``ce``, ``bins`` (calibration), ``by_position`` ({"ce", "count"}: sums
  per ``POSITION_EDGES`` bucket of the inputs' positions; arange(T) when
  they are None) and, with a teacher, ``kl_to_teacher`` and
  ``top1_agreement`` (sums, to be divided by the total count).
  ``teacher_hidden``: the teacher's ``hidden_of`` these inputs, when the
  caller already has it (one teacher pass shared by several models);
  ``hidden`` likewise the model's own.
  """
  mask = inputs["mask"].astype(jnp.float32)
  hidden = hidden_of(model, inputs) if hidden is None else hidden
  t_hidden = None
  if teacher is not None:
    t_hidden = (
        hidden_of(teacher, inputs) if teacher_hidden is None else teacher_hidden
    )
  batch, length = mask.shape
  size = max(1, min(chunk_size, length))
  num = -(-length // size)
  pad = num * size - length

  def split(x):
    widths = [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
    x = jnp.pad(x, widths) if pad else x
    return jnp.moveaxis(x.reshape(batch, num, size, *x.shape[2:]), 1, 0)

  positions = inputs.get("positions")
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  xs = {
      "h": split(hidden),
      "labels": split(inputs["labels"]),
      "w": split(mask),
      "bucket": split(position_buckets(positions)),
  }
  if t_hidden is not None:
    xs["t"] = split(t_hidden)

  def body(carry, x):
    logits = model.logits_from_hidden(x["h"])
    log_q = jax.nn.log_softmax(logits, axis=-1)
    w = x["w"]
    ce = losses.cross_entropy_per_token(logits, x["labels"])
    prediction = jnp.argmax(logits, axis=-1)
    per_bucket = lambda values: (
        jnp.zeros(len(POSITION_EDGES), jnp.float32)
        .at[x["bucket"].ravel()]
        .add(values.ravel())
    )
    out = {
        "ce": jnp.sum(ce * w),
        "count": jnp.sum(w),
        "by_position": {"ce": per_bucket(ce * w), "count": per_bucket(w)},
        "bins": calibration_bins(
            jnp.exp(jnp.max(log_q, -1)), prediction == x["labels"], w, num_bins
        ),
    }
    if "t" in x:
      t_logits = teacher.logits_from_hidden(x["t"])
      out["kl_to_teacher"] = jnp.sum(
          losses.dense_kd_per_token(logits, t_logits) * w
      )
      out["top1_agreement"] = jnp.sum(
          (prediction == jnp.argmax(t_logits, -1)) * w
      )
    return jax.tree.map(jnp.add, carry, out), None

  zero = {
      "ce": 0.0,
      "count": 0.0,
      "by_position": {
          k: jnp.zeros(len(POSITION_EDGES)) for k in ("ce", "count")
      },
      "bins": {
          k: jnp.zeros(num_bins) for k in ("count", "confidence", "correct")
      },
  }
  if t_hidden is not None:
    zero.update(kl_to_teacher=0.0, top1_agreement=0.0)
  zero = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), zero)
  sums, _ = jax.lax.scan(body, zero, xs)
  return sums
