"""Cross-tokenizer pieces: token bytes, byte alignment, label records, ALM."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer, decoders, models, normalizers, trainers

from conftest import copy_workdir, transformers_greedy
from data import align, cache_format, pipeline, prepare
from data import token_bytes as tb
from data import tokenizer as tok
from distill import losses, objective, run_data
from distill import train as distill_train
from distill.core import checkpoint, layout
from distill.core.errors import UserError
from distill.losses import alm, vocab
from distill.training import loop as trainer
from experiments import stdlib
from student import export, load_student
from student.model import Student
from teacher.model import load_teacher

TEXTS = [
    "def f(x):\n    return x ** 2  # squares\n",
    "héllo wörld, naïve café: 3 € and 日本語 text\n",
    "    indented   spaces\tand\ttabs\n\n",
] * 30
SAMPLES = ["héllo € 日本 x\n\t  y", "def f(x):\n    return 1", "  a  b   "]


@pytest.fixture(scope="module")
def byte_level():
  return tok.train_tokenizer(TEXTS, 300)


@pytest.fixture(scope="module")
def sentencepiece_like():
  """A SentencePiece-style BPE: '▁' for spaces, byte fallback for the
  characters outside its vocabulary."""
  sp = Tokenizer(models.BPE())
  sp.normalizer = normalizers.Replace(" ", "\u2581")
  sp.decoder = decoders.Sequence(
      [
          decoders.Replace("\u2581", " "),
          decoders.ByteFallback(),
          decoders.Fuse(),
      ]
  )
  trainer = trainers.BpeTrainer(
      vocab_size=60,
      special_tokens=["<pad>", "<eos>", "<bos>"],
      show_progress=False,
  )
  sp.train_from_iterator(["hello world abc def return"] * 20, trainer=trainer)
  spec = json.loads(sp.to_str())  # the 256 byte tokens join the vocabulary
  vocab = spec["model"]["vocab"]
  for b in range(256):
    vocab.setdefault(f"<0x{b:02X}>", len(vocab))
  spec["model"]["byte_fallback"] = True
  sp = Tokenizer.from_str(json.dumps(spec))
  return sp


@pytest.mark.parametrize("which", ["byte_level", "sentencepiece_like"])
def test_token_bytes_rebuild_every_text(which, request):
  tokenizer = request.getfixturevalue(which)
  table = tb.token_bytes(tokenizer)
  for text in SAMPLES:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert b"".join(table[i] for i in ids) == text.encode("utf-8"), text
  if which == "sentencepiece_like":  # the text needed byte fallback
    pieces = tokenizer.encode(SAMPLES[0], add_special_tokens=False).tokens
    assert "<0xE2>" in pieces
  # A multi-byte character split over byte-level tokens: each holds bytes.
  assert tb.byte_lengths(tokenizer)[tokenizer.token_to_id("<eos>")] == 0


def _ends(tokenizer, text):
  table = tb.byte_lengths(tokenizer)
  ids = tokenizer.encode(text, add_special_tokens=False).ids
  return np.cumsum(table[ids]), ids


def test_chunks_cover_every_byte_once(byte_level, sentencepiece_like):
  """Two tokenizations of texts with multi-byte UTF-8, byte-fallback tokens
  and merged whitespace: the valid chunks tile the bytes after the first
  tokens, each chunk's tokens span exactly its bytes on both sides."""
  for text in SAMPLES + [TEXTS[1]]:
    t_ends, _ = _ends(byte_level, text)
    s_ends, _ = _ends(sentencepiece_like, text)
    t_valid = np.arange(len(t_ends)) > 0
    s_valid = np.arange(len(s_ends)) > 0
    t_chunk, s_chunk, valid = align.chunks(t_ends, t_valid, s_ends, s_valid)
    bounds = np.intersect1d(t_ends, s_ends)
    assert bounds[-1] == len(text.encode())
    covered = np.zeros(len(text.encode()), int)
    for c in np.flatnonzero(valid):
      lo = bounds[c - 1] if c else 0
      covered[lo : bounds[c]] += 1
      for ends, chunk in ((t_ends, t_chunk), (s_ends, s_chunk)):
        mine = ends[chunk == c]
        starts = np.concatenate([[0], ends])[:-1][chunk == c]
        assert starts.min() == lo and mine.max() == bounds[c]
    first = max(t_ends[0], s_ends[0])
    # Every byte once, past the first tokens (predicted by no one).
    assert (covered[first:] <= 1).all() and (covered[:first] == 0).all()
    assert covered[first:].sum() >= len(covered) - first - max(
        np.diff(bounds, prepend=0)
    )


