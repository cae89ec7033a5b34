"""Top-k with a sampled tail: the targets, the record section and the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data import cache_format as cf
from data import sparse_targets
from distill import losses

V, K, M = 40, 5, 4


def _teacher_and_student(seed=0):
  keys = jax.random.split(jax.random.key(seed), 2)
  teacher = jax.nn.log_softmax(1.5 * jax.random.normal(keys[0], (V,)))
  student = jax.random.normal(keys[1], (V,))
  return teacher, student


def _dense_kl(logits, log_p):
  log_q = jax.nn.log_softmax(logits)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q))


def test_expected_gradient_is_the_dense_kl_gradient():
  """Monte Carlo over 4,000 keys: the mean gradient of the topk_tail loss
  equals the full forward KL's within 4 standard errors per logit, while the
  ghost loss on the same head (biased) misses it by far more."""
  log_p, logits = _teacher_and_student()
  lp = log_p[None, None]  # [1, 1, V]
  ids, vals, tail, _, _ = sparse_targets.topk_tail_targets(
      jax.random.key(0), lp, K, M
  )

  def grad_for(key):
    *_, t_ids, t_counts = sparse_targets.topk_tail_targets(key, lp, K, M)
    loss = lambda z: losses.topk_tail_kl_per_token(
        z[None, None], ids, vals, tail, t_ids, t_counts
    )[0, 0]
    return jax.grad(loss)(logits)

  keys = jax.random.split(jax.random.key(1), 4000)
  grads = jax.jit(jax.vmap(grad_for))(keys)  # [S, V], compiled whole
  mean = grads.mean(0)
  stderr = grads.std(0) / np.sqrt(len(keys))
  want = jax.jit(jax.grad(_dense_kl))(logits, log_p)
  error = np.abs(np.asarray(mean - want))
  assert (error <= 4 * np.asarray(stderr) + 1e-6).all(), error.max()
  assert float(tail[0, 0]) > 0.05  # the tail matters in this example

  ghost = jax.jit(
      jax.grad(
          lambda z: losses.ghost_kl_per_token(z[None, None], ids, vals, tail)[
              0, 0
          ]
      )
  )(logits)
  assert np.abs(np.asarray(ghost - want)).max() > 10 * float(stderr.max())


def test_exact_when_the_tail_holds_nothing():
  """A teacher with all its mass on the head: value and gradient equal the
  dense KL's exactly, whatever the (weightless) draws are."""
  _, logits = _teacher_and_student(3)
  head_logits = (
      jnp.full((V,), -jnp.inf)
      .at[jnp.arange(K) * 7]
      .set(jnp.arange(K, dtype=jnp.float32))
  )
  log_p = jax.nn.log_softmax(head_logits)
  made = sparse_targets.topk_tail_targets(
      jax.random.key(2), log_p[None, None], K, M
  )
  assert float(made[2][0, 0]) < 1e-6  # 1 - sum of the head, in float32
  # As the cache stores it (the tail quantised to 1/65535): exactly 0.
  names = ("tt_ids", "tt_log_probs", "tt_tail", "tt_sample_ids")
  names += ("tt_sample_counts",)
  arrays = {name: a[0] for name, a in zip(names, made)}
  encoded = cf.encode_record(
      np.zeros(2, int), np.ones(2, int), vocab_size=V, **arrays
  )
  record = cf.decode_record(encoded, V)
  ids, vals, tail, t_ids, t_counts = (
      jnp.asarray(record[name])[None] for name in names
  )
  assert float(tail[0, 0]) == 0.0
  loss = lambda z: losses.topk_tail_kl_per_token(
      z[None, None], ids, vals, tail, t_ids, t_counts
  )[0, 0]
  dense = lambda z: jnp.sum(
      jnp.where(
          jnp.isfinite(log_p),
          jnp.exp(log_p) * (log_p - jax.nn.log_softmax(z)),
          0.0,
      )
  )
  # Equal up to the head's storage error (log-probs within 0.06 nats).
  bound = float(cf.log_prob_error_bound(np.asarray(made[1][0])).max())
  np.testing.assert_allclose(loss(logits), dense(logits), atol=2 * bound)
  np.testing.assert_allclose(
      jax.grad(loss)(logits), jax.grad(dense)(logits), atol=2 * bound
  )
  # And exactly the head KL computed by hand from the decoded head.
  p = jnp.exp(vals[0, 0])
  log_q = jax.nn.log_softmax(logits)[ids[0, 0]]
  np.testing.assert_allclose(
      loss(logits), jnp.sum(p * (vals[0, 0] - log_q)), rtol=1e-6
  )


