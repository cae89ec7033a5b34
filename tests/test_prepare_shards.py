"""Tokenizing at scale: shards the same whoever writes them, resumable units,
a token budget, streamed JSONL and Parquet sources."""

import dataclasses
import gzip
import json
import os

import numpy as np
import pytest
from conftest import files_config

from data import corpus, pipeline, prepare, shards, tokenize_split
from data import tokenizer as tok
from distill.core import layout
from experiments import hf_moe, stdlib


def _config(pattern, **data):
  # 400-token shards: several per unit, rows across them.
  return files_config(
      pattern, **{"validation_permille": 200, "shard_tokens": 400, **data}
  )


def _write_docs(root, n=40):
  os.makedirs(root, exist_ok=True)
  for i in range(n):
    with open(os.path.join(root, f"d{i:02d}.txt"), "w", encoding="utf-8") as f:
      f.write(f"class C{i}:\n    value = {i * 7}  # ünï {i}\n" * (2 + i % 9))


@pytest.fixture(scope="module")
def files_prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("shards")
  _write_docs(str(root / "corpus"))
  config = _config(str(root / "corpus" / "*.txt"))
  prepare.prepare(config, str(root / "w"))
  return config, str(root / "w")


def _work(config, workdir, out_dir):
  """The train split's work, written to ``out_dir``."""
  builder, text_key, _ = corpus.corpus_builder(
      config.data, layout.data_dir(workdir)
  )
  work = tokenize_split.SplitWork(
      builder.as_data_source(split="train"),
      text_key,
      layout.tokenizer_path(workdir),
      layout.data_dir(workdir),
      "train",
      config,
  )
  work.out_dir = str(out_dir)
  work.job = dataclasses.replace(work.job, out_dir=str(out_dir))
  return work


def _files(out_dir):
  """Every file of a tokenized split, by name; the manifest without its
  timing."""
  got = {}
  for name in sorted(os.listdir(out_dir)):
    with open(os.path.join(out_dir, name), "rb") as f:
      got[name] = f.read()
  manifest = json.loads(got.pop(shards.MANIFEST))
  manifest.pop("seconds")
  manifest.pop("tokenize_seconds")
  return got, manifest


