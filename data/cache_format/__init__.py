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

from data.cache_format._decode import decode_record
from data.cache_format._encode import encode_record
from data.cache_format._layout import (
    ERROR_BOUNDS,
    GAP_MAX,
    HEADER,
    VERSION,
    CacheFormatError,
    id_dtype,
    log_prob_error_bound,
)

__all__ = [
    "CacheFormatError",
    "ERROR_BOUNDS",
    "GAP_MAX",
    "HEADER",
    "VERSION",
    "decode_record",
    "encode_record",
    "id_dtype",
    "log_prob_error_bound",
]
