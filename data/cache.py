"""The logit cache on disk: manifest, shards, reader and verification.

Layout under ``W/logits/``::

    manifest.json                          settings, identity, per-shard state
    shard-00000-of-00012.array_record      one record per packed row
    shard-00000-of-00012.done.json         written when that shard is complete

A record is ``data.cache_format`` (tokens, segment ids, top-k and/or sampled
targets of one packed training row; record ``i`` of the cache is row ``i`` of
the train split). Shards are written under a temporary name and renamed when
complete; the ``.done.json`` sidecar (records, bytes, sha256) is what marks a
shard complete, so several writer processes never race on the manifest.

The manifest holds: ``format_version``; ``record_version``; the teacher
fingerprint (sha256 of its config and parameters); the tokenizer hash; vocab
size; sequence length; ``methods`` with ``k``, ``num_samples``, ``tail_k``,
``tail_samples``, ``temperature``; the value encoding and its error bounds;
per shard its record count, byte size, sha256 and ``complete`` flag; the data
source, split and seed.

Readers refuse a cache whose manifest does not match what the student expects
(tokenizer hash, vocab size, sequence length), naming the field, and refuse a
shard whose size or record count differs from the manifest, naming the shard.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import grain
from array_record.python import array_record_module
import numpy as np

from data import cache_format, pipeline
from distill.core.errors import UserError

# 2: the manifest seals its metadata with ``metadata_sha256``.
FORMAT_VERSION = 2
#: Target methods a cache can hold: "topk" (the k most likely ids, their
#: log-probs and the tail mass), "sample" (N draws as ids and counts),
#: "topk_tail" (a top-k head and M draws from the teacher outside it),
#: "label" (the log-probability of each label token: what cross-tokenizer
#: distillation matches).
METHODS = ("label", "sample", "topk", "topk_tail")
MANIFEST = "manifest.json"


class CacheError(UserError):
  """The cache is missing, incomplete, corrupt or does not fit the student."""


def shard_name(index: int, count: int) -> str:
  return f"shard-{index:05d}-of-{count:05d}.array_record"


def done_path(cache_dir: str, name: str) -> str:
  return os.path.join(cache_dir, name.replace(".array_record", ".done.json"))


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def shard_states(
    cache_dir: str, manifest: dict[str, Any]
) -> list[dict[str, Any]]:
  """Per shard: name, planned records, and (when complete) bytes and sha256."""
  states = []
  for shard in manifest["shards"]:
    state = {
        "name": shard["name"],
        "records": shard["records"],
        "complete": False,
    }
    path = done_path(cache_dir, shard["name"])
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        state.update(json.load(f), complete=True)
    states.append(state)
  return states


def read_manifest(
    cache_dir: str, require_complete: bool = True
) -> dict[str, Any]:
  path = os.path.join(cache_dir, MANIFEST)
  if not os.path.isfile(path):
    raise CacheError(
        f"No logit cache at {cache_dir} ({MANIFEST} is missing); run"
        " `python -m teacher.cache_logits` first."
    )
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except ValueError as e:
    raise CacheError(
        f"{path} is not valid JSON ({e}): the cache is damaged. Remove"
        f" {cache_dir} and rerun `python -m teacher.cache_logits`."
    ) from e
  if not isinstance(manifest, dict):
    raise CacheError(f"{path} does not hold a JSON object; remove {cache_dir}.")
  if manifest.get("format_version") != FORMAT_VERSION:
    raise CacheError(
        f"{path}: cache format {manifest.get('format_version')} is not"
        f" {FORMAT_VERSION}; rebuild it with teacher.cache_logits."
    )
  if manifest.get("metadata_sha256") != metadata_sha256(manifest):
    raise CacheError(
        f"{path} was changed after it was written: its settings do not match"
        " the metadata_sha256 sealed with them, so the targets cannot be"
        f" trusted to be what it says. Remove {cache_dir} and rerun"
        " `python -m teacher.cache_logits`."
    )
  if require_complete:
    missing = [s["name"] for s in manifest["shards"] if not s.get("complete")]
    if missing:
      raise CacheError(
          f"The cache at {cache_dir} is incomplete ({len(missing)} of"
          f" {len(manifest['shards'])} shards missing, first"
          f" {missing[0]}); rerun `python -m teacher.cache_logits`"
          " to finish it."
      )
  return manifest


def metadata_sha256(manifest: dict[str, Any]) -> str:
  """sha256 of a manifest's settings and shard plan (names, record counts).

  The per-shard state (complete, bytes, sha256) is left out: it changes as
  shards finish and ``verify`` checks it against the shards themselves.
  """
  meta = {
      k: v
      for k, v in manifest.items()
      if k not in ("shards", "metadata_sha256")
  }
  meta["shard_plan"] = [[s["name"], s["records"]] for s in manifest["shards"]]
  return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def seal(manifest: dict[str, Any]) -> dict[str, Any]:
  """The manifest with its ``metadata_sha256``, as writers store it."""
  return {**manifest, "metadata_sha256": metadata_sha256(manifest)}


def planned_records(max_rows: int, train_rows: int) -> int:
  """How many packed training rows a cache holds: the first ``max_rows``
  (``config.cache.max_rows``; 0: all ``train_rows``). Every run of a config
  reads exactly these rows, whether or not the cache exists yet."""
  return min(train_rows, max_rows) if max_rows else train_rows


def check_matches(
    manifest: dict[str, Any], expect: dict[str, Any], where: str
) -> None:
  """Refuses a cache that does not fit the student, naming the field."""
  for field, want in expect.items():
    have = manifest.get(field)
    if have != want and field == "teacher_fingerprint":
      raise CacheError(
          f"The logit cache at {where} was written by another teacher than"
          " the one in the workdir now (teacher_fingerprint differs): the"
          " teacher was retrained or replaced since. Remove the cache and"
          " rerun `python -m teacher.cache_logits`."
      )
    if have != want:
      raise CacheError(
          f"The logit cache at {where} does not match this student: {field} is"
          f" {have!r} in the cache but {want!r} here. Rebuild the cache"
          " (teacher.cache_logits) for this tokenizer and config."
      )


def positions_from_segments(segment_ids: np.ndarray) -> np.ndarray:
  """Positions restarting at 0 where the segment id changes (and at 0)."""
  n = segment_ids.shape[0]
  starts = np.flatnonzero(
      np.concatenate([[True], segment_ids[1:] != segment_ids[:-1]])
  )
  run_start = np.repeat(starts, np.diff(np.append(starts, n)))
  return (np.arange(n) - run_start).astype(np.int32)


class CacheSource:
  """Random access to decoded cache records, as training batches want them.

  ``source[i]`` has int32 ``tokens``, ``segment_ids``, ``positions`` [L + 1]
  and the chosen target per position: ``target="topk"``: ``ids`` [L, k]
  int32, ``log_probs`` [L, k] float32, ``tail`` [L] float32;
  ``target="sample"``: ``ids``, ``counts`` [L, N] int32;
  ``target="topk_tail"``: ``ids``, ``log_probs``, ``tail`` as for top-k (the
  head) and ``tail_ids``, ``tail_counts`` [L, M] int32 (the tail's draws);
  ``target="label"``: ``label_log_probs`` [L] float32.
  A ``view`` reads a smaller target than the stored one (``TargetView``).
  """

  def __init__(
      self,
      cache_dir: str,
      target: str,
      manifest: dict[str, Any] | None = None,
      view: TargetView | None = None,
  ):
    self._dir = cache_dir
    self._view = view
    self.manifest = manifest or read_manifest(cache_dir)
    if target not in self.manifest["methods"]:
      raise CacheError(
          f"The cache at {cache_dir} holds {self.manifest['methods']}"
          f" targets, not {target!r}; rebuild it with"
          f" --config.cache.methods including {target!r}."
      )
    self.target = target
    self._vocab = self.manifest["vocab_size"]
    self._shards = self.manifest["shards"]
    for shard in self._shards:
      path = os.path.join(cache_dir, shard["name"])
      size = os.path.getsize(path) if os.path.isfile(path) else None
      if size != shard["bytes"]:
        raise CacheError(
            f"Shard {path} is {'missing' if size is None else f'{size} bytes'}"
            f" but the manifest says {shard['bytes']} bytes: the cache"
            " is damaged. Run `python -m teacher.cache_logits --verify`,"
            " then delete the shard and its .done.json to rewrite it."
        )
    self._starts = np.cumsum([0] + [s["records"] for s in self._shards])
    self._source = None

  def _open(self):
    if self._source is None:
      paths = [os.path.join(self._dir, s["name"]) for s in self._shards]
      source = grain.sources.ArrayRecordDataSource(paths)
      if len(source) != self._starts[-1]:
        raise CacheError(
            f"The shards under {self._dir} hold {len(source)} records,"
            f" the manifest {self._starts[-1]}; run --verify."
        )
      self._source = source
    return self._source

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None
    return state

  def __len__(self) -> int:
    return int(self._starts[-1])

  def locate(self, index: int) -> tuple[str, int]:
    shard = int(np.searchsorted(self._starts, index, side="right") - 1)
    return self._shards[shard]["name"], int(index - self._starts[shard])

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    source = self._open()
    try:
      # ArrayRecord checksums its (compressed) chunks and raises RuntimeError
      # for damaged bytes before the record's own crc sees them.
      record = cache_format.decode_record(
          source[index], self._vocab, self.target
      )
    except (cache_format.CacheFormatError, RuntimeError) as e:
      name, offset = self.locate(index)
      raise CacheError(
          f"Record {offset} of {name} in {self._dir} is unreadable: {e}."
          " Run `python -m teacher.cache_logits --verify`."
      ) from e
    out = {
        "tokens": record["tokens"],
        "segment_ids": record["segment_ids"],
        "positions": positions_from_segments(record["segment_ids"]),
        "row": np.int32(index),
    }
    if self.target == "topk":
      out.update(
          ids=record["topk_ids"],
          log_probs=record["topk_log_probs"],
          tail=record["topk_tail"],
      )
    elif self.target == "topk_tail":
      out.update(
          ids=record["tt_ids"],
          log_probs=record["tt_log_probs"],
          tail=record["tt_tail"],
          tail_ids=record["tt_sample_ids"],
          tail_counts=record["tt_sample_counts"],
      )
    elif self.target == "label":
      out.update(label_log_probs=record["label_log_probs"])
    else:
      out.update(ids=record["sample_ids"], counts=record["sample_counts"])
    if self._view is not None:
      out = self._view.apply(index, out, self.target)
    return out


@dataclasses.dataclass(frozen=True)
class TargetView:
  """A smaller target read from a larger cached one (None: as stored).

  ``k``: the first k of the stored top-k ids (the rest join the tail
  mass); ``n``: n of a stored sample's N draws; ``m``: m of the stored
  top-k-with-tail's M tail draws. Draws are kept uniformly at random without
  replacement (a random n of N i.i.d. draws are n i.i.d. draws), with a
  generator seeded by ``seed`` and the record's index, so a view is the same
  every time it is read.
  """

  k: int | None = None
  n: int | None = None
  m: int | None = None
  seed: int = 0

  def apply(self, index: int, out: dict[str, np.ndarray], target: str):
    rng = np.random.default_rng([self.seed, index])
    if self.k is not None and target == "topk":
      dropped = np.exp(out["log_probs"][:, self.k :].astype(np.float64))
      out["tail"] = np.clip(out["tail"] + dropped.sum(-1), 0.0, 1.0).astype(
          np.float32
      )
      out["ids"] = out["ids"][:, : self.k]
      out["log_probs"] = out["log_probs"][:, : self.k]
    if self.n is not None and target == "sample":
      out["ids"], out["counts"] = thin_sample(
          out["ids"], out["counts"], self.n, rng
      )
    if self.m is not None and target == "topk_tail":
      out["tail_ids"], out["tail_counts"] = thin_sample(
          out["tail_ids"], out["tail_counts"], self.m, rng
      )
    return out


def thin_sample(
    ids: np.ndarray, counts: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
  """n of every position's N draws, kept without replacement.

  ids, counts [L, W] (unique ids, counts summing to N; 0 = padding) ->
  ids, counts [L, n] in the same form.
  """
  length = len(ids)
  total = int(counts[0].sum()) if length else 0
  if not 1 <= n <= total:
    raise CacheError(f"cannot keep {n} of {total} draws per position")
  draws = np.stack(
      [np.repeat(ids[t], counts[t]) for t in range(length)]
  )  # [L, N]
  keep = np.argsort(rng.random(draws.shape), axis=-1)[:, :n]
  kept = np.sort(np.take_along_axis(draws, keep, -1), axis=-1)  # [L, n]
  new = np.ones_like(kept, bool)
  new[:, 1:] = kept[:, 1:] != kept[:, :-1]
  rank = np.cumsum(new, axis=-1) - 1
  out_ids = np.zeros((length, n), np.int32)
  out_counts = np.zeros((length, n), np.int32)
  rows = np.repeat(np.arange(length), n)
  np.maximum.at(out_ids, (rows, rank.ravel()), kept.ravel())
  np.add.at(out_counts, (rows, rank.ravel()), 1)
  return out_ids, out_counts


def make_dataset(
    cache_dir: str,
    *,
    expect: dict[str, Any],
    target: str,
    view: TargetView | None = None,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    map_fn=None,
    read_ahead: int = pipeline.READ_AHEAD,
) -> grain.IterDataset:
  """Batches of cached rows, in the same order as ``pipeline.make_dataset``
  with the same seed and ``num_rows`` equal to the cache's record count.
  ``map_fn(record) -> row``: a host transform of each record (in grain's
  workers when there are some), e.g. ``data.align.CrossTokenizerRows``."""
  manifest = read_manifest(cache_dir)
  check_matches(manifest, expect, cache_dir)
  ds = grain.MapDataset.source(CacheSource(cache_dir, target, manifest, view))
  if map_fn is not None:
    ds = ds.map(map_fn)
  return pipeline.batched(
      ds,
      batch_size=batch_size,
      seed=seed,
      shuffle=shuffle,
      num_epochs=num_epochs,
      process_index=process_index,
      process_count=process_count,
      drop_remainder=True,
      worker_count=worker_count,
      read_ahead=read_ahead,
  )


def verify(cache_dir: str) -> dict[str, Any]:
  """Re-hashes every shard and decodes every record.

  Returns ``{"shards": n, "records": n, "bytes": n}``; raises CacheError naming
  the first bad shard (and record, when a record is the problem).
  """
  manifest = read_manifest(cache_dir)
  records = total_bytes = 0
  for shard in manifest["shards"]:
    path = os.path.join(cache_dir, shard["name"])
    if not os.path.isfile(path):
      raise CacheError(f"Shard {shard['name']} is missing from {cache_dir}.")
    if file_sha256(path) != shard["sha256"]:
      raise CacheError(
          f"Shard {shard['name']} in {cache_dir} does not match its"
          " sha256 in the manifest: it was changed or damaged after it"
          " was written. Delete it and its .done.json, then rerun"
          " teacher.cache_logits to rewrite it."
      )
    reader = array_record_module.ArrayRecordReader(path)
    try:
      count = reader.num_records()
      if count != shard["records"]:
        raise CacheError(
            f"Shard {shard['name']} holds {count} records, the manifest"
            f" {shard['records']}."
        )
      for i in range(count):
        try:
          cache_format.decode_record(
              reader.read([i])[0], manifest["vocab_size"]
          )
        except (cache_format.CacheFormatError, RuntimeError) as e:
          raise CacheError(
              f"Record {i} of shard {shard['name']} is unreadable: {e}"
          ) from e
    finally:
      reader.close()
    records += count
    total_bytes += shard["bytes"]
  return {
      "shards": len(manifest["shards"]),
      "records": records,
      "bytes": total_bytes,
  }
