"""Distillation losses: pure JAX functions of student logits and teacher targets.

Conventions (shared by every function here):

- `logits` [B, T, V] are the student's; with temperature `temperature` the
  student log-probs are `log q = log_softmax(logits / temperature)` over the
  full vocabulary, computed in float32 whatever the input dtype.
- Teacher targets are already at that temperature (the logit cache stores them
  so; `dense_kd` applies it to `teacher_logits` itself). Teacher quantities are
  wrapped in `stop_gradient`: gradients flow to the student only.
- `mask` [B, T] (bool or float weights, 1 = position counts). Every loss
  `name(...)` returns the mask-weighted mean over tokens; `name_per_token(...)`
  returns the [B, T] values. Positions with mask 0 never leak NaN or inf.
- Losses are finite, with finite gradients, for finite student logits (even
  +-1e4) and teacher log-probs that are -inf (padding ids, exact zeros).
- The KD terms are plain KL divergences; the Hinton T^2 factor is applied once,
  in `mix_losses`.

Full-vocabulary logits do not fit in memory at V = 150k-262k; `chunked_loss`
computes any per-token loss over sequence chunks with rematerialisation, so
only one [B, C, V] chunk of logits exists at a time, in the forward and the
backward pass.
"""

from distill.losses.chunked import chunked_loss
from distill.losses.terms import (
    LOG_FLOOR,
    masked_mean,
    cross_entropy_per_token,
    cross_entropy,
    sparse_kl_per_token,
    sparse_kl,
    ghost_kl_per_token,
    ghost_kd_per_token,
    ghost_kl,
    sampled_kl_per_token,
    sampled_kl,
    topk_tail_kl_per_token,
    topk_tail_kl,
    DIVERGENCES,
    dense_kd_per_token,
    dense_kd,
    mix_losses,
    schedule,
)

__all__ = [
    "LOG_FLOOR",
    "chunked_loss",
    "cross_entropy",
    "cross_entropy_per_token",
    "dense_kd",
    "DIVERGENCES",
    "dense_kd_per_token",
    "ghost_kl",
    "ghost_kl_per_token",
    "ghost_kd_per_token",
    "masked_mean",
    "mix_losses",
    "sampled_kl",
    "sampled_kl_per_token",
    "schedule",
    "sparse_kl",
    "sparse_kl_per_token",
    "topk_tail_kl",
    "topk_tail_kl_per_token",
]
