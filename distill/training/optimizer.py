"""The optimiser of a training run: its settings, schedule and AdamW."""

from __future__ import annotations

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """Optimisation and bookkeeping settings of one training run."""

  steps: int
  learning_rate: float = 1e-3
  warmup_steps: int = 100
  end_learning_rate_fraction: float = 0.1
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0
  log_every: int = 20
  eval_every: int = 200
  checkpoint_every: int = 200
  keep_checkpoints: int = 3
  max_bad_steps: int = 3
  # Every this many steps, the step is computed twice from the same state
  # and batch and the results compared bit for bit (0: never).
  replay_check_every: int = 0


def learning_rate_schedule(cfg: LoopConfig) -> optax.Schedule:
  """Linear warmup to the peak, then cosine down to a fraction of it."""
  warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=cfg.learning_rate,
      warmup_steps=warmup,
      decay_steps=max(cfg.steps, warmup + 1),
      end_value=cfg.learning_rate * cfg.end_learning_rate_fraction,
  )


def make_optimizer(cfg: LoopConfig) -> optax.GradientTransformation:
  """AdamW on the schedule, after global-norm gradient clipping.

  Weight decay skips vectors (norm scales, biases), as is usual.
  """
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(
          learning_rate_schedule(cfg),
          b1=cfg.b1,
          b2=cfg.b2,
          weight_decay=cfg.weight_decay,
          mask=decay_mask,
      ),
  )
