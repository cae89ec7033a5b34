"""Writing the logit cache's shards: which rows each holds, and the writer.

A shard is an ArrayRecord file of ``rows_per_shard`` records
(``data.cache_format``), written under a temporary name, then renamed and
marked done by a file beside it, so a run that stops redoes only the shards
not done; the manifest says what the cache holds (``data.cache``).
"""

from __future__ import annotations

import collections
import contextlib
import glob
import math
import os
import time
from typing import Any

import numpy as np
from array_record.python import array_record_module
from jax.experimental import multihost_utils

from data import cache, cache_format
from distill.core import files, sharding, stop


def encode_batch(
    rows: list[dict[str, np.ndarray]], outputs, vocab_size: int
) -> list[bytes]:
  outputs = {  # This process's rows; waits for the device.
      name: sharding.local_rows(value)[: len(rows)]
      for name, value in outputs.items()
  }
  return [
      cache_format.encode_record(
          row["tokens"],
          row["segment_ids"],
          vocab_size=vocab_size,
          **{name: value[i] for name, value in outputs.items()},
      )
      for i, row in enumerate(rows)
  ]


def plan_shards(num_records: int, rows_per_shard: int) -> list[dict[str, Any]]:
  count = math.ceil(num_records / rows_per_shard)
  return [
      {
          "name": cache.shard_name(s, count),
          "records": min(rows_per_shard, num_records - s * rows_per_shard),
      }
      for s in range(count)
  ]


def write_manifest(directory: str, settings: dict[str, Any]) -> dict[str, Any]:
  """The manifest of the shards done so far; the main process writes it."""
  manifest = dict(settings)
  manifest["shards"] = cache.shard_states(directory, settings)
  manifest = cache.seal(manifest)
  if sharding.is_main():
    files.write_json(
        os.path.join(directory, cache.MANIFEST), manifest, sort_keys=True
    )
  return manifest


class ShardWriter:
  """Writes one shard: records arrive by batch (futures of encoded records,
  in order); ``finish`` renames the temporary and writes the done file."""

  def __init__(self, directory: str, shard: dict[str, Any], bar):
    self.final = os.path.join(directory, shard["name"])
    self.expected = shard["records"]
    self.done = cache.done_path(directory, shard["name"])
    # What a killed run of this shard's process left (only that process
    # writes this shard, so nothing else owns these).
    for stale in glob.glob(glob.escape(self.final) + ".tmp-*") + glob.glob(
        glob.escape(self.done) + ".tmp-*"
    ):
      os.remove(stale)
    self.tmp = files.temp_name(self.final)
    self.started = time.time()
    self.writer = array_record_module.ArrayRecordWriter(
        self.tmp, "group_size:1"
    )
    self.written = self.payload = 0
    self.bar = bar

  def write(self, records: list[bytes]) -> None:
    for record in records:
      self.writer.write(record)
      self.payload += len(record)
    self.written += len(records)
    self.bar.update(len(records))

  def abort(self) -> None:
    """Closes and removes the temporary (a failed write leaves nothing)."""
    self.writer.close()
    with contextlib.suppress(OSError):
      os.remove(self.tmp)

  def finish(self) -> None:
    self.writer.close()
    os.replace(self.tmp, self.final)
    files.write_json(
        self.done,
        sort_keys=True,
        payload={
            "records": self.written,
            "bytes": os.path.getsize(self.final),
            "payload_bytes": self.payload,
            "sha256": cache.file_sha256(self.final),
            "seconds": round(time.time() - self.started, 3),
        },
    )  # teacher pass + writing


def _jobs(todo, shards, rows_per_shard: int, batch: int):
  """(shard index, first row, end row) of every teacher pass, in order."""
  return [
      (s, start, min(start + batch, s * rows_per_shard + shards[s]["records"]))
      for s in todo
      for start in range(
          s * rows_per_shard, s * rows_per_shard + shards[s]["records"], batch
      )
  ]


def write_shards(
    directory,
    settings,
    todo,
    rows_source,
    target_fn,
    teacher,
    c,
    base_key,
    pool,
    bar,
) -> None:
  """Runs the teacher over this process's unfinished shards and writes them.

  Every process takes part in every (sharded) teacher pass: a global batch
  is each process's next ``batch_size`` rows, and a process whose shards are
  done feeds padding rows until the others finish.
  """
  mesh = sharding.active()
  local = c.batch_size
  jobs = _jobs(todo, settings["shards"], c.rows_per_shard, local)
  steps = int(np.max(multihost_utils.process_allgather(np.int32(len(jobs)))))
  writers: dict[int, ShardWriter] = {}
  pending = collections.deque()

  def drain(limit: int) -> None:
    while len(pending) > limit:
      s, future = pending.popleft()
      writers[s].write(future.result())
      if writers[s].written == writers[s].expected:
        writers.pop(s).finish()

  try:
    for i in range(steps):
      # Every process stops at the same batch (the teacher pass is
      # collective); what the teacher computed is written first.
      signum = stop.agreed()
      if signum is not None:
        drain(limit=0)
        raise stop.stopped("cache", signum, "its complete shards are kept")
      s, start, end = jobs[i] if i < len(jobs) else (None, 0, 1)
      rows = [rows_source[j] for j in range(start, end)]
      # One compiled shape: the last rows repeat to fill the batch.
      padded = rows + [rows[-1]] * (local - len(rows))
      stacked = {
          key: np.stack([r[key] for r in padded])
          for key in ("tokens", "segment_ids", "positions")
      }
      batch = {key: value[:, :-1] for key, value in stacked.items()}
      batch["labels"] = stacked["tokens"][:, 1:]
      batch["row_ids"] = np.asarray(
          [start + min(j, len(rows) - 1) for j in range(local)], np.int32
      )
      batch = sharding.put_batch(batch, mesh)
      outputs = target_fn(
          teacher,
          batch["tokens"],
          batch["segment_ids"],
          batch["positions"],
          base_key,
          batch["row_ids"],
          batch["labels"],
      )
      if s is None:  # padding of a process that has finished
        continue
      if s not in writers:
        writers[s] = ShardWriter(directory, settings["shards"][s], bar)
      future = pool.submit(encode_batch, rows, outputs, settings["vocab_size"])
      pending.append((s, future))
      drain(limit=2)  # The device runs ahead while host threads encode.
    drain(limit=0)
    if writers:  # every shard is finished once all its records are in
      raise RuntimeError(f"shards left unfinished: {sorted(writers)}")
  except BaseException:
    for writer in writers.values():
      writer.abort()
    raise
