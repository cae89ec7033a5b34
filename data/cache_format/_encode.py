"""Arrays -> one record's bytes (``encode_record``)."""

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
    GAP_MAX,
    HEADER,
    MAGIC,
    TAIL_HEADER,
    TAIL_SCALE,
    TOP_MIN,
    TOP_STEP,
    VERSION,
    id_dtype,
)


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
