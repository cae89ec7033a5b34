"""The grain input pipeline every stage reads from.

Two steps:

1. ``tokenize_split`` (run once by ``data.prepare``): read the split's TFDS
   array_record source with ``grain.MapDataset.source`` → decode → tokenize in
   batches → append EOS → concatenate into one token stream. It is stored under
   ``W/data/tokens/<split>/`` as ``tokens.npy`` (smallest unsigned dtype for the
   vocab), ``doc_offsets.npy`` (int64 [num_docs + 1], where each document
   starts in the stream) and ``meta.json`` (counts and the tokenizer hash).

2. ``make_dataset``: a random-access ``grain.MapDataset`` over packed rows.
   Row ``i`` is the slice ``stream[i * (L + 1) : (i + 1) * (L + 1)]`` with
   ``L = seq_len``, so every token of the stream is in exactly one row (the
   final partial row is dropped). Documents are packed back to back; each row
   carries ``segment_ids`` (1, 2, ... per document piece in the row; attention
   must not cross them) and ``positions`` (restarting at 0 for each piece).
   Then: shuffle by seed (a new order each epoch) → repeat → one disjoint
   shard per JAX process → batch → optional multiprocess prefetch.

Because the rows are addressed by index, the iterator state is just a
position: ``iterator.get_state()`` / ``set_state()`` (and orbax, through
``grain.checkpoint``) restore exactly the batches the original would have
produced.

A batch is a dict of int32 arrays ``tokens``, ``segment_ids``, ``positions``,
each [B, L + 1]; inputs are ``tokens[:, :-1]``, labels ``tokens[:, 1:]`` and
the loss mask is ``target_mask(segment_ids)``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import grain
import jax
import numpy as np
from absl import flags, logging
from tqdm import tqdm

from data import tokenizer as tok
from distill.core import files, layout, stop
from distill.core.errors import UserError

META = "meta.json"


class DataError(UserError):
  """Prepared data that is missing, too small or does not fit the config."""


def token_dtype(vocab_size: int) -> np.dtype:
  """The smallest unsigned integer type that holds every id of the vocab."""
  for dtype in (np.uint8, np.uint16, np.uint32):
    if vocab_size <= np.iinfo(dtype).max + 1:
      return np.dtype(dtype)
  raise DataError(f"a vocab of {vocab_size} ids does not fit in 32 bits")


def prepared_vocab_size(workdir: str) -> int:
  """The tokenizer's vocab size, after checking the prepare stage has run."""
  if read_meta(layout.data_dir(workdir), "train") is None:
    raise tok.TokenizerError(
        f"No prepared data under {layout.data_dir(workdir)}; run `python -m"
        " data.prepare` (or experiments.run) first."
    )
  return tok.load_tokenizer(layout.tokenizer_path(workdir)).get_vocab_size()


def tokens_dir(data_dir: str, split: str) -> str:
  return os.path.join(data_dir, "tokens", split)


def read_meta(data_dir: str, split: str) -> dict[str, Any] | None:
  path = os.path.join(tokens_dir(data_dir, split), META)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _decode(example: dict[str, Any], text_key: str) -> str:
  value = example[text_key]
  return (
      value.decode("utf-8", errors="replace")
      if isinstance(value, bytes)
      else str(value)
  )


