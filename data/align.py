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

The teacher's next-token distribution becomes one over the student's
vocabulary through the student's tokenization of each teacher token
(``teacher_pieces``): at a student token that starts where a teacher token
starts, the teacher's probability of a token goes to its first student
piece; at the student token that follows m pieces of the same teacher
token, the teacher's tokens whose first m pieces are those go to their
next piece (``project_topk``). When the student's merges are a prefix of
the teacher's (two byte-level BPEs trained on the same text) every student
token lies inside one teacher token and this is the teacher's own
next-token distribution in the student's vocabulary, exactly; otherwise an
approximation. The vocabulary-mapping loss (``distill.losses.vocab``)
trains on it.

``CrossTokenizerRows`` builds, for each cached teacher row, the student's
row over the same bytes of the corpus and the alignment, in the grain
pipeline (on the host, beside the batches).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from data import pipeline, shards, token_bytes


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


def teacher_pieces(
    teacher_bytes: list[bytes],
    student,
    specials: dict[int, int] | None = None,
    max_pieces: int = 8,
) -> np.ndarray:
  """int32 [V_teacher, max_pieces]: the student's tokenization of each
  teacher token's bytes (-1 padded). ``student``: its ``tokenizers``
  Tokenizer; a byte-level BPE tokenizes any bytes (partial characters
  too), another the tokens that are whole UTF-8. Special tokens map by
  ``specials`` ({teacher id: student id}); a row of -1 cannot be
  projected (its mass goes to ULD)."""
  out = np.full((len(teacher_bytes), max_pieces), -1, np.int32)
  byte_level = token_bytes.is_byte_level(student)
  for i, data in enumerate(teacher_bytes):
    if not data:
      continue
    if byte_level:
      ids = [
          t.id
          for t in student.model.tokenize(token_bytes.byte_level_string(data))
      ]
    else:
      try:
        text = data.decode("utf-8")
      except UnicodeDecodeError:
        continue
      ids = student.encode(text, add_special_tokens=False).ids
    if 0 < len(ids) <= max_pieces:
      out[i, : len(ids)] = ids
  for teacher_id, student_id in (specials or {}).items():
    if teacher_id < len(out):
      out[teacher_id] = -1
      out[teacher_id, 0] = student_id
  return out


def merge_duplicates(ids, weights, xp=np):
  """Per row of [..., k]: equal ids merged, their weights summed. Returns
  (ids sorted, weights): each id's total at its last copy, 0 at the others.
  ``xp``: numpy or jax.numpy."""
  order = xp.argsort(ids, axis=-1)
  ids = xp.take_along_axis(ids, order, axis=-1)
  weights = xp.take_along_axis(weights, order, axis=-1)
  last = xp.concatenate(
      [ids[..., 1:] != ids[..., :-1], xp.ones_like(ids[..., :1], bool)], -1
  )
  total = xp.cumsum(weights, axis=-1)
  before = xp.where(last, total, 0.0)
  # The cumulative sum at the previous run's end: the running maximum of
  # run-end totals (they only grow), shifted one place right.
  if xp is np:
    ends = np.maximum.accumulate(before, axis=-1)
  else:
    ends = jax.lax.cummax(before, axis=before.ndim - 1)
  previous = xp.concatenate([xp.zeros_like(ends[..., :1]), ends[..., :-1]], -1)
  return ids, xp.where(last, xp.maximum(total - previous, 0.0), 0.0)


def project_topk(ids, log_probs, pieces, prefix, depth, xp=np):
  """The teacher's top-k at a teacher position, as a distribution over the
  student's next token after ``depth`` [P] pieces ``prefix`` [P, M] of the
  teacher token that starts there (see the module doc).

  ids, log_probs [P, k] (teacher); pieces [V_teacher, M]. Returns student
  ``ids`` [P, k], ``log_probs`` [P, k] (merged, -inf padding: the
  teacher's probabilities of the consistent tokens, not renormalised) and
  ``unmapped`` [P, k] (descending: the probabilities of teacher tokens with
  no student pieces, at depth 0; zero elsewhere).
  """
  finite = xp.isfinite(log_probs)
  probs = xp.where(finite, xp.exp(xp.where(finite, log_probs, 0.0)), 0.0)
  out_ids, merged, unmapped = project(ids, probs, pieces, prefix, depth, xp)
  safe = xp.where(merged > 0, merged, 1.0)
  return out_ids, xp.where(merged > 0, xp.log(safe), -xp.inf), unmapped