def test_a_document_boundary_and_unpredicted_tokens_split_chunks():
  """Hand-made: teacher tokens end at 2, 5, 5 (a zero-byte <eos>), 9; the
  student's at 1, 2, 5, 7, 9. The new document's first token (ending at
  9) is not predicted on either side, so its chunk does not count; the
  <eos> joins the chunk of the bytes before it."""
  t_chunk, s_chunk, valid = align.chunks(
      [2, 5, 5, 9],
      [False, True, True, False],
      [1, 2, 5, 7, 9],
      [False, True, True, False, True],
  )
  np.testing.assert_array_equal(t_chunk, [0, 1, 1, 2])
  np.testing.assert_array_equal(s_chunk, [0, 0, 1, 2, 2])
  np.testing.assert_array_equal(valid, [False, True, False])
  sums = align.chunk_sums(np.array([-1.0, -2.0, -0.5, -3.0]), t_chunk, 3)
  np.testing.assert_allclose(sums, [-1.0, -2.5, -3.0])


def test_label_records_round_trip_exactly():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 500, 17)
  label = -rng.exponential(3.0, 16).astype(np.float32)
  data = cache_format.encode_record(
      tokens, np.ones(17, int), vocab_size=500, label_log_probs=label
  )
  out = cache_format.decode_record(data, 500)
  np.testing.assert_array_equal(out["label_log_probs"], label)
  with pytest.raises(cache_format.CacheFormatError, match="label_log_probs"):
    cache_format.encode_record(
        tokens, np.ones(17, int), vocab_size=500, label_log_probs=label[:3]
    )


def test_same_tokenizer_alignment_is_the_teacher_row(tiny_prepared):
  """With one tokenizer on both sides, the student's row over a cached
  row's bytes is that row, and every predicted token is its own chunk."""
  data_dir = layout.data_dir(tiny_prepared)
  tokenizer = tok.load_tokenizer(layout.tokenizer_path(tiny_prepared))
  lengths = tb.byte_lengths(tokenizer)
  directory = pipeline.tokens_dir(data_dir, "train")
  rows = pipeline.PackedRows(data_dir, "train", 32)
  cross = align.CrossTokenizerRows(
      directory, directory, lengths, lengths, seq_len=32, student_len=32, pad=0
  )
  rng = np.random.default_rng(1)
  for index in (0, 5, len(rows) - 1):
    row = rows[index]
    label = -rng.exponential(2.0, 32).astype(np.float32)
    out = cross(dict(row, label_log_probs=label))
    for key in ("tokens", "segment_ids", "positions"):
      np.testing.assert_array_equal(out[key], row[key])
    mask = pipeline.target_mask(row["segment_ids"][None])[0]
    # Zero-byte tokens (<eos>) share their chunk with the token before.
    text = lengths[row["tokens"][1:]] > 0
    kept = mask & text & np.concatenate([[True], mask[:-1]])
    assert (out["chunk_valid"][out["chunk"][kept]]).all()
    singles = kept & (np.roll(lengths[row["tokens"][1:]], -1) > 0)
    np.testing.assert_allclose(
        out["chunk_log_probs"][out["chunk"][singles]], label[singles]
    )


