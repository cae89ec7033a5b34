"""On-policy distillation: the student learns on its own continuations.

Offline targets teach the student on the corpus' tokens, but when it
generates it conditions on its own, where it was never corrected (exposure
bias). An on-policy step (GKD, Agarwal et al. 2024) instead:

1. takes the first ``prompt_len`` tokens of each training row as a prompt;
2. lets the student continue it to the row's length with the compiled
   KV-cache decoding (``distill.decoding.generate.continuations``), outside
   the gradient, at ``temperature``;
3. has the frozen teacher score prompt + continuation in one forward pass
   (inside the step, like an online run);
4. trains on a divergence between the teacher's and the student's
   next-token distributions at the generated positions only: forward KL,
   reverse KL or generalised JSD(beta) (``distill.losses``), over the full
   vocabulary or over the teacher's top-k with its tail as one more class.

A mixing rate ``lam`` (GKD's lambda) chooses per step between such a batch
and the offline batch the iterator gave (its cached target): a coin seeded
by (seed, step), so a resumed run makes the same choices and ``lam = 0``
is the offline run, step for step. Generated rows exist only on the device,
for the step that uses them: they never enter the cache or the data folder.

A prompt is a prefix of a packed row, taken as one document (positions 0..P-1):
where it crosses a document boundary, teacher and student both see the
joined text, so the divergence is still between their predictions on the
same context.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from distill import losses
from distill.core.errors import UserError
from distill.decoding import generate as gen

#: The batch key marking an on-policy batch: [B, L] the generated positions.
MASK = "on_policy_mask"
TARGETS = ("dense", "topk")


@dataclasses.dataclass(frozen=True)
class OnPolicyConfig:
  """How an on-policy run makes and scores its batches (``config.distill.on_policy``)."""

  lam: float = 1.0  # share of steps on-policy (the rest: the offline batch)
  prompt_len: int = 32  # tokens of each row kept as its prompt
  temperature: float = 1.0  # the student's sampling (0: greedy)
  divergence: str = "forward"  # forward | reverse | jsd
  beta: float = 0.5  # jsd's beta
  target: str = "dense"  # dense: full vocabulary; topk: the teacher's top-k
  k: int = 64  # topk: how many ids (the rest is one tail class)

  def check(self, seq_len: int, where: str = "config.distill.on_policy"):
    """Raises UserError naming a setting that cannot work; returns self."""
    if not 0.0 <= self.lam <= 1.0:
      raise UserError(f"{where}.lam={self.lam} must be in [0, 1]")
    if not 1 <= self.prompt_len < seq_len:
      raise UserError(
          f"{where}.prompt_len={self.prompt_len} must be at least 1 and"
          f" below the row length config.data.seq_len={seq_len}, so that"
          " something is generated"
      )
    if self.divergence not in losses.DIVERGENCES:
      raise UserError(
          f"{where}.divergence={self.divergence!r}; use forward, reverse or"
          " jsd"
      )
    if not 0.0 <= self.beta <= 1.0:
      raise UserError(f"{where}.beta={self.beta} must be in [0, 1]")
    if self.target not in TARGETS:
      raise UserError(f"{where}.target={self.target!r}; use dense or topk")
    if self.temperature < 0:
      raise UserError(f"{where}.temperature={self.temperature} must be >= 0")
    if self.k < 1:
      raise UserError(f"{where}.k={self.k} must be >= 1")
    return self


def on_policy_step(lam: float, seed: int, step: int) -> bool:
  """Whether step ``step`` (0-based) trains on the student's own rows."""
  if lam <= 0.0:
    return False
  if lam >= 1.0:
    return True
  return bool(np.random.default_rng([seed, step]).random() < lam)


@jax.jit
def _rows(prompts, continuations):
  """prompts [B, P], continuations [B, G] -> the batch of prompt + continuation."""
  tokens = jnp.concatenate([prompts, continuations], axis=1)
  width = prompts.shape[1]
  index = jnp.zeros_like(tokens) + jnp.arange(tokens.shape[1], dtype=jnp.int32)
  return {
      "tokens": tokens,
      "segment_ids": jnp.ones_like(tokens),
      "positions": index,
      # Label j is token j + 1 (index[:, 1:] holds j + 1): generated from
      # token P on.
      MASK: index[:, 1:] >= width,
  }


def make_batch(
    model, batch: dict[str, Any], step: int, cfg: OnPolicyConfig, seed: int
) -> dict[str, Any]:
  """The on-policy batch of a training batch [B, L + 1] (on the mesh).

  Rows of the same shape: each row's first ``prompt_len`` tokens, then
  ``L + 1 - prompt_len`` tokens the student sampled (key: ``seed`` folded
  with ``step``). Keys: tokens, segment_ids (all 1), positions, and
  ``MASK`` [B, L], true at the labels the student generated.
  """
  tokens = batch["tokens"]
  width = cfg.prompt_len
  prompts = tokens[:, :width]
  key = jax.random.fold_in(jax.random.key(seed), step)
  generated = gen.continuations(
      model,
      prompts,
      tokens.shape[1] - width,
      temperature=cfg.temperature,
      key=key,
  )
  return _rows(prompts, generated)


def prepare_fn(cfg: OnPolicyConfig, seed: int):
  """The training loop's ``prepare`` hook of an on-policy run."""

  def prepare(model, batch, step):
    if not on_policy_step(cfg.lam, seed, step):
      return batch
    return make_batch(model, batch, step, cfg, seed)

  return prepare
