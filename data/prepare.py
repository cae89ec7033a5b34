"""Stage 1: build the corpus, train (or adopt) the tokenizer, tokenize.

    python -m data.prepare --config=experiments/stdlib.py --workdir=W

Writes ``W/data/`` (the TFDS data_dir with array_record files, plus the
tokenized streams under ``W/data/tokens/``) and ``W/tokenizer.json``. An
existing ``W/tokenizer.json`` (an imported teacher's) is used, not retrained.
A second run finds everything done and says so.

Tokenizing scales out (``data.shards`` has the format):

- each split is cut into units, contiguous ranges of documents; every JAX
  process takes every ``process_count``-th unit and tokenizes its units with a
  pool of ``config.data.prepare_workers`` worker processes (default: one per
  core), each writing its unit's shards to disk as they fill, so nothing holds
  a split in memory; the shards are the same whoever wrote them;
- the tokenizer is trained once, by the main process, on the train split's
  first ``config.data.tokenizer_max_bytes`` before the others start;
- ``config.data.max_tokens`` bounds the train split (by default to what the
  configured stages read, with a margin; see ``tokenize_split.token_budget``): the leading
  units that reach it are kept, and the summary says what share of the corpus
  that was;
- a finished unit stays finished: a killed prepare redoes only the others;
- a progress bar counts tokens, and after the first unit a line forecasts the
  wall time of the whole split;
- a student with its own tokenizer (``config.student.tokenizer``, see
  ``data.student_vocab``) gets ``W/student_tokenizer.json`` (trained on the
  same text, or adopted) and every split tokenized again with it, the same
  documents in the same order, under ``W/data/student/``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
from absl import logging

from data import corpus, shards, student_vocab, tokenize_split
from data import tokenizer as tok
from distill.core import cli, files, layout, sharding


def _training_texts(source, text_key: str, max_bytes: int):
  """Train-split texts for the tokenizer, up to ``max_bytes`` of UTF-8
  (0: all), from the start of the split."""
  total = 0
  for i in range(len(source)):  # pylint: disable=consider-using-enumerate
    text = shards.decode_text(source[i], text_key)
    yield text
    total += len(text.encode("utf-8"))
    if max_bytes and total >= max_bytes:
      return


def prepare_workers(config) -> int:
  return config.data.prepare_workers or os.cpu_count() or 1


def check_existing_tokenizer(data_config, path: str) -> None:
  """Refuses an existing tokenizer.json that does not fit the config."""
  existing = tok.load_tokenizer(path)
  size = existing.get_vocab_size()
  if data_config.vocab_size and size != data_config.vocab_size:
    raise tok.TokenizerError(
        f"{path} has a vocab of {size} but config.data.vocab_size is"
        f" {data_config.vocab_size}. Set --config.data.vocab_size={size} to use"
        " it, or move the file away to train a new one."
    )
  tok.special_ids(existing)  # Fails early if it cannot separate documents.


def _adopt_or_train_tokenizer(
    data_config, path: str, train_source, text_key: str
) -> str:
  if os.path.isfile(path):
    check_existing_tokenizer(data_config, path)
    return "adopted"
  start = time.time()
  tokenizer = tok.train_tokenizer(
      _training_texts(train_source, text_key, data_config.tokenizer_max_bytes),
      data_config.vocab_size,
  )
  tok.save_tokenizer(tokenizer, path)
  logging.info(
      "Trained a %d-entry BPE tokenizer in %.1fs -> %s",
      tokenizer.get_vocab_size(),
      time.time() - start,
      path,
  )
  return "trained"


def prepare(config, workdir: str) -> dict[str, Any]:
  """Runs the stage; returns a summary (also written to W/data/prepare.json).

  The main process builds the corpus and the tokenizer; then every process
  tokenizes its share of each split's units with its own pool of workers, and
  the main process writes the manifests and the summary.
  """
  start = time.time()
  ddir = layout.data_dir(workdir)
  tpath = layout.tokenizer_path(workdir)
  is_main = sharding.is_main()
  done = _already_done(config, ddir, tpath) if is_main else None
  if sharding.main_says(done is not None):
    summary = done or _read_summary(ddir)
  else:
    summary = _prepare_teacher_side(config, workdir, start)
  if student_vocab.own(config):
    summary["student"] = _prepare_student_side(config, workdir, summary)
  return summary


def _prepare_teacher_side(config, workdir: str, start: float) -> dict:
  ddir = layout.data_dir(workdir)
  tpath = layout.tokenizer_path(workdir)
  is_main = sharding.is_main()
  counts, works = None, {}
  if is_main:
    counts, works = _corpus_and_tokenizer(config, ddir, tpath)
  sharding.barrier("data.prepare: corpus and tokenizer")
  if not is_main:
    builder, text_key, splits = corpus.corpus_builder(config.data, ddir)
    works = _split_works(
        config, ddir, tpath, text_key, _sources(builder, splits)
    )
  for work in works.values():
    work.run(prepare_workers(config), jax.process_index(), jax.process_count())
  sharding.barrier("data.prepare: units")
  if is_main:
    summary = _summarize(config, ddir, tpath, works, counts, start)
  sharding.barrier("data.prepare: manifests")
  return summary if is_main else _read_summary(ddir)


def _student_tokenizer(config, path: str, train_source, text_key: str) -> str:
  """Trains or adopts the student's own tokenizer (``data.student_vocab``)
  into ``path``; one already there must be the configured one."""
  size, source = student_vocab.trained_size(config), student_vocab.source_path(
      config
  )
  if os.path.isfile(path):
    existing = tok.load_tokenizer(path)
    same = (
        existing.get_vocab_size() == size
        if size
        else tok.tokenizer_hash(path) == tok.tokenizer_hash(source)
    )
    if not same:
      raise tok.TokenizerError(
          f"{path} is not the tokenizer config.student.tokenizer="
          f"{student_vocab.setting(config)!r} asks for; move it away (and"
          f" {layout.student_data_dir(os.path.dirname(path))}) to make it again."
      )
    return "adopted"
  if size:
    tokenizer = tok.train_tokenizer(
        _training_texts(
            train_source, text_key, config.data.tokenizer_max_bytes
        ),
        size,
    )
    tok.save_tokenizer(tokenizer, path)
    return "trained"
  tokenizer = tok.load_tokenizer(source)  # a one-line error if unreadable
  tok.special_ids(tokenizer)
  tok.save_tokenizer(tokenizer, path)
  return "copied"


def _student_budget(teacher_meta: dict, student_tpd: float, teacher_tpd):
  """The student split's token bound: the whole split when the teacher's
  kept every document, else the teacher's bound scaled by the student's
  tokens per document, with a margin (the student's stream must cover the
  teacher's rows' bytes). ``teacher_tpd()``: the teacher tokenizer's
  estimate, made only when needed."""
  if teacher_meta["num_docs"] >= teacher_meta["corpus_docs"]:
    return 0
  ratio = student_tpd / max(teacher_tpd(), 1e-9)
  return int(teacher_meta["num_tokens"] * ratio * 1.1) + 1


def _prepare_student_side(config, workdir: str, summary: dict) -> dict:
  """Tokenizes every split again with the student's own tokenizer into
  ``W/data/student/`` (same documents, same order, same units machinery);
  returns its summary (also ``W/data/student/prepare.json``)."""
  start = time.time()
  ddir, sddir = layout.data_dir(workdir), layout.student_data_dir(workdir)
  spath = layout.student_tokenizer_path(workdir)
  builder, text_key, splits = corpus.corpus_builder(config.data, ddir)
  sources = _sources(builder, splits)
  status = None
  if sharding.is_main():
    status = _student_tokenizer(config, spath, sources["train"], text_key)
  sharding.barrier("data.prepare: student tokenizer")
  works = {}
  for name, source in sources.items():
    budget = lambda _: 0
    if name == corpus.TRAIN:
      teacher_tpd = lambda source=source: shards.estimate_tokens_per_doc(
          source, text_key, tok.load_tokenizer(layout.tokenizer_path(workdir))
      )
      budget = lambda tpd, name=name, t=teacher_tpd: _student_budget(
          summary["splits"][name], tpd, t
      )
    works[name] = tokenize_split.SplitWork(
        source, text_key, spath, sddir, name, config, budget
    )
  if sharding.is_main():
    for work in works.values():
      work.clear_stale()
  sharding.barrier("data.prepare: student manifests cleared")
  for work in works.values():
    work.run(prepare_workers(config), jax.process_index(), jax.process_count())
  sharding.barrier("data.prepare: student units")
  out = {
      "tokenizer": status,
      "tokenizer_hash": tok.tokenizer_hash(spath),
      "vocab_size": tok.load_tokenizer(spath).get_vocab_size(),
      "splits": {},
  }
  if sharding.is_main():
    for name, work in works.items():
      manifest = work.done() or work.finish(start)
      meta = {k: v for k, v in manifest.items() if k != "shards"}
      out["splits"][name] = meta
      print(
          f"prepare: student tokenizer ({out['vocab_size']:,} entries):"
          f" {name}: {meta['num_docs']:,} docs, {meta['num_tokens']:,}"
          f" tokens ({meta['bytes_per_token']:.2f} bytes/token)"
      )
    files.write_json(os.path.join(sddir, "prepare.json"), out)
  sharding.barrier("data.prepare: student summary")
  with open(os.path.join(sddir, "prepare.json"), encoding="utf-8") as f:
    return json.load(f)


def _read_summary(ddir: str) -> dict[str, Any]:
  with open(os.path.join(ddir, "prepare.json"), encoding="utf-8") as f:
    return json.load(f)


def _identity(config, ddir: str, tpath: str) -> dict[str, Any]:
  """What a finished prepare must match to be skipped."""
  builder, _, _ = corpus.corpus_builder(config.data, ddir)
  return {
      "dataset": builder.info.full_name,
      "tokenizer_hash": tok.tokenizer_hash(tpath),
      "format": shards.FORMAT,
      "shard_tokens": config.data.shard_tokens,
      "max_tokens": tokenize_split.token_budget(config),
  }


def _already_done(config, ddir: str, tpath: str) -> dict[str, Any] | None:
  if os.path.isfile(tpath):
    check_existing_tokenizer(config.data, tpath)
  if not (
      os.path.isfile(os.path.join(ddir, "prepare.json"))
      and os.path.isfile(tpath)
  ):
    return None
  summary = _read_summary(ddir)
  identity = _identity(config, ddir, tpath)
  if any(summary.get(k) != v for k, v in identity.items()):
    return None
  logging.info("prepare: already done (%s, %s); nothing to do.", ddir, tpath)
  print(f"prepare: already done ({ddir}); nothing to do.")
  summary["skipped"] = True
  return summary


def _corpus_and_tokenizer(config, ddir: str, tpath: str):
  """Builds the corpus (TFDS array_record) and trains or adopts the
  tokenizer; returns the file counts and each split's work, stale
  manifests cleared."""
  builder, text_key, splits = corpus.corpus_builder(config.data, ddir)
  counts = (
      builder.file_counts() if isinstance(builder, corpus.FilesCorpus) else None
  )
  corpus.build(builder)
  sources = _sources(builder, splits)
  for name, source in sources.items():
    if len(source) == 0:
      raise corpus.CorpusError(
          f"The {name} split of {builder.info.full_name} is empty."
      )
  status = _adopt_or_train_tokenizer(
      config.data, tpath, sources["train"], text_key
  )
  works = _split_works(config, ddir, tpath, text_key, sources)
  for work in works.values():
    work.clear_stale()
  return dict(counts or {}, tokenizer=status), works


def _sources(builder, splits: dict[str, str]) -> dict[str, Any]:
  """Each split's data source of the built corpus."""
  return {
      name: builder.as_data_source(split=tfds_split)
      for name, tfds_split in splits.items()
  }


