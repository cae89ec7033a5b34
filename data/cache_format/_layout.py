"""The record layout's constants (see the package docstring), its error
type and the bounds every decoded value keeps."""

from __future__ import annotations

import struct

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
