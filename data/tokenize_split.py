"""Tokenizing one split of the corpus: how much, by whom, with progress.

``token_budget`` says how many train tokens the configured stages read;
``SplitWork`` is one split's tokenizing: its units (contiguous ranges of
documents, ``data.shards``), the ones this process takes, a pool of worker
processes (or this process's threads, for a small split), a progress bar
of tokens and, after the first unit, a forecast of the split's wall time.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from typing import Any

from absl import logging
from tqdm import tqdm

from data import corpus, pipeline, shards
from data import tokenizer as tok
from distill.core import sharding, stop

# Below this many tokens a bound saves under a few minutes of tokenizing, and
# the whole split gives the shuffle more rows: the automatic bound is never
# lower (the embedded default, ~2.8M tokens, is tokenized whole).
AUTO_MIN_TOKENS = 1 << 27
AUTO_MARGIN = 1.25  # the automatic bound over what the stages read
# A split expected to be smaller is tokenized in the process itself (on
# threads of every core): starting workers would cost more than it saves.
POOL_MIN_TOKENS = 4 << 20
FORECAST_MIN_SECONDS = 20  # a shorter job is not worth a forecast line


def _steps(config, path: str) -> int:
  node = config
  for key in path.split("."):
    if key not in node:
      return 0
    node = node[key]
  return int(node or 0)


def token_budget(config) -> int:
  """How many tokens of the train split to tokenize (0: all of it).

  ``config.data.max_tokens`` when it is 0 or more; at -1 (the default) what
  the stages read (the most tokens any of them reads: the teacher's rows,
  phase by phase (``pipeline.row_phases``), the students' steps x batch,
  the cache's rows) times ``AUTO_MARGIN``, and never below
  ``AUTO_MIN_TOKENS``.
  """
  data = config.data
  if data.max_tokens >= 0:
    return int(data.max_tokens)
  row = data.seq_len + 1  # a row's tokens: inputs and the last label
  teacher, done = 0, 0
  if _steps(config, "teacher.train.steps"):
    for until, seq_len, batch in pipeline.row_phases(config):
      teacher += (until - done) * batch * (seq_len + 1)
      done = until
  students = max(
      _steps(config, "distill.train.steps"),
      _steps(config, "distill.continue_train.steps"),
  )
  read = max(
      teacher,
      students * data.batch_size * row,
      _steps(config, "cache.max_rows") * row,
  )
  return max(AUTO_MIN_TOKENS, int(read * AUTO_MARGIN))


def _duration(seconds: float) -> str:
  if seconds < 120:
    return f"{seconds:.0f} s"
  if seconds < 7200:
    return f"{seconds / 60:.0f} min"
  return f"{seconds / 3600:.1f} h"


class SplitWork:
  """One split's tokenizing: its units, shared by every process and worker
  (``data.shards``), the part this process does, and the manifest."""

  def __init__(self, source, text_key, tpath, ddir, split, config, budget=None):
    """``budget(tokens per document) -> max_tokens``: the split's token
    bound from this tokenizer's estimate (default: ``token_budget`` for the
    train split, 0 for the others)."""
    self.split = split
    self.out_dir = pipeline.tokens_dir(ddir, split)
    tokenizer = tok.load_tokenizer(tpath)
    vocab_size = tokenizer.get_vocab_size()
    self.tokens_per_doc = shards.estimate_tokens_per_doc(
        source, text_key, tokenizer
    )
    if budget is None:
      self.max_tokens = token_budget(config) if split == corpus.TRAIN else 0
    else:
      self.max_tokens = budget(self.tokens_per_doc)
    self.job = shards.Job(
        source=source,
        text_key=text_key,
        tokenizer_path=tpath,
        tokenizer_hash=tok.tokenizer_hash(tpath),
        eos=tok.special_ids(tokenizer)["eos"],
        dtype=pipeline.token_dtype(vocab_size).name,
        shard_tokens=config.data.shard_tokens,
        out_dir=self.out_dir,
    )
    self.identity = {
        "split": split,
        "tokenizer_hash": self.job.tokenizer_hash,
        "vocab_size": vocab_size,
        "dtype": self.job.dtype,
        "shard_tokens": self.job.shard_tokens,
        "max_tokens": self.max_tokens,
    }
    self.units = shards.plan_units(
        len(source),
        self.tokens_per_doc,
        min(shards.UNIT_TOKENS, self.job.shard_tokens),
    )
    self.tokenize_seconds = 0.0
    self.expected_tokens = int(self.tokens_per_doc * len(source))
    if self.max_tokens:
      self.expected_tokens = min(self.expected_tokens, self.max_tokens)

  def done(self) -> dict[str, Any] | None:
    """The manifest, when the split is already tokenized as configured."""
    manifest = shards.read_manifest(self.out_dir)
    if manifest and all(manifest.get(k) == v for k, v in self.identity.items()):
      return manifest
    return None

  def clear_stale(self) -> None:
    """Removes a manifest made otherwise (and the single-file stream of
    earlier versions); finished units of the same plan stay."""
    if self.done() is not None or not os.path.isdir(self.out_dir):
      return
    for name in (shards.MANIFEST, "tokens.npy", "doc_offsets.npy", "meta.json"):
      path = os.path.join(self.out_dir, name)
      if os.path.exists(path):
        os.remove(path)

  def run(self, workers: int, process_index: int, process_count: int) -> None:
    """Tokenizes this process's units (every ``process_count``-th from
    ``process_index``) with ``workers`` worker processes (in this process
    below ``POOL_MIN_TOKENS``), skipping finished ones, until the units a
    manifest needs are all finished."""
    if self.done() is not None:
      return
    started = time.time()
    try:
      tracker = self._run(workers, process_index, process_count)
    finally:
      self.tokenize_seconds = time.time() - started
    logging.info(
        "prepare: %s: process %d of %d tokenized %d of the %d units (%d"
        " found finished) in %.1f s",
        self.split,
        process_index,
        process_count,
        tracker.tokenized,
        len(self.units),
        tracker.resumed,
        self.tokenize_seconds,
    )

  def _run(
      self, workers: int, process_index: int, process_count: int
  ) -> "_Tracker":
    os.makedirs(os.path.join(self.out_dir, shards.UNITS), exist_ok=True)
    mine = self.units[process_index::process_count]
    pooled = self.expected_tokens >= POOL_MIN_TOKENS
    tracker = _Tracker(self, process_count, workers if pooled else 1)
    with tracker.bar:
      if not pooled:
        for unit in mine:
          if tracker.enough():
            break
          stop.check(
              "prepare", "finished shards are kept; a rerun does the rest"
          )
          tracker.finished(unit, _marker_or_tokenize(self.job, unit))
      else:
        _run_pool(self.job, mine, workers, tracker)
    return tracker

  def finish(self, start: float) -> dict[str, Any]:
    """Writes the manifest of the units the split needs (main process, once
    every process has run)."""
    records = [shards.read_marker(self.job, u) for u in self.units]
    count = shards.needed_prefix(records, self.max_tokens)
    if count is None:
      missing = records.index(None)
      raise pipeline.DataError(
          f"Unit {missing} of the {self.split} split under {self.out_dir} is"
          " unfinished after every process ran; rerun data.prepare."
      )
    meta = dict(
        self.identity,
        corpus_docs=len(self.job.source),
        seconds=round(time.time() - start, 2),
        tokenize_seconds=round(self.tokenize_seconds, 2),
    )
    return shards.finish(self.out_dir, records[:count], meta)


def _marker_or_tokenize(job, unit):
  return shards.read_marker(job, unit) or shards.tokenize_unit(job, unit)


def _run_pool(job, units, workers: int, tracker: "_Tracker") -> None:
  """Units through a pool of spawned workers, at most two per worker in
  flight and in order; a stop request or an early enough prefix ends it
  (the pool is terminated: a killed unit is redone next time)."""
  context = multiprocessing.get_context("spawn")
  pool = context.Pool(workers, initializer=shards.init_worker, initargs=(job,))
  try:
    pending, todo = [], list(units)
    while todo or pending:
      stop.check("prepare", "finished shards are kept; a rerun does the rest")
      if tracker.enough():
        break
      while todo and len(pending) < 2 * workers:
        unit = todo.pop(0)
        record = shards.read_marker(job, unit)
        if record is not None:
          tracker.finished(unit, record)
        else:
          pending.append(
              (unit, pool.apply_async(shards.worker_tokenize, (unit,)))
          )
      ready = [(u, r) for u, r in pending if r.ready()]
      for unit, result in ready:
        pending.remove((unit, result))
        tracker.finished(unit, result.get())
      if not ready and pending:
        pending[0][1].wait(0.05)
    pool.close()
  finally:
    pool.terminate()
    pool.join()


class _Tracker:
  """Progress (a bar over this process's share of the expected tokens, a
  forecast after the first unit) and whether the split has enough tokens."""

  def __init__(self, work: SplitWork, process_count: int, workers: int):
    self.work = work
    self.records = [None] * len(work.units)
    self.tokenized = self.resumed = 0
    # ``enough``: the finished leading units so far and their tokens.
    self._prefix = self._prefix_tokens = 0
    self.parallel = process_count * workers
    self.bar = tqdm(
        total=work.expected_tokens // process_count,
        desc=f"tokenize {work.split}",
        unit="tok",
        unit_scale=True,
        disable=not sharding.is_main(),
    )

  def finished(self, unit, record) -> None:
    """Counts a unit in; ``record`` has ``seconds`` when it was tokenized now
    (not found finished), and the first such one gives the forecast."""
    self.records[unit.index] = record
    self.bar.update(record["tokens"])
    if "seconds" not in record:
      self.resumed += 1
      return
    self.tokenized += 1
    if self.tokenized == 1:
      self._forecast(record["tokens"] / max(1e-6, record["seconds"]))

  def _forecast(self, rate: float) -> None:
    seconds = self.work.expected_tokens / (rate * self.parallel)
    if seconds < FORECAST_MIN_SECONDS:
      return
    line = (
        f"prepare: {self.work.split}: about {self.work.expected_tokens:,}"
        f" tokens to tokenize; the first unit ran at {rate:,.0f} tokens/s"
        f" per worker, so about {_duration(seconds)} with {self.parallel}"
        f" worker{'s' if self.parallel > 1 else ''}"
    )
    logging.info("%s", line)
    if sharding.is_main():
      tqdm.write(line)

  def enough(self) -> bool:
    """True once the units the manifest needs are finished (this process's
    and, read from disk, the others'): the finished leading units reach
    ``max_tokens``, or are all of them. Each call reads on from where the
    last one stopped."""
    if not self.work.max_tokens:
      return False
    units, records = self.work.units, self.records
    while self._prefix < len(units):
      i = self._prefix
      records[i] = records[i] or shards.read_marker(self.work.job, units[i])
      if records[i] is None:
        return False
      self._prefix += 1
      self._prefix_tokens += records[i]["tokens"]
      if self._prefix_tokens >= self.work.max_tokens:
        return True
    return True
