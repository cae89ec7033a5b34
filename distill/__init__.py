"""Distillation: the ground-floor packages both models stand on
(``core``, ``nn``, ``decoding``, ``losses``, ``training``, ``evals``) and, in
this folder, the stages that combine teacher and student: ``train``,
``evaluate`` and ``speculative`` decoding."""