def test_shards_are_the_same_for_any_workers_and_processes(
    files_prepared, tmp_path, monkeypatch
):
  config, workdir = files_prepared
  runs = {}
  # One process in itself; one process with a pool of two spawned workers;
  # two processes of one worker each (process 1 runs after process 0 here).
  for name, workers, processes in (
      ("inline", 1, 1),
      ("pool", 2, 1),
      ("two_processes", 1, 2),
  ):
    monkeypatch.setattr(
        tokenize_split, "POOL_MIN_TOKENS", 0 if name == "pool" else 1 << 40
    )
    work = _work(config, workdir, tmp_path / name)
    # Four units of about 650 tokens: each rolls over to new shards of 400.
    n = len(work.job.source)
    work.units = [
        shards.Unit(i, n * i // 4, n * (i + 1) // 4) for i in range(4)
    ]
    for index in range(processes):
      work.run(workers, index, processes)
    work.finish(0.0)
    runs[name] = _files(tmp_path / name)
  assert runs["inline"] == runs["pool"] == runs["two_processes"]
  got, manifest = runs["inline"]
  assert len(manifest["shards"]) > len(work.units)
  assert max(s["tokens"] for s in manifest["shards"]) < 400 + 200
  assert not any(".tmp-" in name for name in got)

  # The stream is each document's ids and EOS, in the split's order, as the
  # tokenizer gives them one document at a time; the prepared split is it.
  tokenizer = tok.load_tokenizer(layout.tokenizer_path(workdir))
  eos = tok.special_ids(tokenizer)["eos"]
  source = work.job.source
  want = np.concatenate(
      [
          shards.encode(tokenizer, shards.decode_text(source[i], "text"))
          + [eos]
          for i in range(len(source))
      ]
  )
  stream = shards.TokenShards(str(tmp_path / "inline"), dict(manifest))
  np.testing.assert_array_equal(stream.tokens(0, stream.num_tokens), want)
  prepared = pipeline.load_stream(
      pipeline.tokens_dir(layout.data_dir(workdir), "train")
  )
  np.testing.assert_array_equal(prepared.tokens(0, prepared.num_tokens), want)
  offsets = stream.doc_offsets()
  assert len(offsets) == len(source) + 1 and offsets[-1] == want.size
  assert (want[offsets[1:] - 1] == eos).all()


def test_embedded_corpus_rows_are_those_of_the_single_stream(tiny_prepared):
  """The rows every stage reads are the ones the single-stream format gave:
  the split's documents encoded in one batch each followed by EOS, and row i
  the slice [i * (L + 1), (i + 1) * (L + 1)) with its documents numbered
  from 1 and positions from the row's start or the document's."""
  data_dir = layout.data_dir(tiny_prepared)
  config = stdlib.get_config("tiny")
  builder, key, _ = corpus.corpus_builder(config.data, data_dir)
  tokenizer = tok.load_tokenizer(layout.tokenizer_path(tiny_prepared))
  eos = tok.special_ids(tokenizer)["eos"]
  for split in ("train", "validation"):
    source = builder.as_data_source(split=split)
    texts = [shards.decode_text(source[i], key) for i in range(len(source))]
    docs = [ids + [eos] for ids in tok.encode_batch(tokenizer, texts)]
    stream = np.concatenate(docs)
    offsets = np.cumsum([0] + [len(d) for d in docs])
    seq_len = config.data.seq_len
    rows = pipeline.PackedRows(data_dir, split, seq_len)
    assert len(rows) == stream.size // (seq_len + 1) > 0
    assert rows.meta["num_tokens"] == stream.size
    for i in range(len(rows)):
      start = i * (seq_len + 1)
      idx = np.arange(start, start + seq_len + 1)
      doc = np.searchsorted(offsets, idx, side="right") - 1
      np.testing.assert_array_equal(rows[i]["tokens"], stream[idx])
      np.testing.assert_array_equal(rows[i]["segment_ids"], doc - doc[0] + 1)
      np.testing.assert_array_equal(
          rows[i]["positions"], idx - np.maximum(offsets[doc], start)
      )


def test_a_killed_prepare_redoes_only_its_unfinished_units(
    files_prepared, tmp_path, monkeypatch
):
  config, workdir = files_prepared
  monkeypatch.setattr(tokenize_split, "POOL_MIN_TOKENS", 1 << 40)
  whole = _work(config, workdir, tmp_path / "whole")
  whole.run(1, 0, 1)
  whole.finish(0.0)

  real, calls = shards.tokenize_unit, []

  def dies_at_unit_5(job, unit):
    calls.append(unit.index)
    if unit.index == 5:
      with open(os.path.join(job.out_dir, "u000005-000.tokens.tmp-1-x"), "wb"):
        pass  # what a killed writer leaves
      raise KeyboardInterrupt
    return real(job, unit)

  monkeypatch.setattr(shards, "tokenize_unit", dies_at_unit_5)
  work = _work(config, workdir, tmp_path / "killed")
  with pytest.raises(KeyboardInterrupt):
    work.run(1, 0, 1)
  assert calls == [0, 1, 2, 3, 4, 5]
  monkeypatch.setattr(shards, "tokenize_unit", real)
  calls.clear()
  monkeypatch.setattr(
      shards,
      "tokenize_unit",
      lambda job, unit: calls.append(unit.index) or real(job, unit),
  )
  work.run(1, 0, 1)
  work.finish(0.0)
  assert calls == list(range(5, len(work.units)))
  assert _files(tmp_path / "killed") == _files(tmp_path / "whole")


def test_max_tokens_keeps_the_leading_units_and_says_the_share(
    files_prepared, tmp_path, capsys
):
  config, workdir = files_prepared
  full = pipeline.PackedRows(layout.data_dir(workdir), "train", 16)
  bound = full.meta["num_tokens"] // 3
  bounded = _config(config.data.files_glob, max_tokens=bound)
  summary = prepare.prepare(bounded, str(tmp_path / "w"))
  train = summary["splits"]["train"]
  assert bound <= train["num_tokens"] < full.meta["num_tokens"]
  assert train["num_docs"] < train["corpus_docs"] == full.meta["corpus_docs"]
  share = round(100 * train["num_docs"] / train["corpus_docs"])
  assert (
      f"docs of {train['corpus_docs']:,} ({share}%)" in capsys.readouterr().out
  )
  # The validation split is not bounded; the kept rows are the full run's
  # first rows, the same tokens and documents.
  assert summary["splits"]["validation"]["num_docs"] == (
      summary["splits"]["validation"]["corpus_docs"]
  )
  rows = pipeline.PackedRows(layout.data_dir(str(tmp_path / "w")), "train", 16)
  assert 0 < len(rows) < len(full)
  for i in range(len(rows)):
    for key in ("tokens", "segment_ids", "positions"):
      np.testing.assert_array_equal(rows[i][key], full[i][key])
  # A later prepare with the whole split re-tokenizes, not "already done".
  assert not prepare.prepare(config, str(tmp_path / "w")).get("skipped")


def test_token_budget_reads_the_stages_and_keeps_small_corpora_whole():
  config = stdlib.get_config()
  assert config.data.max_tokens == -1
  # 110 teacher steps of 32 rows of 129 tokens: far below the floor, so the
  # embedded default (~2.8M tokens) is tokenized whole, as before.
  assert tokenize_split.token_budget(config) == tokenize_split.AUTO_MIN_TOKENS
  moe = hf_moe.get_config()
  steps = max(moe.teacher.train.steps, moe.distill.train.steps)
  want = steps * moe.data.batch_size * (moe.data.seq_len + 1) * 1.25
  assert (
      tokenize_split.token_budget(moe)
      == int(want)
      > tokenize_split.AUTO_MIN_TOKENS
  )
  # A teacher on short rows first counts each phase's own rows: here its
  # 19,000 steps of 128 rows of 65 tokens read more than 20,000 of 32 x 129.
  config.teacher.train.update(
      dict(
          steps=20_000,
          short_steps=19_000,
          short_seq_len=64,
          short_batch_size=128,
      )
  )
  batch, row = config.data.batch_size, config.data.seq_len + 1
  want = (19_000 * 128 * 65 + 1_000 * batch * row) * 1.25
  assert want > 20_000 * batch * row * 1.25
  assert (
      tokenize_split.token_budget(config)
      == int(want)
      > tokenize_split.AUTO_MIN_TOKENS
  )
  config.data.max_tokens = 0
  assert tokenize_split.token_budget(config) == 0
  config.data.max_tokens = 12345
  assert tokenize_split.token_budget(config) == 12345


def test_units_follow_the_estimate_and_cover_the_split_in_order():
  units = shards.plan_units(1000, tokens_per_doc=500.0, unit_tokens=10_000)
  assert len(units) == 50  # 500k tokens in shards of 10k
  assert units[0].start == 0 and units[-1].stop == 1000
  assert all(a.stop == b.start for a, b in zip(units, units[1:]))
  assert {u.stop - u.start for u in units} == {20}
  # A small split still gives the workers MIN_UNITS pieces, or one per doc.
  assert len(shards.plan_units(1000, 1.0, 10_000)) == shards.MIN_UNITS
  assert len(shards.plan_units(5, 1.0, 10_000)) == 5


def _records(n):
  return [
      {"id": i, "body": f"def g{i}(): return {i}  # {'x' * (i % 7)}"}
      for i in range(n)
  ]


def test_jsonl_and_parquet_records_split_by_key_as_streams(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  root = tmp_path / "records"
  os.makedirs(root)
  records = _records(90)
  with open(root / "a.jsonl", "w", encoding="utf-8") as f:
    for r in records[:40]:
      f.write(json.dumps(r) + "\n\n")  # blank lines are skipped
  with gzip.open(root / "b.jsonl.gz", "wt", encoding="utf-8") as f:
    for r in records[40:]:
      f.write(json.dumps(r) + "\n")
  pq.write_table(
      pa.table({"body": [r["body"] for r in records], "id": list(range(90))}),
      root / "c.parquet",
      row_group_size=16,
  )
  want = sorted(r["body"] for r in records)
  for source, pattern in (("jsonl", "*.jsonl*"), ("parquet", "*.parquet")):
    config = _config(str(root / pattern), source=source, text_key="body")
    texts = {}
    for run in ("a", "b"):
      builder, key, splits = corpus.prepare_corpus(
          config.data, str(tmp_path / source / run)
      )
      texts[run] = {
          name: sorted(
              s[i][key].decode()
              for s in [builder.as_data_source(split=split)]
              for i in range(len(s))
          )
          for name, split in splits.items()
      }
    assert texts["a"] == texts["b"]  # the same split every time
    train, validation = texts["a"]["train"], texts["a"]["validation"]
    assert sorted(train + validation) == want and validation and train


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "a.jsonl:2 is not JSON"),
        ('{"text": "x"}', "a.jsonl:2 has no 'body' field"),
    ],
)
def test_a_bad_jsonl_record_is_a_one_line_error(tmp_path, line, message):
  root = tmp_path / "records"
  os.makedirs(root)
  with open(root / "a.jsonl", "w", encoding="utf-8") as f:
    f.write(json.dumps({"body": "fine"}) + "\n" + line + "\n")
  config = _config(str(root / "*.jsonl"), source="jsonl", text_key="body")
  with pytest.raises(corpus.CorpusError, match=message):
    corpus.prepare_corpus(config.data, str(tmp_path / "w"))


