"""The sparse-MoE teacher: config, model, HF import, loading.

    from teacher import load_teacher
    model = load_teacher("W/teacher")
    logits = model(tokens)          # int32 [B, T] -> float32 [B, T, V]

Importing this package registers the "teacher" kind with
``distill.core.registry``, so ``registry.load_model`` reads teacher folders.
"""

from distill.core import registry
from teacher.config import TeacherConfig, get_preset, param_counts
from teacher.model import Teacher, abstract_teacher, load_teacher

registry.register(Teacher.kind, load_teacher)

__all__ = [
    "TeacherConfig",
    "Teacher",
    "abstract_teacher",
    "get_preset",
    "load_teacher",
    "param_counts",
]
