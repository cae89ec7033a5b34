"""Evaluation metrics against direct computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import losses
from distill.evals import metrics, validation


def _ece(confidence, correct, bins=15):
  sums = metrics.calibration_bins(
      jnp.asarray(confidence),
      jnp.asarray(correct),
      jnp.ones_like(jnp.asarray(confidence)),
      bins,
  )
  return metrics.expected_calibration_error(jax.device_get(sums))


def test_ece_is_near_zero_when_calibrated_and_large_when_overconfident():
  rng = np.random.default_rng(0)
  confidence = rng.uniform(0.05, 1.0, size=200_000)
  calibrated = (
      rng.uniform(size=confidence.size) < confidence
  )  # P(correct) = conf
  assert _ece(confidence, calibrated) < 0.01
  # Always 95% sure, right half the time: ECE = 0.45.
  sure = np.full(100_000, 0.95)
  coin = rng.uniform(size=sure.size) < 0.5
  assert _ece(sure, coin) == pytest.approx(0.45, abs=0.01)


def test_ece_matches_a_direct_binned_computation():
  rng = np.random.default_rng(1)
  confidence = rng.uniform(size=5000)
  correct = rng.uniform(size=5000) < confidence**2
  bins = np.minimum((confidence * 10).astype(int), 9)
  want = sum(
      abs(correct[bins == b].mean() - confidence[bins == b].mean())
      * np.mean(bins == b)
      for b in range(10)
      if np.any(bins == b)
  )
  assert _ece(confidence, correct, bins=10) == pytest.approx(want, abs=1e-5)


def test_kv_cache_bytes_count_the_window_only_for_local_layers():
  kinds = ("local",) * 5 + ("global",)
  per_position = 2 * 1 * 256 * 2  # K and V, one kv head of 256, bfloat16
  at_32k = metrics.kv_cache_bytes_per_token(kinds, 1, 256, 512, 32768)
  assert at_32k == pytest.approx(per_position * (1 + 5 * 512 / 32768))
  at_256 = metrics.kv_cache_bytes_per_token(kinds, 1, 256, 512, 256)
  assert at_256 == pytest.approx(6 * per_position)
  with pytest.raises(ValueError, match="unknown layer kind"):
    metrics.kv_cache_bytes_per_token(("sliding",), 1, 8, 4, 16)


class _Linear:
  """A model with the hidden/logits_from_hidden interface over fixed arrays."""

  def __init__(self, hidden, head):
    self._hidden, self._head = hidden, head

  def hidden(self, tokens, segment_ids=None, positions=None):
    return self._hidden, {}

  def logits_from_hidden(self, h):
    return h @ self._head


def test_token_sums_equal_the_unchunked_metrics():
  rng = np.random.default_rng(2)
  b, t, d, v = 2, 11, 6, 17
  student = _Linear(
      jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32),
      jnp.asarray(rng.normal(size=(d, v)), jnp.float32),
  )
  teacher = _Linear(
      jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32),
      jnp.asarray(rng.normal(size=(d, v)), jnp.float32),
  )
  labels = jnp.asarray(rng.integers(0, v, size=(b, t)))
  mask = jnp.asarray(rng.uniform(size=(b, t)) < 0.8)
  inputs = {
      "inputs": labels,
      "segment_ids": None,
      "positions": None,
      "labels": labels,
      "mask": mask,
  }
  sums = jax.device_get(
      metrics.token_sums(student, teacher, inputs, chunk_size=4, num_bins=5)
  )
  logits = student.logits_from_hidden(student._hidden)
  t_logits = teacher.logits_from_hidden(teacher._hidden)
  w = np.asarray(mask, np.float32)
  assert sums["count"] == pytest.approx(w.sum())
  ce = np.asarray(losses.cross_entropy_per_token(logits, labels))
  assert sums["ce"] == pytest.approx((ce * w).sum(), rel=1e-5)
  kl = np.asarray(losses.dense_kd_per_token(logits, t_logits))
  assert sums["kl_to_teacher"] == pytest.approx((kl * w).sum(), rel=1e-5)
  agree = np.asarray(jnp.argmax(logits, -1) == jnp.argmax(t_logits, -1))
  assert sums["top1_agreement"] == pytest.approx((agree * w).sum())
  assert sums["bins"]["count"].sum() == pytest.approx(w.sum())


def test_loss_by_position_against_a_hand_computation():
  """Positions (the tokens of its document before each token) fall in the
  buckets [0, 512), [512, 2k), [2k, 8k), [8k, 32k), [32k, ...); the
  per-bucket sums and ``summarize``'s losses are the hand-computed ones,
  and empty buckets are left out of the report."""
  rng = np.random.default_rng(3)
  b, t, d, v = 2, 6, 5, 13
  model = _Linear(
      jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32),
      jnp.asarray(rng.normal(size=(d, v)), jnp.float32),
  )
  labels = jnp.asarray(rng.integers(0, v, size=(b, t)))
  positions = jnp.asarray(
      [[0, 511, 512, 2047, 2048, 40000], [8191, 8192, 1, 2, 3, 4]]
  )
  mask = jnp.asarray([[1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 1, 1]], jnp.float32)
  inputs = dict(
      inputs=labels, segment_ids=None, positions=positions, labels=labels,
      mask=mask,
  )  # fmt: skip
  sums = jax.device_get(
      metrics.token_sums(model, None, inputs, chunk_size=4, num_bins=5)
  )
  ce = np.asarray(
      losses.cross_entropy_per_token(
          model.logits_from_hidden(model._hidden), labels
      )
  )
  bucket = np.asarray([[0, 0, 1, 1, 2, 4], [2, 3, 0, 0, 0, 0]])
  w = np.asarray(mask)
  for i in range(5):
    want = (ce * w)[bucket == i].sum()
    assert sums["by_position"]["ce"][i] == pytest.approx(want, rel=1e-5)
    assert sums["by_position"]["count"][i] == w[bucket == i].sum()
  out = validation.summarize(sums)
  assert list(out["loss_by_position"]) == ["0-512", "512-2k", "2k-8k", "32k+"]
  assert out["tokens_by_position"] == {
      "0-512": 6.0, "512-2k": 2.0, "2k-8k": 2.0, "32k+": 1.0
  }  # fmt: skip
  assert out["loss_by_position"]["2k-8k"] == pytest.approx(
      (ce[0, 4] + ce[1, 0]) / 2, rel=1e-5
  )
  assert metrics.position_labels((0, 100, 4096)) == ["0-100", "100-4k", "4k+"]


def test_bits_per_byte_against_a_hand_computation():
  """Two texts' tokens of a byte-level BPE: bits per byte is the summed
  cross-entropy over the bytes of the predicted tokens' text, in bits; an
  <eos> costs its loss and adds no byte."""
  from data import token_bytes, tokenizer as tok  # pylint: disable=import-outside-toplevel

  texts = ["x naïve café €5\n", "def f(x):\n    return x\n"]
  tokenizer = tok.train_tokenizer(texts * 20, 280)
  eos = tok.special_ids(tokenizer)["eos"]
  ids = []
  for text in texts:
    ids += tokenizer.encode(text, add_special_tokens=False).ids + [eos]
  ids = jnp.asarray([ids])
  rng = np.random.default_rng(4)
  t, d, v = ids.shape[1] - 1, 6, tokenizer.get_vocab_size()
  model = _Linear(
      jnp.asarray(rng.normal(size=(1, t, d)), jnp.float32),
      jnp.asarray(rng.normal(size=(d, v)), jnp.float32),
  )
  labels = ids[:, 1:]
  mask = jnp.ones((1, t), bool)
  inputs = dict(
      inputs=ids[:, :-1], segment_ids=None, positions=None, labels=labels,
      mask=mask,
  )  # fmt: skip
  sums = jax.device_get(
      metrics.token_sums(model, None, inputs, chunk_size=4, num_bins=5)
  )
  sums["bytes"] = metrics.label_bytes(
      inputs, token_bytes.byte_lengths(tokenizer)
  )
  ce = np.asarray(
      losses.cross_entropy_per_token(
          model.logits_from_hidden(model._hidden), labels
      )
  )
  assert tokenizer.encode(texts[0], add_special_tokens=False).tokens[0] == "x"
  # The labels are every token but the first ("x"): 42 of the 43 bytes
  # (ï, é: 2 bytes, €: 3).
  by_hand = len("".join(texts).encode()) - 1
  assert by_hand == 42
  assert float(sums["bytes"]) == by_hand
  out = validation.summarize(sums)
  assert out["bits_per_byte"] == pytest.approx(
      ce.sum() / np.log(2) / by_hand, rel=1e-5
  )
