"""Corpus split, tokenizer, packing, iterator state, process shards, bad input."""

import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from conftest import files_config

from data import corpus, pipeline, prepare, shards
from data import tokenizer as tok
from distill.core import cli, layout
from distill.core.errors import UserError
from experiments import stdlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_corpus(root, n=12, extra=None):
  os.makedirs(root, exist_ok=True)
  texts = {}
  for i in range(n):
    text = (
        f"def f{i}(x):\n    return x * {i}  # número {i} — ünïcode 日本\n"
        * (3 + i)
    )
    texts[f"doc{i:02d}.txt"] = text
  texts.update(extra or {})
  for name, text in texts.items():
    with open(os.path.join(root, name), "w", encoding="utf-8") as f:
      f.write(text)
  return texts


def test_stdlib_split_is_deterministic_and_disjoint():
  files = corpus.stdlib_files()
  assert len(files) > 300
  assert not any(
      f"{os.sep}{d}{os.sep}" in f for f in files for d in ("test", "idlelib")
  )
  a = corpus.split_files(files, corpus.stdlib_root(), 25)
  b = corpus.split_files(list(reversed(files)), corpus.stdlib_root(), 25)
  assert sorted(a["validation"]) == sorted(b["validation"])
  assert not set(a["train"]) & set(a["validation"])
  assert set(a["train"]) | set(a["validation"]) == set(files)
  assert 0 < len(a["validation"]) < 0.05 * len(files)


def test_prepare_builds_the_same_split_twice(tmp_path):
  _write_corpus(tmp_path / "corpus")
  config = files_config(str(tmp_path / "corpus" / "*.txt"))
  paths = []
  for run in ("a", "b"):
    builder, _, _ = corpus.prepare_corpus(config.data, str(tmp_path / run))
    src = builder.as_data_source(split="validation")
    paths.append(sorted(src[i]["path"] for i in range(len(src))))
    train = builder.as_data_source(split="train")
    assert not {train[i]["path"] for i in range(len(train))} & set(paths[-1])
  assert paths[0] == paths[1] and paths[0]


def test_tokenizer_round_trips_held_out_text_exactly(tmp_path):
  files = corpus.stdlib_files()
  splits = corpus.split_files(files, corpus.stdlib_root(), 25)
  train_texts = [corpus.read_text(p)[0] for p in splits["train"][:30]]
  tokenizer = tok.train_tokenizer(train_texts, vocab_size=600)
  held_out = [corpus.read_text(p)[0] for p in splits["validation"][:3]]
  held_out.append("naïve café — 日本語のテキスト 🙂\t\r\n  trailing  ")
  for text in held_out:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
  assert [tokenizer.token_to_id(s) for s in tok.SPECIALS] == [0, 1, 2]


def _synthetic_stream(data_dir, split, docs, docs_per_shard=2):
  """Writes a token stream with known documents as shards of
  ``docs_per_shard`` documents each (rows then cross shard boundaries)."""
  out = pipeline.tokens_dir(data_dir, split)
  os.makedirs(os.path.join(out, shards.UNITS))
  records = []
  for unit, lo in enumerate(range(0, len(docs), docs_per_shard)):
    writer = shards.ShardWriter(out, f"u{unit:06d}-000")
    for doc in docs[lo : lo + docs_per_shard]:
      writer.add(np.asarray(doc, dtype="<u2"))
    record = {"start": lo, "stop": min(len(docs), lo + docs_per_shard)}
    records.append(dict(record, bytes=0, tokens=writer.num_tokens))
    records[-1]["shards"] = [writer.close()]
  shards.finish(out, records, {"dtype": "uint16", "tokenizer_hash": "x"})
  return np.concatenate(docs)


