"""Compact, versioned record encoding of the logit cache.

One record holds one packed training sequence: `tokens` [L+1] (inputs are
tokens[:-1], labels tokens[1:]), `segment_ids` [L+1] (0 = padding, documents
1, 2, 3, ...), and for each position t in [0, L) a sparse teacher target for
predicting tokens[t+1]: a top-k target, a sampled target, both, or neither.
The cache writer and reader call `encode_record` / `decode_record`; the teacher
side makes the targets with the jittable functions of `data.sparse_targets`.

Byte layout (version 3; every integer little-endian; version 2 is version 3
without the label section, version 1 version 2 without the top-k-with-tail
section; both are still read). Header, 32 bytes:

    off size field
      0   4  magic b"KDLC"
      4   1  version = 3
      5   1  flags: bit 0 top-k present, bit 1 sample present,
                    bit 2 sample counts stored as bytes (else unary),
                    bit 3 top-k with a sampled tail present,
                    bit 4 label log-probs present
      6   1  id_bytes: 2 (vocab_size <= 65,536) or 4
      7   1  ef_low_bits: Elias-Fano low-bit width l of the sample keys
      8   4  vocab_size V
     12   4  L, the number of positions with a target (tokens hold L+1)
     16   2  k (0 without top-k)
     18   2  N, draws per position (0 without sample)
     20   4  R, number of segment-id runs
     24   4  U, number of (position, unique id) pairs in the sample
     28   4  crc32 of the body

Body, in this order:

    tokens       [L+1]    uint16/uint32 (id_bytes)
    run_values   [R]      uint32   segment id of each run
    run_lengths  [R]      uint32   segment_ids = repeat(run_values, run_lengths)
    top-k, if flag bit 0:
      ids        [L, k]   uint16/uint32, in the given order (descending prob)
      top        [L]      uint16   log p of ids[:, 0]: round(-lp0 / TOP_STEP)
      span       [L]      float16  r, the largest gap below the top kept (<= GAP_MAX)
      gaps       [L, k-1] uint8    round((lp0' - lp_j) / (r / 254)), lp0' the decoded
                                   top; 255 = -inf (probability exactly 0)
      tail       [L]      uint16   round(tail * 65535)
    sample, if flag bit 1: keys t * V + id of the unique sampled ids, ascending
    (position-major, ids ascending within a position), Elias-Fano coded:
      low        ceil(U*l / 8) bytes    the l low bits of each key (LSB-first bits)
      high       ceil((U + ((L*V-1) >> l) + 1) / 8) bytes   bit (key_i >> l) + i set
      counts     bytes: [U] uint8; unary: ceil(L*N / 8) bytes, each count c
                 written as c-1 zeros then a one (the smaller of the two is used)
    top-k with a sampled tail, if flag bit 3 (method ``topk_tail``): its head
    is a top-k of its own k_h ids, its tail M draws per position from the
    teacher restricted to the ids outside the head:
      k_h, M     2 x uint16
      U_t        uint32   (position, unique id) pairs in the tail sample
      l_t        uint8    Elias-Fano low-bit width of the tail keys
      bytes      uint8    1: tail counts stored as bytes, 0: unary
      (2 bytes of padding)
      head       the top-k block above with k = k_h
      tail       the sample block above with N = M, U = U_t, l = l_t
    label log-probs, if flag bit 4 (method ``label``; what cross-tokenizer
    distillation matches, ``distill.losses.alm``):
      label      [L]      float32  log p(tokens[t+1]) at temperature 1, exact

Sizes per position (k = 64, V <= 65,536): top-k 3k + 5 = 197 B, plus 2 B of
token = 199 B. Sample with N = 64: about U/L * (l + 2) / 8 + 8 B (+2 B token);
l = floor(log2(L*V/U)); about 40 B at 2.5 nats of teacher entropy on V = 32k
(see tests/test_cache_format.py for the measured table).

Error bounds (see `ERROR_BOUNDS`, asserted in the tests): the top log-prob is
within TOP_STEP/2 = 2.4e-4 nats; every other finite log-prob with lp0 - lp_j <=
GAP_MAX is within max(TOP_STEP, r/254)/2 <= 0.059 nats (`log_prob_error_bound`
gives the per-position bound, typically ~0.02); entries more than GAP_MAX = 30
nats below the top decode as GAP_MAX below it (probability error < p0 * e^-30);
-inf is exact. The tail mass is within 0.5/65535 = 7.7e-6. Ids, tokens,
segment ids and sample counts are exact. The top-k-with-tail section's head
has the top-k block's bounds.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

MAGIC = b"KDLC"
VERSION = 3
#: Record versions this reader decodes.
READABLE_VERSIONS = (1, 2, 3)
HEADER = struct.Struct("<4sBBBBIIHHIII")
FLAG_TOPK, FLAG_SAMPLE, FLAG_COUNT_BYTES, FLAG_TOPK_TAIL = 1, 2, 4, 8
FLAG_LABEL = 16
TAIL_HEADER = struct.Struct("<HHIBB2x")
TOP_MIN = -32.0  # lp0 >= -log(V) > -21.5 for any V < 2^31
TOP_STEP = -TOP_MIN / 65535
GAP_MAX = 30.0
GAP_LEVELS = 254  # codes 0..254 span [0, r]; 255 is -inf
TAIL_SCALE = 65535
ERROR_BOUNDS = {
    "top_log_prob": TOP_STEP / 2,  # 2.44e-4 nats
    "log_prob": max(TOP_STEP, GAP_MAX / GAP_LEVELS)
    / 2,  # worst case 0.059 nats
    "tail": 0.5 / TAIL_SCALE,  # 7.6e-6
}


class CacheFormatError(ValueError):
  """A record that cannot be encoded or decoded, with the reason."""


def id_dtype(vocab_size: int) -> np.dtype:
  """Smallest little-endian unsigned dtype holding ids in [0, vocab_size)."""
  if not 1 <= vocab_size < 2**31:  # decoded ids are int32, as JAX uses
    raise CacheFormatError(
        f"vocab_size must be in [1, 2^31 - 1], got {vocab_size}"
    )
  return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def log_prob_error_bound(log_probs: np.ndarray) -> np.ndarray:
  """Per-position bound on |decoded - true| for finite entries within GAP_MAX
  of the top, for top-k log_probs [L, k] as passed to `encode_record`."""
  lp = np.asarray(log_probs, np.float64)
  finite_min = np.where(np.isfinite(lp), lp, np.inf).min(-1)
  # Gaps are taken from the decoded top (within TOP_STEP/2) and the span is
  # rounded up to float16 (relative 2^-11); 4e-6 covers the float32 output.
  span = np.minimum(lp[:, 0] - finite_min + TOP_STEP / 2, GAP_MAX) * (
      1 + 2.0**-10
  )
  return np.maximum(TOP_STEP, span / GAP_LEVELS) / 2 + 4e-6


# --------------------------------------------------------------------- encode


def _bits_to_bytes(bits: np.ndarray) -> bytes:
  return np.packbits(bits.astype(np.uint8), bitorder="little").tobytes()


def _encode_topk(ids, log_probs, tail, vocab_size, dt):
  ids = np.asarray(ids)
  lp = np.asarray(log_probs, np.float64)
  length, k = ids.shape
  if lp.shape != (length, k) or np.shape(tail) != (length,):
    raise CacheFormatError(
        f"top-k shapes differ: ids {ids.shape}, log_probs {lp.shape}, tail {np.shape(tail)}"
    )
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    raise CacheFormatError(f"top-k ids outside [0, {vocab_size})")
  if np.isnan(lp).any() or (lp > 1e-3).any():
    raise CacheFormatError(
        "top-k log_probs must be log-probabilities (<= 0, no NaN), not logits"
    )
  if (
      not (lp[:, :1] >= lp).all()
      or not np.isfinite(lp[:, 0]).all()
      or (lp[:, 0] < TOP_MIN).any()
  ):
    raise CacheFormatError(
        f"top-k log_probs must be sorted descending with a finite first entry >= {TOP_MIN}"
    )
  top = np.round(-np.minimum(lp[:, 0], 0.0) / TOP_STEP).astype("<u2")
  top_hat = -top.astype(np.float64) * TOP_STEP
  gaps = top_hat[:, None] - lp[:, 1:]
  finite = np.isfinite(gaps)
  widest = np.where(finite, gaps, 0.0).max(-1, initial=0.0)
  span = np.minimum(widest, GAP_MAX).astype("<f2")
  span = np.where(
      span.astype(np.float64) < np.minimum(widest, GAP_MAX),  # round up
      np.nextafter(span, np.float16(np.inf)),
      span,
  ).astype("<f2")
  step = span.astype(np.float64)[:, None] / GAP_LEVELS
  codes = np.round(
      np.clip(np.where(finite, gaps, 0.0), 0.0, GAP_MAX)
      / np.where(step > 0, step, 1.0)
  )
  codes = np.where(finite, np.clip(codes, 0, GAP_LEVELS), 255).astype(np.uint8)
  tail_q = np.round(
      np.clip(np.asarray(tail, np.float64), 0.0, 1.0) * TAIL_SCALE
  ).astype("<u2")
  return b"".join(
      [
          ids.astype(dt).tobytes(),
          top.tobytes(),
          span.tobytes(),
          codes.tobytes(),
          tail_q.tobytes(),
      ]
  )


def _sample_keys(ids, counts, length, vocab_size):
  ids, counts = np.asarray(ids), np.asarray(counts)
  if ids.shape != counts.shape or ids.ndim != 2 or ids.shape[0] != length:
    raise CacheFormatError(
        f"sample ids {ids.shape} and counts {counts.shape} must both be [L={length}, width]"
    )
  if (counts < 0).any():
    raise CacheFormatError("sample counts must be >= 0 (0 = padding)")
  totals = counts.sum(-1)
  draws = int(totals[0]) if length else 0
  if length and (not 1 <= draws < 2**16 or (totals != draws).any()):
    raise CacheFormatError(
        "sample counts must sum to the same N in [1, 65535] at every"
        f" position, got {np.unique(totals)[:5]}"
    )
  rows, cols = np.nonzero(counts > 0)
  sel_ids = ids[rows, cols].astype(np.int64)
  if sel_ids.size and (sel_ids.min() < 0 or sel_ids.max() >= vocab_size):
    raise CacheFormatError(f"sample ids outside [0, {vocab_size})")
  keys = rows.astype(np.uint64) * np.uint64(vocab_size) + sel_ids.astype(
      np.uint64
  )
  order = np.argsort(keys, kind="stable")
  keys, sel_counts = keys[order], counts[rows, cols][order]
  if (np.diff(keys) == 0).any():
    raise CacheFormatError(
        "sample ids must be unique within a position (merge duplicates into counts)"
    )
  return keys, sel_counts, draws


def _encode_sample(keys, counts, length, vocab_size, draws):
  num = len(keys)
  universe = length * vocab_size
  low_bits = max(0, (universe // num).bit_length() - 1) if num else 0
  parts = []
  if low_bits:
    shifts = np.arange(low_bits, dtype=np.uint64)
    parts.append(_bits_to_bytes((keys[:, None] >> shifts) & np.uint64(1)))
  high = np.zeros(num + ((universe - 1) >> low_bits) + 1, np.uint8)
  high[(keys >> np.uint64(low_bits)).astype(np.int64) + np.arange(num)] = 1
  parts.append(_bits_to_bytes(high))
  as_bytes = draws <= 255 and num <= (length * draws + 7) // 8
  if as_bytes:
    parts.append(counts.astype(np.uint8).tobytes())
  else:
    unary = np.zeros(length * draws, np.uint8)
    unary[np.cumsum(counts) - 1] = 1
    parts.append(_bits_to_bytes(unary))
  return b"".join(parts), low_bits, as_bytes


def encode_record(
    tokens,
    segment_ids,
    *,
    vocab_size,
    topk_ids=None,
    topk_log_probs=None,
    topk_tail=None,
    sample_ids=None,
    sample_counts=None,
    tt_ids=None,
    tt_log_probs=None,
    tt_tail=None,
    tt_sample_ids=None,
    tt_sample_counts=None,
    label_log_probs=None,
) -> bytes:
  """Encodes one packed sequence and its targets.

  tokens, segment_ids [L+1] int; topk_ids [L, k] (descending prob),
  topk_log_probs [L, k] float (teacher log-probs at the cache temperature,
  -inf allowed after the first), topk_tail [L] in [0, 1]; sample_ids,
  sample_counts [L, W] (unique ids per position, counts 0 = padding, every
  position's counts summing to the same N). ``tt_*`` are the top-k with a
  sampled tail: a head ``tt_ids``/``tt_log_probs``/``tt_tail`` shaped as the
  top-k arrays, and ``tt_sample_ids``/``tt_sample_counts`` [L, W] as the
  sample arrays (M draws outside the head). ``label_log_probs`` [L] is the
  teacher's log-probability of each label ``tokens[t + 1]`` at temperature
  1, stored exactly (float32). Pass all arrays of a method or none. Raises
  CacheFormatError on invalid input.
  """
  dt = id_dtype(vocab_size)
  tokens, seg = _checked_row(tokens, segment_ids, vocab_size)
  length = len(tokens) - 1
  starts = np.concatenate([[0], np.flatnonzero(np.diff(seg)) + 1])
  run_lengths = np.diff(np.append(starts, len(seg)))
  body = [
      tokens.astype(dt).tobytes(),
      seg[starts].astype("<u4").tobytes(),
      run_lengths.astype("<u4").tobytes(),
  ]
  flags, k, draws, low_bits, num_unique = 0, 0, 0, 0, 0
  topk = (topk_ids, topk_log_probs, topk_tail)
  if any(x is not None for x in topk):
    if any(x is None for x in topk):
      raise CacheFormatError(
          "pass topk_ids, topk_log_probs and topk_tail together"
      )
    k = np.shape(topk_ids)[1]
    if np.shape(topk_ids)[0] != length or not 1 <= k < 2**16:
      raise CacheFormatError(
          f"topk_ids must be [L={length}, k] with 1 <= k < 65536, got {np.shape(topk_ids)}"
      )
    body.append(
        _encode_topk(topk_ids, topk_log_probs, topk_tail, vocab_size, dt)
    )
    flags |= FLAG_TOPK
  if (sample_ids is None) != (sample_counts is None):
    raise CacheFormatError("pass sample_ids and sample_counts together")
  if sample_ids is not None:
    keys, counts, draws = _sample_keys(
        sample_ids, sample_counts, length, vocab_size
    )
    payload, low_bits, as_bytes = _encode_sample(
        keys, counts, length, vocab_size, draws
    )
    body.append(payload)
    num_unique = len(keys)
    flags |= FLAG_SAMPLE | (FLAG_COUNT_BYTES if as_bytes else 0)
  tt = (tt_ids, tt_log_probs, tt_tail, tt_sample_ids, tt_sample_counts)
  if any(x is not None for x in tt):
    if any(x is None for x in tt):
      raise CacheFormatError(
          "pass tt_ids, tt_log_probs, tt_tail, tt_sample_ids and"
          " tt_sample_counts together"
      )
    body.append(_encode_topk_tail(tt, length, vocab_size, dt))
    flags |= FLAG_TOPK_TAIL
  if label_log_probs is not None:
    body.append(_encode_label(label_log_probs, length))
    flags |= FLAG_LABEL
  body = b"".join(body)
  header = HEADER.pack(
      MAGIC,
      VERSION,
      flags,
      dt.itemsize,
      low_bits,
      vocab_size,
      length,
      k,
      draws,
      len(starts),
      num_unique,
      zlib.crc32(body),
  )
  return header + body


def _checked_row(tokens, segment_ids, vocab_size):
  """tokens, segment_ids as arrays, after checking their shapes and ranges."""
  tokens, seg = np.asarray(tokens), np.asarray(segment_ids)
  if tokens.ndim != 1 or seg.shape != tokens.shape or len(tokens) < 1:
    raise CacheFormatError(
        f"tokens {tokens.shape} and segment_ids {seg.shape} must both be [L+1]"
    )
  if tokens.min() < 0 or tokens.max() >= vocab_size:
    raise CacheFormatError(f"tokens outside [0, {vocab_size})")
  if seg.min() < 0 or seg.max() >= 2**32:
    raise CacheFormatError("segment_ids must be in [0, 2^32)")
  return tokens, seg


def _encode_label(label_log_probs, length) -> bytes:
  label = np.asarray(label_log_probs, "<f4")
  if label.shape != (length,):
    raise CacheFormatError(
        f"label_log_probs must be [L={length}], got {label.shape}"
    )
  return label.tobytes()


def _encode_topk_tail(arrays, length, vocab_size, dt) -> bytes:
  ids, log_probs, tail, sample_ids, sample_counts = arrays
  k = np.shape(ids)[1] if np.ndim(ids) == 2 else 0
  if np.shape(ids)[0] != length or not 1 <= k < 2**16:
    raise CacheFormatError(
        f"tt_ids must be [L={length}, k] with 1 <= k < 65536, got {np.shape(ids)}"
    )
  head = _encode_topk(ids, log_probs, tail, vocab_size, dt)
  keys, counts, draws = _sample_keys(
      sample_ids, sample_counts, length, vocab_size
  )
  payload, low_bits, as_bytes = _encode_sample(
      keys, counts, length, vocab_size, draws
  )
  header = TAIL_HEADER.pack(k, draws, len(keys), low_bits, int(as_bytes))
  return header + head + payload


# --------------------------------------------------------------------- decode


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
