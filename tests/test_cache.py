"""The logit cache end to end: the writer binary, the manifest, the reader.

A tiny prepared workdir with a random (untrained) teacher whose outputs are
made peaky by scaling its final norm, so top-k tails and sampled counts carry
information. Records are checked against the teacher recomputed here; a killed
run, two writer processes and an uninterrupted run must write the same bytes;
damaged shards and mismatched manifests are refused, naming what is wrong.
"""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data import cache, cache_format, pipeline
from data import tokenizer as tok
from distill.core import checkpoint as ckpt
from distill.core import files, layout
from experiments import stdlib
from teacher import cache_logits as cl
from teacher import targets as teacher_targets
from teacher import load_teacher

import procs
from conftest import write_random_teacher

TINY = "--config=experiments/stdlib.py:tiny"
# The cached fixture: 3 shards of 16, 16 and 14 rows (the last batch of the
# last shard is padded), at a temperature other than 1.
CACHE = dict(max_rows=46, temperature=2.0)
# The kill test: 10 shards, slow enough that a SIGKILL lands between the
# first and the last shard (about 0.1 s a shard here).
KILL_OVERRIDES = dict(max_rows=320, rows_per_shard=32, batch_size=2)
KILL_SEQ_LEN = 128


def tiny_config(seq_len=None, **cache_overrides):
  config = stdlib.get_config("tiny")
  config.cache.update(cache_overrides)
  if seq_len:
    config.data.seq_len = seq_len
  return config


def flags_for(seq_len=None, **cache_overrides):
  args = [TINY] + [
      f"--config.cache.{key}={value}" for key, value in cache_overrides.items()
  ]
  return args + ([f"--config.data.seq_len={seq_len}"] if seq_len else [])


def copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def logits_dir(workdir):
  return layout.cache_dir(workdir)


def manifest_of(workdir):
  """The manifest without the shards' wall-clock "seconds" (not content)."""
  with open(os.path.join(logits_dir(workdir), cache.MANIFEST)) as f:
    manifest = json.load(f)
  for shard in manifest["shards"]:
    if shard["complete"]:
      assert shard.pop("seconds") > 0
  return manifest


def file_hashes(directory):
  return {
      name: cache.file_sha256(os.path.join(directory, name))
      for name in sorted(os.listdir(directory))
  }


def done_shards(workdir):
  return sorted(
      os.path.basename(p).replace(".done.json", ".array_record")
      for p in glob.glob(os.path.join(logits_dir(workdir), "*.done.json"))
  )


def expect_for(workdir, seq_len):
  return {
      "tokenizer_hash": tok.tokenizer_hash(layout.tokenizer_path(workdir)),
      "vocab_size": tok.load_tokenizer(
          layout.tokenizer_path(workdir)
      ).get_vocab_size(),
      "seq_len": seq_len,
  }


def assert_same_records(dir_a, dir_b):
  for target in cache.read_manifest(dir_a)["methods"]:
    a, b = cache.CacheSource(dir_a, target), cache.CacheSource(dir_b, target)
    assert len(a) == len(b)
    for i in range(len(a)):
      ra, rb = a[i], b[i]
      assert ra.keys() == rb.keys()
      for key in ra:
        np.testing.assert_array_equal(
            ra[key], rb[key], err_msg=f"{target} {i} {key}"
        )


@pytest.fixture(scope="module", autouse=True)
def compile_once():
  """One jitted target function per setting for the whole module: each
  ``cache_logits`` call builds a new one, and compiling takes seconds."""
  made, make = {}, teacher_targets.make_target_fn

  def make_target_fn(methods, *args):
    key = (tuple(methods), *args)
    if key not in made:
      made[key] = make(methods, *args)
    return made[key]

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(teacher_targets, "make_target_fn", make_target_fn)
    yield


@pytest.fixture(scope="module")
def base(tiny_prepared, tmp_path_factory):
  """A prepared tiny workdir with a random teacher in W/teacher (no cache)."""
  workdir = copy(tiny_prepared, tmp_path_factory.mktemp("base") / "w")
  # Random weights give a near-uniform teacher; a larger final-norm scale
  # sharpens it (entropy about 2.3 nats at T=2) without training.
  write_random_teacher(workdir, final_norm_scale=8.0)
  return workdir