def test_alm_with_one_tokenizer_is_the_per_token_binary_kl():
  """ALM through the alignment (chunk = token) equals the per-token binary
  divergence computed by the chunked per-token loss, values and gradients."""
  rng = np.random.default_rng(2)
  batch, length, dim, vocab = 2, 24, 8, 40
  hidden = jnp.asarray(rng.normal(size=(batch, length, dim)), jnp.float32)
  weight = jnp.asarray(rng.normal(size=(dim, vocab)) * 0.5, jnp.float32)
  labels = jnp.asarray(rng.integers(0, vocab, (batch, length)))
  mask = jnp.asarray(rng.random((batch, length)) > 0.2)
  teacher = jnp.asarray(-rng.exponential(2.0, (batch, length)), jnp.float32)
  tau = 1.5

  def via_alignment(hidden, weight):
    lp = alm.label_log_probs(hidden, lambda h: h @ weight, labels, 5)
    chunk = jnp.broadcast_to(jnp.arange(length), (batch, length))
    return alm.alm_loss(lp, chunk, teacher, mask, tau)[0]

  def per_token(hidden, weight):
    fn = lambda logits, t: alm.binary_kl(
        t["teacher"], -losses.cross_entropy_per_token(logits, t["labels"]), tau
    )
    return losses.chunked_loss(
        hidden,
        lambda h: h @ weight,
        fn,
        {"teacher": teacher, "labels": labels},
        mask,
        7,
    )

  got, grads = jax.value_and_grad(via_alignment, (0, 1))(hidden, weight)
  want, want_grads = jax.value_and_grad(per_token, (0, 1))(hidden, weight)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
  assert float(got) > 0


def test_binary_kl_is_zero_at_equal_likelihoods_and_grows():
  t = jnp.asarray([-0.1, -2.0, -30.0, 0.0])
  np.testing.assert_allclose(alm.binary_kl(t, t), 0.0, atol=1e-6)
  assert (alm.binary_kl(t, t - 1.0) > 0).all()
  assert np.isfinite(
      np.asarray(jax.grad(lambda s: alm.binary_kl(t, s).sum())(t))
  ).all()


@pytest.fixture(scope="module")
def own_workdir(tiny_cached, tmp_path_factory):
  """The tiny workdir (random teacher, its cache with the label target)
  with a student tokenizer of its own (300 entries), and three runs read
  from the one cache: alm and vocab in the student's tokenizer, alm in the
  teacher's."""
  workdir = copy_workdir(tiny_cached, tmp_path_factory.mktemp("own") / "w")
  config = own_config()
  summary = prepare.prepare(config, workdir)
  assert summary["student"]["vocab_size"] == 300
  for run in ("alm", "vocab", "alm@tok=teacher"):
    distill_train.train_run(config, workdir, run)
  return workdir


def own_config():
  config = stdlib.get_config("tiny")
  config.student.tokenizer = "300"
  config.distill.train.update(steps=2, warmup_steps=1, eval_every=2)
  config.distill.train.update(checkpoint_every=2, log_every=1)
  return config


def test_one_cache_serves_students_of_two_tokenizers(own_workdir):
  """Both runs read the same cached rows; the one with its own tokenizer
  trains on the student's tokens of those rows' bytes, with a 300-entry
  vocabulary, and logs bits per byte."""
  own = checkpoint.read_config(layout.student_dir(own_workdir, "alm"))
  shared = checkpoint.read_config(
      layout.student_dir(own_workdir, "alm_tokteacher")
  )
  assert own["model"]["vocab_size"] == 300
  assert shared["model"]["vocab_size"] == 512
  assert own["tokenizer_hash"] == tok.tokenizer_hash(
      layout.student_tokenizer_path(own_workdir)
  )
  for run in ("alm", "alm_tokteacher", "vocab"):
    logged = trainer.read_metrics(layout.student_dir(own_workdir, run))
    steps = [r for r in logged if "loss" in r and "eval/loss" not in r]
    assert steps and all(np.isfinite(r["loss"]) for r in steps)
    if run.startswith("alm"):
      assert all(r["chunks"] > 0 and r["alm"] >= 0 for r in steps)
    evals = [r for r in logged if "eval/bits_per_byte" in r]
    assert evals and evals[-1]["eval/bits_per_byte"] > 0
  assert (
      checkpoint.read_config(layout.student_dir(own_workdir, "vocab"))["model"][
          "vocab_size"
      ]
      == 300
  )
  with pytest.raises(UserError, match="own tokenizer"):
    distill_train.train_run(own_config(), own_workdir, "sampled")


