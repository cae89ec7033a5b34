"""Stage 3: run the frozen teacher once and cache its k-sparse targets.

    python -m teacher.cache_logits --config=experiments/stdlib.py --workdir=W [--verify]

Reads ``W/teacher/`` and the packed train rows of ``W/data/``; writes
``W/logits/`` (see ``data/cache.py`` for the layout and ``data/cache_format/``
for the record encoding). One teacher pass feeds every method in
``config.cache.methods``:

- ``topk``: the k most likely ids under log-softmax at temperature T, their
  log-probs and the tail mass 1 - sum p;
- ``sample``: N draws with replacement (inverse-CDF sampling) stored as unique
  ids and counts;
- ``topk_tail``: a top-k head and M draws from the teacher outside it;
- ``label``: the log-probability of each label token at temperature 1 (what
  a student with another tokenizer matches, ``distill.losses.alm``).

Record ``i`` is train row ``i``. The sampling key of a row is derived from
the seed and the row's index, so a record does not depend on the batch it
was computed in, and a run that crashed and resumed at the first incomplete
shard writes the same records as one that never stopped. Several JAX
processes write disjoint shard sets (shard ``s`` belongs to process
``s % process_count``).

``--verify`` re-hashes every shard and decodes every record instead.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time
from typing import Any

import jax
import numpy as np
from absl import flags
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from data import cache, cache_format, pipeline
from data import tokenizer as tok
from distill.core import checkpoint as ckpt
from distill.core import cli, layout, sharding
from distill.training import loop as trainer
from teacher.config import runtime_settings
from teacher import cache_shards, targets
from teacher.model import load_teacher

_VERIFY = flags.DEFINE_bool(
    "verify", False, "Verify the existing cache instead of writing it."
)
_ALLOW_PARTIAL = flags.DEFINE_bool(
    "allow_partial_teacher",
    False,
    "Cache from a teacher whose teacher.train run has not finished.",
)


def _settings(
    config,
    teacher,
    tokenizer_path: str,
    num_records: int,
    data_meta: dict[str, Any],
) -> dict[str, Any]:
  c = config.cache
  methods = sorted(c.methods)
  unknown = sorted(set(methods) - set(cache.METHODS))
  if unknown or not methods:
    raise cache.CacheError(
        f"config.cache.methods={tuple(c.methods)}: use one or more of"
        f" {cache.METHODS}."
    )
  vocab = teacher.config.vocab_size
  if "sample" in methods and not 1 <= c.num_samples <= 255:
    raise cache.CacheError(
        f"config.cache.num_samples={c.num_samples}: counts are"
        " stored in a byte, so use 1..255 draws."
    )
  if "topk" in methods and not 1 <= c.k <= vocab:
    raise cache.CacheError(f"config.cache.k={c.k} must be in [1, {vocab}].")
  if "topk_tail" in methods and not 1 <= c.tail_k < vocab:
    raise cache.CacheError(
        f"config.cache.tail_k={c.tail_k} must be in [1, {vocab - 1}]: the"
        " tail needs at least one id outside the head."
    )
  if "topk_tail" in methods and not 1 <= c.tail_samples <= 255:
    raise cache.CacheError(
        f"config.cache.tail_samples={c.tail_samples}: use 1..255 draws."
    )
  return {
      "format_version": cache.FORMAT_VERSION,
      "record_version": cache_format.VERSION,
      "teacher_fingerprint": ckpt.fingerprint(teacher),
      "tokenizer_hash": tok.tokenizer_hash(tokenizer_path),
      "vocab_size": vocab,
      "seq_len": config.data.seq_len,
      "methods": methods,
      "k": c.k if "topk" in methods else 0,
      "num_samples": c.num_samples if "sample" in methods else 0,
      "tail_k": c.tail_k if "topk_tail" in methods else 0,
      "tail_samples": c.tail_samples if "topk_tail" in methods else 0,
      "temperature": float(c.temperature),
      "stratified": bool(c.stratified) if "sample" in methods else False,
      "encoding": {
          "ids": cache_format.id_dtype(vocab).name,
          "error_bounds": cache_format.ERROR_BOUNDS,
          "description": "data/cache_format (record version"
          f" {cache_format.VERSION})",
      },
      "source": {
          "data": data_meta.get("dataset", ""),
          "split": "train",
          "seed": config.seed,
          "rows_per_shard": c.rows_per_shard,
      },
      "num_records": num_records,
  }


def check_teacher_finished(teacher_path: str) -> None:
  """Refuses a teacher whose ``teacher.train`` run stopped before the end.

  Imported teachers (and any folder another tool wrote) count as finished.
  """
  source = ckpt.read_config(teacher_path, kind="teacher").get("source")
  if source == "teacher.train" and not trainer.is_finished(teacher_path):
    raise cache.CacheError(
        f"The teacher in {teacher_path} has not finished training (step"
        f" {ckpt.latest_step(teacher_path)}, no final summary): a cache of it"
        " would go stale. Rerun `python -m teacher.train` to finish it, or"
        " pass --allow_partial_teacher to cache it as it is."
    )


def _recheck_complete_shards(directory, states, mine) -> None:
  """Marks incomplete a finished shard whose file is missing or resized."""
  for s in mine:
    state = states[s]
    if not state["complete"]:
      continue
    path = os.path.join(directory, state["name"])
    size = os.path.getsize(path) if os.path.isfile(path) else None
    if size != state["bytes"]:
      print(
          f"cache: {state['name']} is"
          f" {'missing' if size is None else f'{size} bytes'}, not the"
          f" {state['bytes']} bytes it was written with; rewriting it."
      )
      os.remove(cache.done_path(directory, state["name"]))
      if size is not None:
        os.remove(path)
      state["complete"] = False


def cache_logits(
    config, workdir: str, allow_partial_teacher: bool | None = None
) -> dict[str, Any]:
  """Writes (or finishes) the cache; returns the completed manifest.

  ``allow_partial_teacher`` (default: the flag) caches from a teacher whose
  training has not finished. The teacher runs on the mesh of
  ``config.mesh``; with several processes each writes its own shards.
  """
  with sharding.use(sharding.from_config(config)):
    return _cache_logits(config, workdir, allow_partial_teacher)


def _cache_logits(
    config, workdir: str, allow_partial_teacher
) -> dict[str, Any]:
  directory = layout.cache_dir(workdir)
  teacher_path = layout.teacher_dir(workdir)
  if ckpt.latest_step(teacher_path) is None:
    raise cache.CacheError(
        f"No trained teacher in {teacher_path}; run `python -m"
        " teacher.train` or `teacher.import_hf` first."
    )
  if allow_partial_teacher is None:  # The flag, when run as a binary.
    allow_partial_teacher = flags.FLAGS.is_parsed() and _ALLOW_PARTIAL.value
  if not allow_partial_teacher:
    check_teacher_finished(teacher_path)
  teacher = load_teacher(teacher_path, **runtime_settings(config))
  ckpt.check_finite(
      nnx.state(teacher, nnx.Param), f"the teacher in {teacher_path}"
  )
  rows = pipeline.PackedRows(
      layout.data_dir(workdir), "train", config.data.seq_len
  )
  settings = _claim_folder(config, workdir, teacher, len(rows))
  c = config.cache

  states = cache.shard_states(directory, settings)
  mine = [
      s
      for s in range(len(states))
      if s % jax.process_count() == jax.process_index()
  ]
  _recheck_complete_shards(directory, states, mine)
  todo = [s for s in mine if not states[s]["complete"]]
  left = multihost_utils.process_allgather(np.int32(len(todo)))
  if not np.sum(left):
    print(f"cache: already complete ({directory}); nothing to do.")
    return cache_shards.write_manifest(directory, settings)

  target_fn = targets.make_target_fn(
      settings["methods"],
      c.k,
      c.num_samples,
      c.temperature,
      c.stratified,
      settings["tail_k"],
      settings["tail_samples"],
      c.get("position_chunk", 0),
  )
  base_key = jax.random.key(config.seed)
  done_records = sum(
      states[s]["records"] for s in mine if states[s]["complete"]
  )
  started = time.time()
  with (
      concurrent.futures.ThreadPoolExecutor(
          max_workers=c.writer_threads
      ) as pool,
      tqdm(
          total=sum(states[s]["records"] for s in mine),
          initial=done_records,
          desc="cache",
          unit="row",
          dynamic_ncols=True,
          disable=not sharding.is_main(),
      ) as bar,
  ):
    cache_shards.write_shards(
        directory,
        settings,
        todo,
        rows,
        target_fn,
        teacher,
        c,
        base_key,
        pool,
        bar,
    )
  seconds = time.time() - started
  sharding.barrier("cache_logits: every shard written")
  manifest = cache_shards.write_manifest(directory, settings)
  written = sum(settings["shards"][s]["records"] for s in todo)
  in_shards = sum(manifest["shards"][s].get("seconds", 0.0) for s in todo)
  sizes = bytes_per_token(manifest)
  print(
      f"cache: {written} rows in {seconds:.1f}s with compiling"
      f" ({in_shards:.1f}s in the shards' passes and writes, as report.md"
      f" counts them; {written * config.data.seq_len / seconds:,.0f}"
      " tokens/s);"
      f" {sizes['records']:.1f} bytes/token in records,"
      f" {sizes['files']:.1f} in files; {directory}"
  )
  return manifest


def _claim_folder(config, workdir: str, teacher, train_rows: int):
  """The cache's settings (what it holds and how it is sharded), written to
  its manifest, or found there already (it resumes); a cache made with
  other settings is refused."""
  directory = layout.cache_dir(workdir)
  data_dir = layout.data_dir(workdir)
  c = config.cache
  num_records = cache.planned_records(c.max_rows, train_rows)
  summary_path = os.path.join(data_dir, "prepare.json")
  data_meta = {}
  if os.path.isfile(summary_path):
    with open(summary_path, encoding="utf-8") as f:
      data_meta = json.load(f)
  settings = _settings(
      config, teacher, layout.tokenizer_path(workdir), num_records, data_meta
  )
  settings["shards"] = cache_shards.plan_shards(num_records, c.rows_per_shard)

  os.makedirs(directory, exist_ok=True)
  manifest_path = os.path.join(directory, cache.MANIFEST)
  if os.path.isfile(manifest_path):
    existing = cache.read_manifest(directory, require_complete=False)
    for field, value in settings.items():
      have = existing.get(field)
      if field == "shards":
        have = [{"name": s["name"], "records": s["records"]} for s in have]
      if have != value:
        raise cache.CacheError(
            f"{directory} holds a cache made with other settings ({field} differs);"
            " resuming would mix them. Remove that folder to rebuild it, or use"
            " another --workdir."
        )
  cache_shards.write_manifest(directory, settings)
  return settings


def bytes_per_token(manifest: dict[str, Any]) -> dict[str, float]:
  """Bytes per cached position: the records alone, and the shard files.

  Files add ArrayRecord's container overhead: a chunk header per record and
  padding of each file to 64 KiB blocks (which dominates tiny caches).
  """
  complete = [s for s in manifest["shards"] if s["complete"]]
  tokens = max(sum(s["records"] for s in complete) * manifest["seq_len"], 1)
  return {
      "records": sum(s["payload_bytes"] for s in complete) / tokens,
      "files": sum(s["bytes"] for s in complete) / tokens,
  }


def main(argv):
  config, workdir = cli.setup(argv)
  if _VERIFY.value:
    result = cache.verify(layout.cache_dir(workdir))
    print(
        f"cache: verified {result['shards']} shards, {result['records']} records,"
        f" {result['bytes']:,} bytes: all intact."
    )
    return
  cache_logits(config, workdir)


if __name__ == "__main__":
  cli.run(main)
