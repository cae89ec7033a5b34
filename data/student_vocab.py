"""Which tokenizer the student speaks: the teacher's, or its own.

``config.student.tokenizer``:

- ``"teacher"`` (the default): the student shares ``W/tokenizer.json`` and
  the teacher's token streams under ``W/data/``;
- ``"N"`` (an integer, e.g. ``"4096"``): a byte-level BPE of N entries
  trained by ``data.prepare`` on the same text as the teacher's;
- a path to a ``tokenizer.json`` (any Hugging Face tokenizer): adopted.

A student with its own tokenizer has ``W/student_tokenizer.json`` and its
own token streams of the same documents under ``W/data/student/``: its CE
baseline trains on them, its validation scores on them (in bits per byte,
beside the teacher's), and its cross-tokenizer runs (``alm``, ``vocab``)
align them with the teacher's cached rows byte by byte (``data.align``).

Every run of such a config speaks the student's tokenizer unless its spec
says ``tok=teacher`` (``distill.runs``): the same-tokenizer baselines of a
comparison train beside the others in one workdir.
"""

from __future__ import annotations

import math
import os

from data import pipeline
from data import tokenizer as tok
from distill.core import layout

TEACHER = "teacher"


def setting(config) -> str:
  return str(config.student.get("tokenizer", TEACHER) or TEACHER)


def own(config, part: str | None = None) -> bool:
  """Whether a run speaks a tokenizer of its own: ``part`` (a run's
  ``tok``, "own" or "teacher"), else the config's setting."""
  if part is not None:
    return part == "own"
  return setting(config) != TEACHER


def trained_size(config) -> int | None:
  """N of a tokenizer to train (``"N"``), else None."""
  value = setting(config)
  return int(value) if value.isdigit() else None


def source_path(config) -> str | None:
  """The tokenizer.json to adopt, else None."""
  value = setting(config)
  if value == TEACHER or value.isdigit():
    return None
  return os.path.expanduser(value)


def tokenizer_path(workdir: str, is_own: bool) -> str:
  """The tokenizer.json a student speaks (``own``'s answer)."""
  if is_own:
    return layout.student_tokenizer_path(workdir)
  return layout.tokenizer_path(workdir)


def data_dir(workdir: str, is_own: bool) -> str:
  """Where the student's token streams are (``pipeline.tokens_dir``'s root)."""
  if is_own:
    return layout.student_data_dir(workdir)
  return layout.data_dir(workdir)


def speaks_own(workdir: str, payload: dict) -> bool:
  """Whether the model folder whose ``config.json`` is ``payload`` speaks
  the workdir's own student tokenizer (the hash it records is that file's,
  and not the teacher's)."""
  path = layout.student_tokenizer_path(workdir)
  if not os.path.isfile(path):
    return False
  own_hash = tok.tokenizer_hash(path)
  return (
      payload.get("tokenizer_hash")
      == own_hash
      != tok.tokenizer_hash(layout.tokenizer_path(workdir))
  )


def vocab_size(workdir: str, is_own: bool) -> int:
  return tok.load_tokenizer(tokenizer_path(workdir, is_own)).get_vocab_size()


def seq_len(config, workdir: str, is_own: bool) -> int:
  """The student's row length: ``config.data.seq_len`` with the teacher's
  tokenizer; with its own, as many of its tokens as hold the bytes of a
  teacher row on average (the train streams' ratio, rounded up to a
  multiple of 8), so that runs on either side see the same text a step."""
  data = config.data
  if not is_own:
    return data.seq_len
  teacher = pipeline.read_meta(layout.data_dir(workdir), "train")
  student = pipeline.read_meta(layout.student_data_dir(workdir), "train")
  if teacher is None or student is None:
    raise pipeline.DataError(
        f"No student token streams under {layout.student_data_dir(workdir)};"
        " run `python -m data.prepare` with this config first."
    )
  ratio = student["num_tokens"] / max(1, teacher["num_tokens"])
  return max(8, -(-int(math.ceil(data.seq_len * ratio)) // 8) * 8)