def test_segment_ids_and_positions_at_document_boundaries(tmp_path):
  # Documents of lengths 3, 6, 2, 9 (token values encode doc and position).
  docs = [np.arange(n) + 100 * (d + 1) for d, n in enumerate((3, 6, 2, 9))]
  _synthetic_stream(str(tmp_path), "train", docs)
  rows = pipeline.PackedRows(str(tmp_path), "train", seq_len=4)  # rows of 5
  assert len(rows) == 4
  r0, r1, r2 = rows[0], rows[1], rows[2]
  np.testing.assert_array_equal(r0["tokens"], [100, 101, 102, 200, 201])
  np.testing.assert_array_equal(r0["segment_ids"], [1, 1, 1, 2, 2])
  np.testing.assert_array_equal(r0["positions"], [0, 1, 2, 0, 1])
  # Row 1 starts inside document 2: positions restart at the row start.
  np.testing.assert_array_equal(r1["tokens"], [202, 203, 204, 205, 300])
  np.testing.assert_array_equal(r1["segment_ids"], [1, 1, 1, 1, 2])
  np.testing.assert_array_equal(r1["positions"], [0, 1, 2, 3, 0])
  np.testing.assert_array_equal(r2["segment_ids"], [1, 2, 2, 2, 2])
  np.testing.assert_array_equal(r2["positions"], [0, 0, 1, 2, 3])
  mask = pipeline.target_mask(np.stack([r0["segment_ids"], r1["segment_ids"]]))
  np.testing.assert_array_equal(mask, [[1, 1, 0, 1], [1, 1, 1, 0]])


def test_rows_map_each_shard_once_from_many_threads(tmp_path, monkeypatch):
  # grain reads rows from several threads; each opens shards on first use.
  docs = [np.arange(n) + 100 for n in (30, 40, 50)]
  _synthetic_stream(str(tmp_path), "train", docs, docs_per_shard=1)
  rows = pipeline.PackedRows(str(tmp_path), "train", seq_len=4)
  want = [rows[i]["tokens"] for i in range(len(rows))]
  fresh = pipeline.PackedRows(str(tmp_path), "train", seq_len=4)
  real_memmap, opened = np.memmap, []

  def slow_memmap(path, *args, **kwargs):
    opened.append(path)
    time.sleep(0.02)  # Wide window: unguarded threads would overlap here.
    return real_memmap(path, *args, **kwargs)

  monkeypatch.setattr(shards.np, "memmap", slow_memmap)
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    got = list(pool.map(lambda i: fresh[i % len(fresh)]["tokens"], range(48)))
  assert sorted(opened) == sorted(set(opened)) and len(opened) == 6
  for i, tokens in enumerate(got):
    np.testing.assert_array_equal(tokens, want[i % len(want)])


def test_packing_loses_and_duplicates_no_token_over_an_epoch(tmp_path):
  rng = np.random.default_rng(0)
  docs = [rng.integers(3, 500, size=rng.integers(1, 40)) for _ in range(200)]
  stream = _synthetic_stream(str(tmp_path), "train", docs)
  seq_len = 15
  ds = pipeline.make_dataset(
      str(tmp_path),
      "train",
      seq_len=seq_len,
      batch_size=7,
      seed=3,
      num_epochs=1,
      process_index=0,
      process_count=1,
      drop_remainder=False,
  )
  rows = np.concatenate([b["tokens"] for b in ds])
  num_rows = stream.size // (seq_len + 1)
  assert rows.shape == (num_rows, seq_len + 1)
  kept = stream[: num_rows * (seq_len + 1)]
  np.testing.assert_array_equal(
      np.bincount(rows.ravel(), minlength=500), np.bincount(kept, minlength=500)
  )
  # Shuffled, but each row exactly once.
  starts = sorted(map(tuple, rows))
  assert starts == sorted(map(tuple, kept.reshape(num_rows, -1)))
  assert not np.array_equal(rows, kept.reshape(num_rows, -1))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("kd")
  _write_corpus(str(root / "corpus"), n=30)
  config = files_config(str(root / "corpus" / "*.txt"))
  summary = prepare.prepare(config, str(root / "w"))
  return config, str(root / "w"), summary


