"""Feature distillation: the student's hidden states follow the teacher's.

An optional extra term of online runs (a run spec's ``feat=cosine`` or
``feat=mse``). For each pair (student block, teacher block) of
``config.distill.features.pairs`` the student's residual stream after its
block, through a learned linear projection from its width to the
teacher's, is compared with the teacher's after its block, at the
non-padding positions:

- ``cosine``: 1 - cos(projected student state, teacher state);
- ``mse``: the mean squared difference over the width, divided by the
  teacher state's mean square (so the term does not scale with the
  teacher's activations).

The term is the mean over pairs, times ``weight``, added to the run's loss.
The projections train with the student but are not part of it: the
training loop keeps them as a separate checkpoint item, so ``best/``,
``load_student`` and every export hold the student alone.

Block indices count from 0; negative ones from the last block. No pairs
given: the middle and last blocks of each model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from distill import losses
from distill.core.errors import UserError

KINDS = ("cosine", "mse")


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
  """``config.distill.features``: which blocks, and how much the term weighs."""

  pairs: tuple[tuple[int, int], ...] = ()  # (student, teacher) block indices
  weight: float = 1.0


def resolve_pairs(
    pairs, student_layers: int, teacher_layers: int
) -> tuple[tuple[int, int], ...]:
  """The pairs as non-negative block indices; () -> middle and last blocks.

  Raises UserError for an index outside either model.
  """
  if not pairs:
    pairs = (
        (student_layers // 2 - 1, teacher_layers // 2 - 1),
        (student_layers - 1, teacher_layers - 1),
    )
  out = []
  for pair in pairs:
    if len(pair) != 2:
      raise UserError(
          f"config.distill.features.pairs: {pair!r} is not a (student block,"
          " teacher block) pair"
      )
    s, t = (int(i) for i in pair)
    for index, count, who in (
        (s, student_layers, "student"),
        (t, teacher_layers, "teacher"),
    ):
      if not -count <= index < count:
        raise UserError(
            f"config.distill.features.pairs: block {index} of the {who},"
            f" which has {count} blocks (0..{count - 1}, or negative from"
            " the end)"
        )
    out.append((s % student_layers, t % teacher_layers))
  return tuple(dict.fromkeys(out))


class Projections(nnx.Module):
  """One linear map [D_student -> D_teacher] per pair (float32, no bias)."""

  def __init__(self, count: int, student_dim: int, teacher_dim: int, seed=0):
    rngs = nnx.Rngs(seed)
    self.maps = nnx.List(
        [
            nnx.Linear(student_dim, teacher_dim, use_bias=False, rngs=rngs)
            for _ in range(count)
        ]
    )


def feature_loss_per_token(student, teacher, kind: str) -> jax.Array:
  """student, teacher [B, T, D] (student already projected) -> [B, T]."""
  s = student.astype(jnp.float32)
  t = jax.lax.stop_gradient(teacher.astype(jnp.float32))
  if kind == "cosine":
    dot = jnp.sum(s * t, axis=-1)
    norms = jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1)
    return 1.0 - dot / jnp.maximum(norms, 1e-6)
  if kind == "mse":
    scale = jnp.mean(jnp.square(t), axis=-1)
    return jnp.mean(jnp.square(s - t), axis=-1) / jnp.maximum(scale, 1e-6)
  raise ValueError(f"feature loss kind must be one of {KINDS}, got {kind!r}")


def feature_loss(
    projections: Projections,
    student_states,
    teacher_states,
    mask: jax.Array,
    kind: str,
) -> jax.Array:
  """Mean over pairs of the masked mean of ``feature_loss_per_token``.

  student_states, teacher_states: one [B, T, D] array per pair, in order.
  """
  terms = [
      losses.masked_mean(feature_loss_per_token(proj(s), t, kind), mask)
      for proj, s, t in zip(
          projections.maps, student_states, teacher_states, strict=True
      )
  ]
  return sum(terms) / len(terms)
