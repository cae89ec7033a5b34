"""Aligning two tokenizations of the same text by their bytes.

A teacher and a student with different tokenizers cut the same bytes into
different tokens, so their next-token predictions are not about the same
thing. Where both tokenizations have a token boundary at the same byte, the
text between two such common boundaries is a *chunk*: a run of whole teacher
tokens and a run of whole student tokens over exactly the same bytes, so the
product of their token probabilities is, for each model, the likelihood of
the same text given the same prefix. Cross-tokenizer distillation
(``distill.losses.alm``) matches those chunk likelihoods.

``chunks`` aligns one row of each: the token end offsets (cumulative bytes,
``data.token_bytes``) in a common byte coordinate, and which tokens are
predicted (a row's first token, and a document's first, are not). A chunk
counts only when every token in it, on both sides, is predicted; a
zero-byte token (``<eos>``) joins the chunk of the bytes before it.

Where both tokenizations *start* a token at the same byte, the teacher's
and the student's next-token distributions are about the same text from the
same prefix (``starts``): the vocabulary-mapping loss (``distill.losses.
vocab``) compares them there, over the tokens both vocabularies spell with
the same bytes (``vocab_map``).

``CrossTokenizerRows`` builds, for each cached teacher row, the student's
row over the same bytes of the corpus and the alignment, in the grain
pipeline (on the host, beside the batches).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data import pipeline, shards


def chunks(
    teacher_ends: np.ndarray,
    teacher_valid: np.ndarray,
    student_ends: np.ndarray,
    student_valid: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The chunks of two aligned token runs.

  ``*_ends`` [n]: each token's end offset (non-decreasing, one byte
  coordinate for both); ``*_valid`` [n]: whether the token is predicted.
  Returns ``(teacher_chunk [n_t], student_chunk [n_s], valid [C])``: the
  chunk of each token (``C`` where it is in none: past the last common
  boundary) and whether each chunk counts; chunk ``c`` is the bytes
  ``(bounds[c - 1], bounds[c]]`` of the common boundaries ``bounds``.
  """
  teacher_ends = np.asarray(teacher_ends, np.int64)
  student_ends = np.asarray(student_ends, np.int64)
  bounds = np.intersect1d(teacher_ends, student_ends)
  count = len(bounds)
  t_chunk = np.searchsorted(bounds, teacher_ends, side="left")
  s_chunk = np.searchsorted(bounds, student_ends, side="left")
  bad = np.zeros(count + 1, bool)  # the last slot collects the strays
  np.logical_or.at(bad, t_chunk, ~np.asarray(teacher_valid, bool))
  np.logical_or.at(bad, s_chunk, ~np.asarray(student_valid, bool))
  has_t = np.bincount(t_chunk, minlength=count + 1)[:count] > 0
  has_s = np.bincount(s_chunk, minlength=count + 1)[:count] > 0
  valid = ~bad[:count] & has_t & has_s
  return t_chunk.astype(np.int32), s_chunk.astype(np.int32), valid


def starts(
    teacher_starts: np.ndarray, student_starts: np.ndarray
) -> np.ndarray:
  """int [n_s]: for each student token, the teacher token that starts at
  the same byte (the first such), or -1."""
  teacher_starts = np.asarray(teacher_starts, np.int64)
  student_starts = np.asarray(student_starts, np.int64)
  at = np.searchsorted(teacher_starts, student_starts, side="left")
  found = at < len(teacher_starts)
  found[found] = teacher_starts[at[found]] == student_starts[found]
  return np.where(found, at, -1)


def vocab_map(
    teacher_bytes: list[bytes],
    student_bytes: list[bytes],
    specials: dict[int, int] | None = None,
) -> np.ndarray:
  """int32 [V_teacher]: the student id spelling each teacher token's bytes,
  or -1 (no student token has them). Special tokens are no text: those of
  ``specials`` ({teacher id: student id}, e.g. the two <eos>) map to each
  other, the others to -1."""
  index = {b: i for i, b in enumerate(student_bytes) if b}
  out = np.asarray(
      [index.get(b, -1) if b else -1 for b in teacher_bytes], np.int32
  )
  for teacher_id, student_id in (specials or {}).items():
    if teacher_id < len(out):
      out[teacher_id] = student_id
  return out


def chunk_sums(values: np.ndarray, chunk: np.ndarray, count: int) -> np.ndarray:
  """float32 [count]: ``values`` summed per chunk (strays dropped)."""
  keep = chunk < count
  return np.bincount(
      chunk[keep], weights=np.asarray(values, np.float64)[keep], minlength=count
  ).astype(np.float32)


