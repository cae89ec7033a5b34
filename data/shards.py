"""A split's token stream as many bounded shard files, written in parallel.

The stream is every document of the split, in the source's order, tokenized
and followed by EOS, back to back. It is cut into **units**, contiguous ranges
of documents, so that any process and any worker can tokenize any unit: the
units depend only on the corpus, the tokenizer and ``shard_tokens``, never on
how many processes or workers share the work, so the shards come out the same
byte for byte whoever wrote them. A unit is about ``UNIT_TOKENS`` tokens,
small enough for hundreds of workers to share a large split; it writes one or
more **shards** (a new one starts after the document that fills
``shard_tokens``), each two raw little-endian files:

- ``<name>.tokens``: the ids, in the manifest's dtype;
- ``<name>.docs``: int64 [docs + 1], where each document starts in the shard
  (the last entry is the shard's length).

A finished unit leaves ``units/<unit>.json`` (its shards, token counts and
sha256), so a killed run redoes only the units without one. When the units a
split needs are done, ``manifest.json`` lists their shards in order with the
split's totals; it is written last and is what says the split is ready.

``TokenShards`` reads the stream back by global token offset from memory maps,
so a packed row may span two shards and nothing is loaded whole.

This module imports neither jax nor the rest of the project: the tokenizing
workers are spawned processes and start from it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import threading
import time
import uuid
from typing import Any, Iterator

import numpy as np
from tokenizers import Tokenizer

MANIFEST = "manifest.json"
UNITS = "units"
MIN_UNITS = 16  # enough pieces to keep a few workers busy on a small corpus
# A unit is about this many tokens (~10 s of one core), so that a large job
# has pieces for hundreds of workers; a unit's shards still close at
# ``shard_tokens`` when that is smaller.
UNIT_TOKENS = 1 << 22
SAMPLE_DOCS = 64  # documents tokenized to estimate a split's size
FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Unit:
  """Documents ``[start, stop)`` of the split; its shards are named
  ``u<index>-<part>``."""

  index: int
  start: int
  stop: int


def plan_units(
    num_docs: int, tokens_per_doc: float, unit_tokens: int
) -> list[Unit]:
  """Contiguous, nearly equal document ranges of about ``unit_tokens`` each
  (by the estimate ``tokens_per_doc``), at least ``MIN_UNITS`` of them (or
  one per document)."""
  count = max(
      min(MIN_UNITS, num_docs),
      int(np.ceil(num_docs * tokens_per_doc / unit_tokens)),
  )
  count = min(count, num_docs)
  edges = [num_docs * i // count for i in range(count + 1)]
  return [Unit(i, edges[i], edges[i + 1]) for i in range(count)]


def decode_text(example: dict[str, Any], text_key: str) -> str:
  value = example[text_key]
  return (
      value.decode("utf-8", errors="replace")
      if isinstance(value, bytes)
      else str(value)
  )


def read_texts(source, text_key: str, start: int, stop: int, batch: int = 64):
  """The texts of documents ``[start, stop)``, in batches of ``batch``."""
  for lo in range(start, stop, batch):
    indices = list(range(lo, min(stop, lo + batch)))
    getitems = getattr(source, "__getitems__", None)
    examples = getitems(indices) if getitems else [source[i] for i in indices]
    yield [decode_text(ex, text_key) for ex in examples]


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
  """A document's ids (no specials)."""
  return tokenizer.encode(text, add_special_tokens=False).ids


def encode_batch(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
  """The documents' ids (no specials): on threads of every core, except in
  a worker (``init_worker``), where a worker is one core."""
  return [
      e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)
  ]


