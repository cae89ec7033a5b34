"""What a student run trains on: its rows and the batches made of them.

``batches`` gives a run's ``make_iterator``: the logit cache's records for a
run that reads a target (after checking that the cache holds what the run
needs), or the packed training rows; for a run across tokenizers, each
teacher row aligned to the student's tokens of the same bytes
(``data.align``). Every run of a config reads the same rows in the same
order, so that runs differ only in their targets.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from data import align, cache, pipeline, student_vocab, token_bytes
from data import tokenizer as tok
from distill.core import checkpoint as ckpt
from distill.core import layout
from distill.core.errors import UserError
from distill.runs import SIZES, RunKind


def rows_of(
    config, kind: RunKind, length: int | None = None
) -> tuple[int, int]:
  """(row length, rows per step) a run trains on: ``config.data``'s (or
  ``length``, a student with its own tokenizer's, ``student_vocab.seq_len``),
  or rows of the run's ``seq`` as many as keep the tokens per step."""
  data = config.data
  length = length or data.seq_len
  if kind.seq is None or kind.seq == length:
    return length, data.batch_size
  return kind.seq, max(1, data.batch_size * length // kind.seq)


def cache_expectations(config, target: str, teacher=None) -> dict[str, Any]:
  """What a logit cache must hold for an offline run on ``target``.

  The config's cache settings that shape the target (temperature, and k or
  N), and, when a teacher is in the workdir, its fingerprint: a cache that a
  different (or since retrained) teacher wrote is refused.
  """
  c = config.cache
  expect: dict[str, Any] = {"temperature": c.temperature}
  if target == "topk":
    expect["k"] = c.k
  elif target == "topk_tail":
    expect.update(tail_k=c.tail_k, tail_samples=c.tail_samples)
  elif target == "sample":
    expect["num_samples"] = c.num_samples
  if teacher is not None:
    expect["teacher_fingerprint"] = ckpt.fingerprint(teacher)
  return expect


def _check_sizes(run: str, kind: RunKind, manifest: dict[str, Any]) -> None:
  """Refuses a view larger than the cached target."""
  cached = {
      "k": manifest.get("k"),
      "n": manifest.get("num_samples"),
      "m": manifest.get("tail_samples"),
  }
  for key in SIZES:
    want = getattr(kind, key)
    if want is not None and want > (cached[key] or 0):
      raise UserError(
          f"Run {run!r} reads {key}={want} but the cache holds"
          f" {cached[key]}: lower it, or cache more (config.cache)."
      )


def batches(
    config,
    workdir: str,
    run: str,
    kind: RunKind,
    teacher,
    vocab_size,
    own: bool = False,
):
  """``(make_iterator, the cache's temperature or None)`` of a run: batches of
  the logit cache's records (a run that reads a target, after checking the
  cache holds what it needs), or of the packed training rows (only those a
  cache holds, ``config.cache.max_rows``, when
  ``config.distill.same_rows_as_cache``; rows of another ``seq``: as
  many as hold the same tokens).
  """
  data, seed = config.data, config.seed
  seq_len, rows = rows_of(
      config, kind, student_vocab.seq_len(config, workdir, own)
  )
  if kind.cross_tokenizer and kind.seq is not None:
    raise UserError(
        f"Run {run!r} reads the logit cache's rows; its student rows hold"
        " their bytes, so it takes no seq."
    )
  if kind.reads_cache and not kind.cross_tokenizer and seq_len != data.seq_len:
    raise UserError(
        f"Run {run!r} reads the logit cache, whose records are rows of"
        f" config.data.seq_len={data.seq_len} tokens, so it cannot train on"
        f" rows of seq={seq_len}: leave seq out of the run, or make the"
        " cache at that config.data.seq_len."
    )
  # The rows the cache holds (or will hold): the same whether or not it
  # exists yet, so the stages may run in any order.
  num_rows = None
  if kind.reads_cache or config.distill.same_rows_as_cache:
    train_rows = len(
        pipeline.PackedRows(layout.data_dir(workdir), "train", data.seq_len)
    )
    num_rows = cache.planned_records(config.cache.max_rows, train_rows)
  if kind.cross_tokenizer and not kind.reads_cache:  # online: teacher rows
    rows_fn = _student_rows(config, workdir, seq_len, own, kind)
    return _packed(config, layout.data_dir(workdir), num_rows, rows_fn), None
  if not kind.reads_cache:
    if num_rows is not None and own:  # rows of the same bytes, not tokens
      num_rows = min(
          num_rows,
          len(
              pipeline.PackedRows(
                  student_vocab.data_dir(workdir, own), "train", seq_len
              )
          ),
      )
    elif num_rows is not None:
      num_rows = max(1, num_rows * data.seq_len // seq_len)
    return (
        _packed(
            config,
            student_vocab.data_dir(workdir, own),
            num_rows,
            seq_len=seq_len,
            rows=rows,
        ),
        None,
    )
  cache_dir = layout.cache_dir(workdir)
  manifest = cache.read_manifest(cache_dir)
  expect = cache_expectations(config, kind.target, teacher)
  expect.update(
      tokenizer_hash=tok.tokenizer_hash(layout.tokenizer_path(workdir)),
      seq_len=data.seq_len,
      num_records=num_rows,
  )
  if not kind.cross_tokenizer:  # the student scores the teacher's ids
    expect["vocab_size"] = vocab_size
  cache.check_matches(manifest, expect, cache_dir)
  _check_sizes(run, kind, manifest)
  rows_fn = (
      _student_rows(config, workdir, seq_len, own, kind)
      if kind.cross_tokenizer
      else None
  )
  return (
      lambda: iter(
          cache.make_dataset(
              cache_dir,
              expect=expect,
              target=kind.target,
              view=kind.view(seed),
              batch_size=data.batch_size,
              seed=seed,
              worker_count=data.worker_count,
              read_ahead=data.read_ahead,
              map_fn=rows_fn,
          )
      ),
      manifest["temperature"],
  )


def teacher_pieces(workdir: str, own: bool) -> np.ndarray:
  """``align.teacher_pieces`` of the workdir's two tokenizers: each teacher
  token in student tokens, the specials by role. Made once per pair of
  tokenizer files in a process (the loss and the input pipeline both need
  it; tokenizing every teacher token takes a while at 150k entries)."""
  teacher_path = layout.tokenizer_path(workdir)
  student_path = student_vocab.tokenizer_path(workdir, own)
  return _pieces_of(
      teacher_path,
      student_path,
      tok.tokenizer_hash(teacher_path),
      tok.tokenizer_hash(student_path),
  )


@functools.lru_cache(maxsize=4)
def _pieces_of(teacher_path, student_path, teacher_hash, student_hash):
  del teacher_hash, student_hash  # the key: the files' contents
  teacher_tok = tok.load_tokenizer(teacher_path)
  student_tok = tok.load_tokenizer(student_path)
  specials = tok.special_ids(teacher_tok), tok.special_ids(student_tok)
  return align.teacher_pieces(
      token_bytes.token_bytes(teacher_tok),
      student_tok,
      {specials[0][role]: specials[1][role] for role in specials[0]},
  )


def _packed(config, data_dir, num_rows, map_fn=None, seq_len=None, rows=None):
  """``make_iterator`` of the packed train rows under ``data_dir`` (rows of
  ``config.data``'s length and batch unless given)."""
  data = config.data
  return lambda: iter(
      pipeline.make_dataset(
          data_dir,
          "train",
          seq_len=seq_len or data.seq_len,
          batch_size=rows or data.batch_size,
          seed=config.seed,
          worker_count=data.worker_count,
          read_ahead=data.read_ahead,
          num_rows=num_rows,
          map_fn=map_fn,
      )
  )


def _student_rows(
    config, workdir: str, student_len: int, own: bool, kind: RunKind
):
  """Cached (or, online, packed) teacher row -> the student's row over its
  bytes, aligned (``data.align``), for a cross-tokenizer run; the teacher
  tokens' pieces only for a vocab_uld run, which projects with them."""
  teacher_tok = tok.load_tokenizer(layout.tokenizer_path(workdir))
  student_tok = tok.load_tokenizer(student_vocab.tokenizer_path(workdir, own))
  pieces = None
  if kind.loss == "vocab_uld":
    pieces = teacher_pieces(workdir, own)
  return align.CrossTokenizerRows(
      pipeline.tokens_dir(layout.data_dir(workdir), "train"),
      pipeline.tokens_dir(student_vocab.data_dir(workdir, own), "train"),
      token_bytes.byte_lengths(teacher_tok),
      token_bytes.byte_lengths(student_tok),
      seq_len=config.data.seq_len,
      student_len=student_len,
      pad=tok.special_ids(student_tok)["pad"],
      pieces=pieces,
      online=kind.mode == "online",
  )