def tokenize_split(
    source,
    text_key: str,
    tokenizer_path: str,
    data_dir: str,
    split: str,
    batch_size: int = 64,
) -> dict[str, Any]:
  """Tokenizes a split's documents into a packed token stream (see module doc).

  Skipped when the stream exists for the same tokenizer. Written to a
  temporary folder and renamed, so an interrupted run leaves nothing behind.
  """
  tokenizer_hash = tok.tokenizer_hash(tokenizer_path)
  meta = read_meta(data_dir, split)
  if meta and meta["tokenizer_hash"] == tokenizer_hash:
    return meta
  tokenizer = tok.load_tokenizer(tokenizer_path)
  eos = tok.special_ids(tokenizer)["eos"]
  vocab_size = tokenizer.get_vocab_size()
  dtype = token_dtype(vocab_size)

  ds = (
      grain.MapDataset.source(source)
      .map(lambda ex: _decode(ex, text_key))
      .batch(batch_size, batch_fn=list)
  )
  pieces, lengths, num_bytes = [], [], 0
  start = time.time()
  with tqdm(total=len(source), desc=f"tokenize {split}", unit="doc") as bar:
    for texts in ds:
      stop.check("prepare", "the splits finished before this one are kept")
      num_bytes += sum(len(t.encode("utf-8")) for t in texts)
      for ids in tok.encode_batch(tokenizer, texts):
        ids.append(eos)
        pieces.append(np.asarray(ids, dtype=dtype))
        lengths.append(len(ids))
      bar.update(len(texts))
  if not pieces:
    raise DataError(f"The {split} split has no documents; nothing to tokenize.")
  stream = np.concatenate(pieces)
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

  meta = {
      "split": split,
      "tokenizer_hash": tokenizer_hash,
      "vocab_size": vocab_size,
      "dtype": dtype.name,
      "num_docs": len(lengths),
      "num_tokens": int(stream.size),
      "num_bytes": num_bytes,
      "bytes_per_token": num_bytes / max(1, int(stream.size) - len(lengths)),
      "seconds": round(time.time() - start, 2),
  }
  with files.atomic_dir(tokens_dir(data_dir, split)) as tmp:
    np.save(os.path.join(tmp, "tokens.npy"), stream)
    np.save(os.path.join(tmp, "doc_offsets.npy"), offsets)
    files.write_json(os.path.join(tmp, META), meta)
  logging.info(
      "Tokenized %s: %d docs, %d tokens, %.2f bytes/token",
      split,
      meta["num_docs"],
      meta["num_tokens"],
      meta["bytes_per_token"],
  )
  return meta


# ``np.load`` parses the .npy header with ``ast.literal_eval``, and CPython
# 3.11's AST constructor is not thread-safe (concurrent calls raise
# "SystemError: AST constructor recursion depth mismatch"); grain reads rows
# from several threads, so every .npy open here holds this lock.
_OPEN_LOCK = threading.Lock()


def load_stream(directory: str) -> tuple[np.ndarray, np.ndarray]:
  """(tokens memory map, doc_offsets) of a tokenized split's folder
  (``tokens_dir(data_dir, split)``); safe to call from any thread."""
  with _OPEN_LOCK:
    offsets = np.load(os.path.join(directory, "doc_offsets.npy"))
    tokens = np.load(os.path.join(directory, "tokens.npy"), mmap_mode="r")
  return tokens, offsets


class PackedRows:
  """Random access to fixed-length packed rows of a token stream.

  ``rows[i]`` is a dict of int32 arrays [seq_len + 1]: ``tokens``,
  ``segment_ids`` (1-based per document piece) and ``positions``; and
  ``row``, the scalar ``i`` (a batch names its rows with it). The
  memory map is reopened lazily, so the source pickles into grain workers.
  """

  def __init__(self, data_dir: str, split: str, seq_len: int):
    self._dir = tokens_dir(data_dir, split)
    meta = read_meta(data_dir, split)
    if meta is None:
      raise DataError(
          f"No tokenized {split!r} split under {self._dir}; run"
          " `python -m data.prepare` first."
      )
    self.meta = meta
    self.row_len = seq_len + 1
    self._num_rows = meta["num_tokens"] // self.row_len
    if self._num_rows == 0:
      raise DataError(
          f"The {split} split has {meta['num_tokens']} tokens, fewer than one row"
          f" of seq_len + 1 = {self.row_len}; lower config.data.seq_len."
      )
    self._tokens = None
    self._offsets = None

  def _open(self):
    # Called from grain's reader threads: ``_tokens`` is checked, so it is
    # assigned last, after what it guards (``load_stream`` holds the lock).
    if self._tokens is None:
      tokens, self._offsets = load_stream(self._dir)
      self._tokens = tokens

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_tokens"] = state["_offsets"] = None
    return state

  def __len__(self) -> int:
    return self._num_rows

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    self._open()
    if not 0 <= index < self._num_rows:
      raise IndexError(f"row {index} out of range [0, {self._num_rows})")
    start = index * self.row_len
    idx = np.arange(start, start + self.row_len)
    doc = np.searchsorted(self._offsets, idx, side="right") - 1
    doc_start = np.maximum(self._offsets[doc], start)
    return {
        "tokens": np.asarray(
            self._tokens[start : start + self.row_len], np.int32
        ),
        "segment_ids": (doc - doc[0] + 1).astype(np.int32),
        "positions": (idx - doc_start).astype(np.int32),
        "row": np.int32(index),
    }