def project_sample(ids, counts, pieces, prefix, depth):
  """``project_topk`` for a sampled target: draws [P, N] and their counts
  -> student ids, counts (float: the draws consistent with the prefix, by
  their next piece) and the unmapped draws' share of all, descending."""
  out_ids, merged, unmapped = project(
      ids, counts.astype(np.float32), pieces, prefix, depth
  )
  total = np.maximum(counts.sum(-1, keepdims=True), 1)
  return out_ids, merged, (unmapped / total).astype(np.float32)


def project(ids, weights, pieces, prefix, depth, xp=np):
  """The projection of ``project_topk`` on any weights [P, k] of teacher
  ids (probabilities, or a sample's counts): merged student ids and
  weights, and the unprojectable weights (depth 0), descending."""
  cand = pieces[ids]  # [P, k, M]
  width = cand.shape[-1]
  before = xp.arange(width)[None, None, :] < depth[:, None, None]
  same = xp.all((cand == prefix[:, None, :]) | ~before, axis=-1)
  at = xp.minimum(depth, width - 1)[:, None, None]
  following = xp.take_along_axis(
      cand, xp.broadcast_to(at, cand.shape[:2] + (1,)), -1
  )[..., 0]
  ok = same & (following >= 0) & (depth[:, None] < width)
  kept = xp.where(ok, weights, 0.0)
  merged_ids, merged = merge_duplicates(xp.where(ok, following, 0), kept, xp)
  lost = (cand[..., 0] < 0) & (depth[:, None] == 0)
  if xp is np and not lost.any():  # e.g. between byte-level BPEs
    unmapped = np.zeros(weights.shape, np.float32)
  else:
    unmapped = -xp.sort(-xp.where(lost, weights, 0.0), axis=-1)
  return (
      merged_ids.astype(xp.int32),
      merged.astype(xp.float32),
      unmapped.astype(xp.float32),
  )