def estimate_tokens_per_doc(source, text_key: str, tokenizer) -> float:
  """Mean tokens (EOS included) of ``SAMPLE_DOCS`` documents spread evenly
  over the split: deterministic for the same corpus and tokenizer."""
  n = len(source)
  picks = sorted({n * i // SAMPLE_DOCS for i in range(min(n, SAMPLE_DOCS))})
  lengths = [
      len(encode(tokenizer, decode_text(source[i], text_key))) + 1
      for i in picks
  ]
  return float(np.mean(lengths))


@dataclasses.dataclass(frozen=True)
class Job:
  """What a unit's worker needs besides the unit (given to each worker once,
  ``init_worker``)."""

  source: Any
  text_key: str
  tokenizer_path: str
  tokenizer_hash: str
  eos: int
  dtype: str
  shard_tokens: int
  out_dir: str


def unit_marker(out_dir: str, unit: Unit) -> str:
  return os.path.join(out_dir, UNITS, f"u{unit.index:06d}.json")


def _temp(path: str) -> str:
  return f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _write_json(path: str, payload: dict[str, Any]) -> None:
  """Writes ``payload`` under a temporary name, then renames it into place."""
  tmp = _temp(path)
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=2)
  os.replace(tmp, path)


def read_marker(job: Job, unit: Unit) -> dict[str, Any] | None:
  """The finished unit's record, or None when it has to be (re)done: no
  marker, one from another tokenizer, plan or shard size, or a shard file
  missing or of the wrong length."""
  path = unit_marker(job.out_dir, unit)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    record = json.load(f)
  if (
      record.get("tokenizer_hash") != job.tokenizer_hash
      or (record.get("start"), record.get("stop")) != (unit.start, unit.stop)
      or record.get("shard_tokens") != job.shard_tokens
  ):
    return None
  itemsize = np.dtype(job.dtype).itemsize
  for shard in record["shards"]:
    for suffix, size in (
        (".tokens", shard["tokens"] * itemsize),
        (".docs", (shard["docs"] + 1) * 8),
    ):
      p = os.path.join(job.out_dir, shard["name"] + suffix)
      if not os.path.isfile(p) or os.path.getsize(p) != size:
        return None
  return record


_TOKENIZERS: dict[str, Tokenizer] = {}
TRIM_EVERY = 8  # encoding calls between returns of freed memory
ENCODE_CHARS = 1 << 18  # characters of text per encoding call (at most)


def _libc_trim():
  """glibc's ``malloc_trim``, or None elsewhere."""
  try:
    return ctypes.CDLL("libc.so.6").malloc_trim
  except (OSError, AttributeError):
    return None


_TRIM = _libc_trim()


def release_memory() -> None:
  """Gives the C heap's freed pages back to the system. Tokenizing many
  documents of very different sizes leaves the heap fragmented, and without
  this a worker's resident memory creeps up with the corpus it has read."""
  if _TRIM is not None:
    _TRIM(0)


def _tokenizer(job: Job) -> Tokenizer:
  if job.tokenizer_hash not in _TOKENIZERS:
    _TOKENIZERS[job.tokenizer_hash] = Tokenizer.from_file(job.tokenizer_path)
  return _TOKENIZERS[job.tokenizer_hash]


class ShardWriter:
  """Appends documents to ``<name>.tokens`` / ``.docs`` under temporary names
  and hashes the token bytes as they go; ``close`` renames them into place."""

  def __init__(self, out_dir: str, name: str):
    self.name = name
    self._paths = [
        os.path.join(out_dir, name + s) for s in (".tokens", ".docs")
    ]
    self._tmps = [_temp(p) for p in self._paths]
    self._tokens = open(self._tmps[0], "wb")  # pylint: disable=consider-using-with
    self._hash = hashlib.sha256()
    self._starts = [0]

  @property
  def num_tokens(self) -> int:
    return self._starts[-1]

  def add(self, ids: np.ndarray) -> None:
    data = ids.tobytes()
    self._tokens.write(data)
    self._hash.update(data)
    self._starts.append(self._starts[-1] + ids.size)

  def close(self) -> dict[str, Any]:
    self._tokens.close()
    starts = np.asarray(self._starts, dtype="<i8")
    starts.tofile(self._tmps[1])
    for tmp, path in zip(self._tmps, self._paths):
      os.replace(tmp, path)
    return {
        "name": self.name,
        "tokens": self.num_tokens,
        "docs": len(self._starts) - 1,
        "sha256": self._hash.hexdigest(),
    }

  def abort(self) -> None:
    self._tokens.close()
    for tmp in self._tmps:
      if os.path.exists(tmp):
        os.remove(tmp)


def by_size(batches, max_chars: int = ENCODE_CHARS):
  """The texts of ``batches`` regrouped into lists of at most ``max_chars``
  characters (or one text): what one encoding call holds in memory (the ids,
  offsets and token strings of every token) stays the same, however large the
  corpus's largest documents and however many batches it has."""
  group, size = [], 0
  for texts in batches:
    for text in texts:
      if group and size + len(text) > max_chars:
        yield group
        group, size = [], 0
      group.append(text)
      size += len(text)
  if group:
    yield group


def tokenize_unit(job: Job, unit: Unit) -> dict[str, Any]:
  """Tokenizes one unit into its shards and writes its marker (callers skip
  the units ``read_marker`` finds finished); the record it returns also has
  the ``seconds`` it took. Runs in a worker or in the process itself."""
  started = time.perf_counter()
  tokenizer = _tokenizer(job)
  dtype = np.dtype(job.dtype).newbyteorder("<")
  shards, num_bytes = [], 0
  writer = ShardWriter(job.out_dir, f"u{unit.index:06d}-{0:03d}")
  try:
    texts_of = read_texts(job.source, job.text_key, unit.start, unit.stop)
    for batch, texts in enumerate(by_size(texts_of)):
      if batch % TRIM_EVERY == TRIM_EVERY - 1:
        release_memory()
      num_bytes += sum(len(text.encode("utf-8")) for text in texts)
      for ids in encode_batch(tokenizer, texts):
        ids.append(job.eos)
        writer.add(np.asarray(ids, dtype=dtype))
        if writer.num_tokens >= job.shard_tokens:
          shards.append(writer.close())
          writer = ShardWriter(
              job.out_dir, f"u{unit.index:06d}-{len(shards):03d}"
          )
  except BaseException:
    writer.abort()
    raise
  if writer.num_tokens:
    shards.append(writer.close())
  else:
    writer.abort()
  record = {
      "unit": unit.index,
      "start": unit.start,
      "stop": unit.stop,
      "tokenizer_hash": job.tokenizer_hash,
      "shard_tokens": job.shard_tokens,
      "bytes": num_bytes,
      "tokens": sum(s["tokens"] for s in shards),
      "shards": shards,
  }
  _write_json(unit_marker(job.out_dir, unit), record)
  return dict(record, seconds=time.perf_counter() - started)


_WORKER_JOB: list[Job] = []


def init_worker(job: Job) -> None:
  """A spawned worker's start: the job (its source opened once, not per
  unit), one core's worth of tokenizing, quiet (Ctrl-C and warnings are the
  main process's to report)."""
  os.environ["TOKENIZERS_PARALLELISM"] = "false"
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  logging.getLogger("absl").setLevel(logging.ERROR)
  _WORKER_JOB[:] = [job]


def worker_tokenize(unit: Unit) -> dict[str, Any]:
  """``tokenize_unit`` of the worker's job (``init_worker``)."""
  return tokenize_unit(_WORKER_JOB[0], unit)


def needed_prefix(
    records: list[dict[str, Any] | None], max_tokens: int
) -> int | None:
  """How many leading units make the split: all of them (``max_tokens`` 0)
  or the fewest whose tokens reach ``max_tokens``. None while a unit of that
  prefix is unfinished (``records[i]`` None)."""
  total = 0
  for i, record in enumerate(records):
    if record is None:
      return None
    total += record["tokens"]
    if max_tokens and total >= max_tokens:
      return i + 1
  return len(records)


def finish(
    out_dir: str, records: list[dict[str, Any]], meta: dict[str, Any]
) -> dict[str, Any]:
  """Writes the manifest of the units ``records`` (in order) and removes
  every other unit's shards and the unit markers; returns the manifest."""
  keep = {s["name"] for r in records for s in r["shards"]}
  manifest = dict(
      meta,
      format=FORMAT,
      num_docs=sum(r["stop"] - r["start"] for r in records),
      num_tokens=sum(r["tokens"] for r in records),
      num_bytes=sum(r["bytes"] for r in records),
      shards=[s for r in records for s in r["shards"]],
  )
  manifest["bytes_per_token"] = manifest["num_bytes"] / max(
      1, manifest["num_tokens"] - manifest["num_docs"]
  )
  _write_json(os.path.join(out_dir, MANIFEST), manifest)
  for name in os.listdir(out_dir):
    stem, _, suffix = name.partition(".")
    if (suffix in ("tokens", "docs") and stem not in keep) or ".tmp-" in name:
      os.remove(os.path.join(out_dir, name))
  shutil.rmtree(os.path.join(out_dir, UNITS), ignore_errors=True)
  return manifest


def read_manifest(out_dir: str) -> dict[str, Any] | None:
  path = os.path.join(out_dir, MANIFEST)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


class TokenShards:
  """A finished split's stream, read by global token offset (memory maps,
  opened on first use; safe to share between threads and to pickle)."""

  def __init__(self, out_dir: str, manifest: dict[str, Any]):
    self._dir = out_dir
    self._dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    self._names = [s["name"] for s in manifest["shards"]]
    sizes = [s["tokens"] for s in manifest["shards"]]
    docs = [s["docs"] for s in manifest["shards"]]
    self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    self.doc_bases = np.concatenate([[0], np.cumsum(docs)]).astype(np.int64)
    self.num_tokens = int(self.starts[-1])
    self.num_docs = int(self.doc_bases[-1])
    self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_maps"], state["_lock"] = {}, None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _shard(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    maps = self._maps.get(i)
    if maps is None:
      with self._lock:
        maps = self._maps.get(i)
        if maps is None:
          base = os.path.join(self._dir, self._names[i])
          maps = (
              np.memmap(base + ".tokens", dtype=self._dtype, mode="r"),
              np.memmap(base + ".docs", dtype="<i8", mode="r"),
          )
          self._maps[i] = maps
    return maps

  def _pieces(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
    """(shard, local start, local stop) covering ``[start, stop)``."""
    i = int(np.searchsorted(self.starts, start, side="right")) - 1
    while start < stop:
      lo, hi = start - self.starts[i], min(stop, self.starts[i + 1])
      yield i, int(lo), int(hi - self.starts[i])
      start, i = int(hi), i + 1

  def tokens(self, start: int, stop: int) -> np.ndarray:
    """The ids at ``[start, stop)``."""
    parts = [
        self._shard(i)[0][lo:hi] for i, lo, hi in self._pieces(start, stop)
    ]
    return np.concatenate(parts) if len(parts) > 1 else np.array(parts[0])

  def documents(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """For each position of ``[start, stop)``: its document's number in the
    split and the offset where that document starts."""
    numbers, starts = [], []
    for i, lo, hi in self._pieces(start, stop):
      offsets = self._shard(i)[1]
      doc = np.searchsorted(offsets, np.arange(lo, hi), side="right") - 1
      numbers.append(self.doc_bases[i] + doc)
      starts.append(self.starts[i] + np.asarray(offsets[doc]))
    return np.concatenate(numbers), np.concatenate(starts)

  def doc_offsets(self) -> np.ndarray:
    """Every document's start and the stream's end, int64 [docs + 1] (read
    whole: for a split small enough to walk, like validation)."""
    parts = [
        self.starts[i] + np.asarray(self._shard(i)[1][:-1])
        for i in range(len(self._names))
    ]
    return np.concatenate(parts + [[self.num_tokens]]).astype(np.int64)
