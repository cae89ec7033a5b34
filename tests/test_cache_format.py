"""Tests for data/cache_format/: round trips, error bounds, sizes, target makers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from data import cache_format as cf
from data import sparse_targets


def random_record(rng, vocab, length, k, draws, with_topk, with_sample):
  """Random but valid encoder inputs: ids anywhere in the vocab, gaps from tiny to
  beyond GAP_MAX, -inf suffixes, padded and shuffled sample columns."""
  tokens = rng.integers(0, vocab, length + 1)
  cuts = np.sort(rng.integers(0, length + 1, rng.integers(0, 4)))
  segments = np.searchsorted(cuts, np.arange(length + 1), side="right") + 1
  segments[length + 1 - rng.integers(0, length // 2 + 1) :] = 0
  record = {"tokens": tokens, "segment_ids": segments}
  if with_topk:
    k = min(k, vocab)
    ids = np.stack(
        [rng.choice(vocab, k, replace=False) for _ in range(length)]
    ).reshape(length, k)
    scale = rng.choice([0.01, 0.5, 3.0], size=(length, 1))
    gaps = np.cumsum(rng.exponential(1.0, (length, k - 1)) * scale, -1)
    lp = -rng.exponential(1.0, (length, 1)) - np.concatenate(
        [np.zeros((length, 1)), gaps], 1
    )
    lp[rng.random(length) < 0.3, k - rng.integers(0, k) :] = -np.inf
    lp[:, 0] = np.maximum(lp[:, 0], -20.0)
    tail = rng.choice([0.0, 1.0, 0.5], size=length) * rng.random(length)
    record.update(
        topk_ids=ids,
        topk_log_probs=lp.astype(np.float32),
        topk_tail=tail.astype(np.float32),
    )
  if with_sample:
    width = draws + 2
    ids = rng.integers(
        0, vocab, (length, width)
    )  # padding columns keep random ids
    counts = np.zeros((length, width), np.int64)
    for t in range(length):
      uniq = rng.integers(1, min(draws, vocab) + 1)
      cols = rng.choice(width, uniq, replace=False)
      ids[t, cols] = rng.choice(vocab, uniq, replace=False)
      counts[t, cols] = 1 + rng.multinomial(draws - uniq, np.ones(uniq) / uniq)
    record.update(sample_ids=ids, sample_counts=counts)
  return record


def triples(ids, counts):
  return sorted(
      (t, int(i), int(c))
      for t, (row_i, row_c) in enumerate(zip(ids, counts))
      for i, c in zip(row_i, row_c)
      if c > 0
  )


def check_round_trip(record, vocab):
  data = cf.encode_record(**record, vocab_size=vocab)
  out = cf.decode_record(data, vocab)
  np.testing.assert_array_equal(out["tokens"], record["tokens"])
  np.testing.assert_array_equal(out["segment_ids"], record["segment_ids"])
  if "topk_ids" in record:
    np.testing.assert_array_equal(out["topk_ids"], record["topk_ids"])
    lp, got = record["topk_log_probs"].astype(np.float64), out["topk_log_probs"]
    np.testing.assert_array_equal(np.isinf(got), np.isinf(lp))
    near = np.isfinite(lp) & (lp[:, :1] - lp <= cf.GAP_MAX)
    bound = cf.log_prob_error_bound(lp)[:, None] + np.zeros_like(lp)
    assert np.all(np.abs(got[near] - lp[near]) <= bound[near])
    assert np.all(bound <= cf.ERROR_BOUNDS["log_prob"] + 1e-4)
    assert np.all(
        np.abs(got[:, 0] - lp[:, 0]) <= cf.ERROR_BOUNDS["top_log_prob"] + 4e-6
    )
    far = (
        np.isfinite(lp) & ~near
    )  # beyond GAP_MAX: probability error below p0 * e^-30
    assert np.all(
        np.exp(got[far])
        <= np.exp(lp[:, :1] - cf.GAP_MAX + 0.06).repeat(lp.shape[1], 1)[far]
    )
    assert np.all(
        np.abs(out["topk_tail"] - record["topk_tail"])
        <= cf.ERROR_BOUNDS["tail"] + 1e-7
    )
  if "sample_ids" in record:
    ids, counts = out["sample_ids"], out["sample_counts"]
    assert triples(ids, counts) == triples(
        record["sample_ids"], record["sample_counts"]
    )
    draws = record["sample_counts"].sum(-1)[0] if len(ids) else 0
    assert ids.shape == counts.shape == (len(record["tokens"]) - 1, draws)
    nonzero = (counts > 0).sum(-1)
    for t, u in enumerate(nonzero):  # unique ids first, ascending, then padding
      assert (
          np.all(counts[t, u:] == 0)
          and np.all(ids[t, u:] == 0)
          and np.all(np.diff(ids[t, :u]) > 0)
      )
  return data, out


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    vocab=st.one_of(
        st.integers(1, 300),
        st.integers(65_530, 65_542),
        st.integers(65_537, 2**24),
    ),
    length=st.integers(0, 20),
    k=st.integers(1, 40),
    draws=st.integers(1, 300),
    with_topk=st.booleans(),
    with_sample=st.booleans(),
)
def test_round_trip_property(
    seed, vocab, length, k, draws, with_topk, with_sample
):
  rng = np.random.default_rng(seed)
  record = random_record(
      rng, vocab, length, k, draws, with_topk and length > 0, with_sample
  )
  data, _ = check_round_trip(record, vocab)
  assert data[6] == (2 if vocab <= 65_536 else 4)  # id_bytes


def test_largest_vocab_round_trip():
  rng = np.random.default_rng(0)
  vocab = 2**31 - 1
  record = random_record(rng, vocab, 6, 8, 64, True, True)
  record["tokens"][0] = vocab - 1
  record["sample_ids"][-1, np.flatnonzero(record["sample_counts"][-1])[0]] = (
      vocab - 1
  )
  check_round_trip(record, vocab)


def test_id_dtype():
  assert cf.id_dtype(65_536) == np.uint16 and cf.id_dtype(65_537) == np.uint32
  assert cf.id_dtype(2**31 - 1) == np.uint32
  for bad in (0, 2**31):
    with pytest.raises(cf.CacheFormatError, match="vocab_size"):
      cf.id_dtype(bad)


@pytest.fixture
def record_bytes():
  record = random_record(np.random.default_rng(1), 1000, 16, 8, 32, True, True)
  return cf.encode_record(**record, vocab_size=1000)


def test_unknown_version_and_foreign_bytes_refused(record_bytes):
  newer = record_bytes[:4] + bytes([cf.VERSION + 1]) + record_bytes[5:]
  with pytest.raises(
      cf.CacheFormatError, match=f"version {cf.VERSION + 1} is not supported"
  ):
    cf.decode_record(newer, 1000)
  with pytest.raises(cf.CacheFormatError, match="magic"):
    cf.decode_record(b"XXXX" + record_bytes[4:], 1000)
  with pytest.raises(cf.CacheFormatError, match="vocab_size 1000"):
    cf.decode_record(record_bytes, 1001)


def test_truncated_or_corrupted_bytes_raise(record_bytes):
  cf.decode_record(record_bytes, 1000)
  for cut in (0, 10, cf.HEADER.size, len(record_bytes) - 1):
    with pytest.raises(cf.CacheFormatError, match="truncated"):
      cf.decode_record(record_bytes[:cut], 1000)
  with pytest.raises(cf.CacheFormatError, match="truncated or corrupted"):
    cf.decode_record(record_bytes + b"\0", 1000)
  rng = np.random.default_rng(2)
  for pos in rng.integers(cf.HEADER.size, len(record_bytes), 20):
    bad = bytearray(record_bytes)
    bad[pos] ^= 1 << rng.integers(0, 8)
    with pytest.raises(cf.CacheFormatError, match="checksum"):
      cf.decode_record(bytes(bad), 1000)
  header = list(cf.HEADER.unpack_from(record_bytes))
  header[7] += 1  # one more segment run than the body holds
  with pytest.raises(cf.CacheFormatError, match="truncated or corrupted"):
    cf.decode_record(
        cf.HEADER.pack(*header) + record_bytes[cf.HEADER.size :], 1000
    )


def test_encoder_rejects_invalid_targets():
  rng = np.random.default_rng(3)
  record = random_record(rng, 500, 4, 6, 16, True, True)
  bad = dict(record, topk_log_probs=record["topk_log_probs"][:, ::-1].copy())
  with pytest.raises(cf.CacheFormatError, match="sorted descending"):
    cf.encode_record(**bad, vocab_size=500)
  ids = record["sample_ids"].copy()
  cols = np.flatnonzero(record["sample_counts"][0])
  if len(cols) > 1:
    ids[0, cols[1]] = ids[0, cols[0]]
    with pytest.raises(cf.CacheFormatError, match="unique"):
      cf.encode_record(**dict(record, sample_ids=ids), vocab_size=500)
  counts = record["sample_counts"].copy()
  counts[1, np.flatnonzero(counts[1])[0]] += 1
  with pytest.raises(cf.CacheFormatError, match="sum to the same N"):
    cf.encode_record(**dict(record, sample_counts=counts), vocab_size=500)
  with pytest.raises(cf.CacheFormatError, match="outside"):
    cf.encode_record(**record, vocab_size=10)


def test_topk_targets_match_lax_top_k_and_tail():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(2, 5, 300)).astype(np.float32) * 3
  log_probs = jax.nn.log_softmax(jnp.asarray(logits) / 1.5)
  ids, vals, tail = sparse_targets.topk_targets(log_probs, 16)
  want_vals, want_ids = jax.lax.top_k(log_probs, 16)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(vals, want_vals)
  p = np.exp(np.asarray(log_probs, np.float64))
  np.testing.assert_allclose(
      tail, 1 - np.take_along_axis(p, np.asarray(ids), -1).sum(-1), atol=2e-6
  )
  ref_ids, ref_vals, ref_tail = sparse_targets.topk_from_log_probs(
      np.asarray(log_probs).reshape(10, 300), 16
  )
  np.testing.assert_array_equal(ref_ids, np.asarray(ids).reshape(10, 16))
  np.testing.assert_allclose(ref_tail, np.asarray(tail).reshape(10), atol=2e-6)


@pytest.mark.parametrize("stratified", [False, True])
def test_sample_targets_are_unbiased(stratified):
  """counts / n averaged over M = 500 independent batches approaches p.

  Per (position, id), the total count over M*n = 32,000 draws is Binomial(M*n, p)
  (i.i.d.) or less variable (stratified). Every nonzero p is >= 1e-3, so M*n*p >= 32
  and z = (count - M n p) / sqrt(M n p (1-p)) is close to normal: max |z| < 5 over
  the ~150 coordinates fails with probability < 1e-4 for a correct sampler (fixed
  seed, so deterministic), and the chi-square sum stays below df + 6 sqrt(2 df).
  Zero-probability ids (including the last id, the edge of the inverse CDF) must
  never be drawn.
  """
  rng = np.random.default_rng(5)
  positions, vocab, n, batches = 4, 40, 64, 500
  logits = rng.normal(size=(positions, vocab)) * 0.8
  logits[:, ::7] = -np.inf
  logits[:, -1] = -np.inf
  log_probs = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32))
  p = np.exp(np.asarray(log_probs, np.float64))
  assert p[p > 0].min() > 1e-3
  ids, counts = sparse_targets.sample_targets(
      jax.random.key(0),
      jnp.broadcast_to(log_probs, (batches, positions, vocab)),
      n,
      stratified,
  )
  ids, counts = np.asarray(ids), np.asarray(counts)
  assert np.all(counts.sum(-1) == n)
  for row_i, row_c in zip(
      ids.reshape(-1, n)[:200], counts.reshape(-1, n)[:200]
  ):
    u = np.count_nonzero(row_c)
    assert (
        np.all(row_c[u:] == 0)
        and np.all(row_i[u:] == 0)
        and np.all(np.diff(row_i[:u]) > 0)
    )
  totals = np.zeros((positions, vocab))
  np.add.at(
      totals,
      (np.broadcast_to(np.arange(positions)[:, None], ids.shape[1:]), ids),
      counts,
  )
  draws = batches * n
  assert np.all(totals[p == 0] == 0)
  live = p > 0
  z = (totals[live] - draws * p[live]) / np.sqrt(
      draws * p[live] * (1 - p[live])
  )
  assert np.abs(z).max() < 5, np.abs(z).max()
  df = live.sum() - positions
  assert (z**2).sum() < df + 6 * np.sqrt(2 * df)


def test_jax_targets_encode_and_decode():
  rng = np.random.default_rng(6)
  log_probs = jax.nn.log_softmax(
      jnp.asarray(rng.normal(size=(1, 12, 70_000)) * 4, jnp.float32)
  )
  ids, vals, tail = (
      np.asarray(x[0]) for x in sparse_targets.topk_targets(log_probs, 64)
  )
  s_ids, s_counts = (
      np.asarray(x[0])
      for x in sparse_targets.sample_targets(jax.random.key(1), log_probs, 64)
  )
  record = dict(
      tokens=rng.integers(0, 70_000, 13),
      segment_ids=np.ones(13, int),
      topk_ids=ids,
      topk_log_probs=vals,
      topk_tail=tail,
      sample_ids=s_ids,
      sample_counts=s_counts,
  )
  _, out = check_round_trip(record, 70_000)
  np.testing.assert_array_equal(out["sample_ids"], s_ids)
  np.testing.assert_array_equal(out["sample_counts"], s_counts)


def zipf_log_probs(rng, length, vocab, entropy):
  """[length, vocab] log-probs, Zipf p_r ~ r^-s with s set for `entropy` nats, ids
  shuffled independently per position (so ids are spread over the vocabulary).
  """
  ranks = np.arange(1, vocab + 1, dtype=np.float64)
  lo, hi = 0.0, 10.0
  for _ in range(60):
    s = (lo + hi) / 2
    p = ranks**-s / (ranks**-s).sum()
    lo, hi = (s, hi) if -(p * np.log(p)).sum() > entropy else (lo, s)
  logp = np.log(p).astype(np.float32)
  return np.stack([logp[rng.permutation(vocab)] for _ in range(length)])


def bytes_per_token(log_probs, method, k=64, n=64, seed=0):
  length, vocab = log_probs.shape
  lp = jnp.asarray(log_probs)[None]
  record = {
      "tokens": np.zeros(length + 1, int),
      "segment_ids": np.ones(length + 1, int),
  }
  if method == "topk":
    ids, vals, tail = (
        np.asarray(x[0]) for x in sparse_targets.topk_targets(lp, k)
    )
    record.update(topk_ids=ids, topk_log_probs=vals, topk_tail=tail)
  else:
    ids, counts = (
        np.asarray(x[0])
        for x in sparse_targets.sample_targets(jax.random.key(seed), lp, n)
    )
    record.update(sample_ids=ids, sample_counts=counts)
  data = cf.encode_record(**record, vocab_size=vocab)
  out = cf.decode_record(data, vocab)
  err = (
      np.abs(out["topk_log_probs"] - record["topk_log_probs"]).max()
      if method == "topk"
      else 0.0
  )
  return len(data) / length, err


def test_sizes_meet_targets():
  rng = np.random.default_rng(7)
  length = 512
  for vocab in (32_000, 65_536):
    lp = zipf_log_probs(rng, length, vocab, 2.5)
    size, err = bytes_per_token(lp, "topk")
    print(
        f"V={vocab} topk k=64: {size:.1f} B/token, max |log p error| {err:.4f}"
    )
    assert size <= 200 and err <= cf.ERROR_BOUNDS["log_prob"]
  for entropy in (0.5, 1.0, 2.0, 2.5, 3.0, 4.0, 5.0):
    size, _ = bytes_per_token(
        zipf_log_probs(rng, length, 32_000, entropy), "sample"
    )
    print(
        f"V=32000 sample N=64, Zipf entropy {entropy} nats: {size:.1f} B/token"
    )
    if 2.0 <= entropy <= 3.0:
      assert size <= 48