@pytest.fixture(scope="module")
def cached(base, tmp_path_factory):
  """``base`` with a complete cache of both targets (CACHE settings)."""
  workdir = copy(base, tmp_path_factory.mktemp("cached") / "w")
  cl.cache_logits(tiny_config(**CACHE), workdir)
  return workdir


def test_records_match_the_teacher_recomputed(cached):
  config = tiny_config(**CACHE)
  c = config.cache
  directory = logits_dir(cached)
  manifest = cache.read_manifest(directory)
  teacher = load_teacher(layout.teacher_dir(cached))
  assert manifest["teacher_fingerprint"] == ckpt.fingerprint(teacher)
  assert manifest["temperature"] == c.temperature == 2.0
  assert (manifest["k"], manifest["num_samples"]) == (c.k, c.num_samples)
  assert [s["records"] for s in manifest["shards"]] == [16, 16, 14]
  assert all(s["complete"] for s in manifest["shards"])

  rows = pipeline.PackedRows(
      layout.data_dir(cached), "train", config.data.seq_len
  )
  topk, sample = cache.CacheSource(directory, "topk"), cache.CacheSource(
      directory, "sample"
  )
  assert len(topk) == len(sample) == 46
  picks = [0, 17, 45]  # first shard, second shard, padded last batch
  batch = {key: np.stack([rows[i][key] for i in picks]) for key in rows[0]}
  logits = nnx.jit(lambda model, *x: model(*x))(
      teacher,
      batch["tokens"][:, :-1],
      batch["segment_ids"][:, :-1],
      batch["positions"][:, :-1],
  )
  log_probs = np.asarray(
      jax.nn.log_softmax(logits / c.temperature, axis=-1), np.float64
  )
  # The label target: each label's log-prob at temperature 1, exactly.
  natural = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
  labels_of = cache.CacheSource(directory, "label")
  for b, i in enumerate(picks):
    want = np.take_along_axis(natural[b], rows[i]["tokens"][1:, None], -1)[:, 0]
    np.testing.assert_allclose(
        labels_of[i]["label_log_probs"], want, rtol=1e-5, atol=1e-5
    )
  top_vals, top_ids = (
      np.asarray(x)
      for x in jax.lax.top_k(jnp.asarray(log_probs, jnp.float32), c.k)
  )

  top1_counts = top1_expected = top1_var = 0.0
  for b, i in enumerate(picks):
    lp, got, drawn = log_probs[b], topk[i], sample[i]
    for record in (got, drawn):
      for key in ("tokens", "segment_ids", "positions"):
        np.testing.assert_array_equal(
            record[key], rows[i][key], err_msg=f"{i} {key}"
        )

    # Top-k: the right ids in descending order (ties aside), values within
    # the stated bound of the teacher's log-probs, tail within its bound.
    ids = got["ids"]
    true_at_ids = np.take_along_axis(lp, ids, -1)
    np.testing.assert_allclose(true_at_ids, top_vals[b], atol=1e-5)
    assert (ids == top_ids[b]).mean() > 0.99
    bound = cache_format.log_prob_error_bound(true_at_ids)[:, None] + 2e-6
    bound = np.broadcast_to(bound, ids.shape).copy()
    bound[:, 0] = cache_format.ERROR_BOUNDS["top_log_prob"] + 2e-6
    assert (np.abs(got["log_probs"] - true_at_ids) <= bound).all(), i
    assert (bound[:, 1:] <= cache_format.ERROR_BOUNDS["log_prob"] + 1e-5).all()
    tail = 1.0 - np.exp(true_at_ids).sum(-1)
    assert tail.mean() > 0.05  # A real tail to check, not zero.
    np.testing.assert_allclose(
        got["tail"], tail, rtol=0, atol=cache_format.ERROR_BOUNDS["tail"] + 2e-6
    )

    # Sample: N draws a position, unique ids ascending, then padding.
    counts, sids = drawn["counts"], drawn["ids"]
    assert counts.shape == sids.shape == (config.data.seq_len, c.num_samples)
    assert (counts.sum(-1) == c.num_samples).all()
    for t in range(config.data.seq_len):
      used = counts[t] > 0
      assert used[: used.sum()].all() and (np.diff(sids[t][used]) > 0).all()
      assert (sids[t][~used] == 0).all()
    # Draws follow the teacher at the cache temperature: the top id's total
    # count is within 5 standard deviations of N * p_top summed.
    p_top = np.exp(lp.max(-1))
    top1_counts += np.where(sids == lp.argmax(-1)[:, None], counts, 0).sum()
    top1_expected += (c.num_samples * p_top).sum()
    top1_var += (c.num_samples * p_top * (1 - p_top)).sum()
  assert abs(top1_counts - top1_expected) < 5 * np.sqrt(top1_var), (
      top1_counts,
      top1_expected,
  )


