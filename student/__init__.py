"""The dense Gemma-3-style student: config, model, loading and export.

``load_student(dir)`` takes a model folder written by this project
(``student/<run>/`` or ``export/<run>/``: config.json with "kind": "student",
latest checkpoint's params) or a Hugging Face Gemma 3 text folder
(config.json with model_type "gemma3_text", safetensors), or a quantised
student (``student.quantize``: config.json names its "quantization"). A
run trained quantisation-aware (its settings name ``q``) loads quantised as
it was trained (projections only), ready to serve.

Importing this package registers both with ``distill.core.registry``, so
``registry.load_model`` reads student and Gemma 3 folders.
"""

from __future__ import annotations

from distill.core import checkpoint, registry
from student import hf, quantize
from student.config import PRESETS, StudentConfig, get_preset
from student.model import Student, abstract_student

__all__ = [
    "PRESETS",
    "Student",
    "StudentConfig",
    "abstract_student",
    "get_preset",
    "load_student",
]


def load_student(directory: str) -> Student:
  """The student stored in ``directory`` (see the module docstring)."""
  payload = checkpoint.read_config(directory)
  if "kind" not in payload and "model_type" in payload:
    return hf.load_hf(directory)
  if payload.get(quantize.CONFIG_KEY):
    return quantize.load(directory)
  qat = quantize.trained_scheme(payload)
  if qat:  # trained quantisation-aware: served as its quantised self
    return quantize.quantize(Student.load(directory), qat, embedding=False)
  return Student.load(directory)


registry.register(Student.kind, load_student)
registry.register(hf.MODEL_TYPE, load_student)