def test_tail_draws_follow_the_teacher_outside_the_head():
  log_p, _ = _teacher_and_student(5)
  lp = jnp.broadcast_to(log_p, (1, 2000, V))  # 2,000 positions, same p
  ids, _, tail, t_ids, t_counts = sparse_targets.topk_tail_targets(
      jax.random.key(7), lp, K, M
  )
  t_ids, t_counts = np.asarray(t_ids), np.asarray(t_counts)
  head = set(np.asarray(ids[0, 0]).tolist())
  assert (t_counts.sum(-1) == M).all()
  drawn = np.bincount(t_ids.ravel(), weights=t_counts.ravel(), minlength=V)
  assert not any(drawn[i] for i in head)
  p = np.exp(np.asarray(log_p, np.float64))
  p[list(head)] = 0.0
  expected = p / p.sum() * drawn.sum()
  np.testing.assert_allclose(float(tail[0, 0]), p.sum(), atol=1e-6)
  # Chi-square over the ids expected at least 5 times.
  big = expected >= 5
  chi2 = float(np.sum((drawn[big] - expected[big]) ** 2 / expected[big]))
  assert chi2 < 2 * big.sum() + 30, chi2


def _record(**extra):
  rng = np.random.default_rng(0)
  length = 6
  lp = jax.nn.log_softmax(
      jnp.asarray(rng.normal(size=(1, length, V)), jnp.float32)
  )
  ids, vals, tail, t_ids, t_counts = sparse_targets.topk_tail_targets(
      jax.random.key(0), lp, K, M
  )
  arrays = dict(
      tt_ids=ids[0],
      tt_log_probs=vals[0],
      tt_tail=tail[0],
      tt_sample_ids=t_ids[0],
      tt_sample_counts=t_counts[0],
  )
  tokens = rng.integers(0, V, length + 1)
  segments = np.array([1, 1, 1, 2, 2, 2, 0])
  record = cf.encode_record(
      tokens, segments, vocab_size=V, **{**arrays, **extra}
  )
  return record, arrays


def test_record_round_trip_within_the_bounds():
  record, arrays = _record()
  out = cf.decode_record(record, V)
  np.testing.assert_array_equal(out["tt_ids"], arrays["tt_ids"])
  bound = cf.log_prob_error_bound(np.asarray(arrays["tt_log_probs"]))
  assert (
      np.abs(out["tt_log_probs"] - np.asarray(arrays["tt_log_probs"]))
      <= bound[:, None] + 1e-7
  ).all()
  np.testing.assert_allclose(
      out["tt_tail"], arrays["tt_tail"], atol=cf.ERROR_BOUNDS["tail"] + 1e-7
  )
  for t in range(len(out["tt_ids"])):
    want = {
        int(i): int(c)
        for i, c in zip(
            arrays["tt_sample_ids"][t], arrays["tt_sample_counts"][t]
        )
        if c
    }
    got = {
        int(i): int(c)
        for i, c in zip(out["tt_sample_ids"][t], out["tt_sample_counts"][t])
        if c
    }
    assert got == want