def target_mask(segment_ids: np.ndarray) -> np.ndarray:
  """[B, L] mask of the labels ``tokens[:, 1:]`` that continue their document.

  The first token of a document cannot be predicted from the one before it
  (that belongs to the previous document), and padding (id 0) never counts.
  """
  return (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)


def make_dataset(
    data_dir: str,
    split: str,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    drop_remainder: bool = True,
    num_rows: int | None = None,
    worker_count: int = 0,
) -> grain.IterDataset:
  """The batched, per-process pipeline over packed rows (see module doc).

  ``batch_size`` is the global batch; each of the ``process_count`` processes
  gets ``batch_size // process_count`` rows per batch from its own disjoint
  shard. ``num_epochs=None`` repeats forever. ``num_rows`` keeps only the
  first rows of the split (those a logit cache covers), before shuffling.
  """
  ds = grain.MapDataset.source(PackedRows(data_dir, split, seq_len))
  if num_rows is not None:
    if not 0 < num_rows <= len(ds):
      raise DataError(
          f"num_rows={num_rows} is outside [1, {len(ds)}] for the {split} split"
          f" under {data_dir}; the cache and the data do not belong together."
      )
    ds = ds[:num_rows]
  return batched(
      ds,
      batch_size=batch_size,
      seed=seed,
      shuffle=shuffle,
      num_epochs=num_epochs,
      process_index=process_index,
      process_count=process_count,
      drop_remainder=drop_remainder,
      worker_count=worker_count,
  )


def batched(
    ds: grain.MapDataset,
    *,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    drop_remainder: bool = True,
    worker_count: int = 0,
) -> grain.IterDataset:
  """The tail every training input shares: rows -> per-process batches.

  Shuffle by seed (a new order each epoch) -> repeat (``num_epochs=None``:
  forever) -> this process's disjoint shard -> batches of ``batch_size //
  process_count`` rows -> optional multiprocess prefetch. The same rows and
  seed give the same batches whatever the rows are (packed text or cached
  targets), which keeps every run of a config on the same rows.
  """
  if process_index is None or process_count is None:
    process_index, process_count = jax.process_index(), jax.process_count()
  if batch_size % process_count:
    raise DataError(
        f"config.data.batch_size={batch_size} is not divisible by"
        f" the {process_count} processes; choose a multiple."
    )
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  ds = ds[process_index::process_count]
  ds = ds.batch(batch_size // process_count, drop_remainder=drop_remainder)
  it_ds = ds.to_iter_dataset()
  if worker_count > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags.
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=worker_count)
    )
  return it_ds


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
  """Splits a packed batch [B, L + 1] into what a model and its loss take.

  Returns ``inputs``, ``segment_ids``, ``positions`` (the first L columns),
  ``labels`` (the last L) and ``mask`` ([B, L], ``target_mask``). Works on
  numpy and jax arrays alike.
  """
  segment_ids = batch["segment_ids"]
  return {
      "inputs": batch["tokens"][:, :-1],
      "labels": batch["tokens"][:, 1:],
      "segment_ids": segment_ids[:, :-1],
      "positions": batch["positions"][:, :-1],
      "mask": target_mask(segment_ids),
  }