def test_a_corpus_sorted_on_disk_keeps_the_order_sorted_in_memory(tmp_path):
  _write_docs(str(tmp_path / "corpus"), n=30)
  config = _config(str(tmp_path / "corpus" / "*.txt"))
  orders = []
  for run, memory in (("memory", corpus.SORT_MEMORY), ("disk", 1)):
    builder, _, _ = corpus.corpus_builder(config.data, str(tmp_path / run))
    corpus.build(builder, sort_memory=memory)
    source = builder.as_data_source(split="train")
    orders.append([source[i]["path"] for i in range(len(source))])
  assert orders[0] == orders[1] and len(orders[0]) > 20


def test_package_documents_join_a_folder_and_split_by_package(tmp_path):
  root = tmp_path / "corpus"
  files = {
      "pkga/__init__.py": "from pkga.core import Engine\n",
      "pkga/core.py": "class Engine:\n    pass\n",
      "pkgb/util.py": "def helper():\n    return 1\n",
      "top.py": "import pkga\n",
  }
  for i in range(30):  # more packages, so both splits get some
    files[f"p{i:02d}/m.py"] = f"VALUE_{i} = {i}\n"
  for rel, text in files.items():
    os.makedirs((root / rel).parent, exist_ok=True)
    (root / rel).write_text(text, encoding="utf-8")
  config = _config(str(root / "**" / "*.py"), documents="package")
  docs = {}
  for run in ("a", "b"):
    builder, key, splits = corpus.prepare_corpus(
        config.data, str(tmp_path / run)
    )
    docs[run] = {
        name: {
            s[i]["path"].decode(): s[i][key].decode()
            for s in [builder.as_data_source(split=split)]
            for i in range(len(s))
        }
        for name, split in splits.items()
    }
  assert docs["a"] == docs["b"]
  train, validation = docs["a"]["train"], docs["a"]["validation"]
  assert train and validation and not set(train) & set(validation)
  both = {**train, **validation}
  assert sorted(both) == sorted({rel.split("/")[0] for rel in files})
  assert both["pkga"] == (
      "# file: pkga/__init__.py\nfrom pkga.core import Engine\n\n"
      "# file: pkga/core.py\nclass Engine:\n    pass\n"
  )
  assert both["top.py"] == "# file: top.py\nimport pkga\n"
  # The embedded corpus's document names keep the default's: another mode
  # is another dataset on disk.
  name = corpus.corpus_builder(config.data, str(tmp_path / "a"))[
      0
  ].info.full_name
  assert "packages" in name
  config.data.source = "jsonl"
  with pytest.raises(corpus.CorpusError, match="documents='package'"):
    corpus.corpus_builder(config.data, str(tmp_path / "c"))
