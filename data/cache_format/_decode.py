"""One record's bytes -> arrays (``decode_record``), every readable version."""

from __future__ import annotations

import zlib

import numpy as np

from data.cache_format._layout import (
    CacheFormatError,
    FLAG_COUNT_BYTES,
    FLAG_LABEL,
    FLAG_SAMPLE,
    FLAG_TOPK,
    FLAG_TOPK_TAIL,
    GAP_LEVELS,
    HEADER,
    MAGIC,
    READABLE_VERSIONS,
    TAIL_HEADER,
    TAIL_SCALE,
    TOP_STEP,
    id_dtype,
)


def _topk_size(length, k, id_bytes):
  return length * (k * id_bytes + 2 + 2 + (k - 1) + 2)


def _sample_sizes(prefix, as_bytes, low_bits, vocab, length, draws, num):
  high = num + ((length * vocab - 1) >> low_bits) + 1
  counts = num if as_bytes else (length * draws + 7) // 8
  return [
      (prefix + "low", (num * low_bits + 7) // 8),
      (prefix + "high", (high + 7) // 8),
      (prefix + "counts", counts),
  ]


def _section_sizes(
    flags, id_bytes, low_bits, vocab_size, length, k, draws, runs, num_unique
):
  sizes = [("tokens", (length + 1) * id_bytes), ("runs", 8 * runs)]
  if flags & FLAG_TOPK:
    sizes.append(("topk", _topk_size(length, k, id_bytes)))
  if flags & FLAG_SAMPLE:
    sizes += _sample_sizes(
        "",
        flags & FLAG_COUNT_BYTES,
        low_bits,
        vocab_size,
        length,
        draws,
        num_unique,
    )
  return sizes


def _tail_sizes(data, offset, id_bytes, vocab, length):
  """The top-k-with-tail section's header fields and sizes, read at offset."""
  if len(data) < offset + TAIL_HEADER.size:
    raise CacheFormatError(
        "record truncated: its top-k-with-tail header is missing"
    )
  k, draws, num, low_bits, as_bytes = TAIL_HEADER.unpack_from(data, offset)
  if not k or not draws or as_bytes > 1 or low_bits > 63:
    raise CacheFormatError("corrupt top-k-with-tail header")
  sizes = [
      ("tt_header", TAIL_HEADER.size),
      ("tt_topk", _topk_size(length, k, id_bytes)),
  ]
  sizes += _sample_sizes("tt_", as_bytes, low_bits, vocab, length, draws, num)
  return (k, draws, num, low_bits, as_bytes), sizes


def decode_record(
    data: bytes, vocab_size: int, target: str | None = None
) -> dict[str, np.ndarray]:
  """Decodes `encode_record` output for a reader whose vocabulary has `vocab_size`.

  Returns int32 `tokens`, `segment_ids` [L+1]; with top-k: `topk_ids` [L, k]
  int32, `topk_log_probs` [L, k] float32, `topk_tail` [L] float32; with a
  sample: `sample_ids`, `sample_counts` [L, N] int32, the unique ids of each
  position ascending, then padding (id 0, count 0); with a top-k and a
  sampled tail: `tt_ids`, `tt_log_probs`, `tt_tail` as the top-k ones and
  `tt_sample_ids`, `tt_sample_counts` [L, M] as the sample; with labels:
  `label_log_probs` [L] float32. ``target`` ("topk", "sample",
  "topk_tail" or "label"): decode that target's section alone (the record
  is checked whole all the same). Raises CacheFormatError
  for a foreign, newer, truncated or corrupted record or a vocab mismatch.
  """
  data = memoryview(data).cast("B")
  header = _read_header(data, vocab_size)
  (_, _, flags, id_bytes, low_bits, vocab, length, k, draws, runs, num_unique,
   crc) = header  # fmt: skip
  sizes = _section_sizes(
      flags, id_bytes, low_bits, vocab, length, k, draws, runs, num_unique
  )
  tail_fields = None
  if flags & FLAG_TOPK_TAIL:
    tail_fields, more = _tail_sizes(
        data,
        HEADER.size + sum(size for _, size in sizes),
        id_bytes,
        vocab,
        length,
    )
    sizes += more
  if flags & FLAG_LABEL:
    sizes.append(("label", 4 * length))
  expected = HEADER.size + sum(size for _, size in sizes)
  if len(data) != expected:
    raise CacheFormatError(
        f"record is {len(data)} bytes but its header describes {expected}: truncated or corrupted"
    )
  body = data[HEADER.size :]
  if zlib.crc32(body) != crc:
    raise CacheFormatError("record checksum mismatch: the bytes are corrupted")
  offsets = np.cumsum([0] + [size for _, size in sizes])
  section = {
      name: body[offsets[i] : offsets[i + 1]]
      for i, (name, _) in enumerate(sizes)
  }
  dt = id_dtype(vocab)
  out = {"tokens": np.frombuffer(section["tokens"], dt).astype(np.int32)}
  run_values = np.frombuffer(section["runs"], "<u4", runs)
  run_lengths = np.frombuffer(section["runs"], "<u4", runs, offset=4 * runs)
  if run_lengths.sum() != length + 1:
    raise CacheFormatError(
        "corrupt record: segment runs do not cover the sequence"
    )
  out["segment_ids"] = np.repeat(run_values, run_lengths).astype(np.int32)
  if flags & FLAG_TOPK and target in (None, "topk"):
    out.update(_decode_topk(section["topk"], dt, length, k))
  if flags & FLAG_SAMPLE and target in (None, "sample"):
    ids, counts = _decode_sample(
        section,
        "",
        flags & FLAG_COUNT_BYTES,
        low_bits,
        vocab,
        length,
        draws,
        num_unique,
    )
    out.update(sample_ids=ids, sample_counts=counts)
  if tail_fields is not None and target in (None, "topk_tail"):
    out.update(_decode_tail(section, tail_fields, dt, vocab, length))
  if flags & FLAG_LABEL and target in (None, "label"):
    out["label_log_probs"] = np.frombuffer(section["label"], "<f4").copy()
  return out


def _read_header(data: memoryview, vocab_size: int) -> tuple:
  """The record's header fields (``HEADER``), checked: a foreign, newer or
  damaged header, or another vocabulary, is a CacheFormatError."""
  if len(data) < HEADER.size:
    raise CacheFormatError(
        f"record truncated: {len(data)} bytes, the header alone needs {HEADER.size}"
    )
  header = HEADER.unpack_from(data)
  magic, version, flags, id_bytes, _, vocab = header[:6]
  if magic != MAGIC:
    raise CacheFormatError(
        f"not a logit-cache record: magic {bytes(magic)!r}, expected {MAGIC!r}"
    )
  if version not in READABLE_VERSIONS:
    raise CacheFormatError(
        f"logit-cache record version {version} is not supported (this reader"
        f" knows versions {READABLE_VERSIONS}); rebuild the cache with"
        " teacher.cache_logits or update the code"
    )
  if vocab != vocab_size:
    raise CacheFormatError(
        f"record was written for vocab_size {vocab}, the reader expects {vocab_size}"
    )
  known = {1: 7, 2: 15}.get(version, 31)
  if flags & ~known or id_bytes != id_dtype(vocab).itemsize:
    raise CacheFormatError(
        f"corrupt record header (flags {flags}, id_bytes {id_bytes})"
    )
  return header


def _decode_tail(section, tail_fields, dt, vocab, length):
  """The top-k head and sampled tail of a ``topk_tail`` target."""
  tk, t_draws, t_num, t_low, t_bytes = tail_fields
  head = _decode_topk(section["tt_topk"], dt, length, tk)
  ids, counts = _decode_sample(
      section, "tt_", t_bytes, t_low, vocab, length, t_draws, t_num
  )
  return dict(
      tt_ids=head["topk_ids"],
      tt_log_probs=head["topk_log_probs"],
      tt_tail=head["topk_tail"],
      tt_sample_ids=ids,
      tt_sample_counts=counts,
  )


def _decode_topk(buf, dt, length, k):
  sizes = [
      length * k * dt.itemsize,
      2 * length,
      2 * length,
      length * (k - 1),
      2 * length,
  ]
  offsets = np.cumsum([0] + sizes)
  ids, top, span, codes, tail = [
      np.frombuffer(buf[offsets[i] : offsets[i + 1]], d)
      for i, d in enumerate([dt, "<u2", "<f2", np.uint8, "<u2"])
  ]
  top_hat = -top.astype(np.float64) * TOP_STEP
  step = span.astype(np.float64)[:, None] / GAP_LEVELS
  codes = codes.reshape(length, k - 1)
  rest = np.where(codes == 255, -np.inf, top_hat[:, None] - codes * step)
  return {
      "topk_ids": ids.reshape(length, k).astype(np.int32),
      "topk_log_probs": np.concatenate([top_hat[:, None], rest], 1).astype(
          np.float32
      ),
      "topk_tail": (tail / TAIL_SCALE).astype(np.float32),
  }


def _decode_sample(
    section, prefix, as_bytes, low_bits, vocab, length, draws, num
):
  high_bits = np.unpackbits(
      np.frombuffer(section[prefix + "high"], np.uint8), bitorder="little"
  )
  ones = np.flatnonzero(high_bits)
  if len(ones) != num:
    raise CacheFormatError(
        "corrupt record: sample key stream does not match its header"
    )
  keys = (ones - np.arange(num)).astype(np.uint64) << np.uint64(low_bits)
  if low_bits:
    bits = np.unpackbits(
        np.frombuffer(section[prefix + "low"], np.uint8),
        count=num * low_bits,
        bitorder="little",
    )
    keys |= (
        bits.reshape(num, low_bits).astype(np.uint64)
        << np.arange(low_bits, dtype=np.uint64)
    ).sum(1)
  if as_bytes:
    counts = np.frombuffer(section[prefix + "counts"], np.uint8).astype(
        np.int64
    )
  else:
    unary = np.unpackbits(
        np.frombuffer(section[prefix + "counts"], np.uint8),
        count=length * draws,
        bitorder="little",
    )
    counts = np.diff(np.flatnonzero(unary), prepend=-1)
  rows = (keys // np.uint64(vocab)).astype(np.int64)
  if len(counts) != num or (num and rows[-1] >= length) or (counts <= 0).any():
    raise CacheFormatError(
        "corrupt record: sample counts or positions out of range"
    )
  rank = np.arange(num) - np.searchsorted(rows, rows)
  if (np.bincount(rows, weights=counts, minlength=length) != draws).any() or (
      rank >= draws
  ).any():
    raise CacheFormatError(
        "corrupt record: sample counts do not sum to N at every position"
    )
  ids = np.zeros((length, draws), np.int32)
  out_counts = np.zeros((length, draws), np.int32)
  ids[rows, rank] = (keys % np.uint64(vocab)).astype(np.int64)
  out_counts[rows, rank] = counts
  return ids, out_counts