def test_iterator_state_restores_the_exact_batches(prepared):
  """Whatever the batches made ahead of the consumer, a saved state
  restores exactly the batches that followed it."""
  config, workdir, _ = prepared

  def make(read_ahead=pipeline.READ_AHEAD):
    return pipeline.make_dataset(
        layout.data_dir(workdir),
        "train",
        seq_len=16,
        batch_size=4,
        seed=7,
        process_index=0,
        process_count=1,
        read_ahead=read_ahead,
    )

  it = iter(make())
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(8)]  # Crosses an epoch boundary.
  for read_ahead in (pipeline.READ_AHEAD, 1, 16):
    restored = iter(make(read_ahead))
    restored.set_state(json.loads(json.dumps(state)))
    for want, got in zip(expected, (next(restored) for _ in range(8))):
      for key in ("tokens", "segment_ids", "positions"):
        np.testing.assert_array_equal(want[key], got[key])
  fresh = next(iter(make()))["tokens"]
  assert not np.array_equal(fresh, expected[0]["tokens"])
  with pytest.raises(pipeline.DataError, match="read_ahead=0"):
    make(read_ahead=0)


def test_phases_switch_rows_and_resume_in_either_phase(prepared):
  """Short rows for three batches, then long ones; a state saved in either
  phase (or at the switch) restores the batches that followed it."""
  _, workdir, _ = prepared

  def make(seq_len, batch_size):
    return lambda: iter(
        pipeline.make_dataset(
            layout.data_dir(workdir),
            "train",
            seq_len=seq_len,
            batch_size=batch_size,
            seed=3,
            process_index=0,
            process_count=1,
        )
    )

  def phases():
    return pipeline.Phases([(3, make(8, 4)), (1, make(16, 2))])

  it = phases()
  states, batches = [], []
  for _ in range(6):
    states.append(json.loads(json.dumps(it.get_state())))
    batches.append(next(it))
  shapes = [b["tokens"].shape for b in batches]
  assert shapes == [(4, 9)] * 3 + [(2, 17)] * 3  # the last phase runs on
  plain = make(16, 2)()
  np.testing.assert_array_equal(next(plain)["tokens"], batches[3]["tokens"])
  for start in (1, 3, 4):
    resumed = phases()
    resumed.set_state(states[start])
    for want in batches[start:]:
      np.testing.assert_array_equal(next(resumed)["tokens"], want["tokens"])
  # A plain iterator's state (a checkpoint from before phases) is the last
  # phase's; a phase the schedule no longer has is refused.
  next(plain)
  resumed = phases()
  resumed.set_state(json.loads(json.dumps(plain.get_state())))
  np.testing.assert_array_equal(next(resumed)["tokens"], batches[5]["tokens"])
  with pytest.raises(pipeline.DataError, match="phase 2 of a run"):
    phases().set_state({"phase": 2, "taken": 0, "state": states[0]})


def test_process_shards_are_disjoint_and_cover_the_data(tmp_path):
  # Unique token values, so a row is identified by its first token.
  rng = np.random.default_rng(1)
  stream = np.arange(3000)
  cuts = np.sort(rng.choice(np.arange(1, 3000), size=80, replace=False))
  _synthetic_stream(str(tmp_path), "train", np.split(stream, cuts))
  num_rows = 3000 // 17
  seen = []
  for index in range(3):
    ds = pipeline.make_dataset(
        str(tmp_path),
        "train",
        seq_len=16,
        batch_size=3,
        seed=1,
        num_epochs=1,
        process_index=index,
        process_count=3,
        drop_remainder=False,
    )
    firsts = [int(r[0]) for b in ds for r in b["tokens"]]
    assert len(firsts) == len(set(firsts))
    seen.append(set(firsts))
  for a in range(3):
    for b in range(a + 1, 3):
      assert not seen[a] & seen[b]
  assert set().union(*seen) == {17 * i for i in range(num_rows)}
  assert max(map(len, seen)) - min(map(len, seen)) <= 1


def test_prepare_is_idempotent_and_reports(prepared, capsys):
  config, workdir, summary = prepared
  assert summary["tokenizer"] == "trained"
  assert summary["splits"]["train"]["num_tokens"] > 0
  again = prepare.prepare(config, workdir)
  assert again.get("skipped") and "nothing to do" in capsys.readouterr().out