def stream_ends(stream: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """int64 [n]: where each token of a token stream ends, in bytes from the
  stream's start (``lengths``: ``token_bytes.byte_lengths``)."""
  return np.cumsum(lengths[np.asarray(stream)], dtype=np.int64)


class CrossTokenizerRows:
  """Cached teacher rows -> the student's rows over the same bytes.

  The teacher's and the student's token streams of a split hold the same
  documents in the same order (``data.prepare`` tokenizes both), so a byte
  offset from the start of the stream is one coordinate for both. Teacher
  row ``i`` covers stream tokens ``[i (L + 1), (i + 1)(L + 1))``; its
  student row is the student tokens that lie wholly inside those bytes,
  cut to ``student_len + 1`` tokens (a longer run loses its end, a shorter
  one is padded with id ``pad``, segment 0).

  Called on a cache record (``data.cache.CacheSource``), returns the
  student's ``tokens``, ``segment_ids``, ``positions`` [S + 1] (S =
  ``student_len``), ``row``, and the alignment over the student's labels
  ``tokens[1:]``:

  - target ``label``: ``chunk`` [S] int32 (each label's chunk; S where it is
    in none), ``chunk_log_probs`` [S] float32 (the teacher's
    log-likelihood of each chunk, indexed like ``chunk``) and
    ``chunk_valid`` [S] bool;
  - target ``topk`` (with ``id_map``, ``vocab_map``'s table): at each
    label that starts where a teacher label starts, that teacher position's
    top-k, its ids mapped into the student's vocabulary: ``ids`` [S, k]
    int32 (0 where unmapped), ``log_probs`` [S, k] float32 (-inf where
    unmapped or unaligned), ``unmapped_probs`` [S, k] float32 (the
    probabilities of its unmapped ids, descending; 0 elsewhere) and
    ``aligned`` [S] bool.

  ``online``: the record is a packed teacher row (``pipeline.PackedRows``)
  and the teacher runs in the step: the output adds that row
  (``teacher_tokens``, ``teacher_segment_ids``, ``teacher_positions``
  [L + 1]), and in place of the teacher's figures says where they come
  from: ``teacher_chunk`` [L] (each teacher label's chunk, indexed like
  ``chunk``; S: none) beside ``chunk`` and ``chunk_valid``, and with
  ``id_map`` ``teacher_position`` [S] (the teacher position aligned with
  each student label) beside ``aligned``.
  """

  def __init__(
      self,
      teacher_dir: str,
      student_dir: str,
      teacher_lengths: np.ndarray,
      student_lengths: np.ndarray,
      *,
      seq_len: int,
      student_len: int,
      pad: int,
      id_map: np.ndarray | None = None,
      online: bool = False,
  ):
    self.online = online
    self._row_len = seq_len + 1
    self._student_len = student_len
    self._pad = pad
    self._id_map = id_map
    teacher = pipeline.load_stream(teacher_dir)
    self._student: shards.TokenShards = pipeline.load_stream(student_dir)
    student_tokens = self._student.tokens(0, self._student.num_tokens)
    self._teacher_ends = stream_ends(
        teacher.tokens(0, teacher.num_tokens), teacher_lengths
    )
    self._student_ends = stream_ends(student_tokens, student_lengths)
    self._student_starts = self._student_ends - student_lengths[
        student_tokens
    ].astype(np.int64)
    self.num_rows = teacher.num_tokens // self._row_len

  def student_span(self, index: int) -> tuple[int, int]:
    """Stream token range [start, stop) of the student tokens inside
    teacher row ``index``'s bytes."""
    first = index * self._row_len
    begin = self._teacher_ends[first - 1] if first else 0
    end = self._teacher_ends[first + self._row_len - 1]
    start = int(np.searchsorted(self._student_starts, begin, side="left"))
    stop = int(np.searchsorted(self._student_ends, end, side="right"))
    return start, max(start, stop)

  def __call__(self, record: dict[str, np.ndarray]) -> dict[str, Any]:
    index = int(record["row"])
    first = index * self._row_len
    t_ends = self._teacher_ends[first : first + self._row_len]
    t_valid = np.concatenate([[False], _target_mask(record["segment_ids"])])
    start, stop = self.student_span(index)
    size = self._student_len + 1
    stop = min(stop, start + size)
    stream = self._student
    n = stop - start
    tokens = np.full(size, self._pad, np.int32)
    segments = np.zeros(size, np.int32)
    positions = np.zeros(size, np.int32)
    if n:
      doc, doc_start = stream.documents(start, stop)
      tokens[:n] = stream.tokens(start, stop)
      segments[:n] = doc - doc[0] + 1
      positions[:n] = np.arange(start, stop) - np.maximum(doc_start, start)
    s_ends = self._student_ends[start:stop]
    s_valid = np.concatenate([[False], _target_mask(segments)])[:n]
    out = {
        "tokens": tokens,
        "segment_ids": segments,
        "positions": positions,
        "row": np.int32(index),
    }
    if self.online:  # the teacher runs in the step, on its own row
      out.update(
          {f"teacher_{k}": record[k] for k in ("tokens", "segment_ids")},
          teacher_positions=record["positions"],
      )
    if self.online or "label_log_probs" in record:
      out.update(self._chunks(record, t_ends, t_valid, s_ends, s_valid))
    if self._id_map is not None and (self.online or "log_probs" in record):
      out.update(
          self._distributions(
              record, t_ends, t_valid, s_ends, s_valid, first, start
          )
      )
    return out

  def _distributions(
      self, record, t_ends, t_valid, s_ends, s_valid, first, start
  ):
    """The teacher's top-k at the student's labels that start where a
    teacher label starts, mapped into the student's vocabulary."""
    t_starts = np.concatenate(
        [[self._teacher_ends[first - 1] if first else 0], t_ends[:-1]]
    )
    s_starts = self._student_starts[start : start + len(s_ends)]
    match = starts(t_starts, s_starts)  # teacher token of each student one
    lengths = self._student_len
    aligned = np.zeros(lengths, bool)
    labels = np.arange(1, len(s_ends))  # student label tokens
    teacher = match[labels]
    ok = (teacher >= 1) & s_valid[labels]
    ok[ok] = t_valid[teacher[ok]]
    rows, source = labels[ok] - 1, teacher[ok] - 1  # label -> position
    aligned[rows] = True
    if self.online:  # the step takes the teacher's top-k there
      position = np.zeros(lengths, np.int32)
      position[rows] = source
      return {"teacher_position": position, "aligned": aligned}
    k = record["ids"].shape[-1]
    ids = np.zeros((lengths, k), np.int32)
    log_probs = np.full((lengths, k), -np.inf, np.float32)
    unmapped = np.zeros((lengths, k), np.float32)
    mapped = self._id_map[record["ids"][source]]  # [m, k]
    lp = record["log_probs"][source]
    ids[rows] = np.maximum(mapped, 0)
    log_probs[rows] = np.where(mapped >= 0, lp, -np.inf)
    probs = np.where((mapped < 0) & np.isfinite(lp), np.exp(lp), 0.0)
    unmapped[rows] = -np.sort(-probs, axis=-1)
    return {
        "ids": ids,
        "log_probs": log_probs,
        "unmapped_probs": unmapped,
        "aligned": aligned,
    }

  def _chunks(self, record, t_ends, t_valid, s_ends, s_valid):
    """The chunks of the two rows and the teacher's likelihood of each."""
    n = len(s_ends)
    t_chunk, s_chunk, valid = chunks(t_ends, t_valid, s_ends, s_valid)
    count = len(valid)
    lengths = self._student_len
    # Chunk 0 holds the row's first student token, which nothing predicts:
    # chunk c >= 1 is stored at index c - 1.
    kept = min(count - 1, lengths)
    chunk = np.full(lengths, lengths, np.int32)  # labels: tokens[1:]
    ids = s_chunk[1:] - 1
    chunk[: max(n - 1, 0)] = np.where((ids >= 0) & (ids < kept), ids, lengths)
    flags = np.zeros(lengths, bool)
    if kept > 0:
      flags[:kept] = valid[1 : kept + 1]
    if self.online:  # the teacher's label log-probs are summed in the step
      t_ids = t_chunk[1:] - 1
      return {
          "chunk": chunk,
          "chunk_valid": flags,
          "teacher_chunk": np.where(
              (t_ids >= 0) & (t_ids < kept), t_ids, lengths
          ).astype(np.int32),
      }
    t_sums = chunk_sums(
        np.concatenate([[0.0], record["label_log_probs"]]), t_chunk, count
    )
    log_probs = np.zeros(lengths, np.float32)
    if kept > 0:
      log_probs[:kept] = t_sums[1 : kept + 1]
    return {
        "chunk": chunk,
        "chunk_log_probs": log_probs,
        "chunk_valid": flags,
    }


def _target_mask(segment_ids: np.ndarray) -> np.ndarray:
  """[n - 1]: ``pipeline.target_mask`` of one row."""
  return pipeline.target_mask(np.asarray(segment_ids)[None])[0]
