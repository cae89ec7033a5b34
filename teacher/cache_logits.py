"""Stage 3: run the frozen teacher once and cache its k-sparse targets.

    python -m teacher.cache_logits --config=experiments/stdlib.py --workdir=W [--verify]

Reads ``W/teacher/`` and the packed train rows of ``W/data/``; writes
``W/logits/`` (see ``data/cache.py`` for the layout and ``data/cache_format.py``
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

import collections
import contextlib
import concurrent.futures
import functools
import glob
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from array_record.python import array_record_module
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec
from tqdm import tqdm

from data import cache, cache_format, pipeline, sparse_targets
from data import tokenizer as tok
from distill.core import checkpoint as ckpt
from distill.core import cli, files, layout, sharding, stop
from distill.training import loop as trainer
from teacher.config import runtime_settings
from teacher.model import load_teacher

_VERIFY = flags.DEFINE_bool(
    "verify", False, "Verify the existing cache instead of writing it."
)
_ALLOW_PARTIAL = flags.DEFINE_bool(
    "allow_partial_teacher",
    False,
    "Cache from a teacher whose teacher.train run has not finished.",
)


def _draws(key, length, *, methods, num_samples, tail_samples):
  """One row's uniforms, [1, length, n] per sampling method, drawn as one
  pass over the whole row draws them (``sparse_targets.sample_targets``)."""
  out = {}
  if "sample" in methods:
    out["sample"] = jax.random.uniform(key, (1, length, num_samples))
  if "topk_tail" in methods:
    out["topk_tail"] = jax.random.uniform(
        jax.random.fold_in(key, 1), (1, length, tail_samples)
    )
  return out


def _row_targets(
    logits, uniforms, *, methods, k, temperature, stratified, tail_k
):
  """The targets of one row's positions: logits [C, V] and their uniforms
  ([1, C, n] per method; the labels [1, C, 1] as "label") -> {name: [C,
  ...]}."""
  log_probs = jax.nn.log_softmax(
      logits[None].astype(jnp.float32) / temperature, axis=-1
  )
  out = {}
  if "label" in methods:  # at temperature 1: the same softmax when T = 1
    natural = (
        log_probs[0]
        if temperature == 1.0
        else jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    )
    labels = uniforms["label"][0]  # [C, 1]
    out["label_log_probs"] = jnp.take_along_axis(natural, labels, -1).T
  if "topk" in methods:
    out["topk_ids"], out["topk_log_probs"], out["topk_tail"] = (
        sparse_targets.topk_targets(log_probs, k)
    )
  if "sample" in methods:
    out["sample_ids"], out["sample_counts"] = sparse_targets.sample_targets_at(
        uniforms["sample"], log_probs, stratified
    )
  if "topk_tail" in methods:
    names = ("ids", "log_probs", "tail", "sample_ids", "sample_counts")
    made = sparse_targets.topk_tail_targets_at(
        uniforms["topk_tail"], log_probs, tail_k, stratified
    )
    out.update({f"tt_{n}": v for n, v in zip(names, made)})
  return {name: value[0] for name, value in out.items()}


def make_target_fn(
    methods,
    k: int,
    num_samples: int,
    temperature: float,
    stratified: bool,
    tail_k: int = 0,
    tail_samples: int = 0,
    position_chunk: int = 0,
):
  """Jitted ``(teacher, tokens, segment_ids, positions, base_key, row_ids,
  labels=None) -> targets``: the one teacher pass over a batch of rows [B,
  L] (``labels`` [B, L], the next tokens, for the ``label`` method).

  Row ``r`` draws its sample with ``fold_in(base_key, row_ids[r])`` (its
  index among the train rows) and, for ``topk_tail`` (a top-``tail_k`` head
  and ``tail_samples`` draws from the rest), its tail draws with that key
  folded with 1.

  The teacher's blocks run once over the whole rows; its output layer, the
  softmax and the targets then run over ``position_chunk`` positions at a
  time (0: the whole row), so no [B, L, V] array of logits is whole: at a
  real vocabulary (V = 151,936) one row of 8,192 positions is 5 GB of
  float32 logits. Each position's draws are the slice of its row's, so the
  targets do not depend on the chunk. On the CPU the targets are made a row
  at a time, where a row's [L, V] log-probs stay in cache (demo teacher,
  32 x 128 tokens, V = 8192, 2 cores: 0.22 s over the forward pass against
  0.38 s for the whole batch at once), elsewhere for the whole batch.
  """

  draws = functools.partial(
      _draws,
      methods=methods,
      num_samples=num_samples,
      tail_samples=tail_samples,
  )
  row_targets = functools.partial(
      _row_targets,
      methods=methods,
      k=k,
      temperature=temperature,
      stratified=stratified,
      tail_k=tail_k,
  )

  def local_targets(logits, uniforms):  # this device's rows, whole vocab
    one_row_at_a_time = sharding.platform() == "cpu"
    return jax.lax.map(
        lambda args: row_targets(*args),
        (logits, uniforms),
        batch_size=None if one_row_at_a_time else logits.shape[0],
    )

  def chunk_targets(teacher, hidden, uniforms):  # [B, C, D] -> targets
    logits = teacher.logits_from_hidden(hidden)
    mesh = sharding.current()
    if mesh is None:
      return local_targets(logits, uniforms)
    # Each device makes the targets of its own rows (the vocab, split over
    # ``tensor`` in the logits, gathered per row).
    rows_spec = sharding.spec(("batch",), logits.shape[:1], mesh)
    return jax.shard_map(
        local_targets,
        mesh=mesh,
        in_specs=(
            PartitionSpec(*rows_spec, None, None),
            PartitionSpec(*rows_spec, None, None, None),
        ),
        out_specs=PartitionSpec(*rows_spec),
        check_vma=False,
    )(logits, uniforms)

  # Read-only: no copy of the teacher comes out (graph_updates=False).
  @functools.partial(nnx.jit, graph_updates=False)
  def targets(
      teacher, tokens, segment_ids, positions, base_key, row_ids, labels=None
  ):
    hidden, _ = teacher.hidden(tokens, segment_ids, positions)
    length = tokens.shape[1]
    keys = jax.vmap(lambda row: jax.random.fold_in(base_key, row))(row_ids)
    uniforms = jax.vmap(lambda key: draws(key, length))(keys)
    if "label" in methods:  # split by position like the uniforms
      uniforms["label"] = labels[:, None, :, None]
    chunk = min(position_chunk or length, length)
    if chunk == length:
      return chunk_targets(teacher, hidden, uniforms)
    graphdef, state = nnx.split(teacher)
    return _by_position_chunks(
        lambda h, u: chunk_targets(nnx.merge(graphdef, state), h, u),
        hidden,
        uniforms,
        chunk,
    )

  return targets


def _by_position_chunks(fn, hidden, uniforms, chunk: int):
  """``fn(hidden [B, C, D], uniforms [B, ..., C, ...]) -> targets [B, C,
  ...]`` over ``chunk`` positions at a time (``lax.map``), joined back to
  [B, L, ...]: [B, L, ...] -> [chunks, B, C, ...], the last chunk padded;
  then back. uniforms' position axis is 2 (after the row and the draw)."""
  rows, length = hidden.shape[:2]
  count = -(-length // chunk)

  def split(x, axis):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, count * chunk - length)
    x = jnp.pad(x, pad)
    x = x.reshape(*x.shape[:axis], count, chunk, *x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)

  made = jax.lax.map(
      lambda args: fn(*args),
      (split(hidden, 1), jax.tree.map(lambda u: split(u, 2), uniforms)),
  )
  return jax.tree.map(
      lambda x: jnp.moveaxis(x, 0, 1).reshape(
          rows, count * chunk, *x.shape[3:]
      )[:, :length],
      made,
  )


