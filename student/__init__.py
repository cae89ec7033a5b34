"""The dense Gemma-3-style student: config, model, loading and export.

``load_student(dir)`` takes a model folder written by this project
(``student/<run>/`` or ``export/<run>/``: config.json with "kind": "student",
latest checkpoint's params) or a Hugging Face Gemma 3 text folder
(config.json with model_type "gemma3_text", safetensors).
"""

from __future__ import annotations

import json
import os

from distill import checkpoint
from student.config import PRESETS, StudentConfig, get_preset
from student.model import Student, abstract_student

__all__ = ["PRESETS", "Student", "StudentConfig", "abstract_student",
           "get_preset", "load_student"]


def load_student(directory: str) -> Student:
  """The student stored in ``directory`` (see the module docstring)."""
  path = os.path.join(directory, checkpoint.CONFIG_FILE)
  if not os.path.isfile(path):
    raise checkpoint.ModelFolderError(
        f"{directory!r} is not a model folder: {checkpoint.CONFIG_FILE} is missing."
        " Pass a student/<run>/ or export/<run>/ folder, or a Hugging Face"
        " Gemma 3 folder")
  with open(path) as f:
    payload = json.load(f)
  if "model_type" in payload and "kind" not in payload:
    from student import hf  # pylint: disable=g-import-not-at-top
    return hf.load_hf(directory)
  if "kind" not in payload:
    raise checkpoint.ModelFolderError(
        f"{path} has neither 'kind' (a folder written by this project) nor"
        " 'model_type' (a Hugging Face folder); cannot tell what it holds")
  payload = checkpoint.read_config(directory, kind="student")
  config = checkpoint.config_from_dict(StudentConfig, payload["model"])
  return checkpoint.restore_params(directory, abstract_student(config))