def _poll_and_kill(workdir, args, timeout=120):
  """Starts the writer; SIGKILLs it once a shard but not all are done."""
  proc = subprocess.Popen(
      [
          sys.executable,
          "-m",
          "teacher.cache_logits",
          *args,
          f"--workdir={workdir}",
      ],
      cwd=procs.REPO,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + timeout
  try:
    while proc.poll() is None and time.time() < deadline:
      if done_shards(workdir):
        proc.send_signal(signal.SIGKILL)
        break
      time.sleep(0.002)
  finally:
    if proc.poll() is None and time.time() >= deadline:
      proc.kill()
    proc.wait()
  return proc.returncode


@pytest.mark.slow  # ~35 s: a subprocess killed mid-cache, then resumed
def test_killed_run_resumes_to_the_same_cache(base, tmp_path):
  args = flags_for(KILL_SEQ_LEN, **KILL_OVERRIDES)
  killed = copy(base, tmp_path / "killed")
  straight = copy(base, tmp_path / "straight")
  directory = logits_dir(killed)

  code = _poll_and_kill(killed, args)
  assert code == -signal.SIGKILL
  done = done_shards(killed)
  assert (
      1 <= len(done) < 10
  ), f"not killed mid-run: {len(done)} of 10 shards done"
  with pytest.raises(cache.CacheError, match="incomplete"):
    cache.read_manifest(directory)
  # Nothing half-written under a final name: every shard file there is a
  # complete one (its .done.json matches it, or, killed between the rename
  # and the .done.json, it holds all its records); partial ones are *.tmp-*.
  states = {
      s["name"]: s for s in cache.shard_states(directory, manifest_of(killed))
  }
  finals = sorted(
      os.path.basename(p)
      for p in glob.glob(os.path.join(directory, "*.array_record"))
  )
  assert set(done) <= set(finals) and len(finals) <= len(done) + 1
  for name in finals:
    path = os.path.join(directory, name)
    if name in done:
      assert cache.file_sha256(path) == states[name]["sha256"]
    else:
      assert len(_read_records(path)) == states[name]["records"]

  result = procs.binary("teacher.cache_logits", *args, f"--workdir={killed}")
  assert result.returncode == 0, result.stderr[-3000:]
  rewritten = int(re.search(r"cache: (\d+) rows in", result.stdout).group(1))
  assert rewritten == 320 - 32 * len(done)  # Resumed, not restarted.
  assert not glob.glob(
      os.path.join(directory, "shard-*.tmp-*")
  )  # Stale ones removed.

  config = tiny_config(KILL_SEQ_LEN, **KILL_OVERRIDES)
  cl.cache_logits(config, straight)
  want = manifest_of(straight)
  assert manifest_of(killed) == want
  assert [s["sha256"] for s in want["shards"]] == [
      s["sha256"] for s in manifest_of(killed)["shards"]
  ]
  assert (
      all(s["complete"] for s in want["shards"]) and len(want["shards"]) == 10
  )
  assert_same_records(directory, logits_dir(straight))

  before = file_hashes(directory)
  mtimes = {
      n: os.path.getmtime(os.path.join(directory, n))
      for n in before
      if n != cache.MANIFEST
  }
  cl.cache_logits(config, killed)
  assert file_hashes(directory) == before
  assert mtimes == {
      n: os.path.getmtime(os.path.join(directory, n)) for n in mtimes
  }


def test_nothing_to_do_on_a_finished_cache(cached, tmp_path, capsys):
  workdir = copy(cached, tmp_path / "w")
  before = file_hashes(logits_dir(workdir))
  cl.cache_logits(tiny_config(**CACHE), workdir)
  assert "nothing to do" in capsys.readouterr().out
  assert file_hashes(logits_dir(workdir)) == before


def _rewrite_shard(directory, name, records):
  """Replaces a shard by these records and makes the manifest agree with it."""
  from array_record.python import array_record_module

  path = os.path.join(directory, name)
  os.remove(path)
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  for record in records:
    writer.write(record)
  writer.close()
  manifest = json.load(open(os.path.join(directory, cache.MANIFEST)))
  for shard in manifest["shards"]:
    if shard["name"] == name:
      shard.update(bytes=os.path.getsize(path), sha256=cache.file_sha256(path))
  files.write_json(
      os.path.join(directory, cache.MANIFEST), manifest, sort_keys=True
  )


def _read_records(path):
  from array_record.python import array_record_module

  reader = array_record_module.ArrayRecordReader(path)
  try:
    return [reader.read([i])[0] for i in range(reader.num_records())]
  finally:
    reader.close()


def test_damaged_shards_are_named(cached, tmp_path):
  manifest = manifest_of(cached)
  names = [s["name"] for s in manifest["shards"]]
  assert cache.verify(logits_dir(cached)) == {
      "shards": 3,
      "records": 46,
      "bytes": sum(s["bytes"] for s in manifest["shards"]),
  }

  # One flipped byte inside shard 1's data: verify names the shard; the
  # reader names the shard and the record, and reads the others.
  flipped = copy(cached, tmp_path / "flipped")
  directory = logits_dir(flipped)
  path = os.path.join(directory, names[1])
  data = bytearray(open(path, "rb").read())
  data[3000] ^= 0x10
  open(path, "wb").write(bytes(data))
  with pytest.raises(cache.CacheError, match=re.escape(names[1])):
    cache.verify(directory)
  # Which record the byte belongs to, found by reading each one directly
  # (ArrayRecord compresses and checksums each record, so the record's
  # bytes are not in the file as such).
  from array_record.python import array_record_module

  reader = array_record_module.ArrayRecordReader(path)
  bad = []
  for j in range(reader.num_records()):
    try:
      cache_format.decode_record(reader.read([j])[0], manifest["vocab_size"])
    except (RuntimeError, cache_format.CacheFormatError):
      bad.append(j)
  reader.close()
  assert len(bad) == 1, bad
  source = cache.CacheSource(directory, "topk")
  with pytest.raises(
      cache.CacheError, match=rf"Record {bad[0]} of {re.escape(names[1])}"
  ):
    source[16 + bad[0]]
  source[16 + (bad[0] + 1) % 16]  # The rest still reads.

  # A record whose bytes changed but whose container is intact (its own
  # crc catches it): verify and the reader name shard and record.
  recrc = copy(cached, tmp_path / "recrc")
  directory = logits_dir(recrc)
  records = _read_records(os.path.join(directory, names[2]))
  damaged = bytearray(records[5])
  damaged[cache_format.HEADER.size + 40] ^= 0x01
  records[5] = bytes(damaged)
  _rewrite_shard(directory, names[2], records)
  with pytest.raises(
      cache.CacheError,
      match=rf"Record 5 of shard {re.escape(names[2])}.*checksum",
  ):
    cache.verify(directory)
  with pytest.raises(
      cache.CacheError, match=rf"Record 5 of {re.escape(names[2])}.*checksum"
  ):
    cache.CacheSource(directory, "sample")[32 + 5]

  # A truncated shard: the reader refuses to open the cache, naming it (size
  # differs from the manifest), verify refuses, and the binary says so in
  # one line, without a traceback.
  truncated = copy(cached, tmp_path / "truncated")
  directory = logits_dir(truncated)
  path = os.path.join(directory, names[0])
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(
      cache.CacheError,
      match=rf"{re.escape(names[0])} is \d+ bytes but the manifest",
  ):
    cache.CacheSource(directory, "topk")
  with pytest.raises(cache.CacheError, match=re.escape(names[0])):
    cache.verify(directory)
  result = procs.binary(
      "teacher.cache_logits", TINY, f"--workdir={truncated}", "--verify"
  )
  assert result.returncode == 1, result.stdout + result.stderr
  output = result.stdout + result.stderr
  assert "Traceback" not in output, output
  errors = [line for line in output.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and names[0] in errors[0], output


def test_cache_that_does_not_fit_the_student_is_refused(cached, base, tmp_path):
  directory = logits_dir(cached)
  expect = expect_for(cached, 32)
  kwargs = dict(
      target="topk",
      batch_size=4,
      num_epochs=1,
      process_index=0,
      process_count=1,
  )
  next(iter(cache.make_dataset(directory, expect=expect, **kwargs)))  # Fits.
  for field, value in [
      ("tokenizer_hash", "other"),
      ("vocab_size", 513),
      ("seq_len", 64),
  ]:
    with pytest.raises(
        cache.CacheError,
        match=rf"{field} is .* in the cache but {re.escape(repr(value))}",
    ):
      cache.make_dataset(
          directory, expect=dict(expect, **{field: value}), **kwargs
      )

  topk_only = copy(base, tmp_path / "topk_only")
  cl.cache_logits(tiny_config(methods=("topk",), max_rows=16), topk_only)
  directory = logits_dir(topk_only)
  assert manifest_of(topk_only)["methods"] == ["topk"]
  next(iter(cache.make_dataset(directory, expect=expect, **kwargs)))
  with pytest.raises(cache.CacheError, match="not 'sample'"):
    cache.make_dataset(
        directory, expect=expect, **dict(kwargs, target="sample")
    )


@pytest.mark.parametrize("process_index,process_count", [(0, 1), (1, 2)])
def test_order_matches_the_token_pipeline(cached, process_index, process_count):
  expect = expect_for(cached, 32)
  common = dict(
      batch_size=4,
      seed=7,
      num_epochs=1,
      process_index=process_index,
      process_count=process_count,
  )
  got = list(
      cache.make_dataset(
          logits_dir(cached), expect=expect, target="sample", **common
      )
  )
  want = list(
      pipeline.make_dataset(
          layout.data_dir(cached), "train", seq_len=32, num_rows=46, **common
      )
  )
  assert len(got) == len(want) == 46 // process_count // (4 // process_count)
  for a, b in zip(got, want):
    for key in ("tokens", "segment_ids", "positions"):
      np.testing.assert_array_equal(a[key], b[key])
    assert a["counts"].shape == (4 // process_count, 32, 16)
  # Shuffled, so the order is a property worth checking.
  rows = pipeline.PackedRows(layout.data_dir(cached), "train", 32)
  first = np.stack([rows[i]["tokens"] for i in range(len(got[0]["tokens"]))])
  assert not np.array_equal(got[0]["tokens"], first)


class _AsProcess:
  """The ``jax`` module as process ``index`` of ``count`` sees it."""

  def __init__(self, index, count):
    self._index, self._count = index, count

  def __getattr__(self, name):
    return getattr(jax, name)

  def process_index(self):
    return self._index

  def process_count(self):
    return self._count


def test_two_writer_processes_write_disjoint_shards(
    cached, base, tmp_path, monkeypatch
):
  workdir = copy(base, tmp_path / "w")
  names = [s["name"] for s in manifest_of(cached)["shards"]]
  config = tiny_config(**CACHE)
  monkeypatch.setattr(cl, "jax", _AsProcess(0, 2))
  cl.cache_logits(config, workdir)
  assert done_shards(workdir) == [names[0], names[2]]
  assert not os.path.exists(os.path.join(logits_dir(workdir), names[1]))
  monkeypatch.setattr(cl, "jax", _AsProcess(1, 2))
  cl.cache_logits(config, workdir)
  assert done_shards(workdir) == names
  assert manifest_of(workdir) == manifest_of(cached)
  for name in names:
    assert cache.file_sha256(
        os.path.join(logits_dir(workdir), name)
    ) == cache.file_sha256(os.path.join(logits_dir(cached), name))


def test_other_settings_are_refused_on_resume(cached, tmp_path):
  complete = copy(cached, tmp_path / "complete")
  partial = copy(cached, tmp_path / "partial")
  last = manifest_of(cached)["shards"][-1]["name"]
  os.remove(os.path.join(logits_dir(partial), last))
  os.remove(cache.done_path(logits_dir(partial), last))
  for workdir in (complete, partial):
    before = file_hashes(logits_dir(workdir))
    for change in (dict(k=4), dict(temperature=1.0), dict(num_samples=8)):
      field = next(iter(change))
      with pytest.raises(
          cache.CacheError, match=rf"other settings \({field} differs\)"
      ):
        cl.cache_logits(tiny_config(**dict(CACHE, **change)), workdir)
      assert file_hashes(logits_dir(workdir)) == before
  # The same settings finish the partial cache, byte for byte.
  cl.cache_logits(tiny_config(**CACHE), partial)
  assert manifest_of(partial) == manifest_of(cached)


def test_records_do_not_depend_on_the_batch_size(cached, base, tmp_path):
  # Row r samples with a key of its own, so another batch size (here with a
  # padded batch in every shard) draws the same ids; top-k agrees up to the
  # teacher's float noise across batch shapes and the quantisation.
  workdir = copy(base, tmp_path / "w")
  cl.cache_logits(tiny_config(**dict(CACHE, batch_size=3)), workdir)
  for target in ("sample", "topk"):
    a = cache.CacheSource(logits_dir(cached), target)
    b = cache.CacheSource(logits_dir(workdir), target)
    same = []
    for i in range(len(a)):
      ra, rb = a[i], b[i]
      np.testing.assert_array_equal(ra["tokens"], rb["tokens"])
      if target == "sample":
        same.append(
            ((ra["ids"] == rb["ids"]) & (ra["counts"] == rb["counts"])).all(-1)
        )
      else:
        # Each within its bound of the teacher (the quantisation step
        # follows the row's span), so within twice the bound of each other.
        np.testing.assert_allclose(
            ra["log_probs"],
            rb["log_probs"],
            atol=2 * cache_format.ERROR_BOUNDS["log_prob"],
        )
        same.append((ra["ids"] == rb["ids"]).all(-1))
    assert np.mean(same) > 0.99, (target, np.mean(same))


def test_records_do_not_depend_on_the_position_chunk(cached, base, tmp_path):
  """The output layer and the targets made 8 positions at a time (the tiny
  rows are otherwise made whole): the same bytes in every shard. Chunks
  that do not divide the row (the last one padded) draw the same ids too,
  their log-probs within float32 rounding of the whole row's."""
  workdir = copy(base, tmp_path / "w")
  cl.cache_logits(tiny_config(**dict(CACHE, position_chunk=8)), workdir)
  assert manifest_of(workdir) == manifest_of(cached)

  teacher = load_teacher(layout.teacher_dir(base))
  rows = pipeline.PackedRows(layout.data_dir(base), "train", 32)
  batch = [
      np.stack([rows[i][key] for i in range(3)])[:, :-1]
      for key in ("tokens", "segment_ids", "positions")
  ]
  made = {}
  for chunk in (0, 5):
    target_fn = teacher_targets.make_target_fn(
        ("sample", "topk", "topk_tail"), 8, 16, 2.0, False, 4, 16, chunk
    )
    made[chunk] = target_fn(
        teacher, *batch, jax.random.key(0), np.arange(3, dtype=np.int32)
    )
  assert made[0].keys() == made[5].keys()
  for name, whole in made[0].items():
    if jnp.issubdtype(whole.dtype, jnp.floating):  # log-probs, tail mass
      np.testing.assert_allclose(made[5][name], whole, atol=2e-6, err_msg=name)
    else:
      np.testing.assert_array_equal(made[5][name], whole, err_msg=name)
