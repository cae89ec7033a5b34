"""Stage 1: build the corpus, train (or adopt) the tokenizer, tokenize.

    python -m data.prepare --config=experiments/stdlib.py --workdir=W

Writes ``W/data/`` (the TFDS data_dir with array_record files, plus the
tokenized streams under ``W/data/tokens/``) and ``W/tokenizer.json``. An
existing ``W/tokenizer.json`` (an imported teacher's) is used, not retrained.
A second run finds everything done and says so.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
from absl import logging

from data import corpus, pipeline
from data import tokenizer as tok
from distill.core import cli, files, layout, sharding


def _training_texts(source, text_key: str, max_bytes: int):
  """Train-split texts for the tokenizer, up to ``max_bytes`` (0: all)."""
  total = 0
  for i in range(len(source)):  # pylint: disable=consider-using-enumerate
    value = source[i][text_key]
    text = (
        value.decode("utf-8", errors="replace")
        if isinstance(value, bytes)
        else value
    )
    yield text
    total += len(text)
    if max_bytes and total >= max_bytes:
      return


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

  With several processes the main one prepares and the others wait for it.
  """
  if jax.process_count() == 1:
    return _prepare(config, workdir)
  summary = _prepare(config, workdir) if sharding.is_main() else None
  sharding.barrier("data.prepare")
  if summary is None:
    with open(
        os.path.join(layout.data_dir(workdir), "prepare.json"), encoding="utf-8"
    ) as f:
      summary = json.load(f)
  return summary


def _prepare(config, workdir: str) -> dict[str, Any]:
  ddir = layout.data_dir(workdir)
  tpath = layout.tokenizer_path(workdir)
  summary_path = os.path.join(ddir, "prepare.json")
  builder, text_key, splits = corpus.corpus_builder(config.data, ddir)
  if os.path.isfile(tpath):
    check_existing_tokenizer(config.data, tpath)
  if os.path.isfile(summary_path) and os.path.isfile(tpath):
    with open(summary_path, encoding="utf-8") as f:
      summary = json.load(f)
    if summary.get("dataset") == builder.info.full_name and summary.get(
        "tokenizer_hash"
    ) == tok.tokenizer_hash(tpath):
      logging.info(
          "prepare: already done (%s, %s); nothing to do.", ddir, tpath
      )
      print(f"prepare: already done ({ddir}); nothing to do.")
      summary["skipped"] = True
      return summary

  counts = (
      builder.file_counts() if isinstance(builder, corpus.FilesCorpus) else None
  )
  builder.download_and_prepare()
  sources = {
      name: builder.as_data_source(split=tfds_split)
      for name, tfds_split in splits.items()
  }
  for name, source in sources.items():
    if len(source) == 0:
      raise corpus.CorpusError(
          f"The {name} split of {builder.info.full_name} is empty."
      )
  tokenizer_status = _adopt_or_train_tokenizer(
      config.data, tpath, sources["train"], text_key
  )
  metas = {
      name: pipeline.tokenize_split(source, text_key, tpath, ddir, name)
      for name, source in sources.items()
  }
  summary = {
      "dataset": builder.info.full_name,
      "tokenizer": tokenizer_status,
      "tokenizer_hash": tok.tokenizer_hash(tpath),
      "vocab_size": tok.load_tokenizer(tpath).get_vocab_size(),
      "splits": metas,
  }
  if counts is not None:
    summary["files"] = counts
  files.write_json(summary_path, summary)
  for name, meta in metas.items():
    print(
        f"prepare: {name}: {meta['num_docs']} docs, {meta['num_bytes']:,} bytes,"
        f" {meta['num_tokens']:,} tokens ({meta['bytes_per_token']:.2f} bytes/token)"
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