def _encode_batch(
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
          "description": "data/cache_format.py (record version"
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


def _plan_shards(num_records: int, rows_per_shard: int) -> list[dict[str, Any]]:
  count = math.ceil(num_records / rows_per_shard)
  return [
      {
          "name": cache.shard_name(s, count),
          "records": min(rows_per_shard, num_records - s * rows_per_shard),
      }
      for s in range(count)
  ]


def _write_manifest(directory: str, settings: dict[str, Any]) -> dict[str, Any]:
  """The manifest of the shards done so far; the main process writes it."""
  manifest = dict(settings)
  manifest["shards"] = cache.shard_states(directory, settings)
  manifest = cache.seal(manifest)
  if sharding.is_main():
    files.write_json(
        os.path.join(directory, cache.MANIFEST), manifest, sort_keys=True
    )
  return manifest


class _ShardWriter:
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


def _write_shards(
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
  writers: dict[int, _ShardWriter] = {}
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
        writers[s] = _ShardWriter(directory, settings["shards"][s], bar)
      future = pool.submit(_encode_batch, rows, outputs, settings["vocab_size"])
      pending.append((s, future))
      drain(limit=2)  # The device runs ahead while host threads encode.
    drain(limit=0)
    if writers:  # every shard is finished once all its records are in
      raise RuntimeError(f"shards left unfinished: {sorted(writers)}")
  except BaseException:
    for writer in writers.values():
      writer.abort()
    raise


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
    return _write_manifest(directory, settings)

  target_fn = make_target_fn(
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
    _write_shards(
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
  manifest = _write_manifest(directory, settings)
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
  settings["shards"] = _plan_shards(num_records, c.rows_per_shard)

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
  _write_manifest(directory, settings)
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