def test_existing_tokenizer_with_another_vocab_is_refused_and_kept(prepared):
  config, workdir, _ = prepared
  path = layout.tokenizer_path(workdir)
  before = open(path, "rb").read()
  other = config.copy_and_resolve_references()
  other.data.vocab_size = 4096
  with pytest.raises(tok.TokenizerError, match="vocab of 300"):
    prepare.prepare(other, workdir)
  assert open(path, "rb").read() == before


def test_imported_tokenizer_is_adopted_not_retrained(prepared, tmp_path):
  config, workdir, _ = prepared
  new_workdir = tmp_path / "w2"
  new_workdir.mkdir()
  path = layout.tokenizer_path(str(new_workdir))
  with (
      open(layout.tokenizer_path(workdir), "rb") as src,
      open(path, "wb") as dst,
  ):
    dst.write(src.read())
  summary = prepare.prepare(config, str(new_workdir))
  assert summary["tokenizer"] == "adopted"
  assert summary["tokenizer_hash"] == tok.tokenizer_hash(
      layout.tokenizer_path(workdir)
  )


def test_glob_that_matches_nothing_is_a_clear_error(tmp_path):
  config = files_config(str(tmp_path / "nope" / "*.txt"))
  os.makedirs(tmp_path / "w")
  with pytest.raises(corpus.CorpusError, match="matched nothing"):
    prepare.prepare(config, str(tmp_path / "w"))
  assert not os.listdir(tmp_path / "w")  # no empty W/data/ left behind


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
  root = tmp_path / "corpus"
  _write_corpus(str(root))
  (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1") * 50)
  text, replaced = corpus.read_text(str(root / "latin1.txt"))
  assert replaced == 100 and "caf\ufffd" in text
  config = files_config(str(root / "*.txt"))
  summary = prepare.prepare(config, str(tmp_path / "w"))
  total_docs = sum(m["num_docs"] for m in summary["splits"].values())
  assert total_docs == 13


def test_unwritable_workdir_is_a_clear_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  with pytest.raises(UserError, match="not writable"):
    cli.check_workdir(str(blocker / "sub"))


def test_prepare_binary_prints_one_line_errors(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "data.prepare",
          "--config=experiments/stdlib.py:tiny",
          "--config.data.source=files",
          f"--config.data.files_glob={tmp_path}/none/*.txt",
          f"--workdir={tmp_path}/w",
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert proc.returncode == 1
  assert "error: No input files" in proc.stderr
  assert "Traceback" not in proc.stderr
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "data.prepare",
          "--config=experiments/stdlib.py:tiny",
          "--config.data.vocab_sise=10",
          f"--workdir={tmp_path}/w",
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert proc.returncode != 0 and "vocab_sise" in proc.stderr


def test_preparing_local_files_announces_no_download(tmp_path, capsys):
  _write_corpus(str(tmp_path / "corpus"), n=6)
  config = files_config(str(tmp_path / "corpus" / "*.txt"))
  prepare.prepare(config, str(tmp_path / "w"))
  out = capsys.readouterr().out
  assert "prepare: train:" in out
  assert "Downloading" not in out and "downloaded" not in out


def test_building_a_corpus_does_not_warn_about_its_configuration(
    tmp_path, caplog
):
  """TFDS warns "Using custom data configuration" for every custom corpus:
  noise on every run, so the corpus keeps it out of the log."""
  caplog.set_level("INFO")
  corpus.corpus_builder(
      files_config(str(tmp_path / "*.txt")).data, str(tmp_path / "d")
  )
  corpus.corpus_builder(stdlib.get_config("tiny").data, str(tmp_path / "d"))
  assert not [
      r for r in caplog.records if "custom data configuration" in r.getMessage()
  ]


def test_a_corpus_builder_leaves_nothing_in_the_temporary_directory(
    tmp_path, monkeypatch
):
  """TFDS makes an empty folder in the system's temporary directory for
  each builder of an unbuilt corpus (its bucket lookup) and never removes
  it: one more per prepare, test and run."""
  temporary = tmp_path / "tmp"
  temporary.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(temporary))
  corpus.corpus_builder(
      files_config(str(tmp_path / "*.txt")).data, str(tmp_path / "d")
  )
  corpus.corpus_builder(stdlib.get_config("tiny").data, str(tmp_path / "d"))
  assert not os.listdir(temporary)