def test_own_tokenizer_export_matches_transformers_greedy(own_workdir):
  """The HF export of a student with its own tokenizer carries that
  tokenizer; transformers loads both and continues a prompt exactly as
  our decoding does."""
  pytest.importorskip("transformers")
  from distill.decoding import generate as gen  # pylint: disable=import-outside-toplevel

  folder = export.export(own_workdir, "alm", fmt="hf")
  with (
      open(os.path.join(folder, "tokenizer.json"), "rb") as a,
      open(layout.student_tokenizer_path(own_workdir), "rb") as b,
  ):
    assert a.read() == b.read()
  ids, theirs, tokenizer = transformers_greedy(folder, "def add(a, b):", 6)
  assert len(tokenizer) == 300
  ours_tok = tok.load_tokenizer(layout.student_tokenizer_path(own_workdir))
  assert (
      ids[1:] == ours_tok.encode("def add(a, b):", add_special_tokens=False).ids
  )
  (ours,) = gen.generate(load_student(folder), [ids], 6)
  assert theirs == ours


def test_teacher_pieces_on_two_small_tokenizers():
  """Two byte-level BPEs trained on the same text at 280 and 320 entries:
  the smaller one's merges are a prefix of the larger one's, so each token
  of the large one is one or more tokens of the small one spelling its
  bytes; the 40 merges only the large one has take two or more; specials
  map by role."""
  small, large = tok.train_tokenizer(TEXTS, 280), tok.train_tokenizer(
      TEXTS, 320
  )
  sb, lb = tb.token_bytes(small), tb.token_bytes(large)
  eos = {tok.special_ids(large)["eos"]: tok.special_ids(small)["eos"]}
  pieces = align.teacher_pieces(lb, small, eos)
  counts = (pieces >= 0).sum(-1)
  for teacher_id, row in enumerate(pieces):
    if lb[teacher_id]:
      assert b"".join(sb[i] for i in row[row >= 0]) == lb[teacher_id]
  assert (counts[3:] >= 1).all() and (counts[3:] > 1).sum() == 40
  assert (
      pieces[tok.special_ids(large)["eos"], 0] == tok.special_ids(small)["eos"]
  )
  assert counts[tok.special_ids(large)["pad"]] == 0  # no role given
  assert not vocab.student_unmapped(pieces[:, 0], len(sb))[3:].any()


def test_projection_against_a_hand_computation():
  """Teacher tokens 0: " theory" = student [5, 6], 1: " the" = [5],
  2: " then" = [5, 7], 3: "<x>" (no student pieces). Where a teacher token
  starts, all three give their probability to 5; one piece in (prefix
  [5]), " the" has ended and the others go to their second piece."""
  pieces = np.asarray([[5, 6], [5, -1], [5, 7], [-1, -1]], np.int32)
  ids = np.asarray([[0, 1, 2, 3]] * 2)
  lp = np.log(np.asarray([[0.5, 0.2, 0.1, 0.05]] * 2, np.float32))
  prefix = np.asarray([[-1, -1], [5, -1]], np.int32)
  got_ids, got_lp, unmapped = align.project_topk(
      ids, lp, pieces, prefix, np.asarray([0, 1])
  )
  probs = lambda row: {
      int(i): float(np.exp(v))
      for i, v in zip(got_ids[row], got_lp[row])
      if np.isfinite(v)
  }
  assert probs(0) == pytest.approx({5: 0.8})
  assert probs(1) == pytest.approx({6: 0.5, 7: 0.1})
  np.testing.assert_allclose(unmapped[0], [0.05, 0, 0, 0], atol=1e-7)
  np.testing.assert_allclose(unmapped[1], 0.0)
  # The same on the device, as an online run projects.
  dev = align.project_topk(
      jnp.asarray(ids), jnp.asarray(lp), jnp.asarray(pieces),
      jnp.asarray(prefix), jnp.asarray([0, 1]), xp=jnp,
  )  # fmt: skip
  for a, b in zip(dev, (got_ids, got_lp, unmapped)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6)