def pieces_at(t_starts, t_ends, s_starts, s_ends):
  """For each student token: the teacher token it lies in and how many
  student tokens of that teacher token come before it (its depth), or
  (-1, -1) where it does not start inside one teacher token that a student
  token starts with. A zero-byte token (<eos>) pairs with the zero-byte
  teacher token at its byte, at depth 0."""
  t_starts, t_ends = np.asarray(t_starts), np.asarray(t_ends)
  s_starts, s_ends = np.asarray(s_starts), np.asarray(s_ends)
  n = len(s_starts)
  teacher = np.searchsorted(t_ends, s_starts, side="right")
  teacher = np.minimum(teacher, len(t_ends) - 1)
  empty = s_ends == s_starts
  at = np.searchsorted(t_starts, s_starts, side="left")
  at = np.minimum(at, len(t_starts) - 1)
  teacher = np.where(empty, at, teacher)
  # Runs of student tokens in the same teacher token; depth within the run.
  index = np.arange(n)
  new = np.ones(n, bool)
  new[1:] = (teacher[1:] != teacher[:-1]) | empty[1:] | empty[:-1]
  first = np.maximum.accumulate(np.where(new, index, 0))
  depth = index - first
  inside = (s_starts < t_ends[teacher]) | empty
  starts_with = s_starts[first] == t_starts[teacher]
  if n:
    empty_ok = ~empty | ((t_ends[teacher] == t_starts[teacher]) & starts_with)
  else:
    empty_ok = empty
  ok = inside & starts_with & empty_ok
  return np.where(ok, teacher, -1), np.where(ok, depth, -1)


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
  - target ``topk`` (with ``pieces``, ``teacher_pieces``' table): at each
    label that lies in one teacher token, the top-k of the teacher position
    that predicts that token, projected onto the student's next token
    (``project_topk``): ``ids`` [S, k] int32, ``log_probs`` [S, k] float32
    (-inf padding, and everywhere at labels without a target),
    ``unmapped_probs`` [S, k] float32 (the probabilities of teacher tokens
    the student cannot spell, descending) and ``aligned`` [S] bool (the
    labels with a target).

  ``online``: the record is a packed teacher row (``pipeline.PackedRows``)
  and the teacher runs in the step: the output adds that row
  (``teacher_tokens``, ``teacher_segment_ids``, ``teacher_positions``
  [L + 1]), and in place of the teacher's figures says where they come
  from: ``teacher_chunk`` [L] (each teacher label's chunk, indexed like
  ``chunk``; S: none) beside ``chunk`` and ``chunk_valid``, and with
  ``pieces`` ``teacher_position`` [S] (the teacher position whose top-k
  each student label's target projects), ``piece_depth`` [S] and
  ``piece_prefix`` [S, M] (the student tokens of that teacher token before
  the label) beside ``aligned``.
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
      pieces: np.ndarray | None = None,
      online: bool = False,
  ):
    self.online = online
    self._row_len = seq_len + 1
    self._student_len = student_len
    self._pad = pad
    self._pieces = pieces
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
    if self._pieces is not None and (self.online or "ids" in record):
      out.update(
          self._distributions(
              record, t_ends, t_valid, s_ends, s_valid, first, start, tokens
          )
      )
    return out

  def _distributions(
      self, record, t_ends, t_valid, s_ends, s_valid, first, start, tokens
  ):
    """Where each student label sits in the teacher's tokens, and (cached
    target) the teacher's top-k there projected onto the student's next
    token (``project_topk``); ``tokens``: the student's row."""
    t_starts = np.concatenate(
        [[self._teacher_ends[first - 1] if first else 0], t_ends[:-1]]
    )
    s_starts = self._student_starts[start : start + len(s_ends)]
    teacher, depth = pieces_at(t_starts, t_ends, s_starts, s_ends)
    lengths, width = self._student_len, self._pieces.shape[1]
    labels = np.arange(1, len(s_ends))  # student label tokens
    teacher, depth = teacher[labels], depth[labels]
    ok = (teacher >= 1) & (depth >= 0) & (depth < width) & s_valid[labels]
    ok[ok] = t_valid[teacher[ok]]
    rows, source = labels[ok] - 1, teacher[ok] - 1  # label -> position
    aligned = np.zeros(lengths, bool)
    aligned[rows] = True
    positions = np.zeros(lengths, np.int32)
    positions[rows] = source
    steps = np.zeros(lengths, np.int32)
    steps[rows] = depth[ok]
    # prefix[row, j] = tokens[label - m + j] for j < m (m = the depth).
    prefix = np.full((lengths, width), -1, np.int32)
    j = np.arange(width)
    m = depth[ok][:, None]
    before = j < m
    prefix[rows] = np.where(
        before, tokens[np.where(before, labels[ok][:, None] - m + j, 0)], -1
    )
    if self.online:  # the step projects the teacher's top-k there
      return {
          "teacher_position": positions,
          "piece_depth": steps,
          "piece_prefix": prefix,
          "aligned": aligned,
      }
    sampled = "counts" in record
    k = record["ids"].shape[-1]
    ids = np.zeros((lengths, k), np.int32)
    values = np.full((lengths, k), 0.0 if sampled else -np.inf, np.float32)
    unmapped = np.zeros((lengths, k), np.float32)
    if len(rows):
      project_fn = project_sample if sampled else project_topk
      ids[rows], values[rows], unmapped[rows] = project_fn(
          record["ids"][source],
          record["counts" if sampled else "log_probs"][source],
          self._pieces,
          prefix[rows],
          steps[rows],
      )
    return {
        "ids": ids,
        "counts" if sampled else "log_probs": values,
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