def test_damaged_or_partial_tail_sections_are_refused():
  record, arrays = _record()
  with pytest.raises(cf.CacheFormatError, match="truncated|describes"):
    cf.decode_record(record[:-3], V)
  damaged = bytearray(record)
  damaged[-1] ^= 0xFF
  with pytest.raises(cf.CacheFormatError, match="checksum"):
    cf.decode_record(bytes(damaged), V)
  partial = dict(arrays)
  del partial["tt_sample_counts"]
  with pytest.raises(cf.CacheFormatError, match="together"):
    cf.encode_record(np.zeros(7, int), np.ones(7, int), vocab_size=V, **partial)


def test_version_1_records_still_read():
  """A version-1 record (no tail section) and a version-2 record (no label
  section) decode as they always did; the sections they lacked are refused
  under their version."""
  rng = np.random.default_rng(1)
  lp = np.log(rng.dirichlet(np.ones(V), 6)).astype(np.float32)
  ids, vals, tail = sparse_targets.topk_from_log_probs(lp, K)
  record = bytearray(
      cf.encode_record(
          rng.integers(0, V, 7),
          np.ones(7, int),
          vocab_size=V,
          topk_ids=ids,
          topk_log_probs=vals,
          topk_tail=tail,
      )
  )
  assert record[4] == cf.VERSION == 3
  for version in (1, 2):  # the layout of everything but the new sections
    record[4] = version
    out = cf.decode_record(bytes(record), V)
    np.testing.assert_array_equal(out["topk_ids"], ids)
  labelled = bytearray(
      cf.encode_record(
          rng.integers(0, V, 7),
          np.ones(7, int),
          vocab_size=V,
          label_log_probs=np.zeros(6, np.float32),
      )
  )
  labelled[4] = 2  # version 2 had no label section
  with pytest.raises(cf.CacheFormatError, match="corrupt record header"):
    cf.decode_record(bytes(labelled), V)
  tailed, _ = _record()
  tailed = bytearray(tailed)
  tailed[4] = 1  # version 1 had no tail section
  with pytest.raises(cf.CacheFormatError, match="corrupt record header"):
    cf.decode_record(bytes(tailed), V)


def test_a_reader_decodes_only_its_target_and_checks_the_whole_record():
  """``decode_record(..., target)`` gives that target's arrays exactly as a
  whole decode does, none of the others' sections, and still refuses a
  record damaged in a section it does not decode."""
  rng = np.random.default_rng(2)
  lp = np.log(rng.dirichlet(np.ones(V), 6)).astype(np.float32)
  ids, vals, tail = sparse_targets.topk_from_log_probs(lp, K)
  s_ids, s_counts = (
      np.asarray(x[0])
      for x in sparse_targets.sample_targets(
          jax.random.key(3), jnp.asarray(lp)[None], 8
      )
  )
  record, _ = _record(
      topk_ids=ids,
      topk_log_probs=vals,
      topk_tail=tail,
      sample_ids=s_ids,
      sample_counts=s_counts,
      label_log_probs=lp[np.arange(6), rng.integers(0, V, 6)],
  )
  whole = cf.decode_record(record, V)
  sections = {
      "topk": ("topk_ids", "topk_log_probs", "topk_tail"),
      "sample": ("sample_ids", "sample_counts"),
      "topk_tail": (
          "tt_ids",
          "tt_log_probs",
          "tt_tail",
          "tt_sample_ids",
          "tt_sample_counts",
      ),
      "label": ("label_log_probs",),
  }
  assert set(whole) == {"tokens", "segment_ids"}.union(*sections.values())
  for target, keys in sections.items():
    out = cf.decode_record(record, V, target)
    assert set(out) == {"tokens", "segment_ids", *keys}, target
    for key in out:
      np.testing.assert_array_equal(out[key], whole[key])
  damaged = bytearray(record)
  damaged[-1] ^= 1  # inside the label section, the last one
  with pytest.raises(cf.CacheFormatError, match="checksum"):
    cf.decode_record(bytes(damaged), V, "topk")