def _split_works(
    config, ddir: str, tpath: str, text_key: str, sources: dict[str, Any]
) -> dict[str, tokenize_split.SplitWork]:
  return {
      name: tokenize_split.SplitWork(
          source, text_key, tpath, ddir, name, config
      )
      for name, source in sources.items()
  }


def _summarize(config, ddir, tpath, works, counts, start) -> dict[str, Any]:
  """Writes every split's manifest and ``prepare.json``; prints a line per
  split (with the share of the corpus a bound kept)."""
  metas = {}
  for name, work in works.items():
    manifest = work.done() or work.finish(start)
    metas[name] = {k: v for k, v in manifest.items() if k != "shards"}
    metas[name]["num_shards"] = len(manifest["shards"])
  status = counts.pop("tokenizer")
  summary = dict(
      _identity(config, ddir, tpath),
      tokenizer=status,
      vocab_size=tok.load_tokenizer(tpath).get_vocab_size(),
      workers=prepare_workers(config),
      processes=jax.process_count(),
      seconds=round(time.time() - start, 2),
      splits=metas,
  )
  if counts:
    summary["files"] = counts
  files.write_json(os.path.join(ddir, "prepare.json"), summary)
  for name, meta in metas.items():
    kept = meta["num_docs"] / max(1, meta["corpus_docs"])
    print(
        f"prepare: {name}: {meta['num_docs']:,} docs of {meta['corpus_docs']:,}"
        f" ({kept:.0%}), {meta['num_bytes']:,} bytes, {meta['num_tokens']:,}"
        f" tokens ({meta['bytes_per_token']:.2f} bytes/token) in"
        f" {meta['num_shards']} shards"
    )
  if counts and counts["left_out"]:
    line = (
        f"prepare: config.data.max_files={counts['max_files']} kept"
        f" {counts['matched'] - counts['left_out']} of the {counts['matched']}"
        f" files the corpus matched ({counts['left_out']} left out; 0 keeps"
        " them all)"
    )
    logging.warning("%s", line)
    print(line)
  return summary


def main(argv):
  config, workdir = cli.setup(argv)
  prepare(config, workdir)


if __name__ == "__main__":
  cli.run(main)
