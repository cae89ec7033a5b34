"""The workdir layout: every path under ``W`` that a stage reads or writes.

    W/
      data/                  prepared corpus (TFDS data_dir, token streams)
      data/student/          the student's token streams (its own tokenizer)
      tokenizer.json         the tokenizer every stage shares
      student_tokenizer.json a student's own tokenizer, when it has one
      teacher/               the teacher's model folder
      logits/                the logit cache (manifest and shards)
      student/<run>/         one model folder per distillation run
      eval/                  report.md, report.json, plots
      export/<run>[-hf]/     exported students

Stages ask this module for paths instead of joining them by hand, so the
layout is written down once.
"""

from __future__ import annotations

import os

CONFIG_FILE = "config.json"  # What makes a folder a model folder.


def data_dir(workdir: str) -> str:
  return os.path.join(workdir, "data")


def tokenizer_path(workdir: str) -> str:
  return os.path.join(workdir, "tokenizer.json")


def student_data_dir(workdir: str) -> str:
  """Token streams in the student's own tokenizer (``config.student.tokenizer``)."""
  return os.path.join(workdir, "data", "student")


def student_tokenizer_path(workdir: str) -> str:
  return os.path.join(workdir, "student_tokenizer.json")


def teacher_dir(workdir: str) -> str:
  return os.path.join(workdir, "teacher")


def cache_dir(workdir: str) -> str:
  return os.path.join(workdir, "logits")


def students_dir(workdir: str) -> str:
  return os.path.join(workdir, "student")


def student_dir(workdir: str, run: str) -> str:
  return os.path.join(students_dir(workdir), run)


def eval_dir(workdir: str) -> str:
  return os.path.join(workdir, "eval")


def export_dir(workdir: str, run: str, fmt: str) -> str:
  """``W/export/R/`` (orbax) or ``W/export/R-hf/`` (hf)."""
  return os.path.join(workdir, "export", run + ("-hf" if fmt == "hf" else ""))


def run_folder(run: str) -> str:
  """The folder name under W/student of a run spec: the spec with '@' and
  ',' as '_' and '=' dropped ("sampled@n=16" -> "sampled_n16")."""
  return run.replace("@", "_").replace(",", "_").replace("=", "")


def list_runs(workdir: str) -> list[str]:
  """Runs under ``W/student/`` (folders with a config.json), sorted."""
  root = students_dir(workdir)
  if not os.path.isdir(root):
    return []
  return sorted(
      r
      for r in os.listdir(root)
      if os.path.isfile(os.path.join(root, r, CONFIG_FILE))
  )


def missing_run_message(workdir: str, run: str) -> str:
  """What to say when ``W/student/<run>`` is not a run: the runs there are."""
  runs = list_runs(workdir)
  source = student_dir(workdir, run)
  root = students_dir(workdir)
  return f"no student run {run!r}: {source} has no {CONFIG_FILE}. " + (
      f"Runs in {root}: {', '.join(runs)}"
      if runs
      else f"{root} has no runs yet; run `python -m distill.train` first"
  )