def test_uld_against_a_hand_computation():
  """Sorted probabilities: teacher's unmapped mass [0.3, 0.1] against the
  student's two largest probabilities on its unmapped ids."""
  logits = jnp.log(jnp.asarray([[[0.5, 0.2, 0.25, 0.05]]]))
  unmapped_ids = np.asarray([False, True, True, True])
  got = vocab.uld_per_token(logits, jnp.asarray([[[0.3, 0.1]]]), unmapped_ids)
  np.testing.assert_allclose(
      got, [[abs(0.3 - 0.25) + abs(0.1 - 0.2)]], rtol=1e-5
  )


@pytest.mark.parametrize("target", ["topk", "sample"])
def test_vocab_uld_with_one_tokenizer_is_the_same_tokenizer_loss(
    tiny_prepared, target
):
  """Through the alignment with the teacher's own tokenizer on both sides,
  every label is aligned, every id maps to itself, ULD vanishes and the
  vocab_uld loss equals topk_sparse's (top-k) or sampled's (sample), values
  and gradients."""
  data_dir = layout.data_dir(tiny_prepared)
  tokenizer = tok.load_tokenizer(layout.tokenizer_path(tiny_prepared))
  table_bytes = tb.token_bytes(tokenizer)
  ids_of = tok.special_ids(tokenizer)
  pieces = align.teacher_pieces(
      table_bytes, tokenizer, {i: i for i in ids_of.values()}
  )
  id_map = pieces[:, 0]
  assert (id_map == np.arange(len(id_map))).all() and (pieces[:, 1:] < 0).all()
  directory = pipeline.tokens_dir(data_dir, "train")
  lengths = tb.byte_lengths(tokenizer)
  cross = align.CrossTokenizerRows(
      directory, directory, lengths, lengths, seq_len=32, student_len=32,
      pad=0, pieces=pieces,
  )  # fmt: skip
  rows = pipeline.PackedRows(data_dir, "train", 32)
  rng = np.random.default_rng(5)
  vocab_size, k = len(id_map), 6
  batch, records = [], []
  for index in (2, 9):
    ids = np.stack(
        [rng.choice(vocab_size, k, replace=False) for _ in range(32)]
    )
    lp = np.sort(-rng.exponential(2.0, (32, k)), -1)[:, ::-1].astype(np.float32)
    if target == "topk":
      record = dict(rows[index], ids=ids, log_probs=lp)
    else:  # unique ids, counts summing to 16, zero-count padding
      counts = rng.multinomial(16, np.full(k, 1 / k), size=32)
      record = dict(rows[index], ids=ids, counts=counts.astype(np.int32))
    records.append(record)
    batch.append(cross(record))
  stack = lambda key, xs: jnp.asarray(np.stack([x[key] for x in xs]))
  mask = pipeline.target_mask(np.asarray(stack("segment_ids", records)))
  np.testing.assert_array_equal(stack("aligned", batch), mask)
  logits = jnp.asarray(rng.normal(size=(2, 32, vocab_size)), jnp.float32)
  unmapped = vocab.student_unmapped(id_map, vocab_size)
  assert not unmapped.any()

  def crossed(logits):
    per = vocab.vocab_uld_per_token(
        logits, stack("ids", batch),
        stack("log_probs", batch) if target == "topk" else None,
        stack("unmapped_probs", batch), stack("aligned", batch), unmapped, 2.0,
        counts=stack("counts", batch) if target == "sample" else None,
    )  # fmt: skip
    return losses.masked_mean(per, mask)

  def same(logits):
    if target == "topk":
      per = losses.sparse_kl_per_token(
          logits, stack("ids", records), stack("log_probs", records), 2.0
      )
    else:
      per = losses.sampled_kl_per_token(
          logits, stack("ids", records), stack("counts", records), 2.0
      )
    return losses.masked_mean(per, mask)

  got, grad = jax.value_and_grad(crossed)(logits)
  want, want_grad = jax.value_and_grad(same)(logits)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("offline", ["alm", "vocab_topk"])
