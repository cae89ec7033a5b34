"""The grain input pipeline every stage reads from.

Two steps:

1. ``data.prepare`` (once) tokenizes each split into a token stream: every
   document in the source's order, followed by EOS, back to back. It is
   stored under ``W/data/tokens/<split>/`` as bounded shard files (smallest
   unsigned dtype for the vocab) and ``manifest.json`` (the shards in order,
   with counts, hashes and the tokenizer hash); ``data.shards`` writes and
   reads them.

2. ``make_dataset``: a random-access ``grain.MapDataset`` over packed rows.
   Row ``i`` is the slice ``stream[i * (L + 1) : (i + 1) * (L + 1)]`` with
   ``L = seq_len``, so every token of the stream is in exactly one row (the
   final partial row is dropped). Documents are packed back to back; each row
   carries ``segment_ids`` (1, 2, ... per document piece in the row; attention
   must not cross them) and ``positions`` (restarting at 0 for each piece).
   Then: shuffle by seed (a new order each epoch) → repeat → one disjoint
   shard per JAX process → batch → a few batches made ahead of the step
   (``config.data.read_ahead``) → optional multiprocess prefetch.

Because the rows are addressed by index, the iterator state is just a
position: ``iterator.get_state()`` / ``set_state()`` (and orbax, through
``grain.checkpoint``) restore exactly the batches the original would have
produced. ``Phases`` chains such iterators (short rows for the first
steps, then long ones) and keeps which one is current in its state.

A batch is a dict of int32 arrays ``tokens``, ``segment_ids``, ``positions``,
each [B, L + 1]; inputs are ``tokens[:, :-1]``, labels ``tokens[:, 1:]`` and
the loss mask is ``target_mask(segment_ids)``.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Sequence

import grain
import jax
import numpy as np
from absl import flags

from data import shards
from data import tokenizer as tok
from distill.core import layout
from distill.core.errors import UserError


class DataError(UserError):
  """Prepared data that is missing, too small or does not fit the config."""


# Batches made ahead of the step, in as many threads (``batched``). grain's
# own default, 500 batches in 16 threads, keeps every core busy decoding
# far ahead of the step and slows it: on 2 cores a student trained at
# about 2,100 tokens/s with it and 2,900-3,000 with 4 (the README's
# "Input pipeline" has the runs).
READ_AHEAD = 4


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
  """The split's manifest (``data.shards``), or None before it is ready."""
  return shards.read_manifest(tokens_dir(data_dir, split))


def load_stream(directory: str) -> shards.TokenShards:
  """The token stream of a tokenized split's folder
  (``tokens_dir(data_dir, split)``), read from its shards on demand."""
  manifest = shards.read_manifest(directory)
  if manifest is None:
    raise DataError(
        f"No tokenized split under {directory}; run `python -m data.prepare`"
        " first."
    )
  return shards.TokenShards(directory, manifest)