def test_online_losses_equal_the_cached_ones(own_workdir, offline):
  """With the teacher in the loop on its own rows, the cross-tokenizer
  losses equal those read from the cache on the same rows: exactly the
  label log-probs (ALM), within the cache's top-k encoding error (vocab)."""
  config = own_config()
  teacher = load_teacher(layout.teacher_dir(own_workdir))
  student = Student(distill_train.model_config(config, 300), rngs=nnx.Rngs(0))
  pieces = run_data.teacher_pieces(own_workdir, True)
  losses_of = {}
  for run in (offline, "online_" + offline.removesuffix("_topk")):
    kind = distill_train.run_kind(run)
    make, temperature = run_data.batches(
        config, own_workdir, run, kind, teacher, 300, True
    )
    batch = next(make())
    loss_fn = objective.loss_fn_for(
        kind, config.distill, temperature, topk_k=config.cache.k,
        cross_cfg=dict(config.distill.cross_tokenizer),
        unmapped_ids=vocab.student_unmapped(pieces[:, 0], 300), pieces=pieces,
    )  # fmt: skip
    frozen = (teacher,) if kind.mode == "online" else ()
    loss, metrics = jax.jit(lambda m, b, fn=loss_fn, f=frozen: fn(m, b, 0, *f))(
        student, batch
    )
    # alm: its own term (the CE beside it is the same either way); vocab:
    # the whole loss, KD alone (config.distill.alpha is 0).
    losses_of[run] = (batch, metrics["alm"] if offline == "alm" else loss)
  (cached_batch, cached), (live_batch, live) = losses_of.values()
  np.testing.assert_array_equal(cached_batch["row"], live_batch["row"])
  np.testing.assert_array_equal(cached_batch["tokens"], live_batch["tokens"])
  assert float(cached) > (1e-4 if offline == "alm" else 0.1)
  tolerance = 1e-5 if offline == "alm" else 1e-3
  np.testing.assert_allclose(live, cached, rtol=tolerance)


def test_vocab_uld_falls_back_to_the_text_where_no_draw_agrees():
  """A position whose projected sample kept no draw trains on the text's
  next piece (cross-entropy); the others on the sampled KL."""
  rng = np.random.default_rng(6)
  logits = jnp.asarray(rng.normal(size=(1, 2, 9)), jnp.float32)
  ids = jnp.asarray([[[1, 2], [3, 4]]])
  counts = jnp.asarray([[[3.0, 1.0], [0.0, 0.0]]])
  labels = jnp.asarray([[5, 7]])
  got = vocab.vocab_uld_per_token(
      logits, ids, None, jnp.zeros((1, 2, 2)), jnp.asarray([[True, True]]),
      None, counts=counts, labels=labels,
  )  # fmt: skip
  want_kd = losses.sampled_kl_per_token(logits, ids, counts)[0, 0]
  want_ce = losses.cross_entropy_per_token(logits, labels)[0, 1]
  np.testing.assert_allclose(got[0], [want_kd, want_ce], rtol=1e-6)