class PackedRows:
  """Random access to fixed-length packed rows of a token stream.

  ``rows[i]`` is a dict of int32 arrays [seq_len + 1]: ``tokens``,
  ``segment_ids`` (1-based per document piece) and ``positions``; and
  ``row``, the scalar ``i`` (a batch names its rows with it). A row may span
  two shards; the shards are memory-mapped on first use, so the source
  pickles into grain workers.
  """

  def __init__(self, data_dir: str, split: str, seq_len: int):
    directory = tokens_dir(data_dir, split)
    meta = read_meta(data_dir, split)
    if meta is None:
      raise DataError(
          f"No tokenized {split!r} split under {directory}; run"
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
    self._stream = shards.TokenShards(directory, meta)

  def __len__(self) -> int:
    return self._num_rows

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < self._num_rows:
      raise IndexError(f"row {index} out of range [0, {self._num_rows})")
    start = index * self.row_len
    stop = start + self.row_len
    doc, doc_start = self._stream.documents(start, stop)
    return {
        "tokens": self._stream.tokens(start, stop).astype(np.int32),
        "segment_ids": (doc - doc[0] + 1).astype(np.int32),
        "positions": (
            np.arange(start, stop) - np.maximum(doc_start, start)
        ).astype(np.int32),
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
    map_fn=None,
    read_ahead: int = READ_AHEAD,
) -> grain.IterDataset:
  """The batched, per-process pipeline over packed rows (see module doc).

  ``batch_size`` is the global batch; each of the ``process_count`` processes
  gets ``batch_size // process_count`` rows per batch from its own disjoint
  shard. ``num_epochs=None`` repeats forever. ``num_rows`` keeps only the
  first rows of the split (those a logit cache covers), before shuffling.
  ``map_fn(row) -> row``: a host transform of each row before batching
  (e.g. ``data.align.CrossTokenizerRows`` of an online run).
  """
  ds = grain.MapDataset.source(PackedRows(data_dir, split, seq_len))
  if num_rows is not None:
    if not 0 < num_rows <= len(ds):
      raise DataError(
          f"num_rows={num_rows} is outside [1, {len(ds)}] for the {split} split"
          f" under {data_dir}; the cache and the data do not belong together."
      )
    ds = ds[:num_rows]
  if map_fn is not None:
    ds = ds.map(map_fn)
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
      read_ahead=read_ahead,
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
    read_ahead: int = READ_AHEAD,
) -> grain.IterDataset:
  """The tail every training input shares: rows -> per-process batches.

  Shuffle by seed (a new order each epoch) -> repeat (``num_epochs=None``:
  forever) -> this process's disjoint shard -> batches of ``batch_size //
  process_count`` rows, ``read_ahead`` of them made ahead of the consumer
  in as many threads -> optional multiprocess prefetch. The same rows and
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
  if read_ahead < 1:
    raise DataError(
        f"config.data.read_ahead={read_ahead}: the batches made ahead of the"
        " step must be at least 1."
    )
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  ds = ds[process_index::process_count]
  ds = ds.batch(batch_size // process_count, drop_remainder=drop_remainder)
  it_ds = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=read_ahead, prefetch_buffer_size=read_ahead)
  )
  if worker_count > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags.
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=worker_count)
    )
  return it_ds


def row_phases(config) -> list[tuple[int, int, int]]:
  """The teacher's rows, phase by phase: ``[(until_step, seq_len,
  batch_size), ...]`` (``teacher.train`` reads them through ``Phases``;
  ``data.prepare`` counts their tokens).

  ``config.teacher.train.short_steps`` > 0 puts that many steps on rows of
  ``short_seq_len`` tokens first (``short_batch_size`` rows a batch; 0: as
  many tokens a step as a batch of ``config.data``), the usual recipe for a
  long-context model: most steps where a step is cheap, then enough on the
  long rows to learn to read far back. The last phase runs on.
  """
  data, section = config.data, config.teacher.train
  long = (section.steps, data.seq_len, data.batch_size)
  steps = section.get("short_steps", 0)
  if not steps:
    return [long]
  seq_len = section.get("short_seq_len", 0)
  where = "config.teacher.train"
  if not 2 <= seq_len < data.seq_len:
    raise UserError(
        f"{where}.short_seq_len={seq_len} must be in [2, config.data.seq_len"
        f"={data.seq_len}) when short_steps={steps}; set it or short_steps=0."
    )
  if not 0 < steps < section.steps:
    raise UserError(
        f"{where}.short_steps={steps} must be in [0, steps={section.steps}):"
        " the run ends on the long rows."
    )
  batch = section.get("short_batch_size", 0)
  if batch < 0:
    raise UserError(
        f"{where}.short_batch_size={batch} must be at least 0 (0: as many"
        " tokens a step as a batch of config.data)."
    )
  batch = batch or max(1, data.batch_size * data.seq_len // seq_len)
  return [(steps, seq_len, batch), long]


class Phases:
  """Batches from a sequence of iterators: ``phases`` is ``[(count,
  make_iterator), ...]``, each phase's iterator made when it starts and read
  for ``count`` batches (the last phase's count is ignored: it runs on).

  Its state is ``{"phase", "taken", "state"}`` (the current phase, the
  batches it gave, its iterator's state), so a resumed run takes the same
  batches. A state without ``"phase"`` (a checkpoint of one plain iterator)
  is the last phase's.
  """

  def __init__(self, phases: Sequence[tuple[int, Callable[[], Iterator]]]):
    if not phases:
      raise ValueError("Phases needs at least one phase.")
    self._phases = list(phases)
    self._start(0, 0)

  def _start(self, phase: int, taken: int) -> None:
    self._phase, self._taken = phase, taken
    self._iterator = self._phases[phase][1]()

  def __iter__(self):
    return self

  def __next__(self):
    while (
        self._phase < len(self._phases) - 1
        and self._taken >= self._phases[self._phase][0]
    ):
      self._start(self._phase + 1, 0)
    batch = next(self._iterator)
    self._taken += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {
        "phase": self._phase,
        "taken": self._taken,
        "state": self._iterator.get_state(),
    }

  def set_state(self, state: dict[str, Any]) -> None:
    if "phase" not in state:
      state = {"phase": len(self._phases) - 1, "taken": 0, "state": state}
    phase = int(state["phase"])
    if not 0 <= phase < len(self._phases):
      raise DataError(
          f"The checkpoint's data position is in phase {phase} of a run"
          f" that now has {len(self._phases)}; the training schedule changed"
          " under a run in progress: train it in a new folder."
      )
    if phase != self._phase:
      self._start(phase, 0)
    self._taken = int(state["taken"])
    self._iterator.set_state(state["state"])


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
