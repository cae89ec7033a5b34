"""Per-token distillation terms, their masked means, mixing and schedules.

See ``distill.losses`` for the conventions every function here follows.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Teacher log-probs are clamped to this floor where student mass multiplies
# them (reverse KL, JSD), so an exact teacher zero gives a large finite loss
# instead of inf. Real log-probs (about -2e4 at logits of +-1e4) are unchanged.
LOG_FLOOR = -1e6


def masked_mean(per_token: jax.Array, mask: jax.Array) -> jax.Array:
  """Mask-weighted mean of [B, T] values; 0 when the mask is empty."""
  weights = mask.astype(jnp.float32)
  total = jnp.sum(jnp.where(weights != 0, per_token, 0.0) * weights)
  count = jnp.sum(weights)
  return total / jnp.where(count != 0, count, 1.0)


def _log_q(logits: jax.Array, temperature) -> jax.Array:
  return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def _gather(log_q: jax.Array, ids: jax.Array) -> jax.Array:
  """log_q [B, T, V], ids [B, T, K] -> [B, T, K]; out-of-range ids are clipped."""
  return jnp.take_along_axis(log_q, ids.astype(jnp.int32), axis=-1, mode="clip")


def _xlogy_diff(p, log_p, log_q):
  """sum over the last axis of p * (log_p - log_q), counting p == 0 as 0."""
  safe_log_p = jnp.where(p > 0, log_p, 0.0)
  return jnp.sum(jnp.where(p > 0, p * (safe_log_p - log_q), 0.0), axis=-1)


# ----------------------------------------------------------------- hard labels


def cross_entropy_per_token(logits, labels):
  """-log softmax(logits)[labels] at temperature 1. logits [B, T, V], labels [B, T] -> [B, T]."""
  log_q = _log_q(logits, 1.0)
  return -_gather(log_q, labels[..., None])[..., 0]


def cross_entropy(logits, labels, mask):
  """Masked mean hard-label cross-entropy (nats). labels [B, T] int, mask [B, T]."""
  return masked_mean(cross_entropy_per_token(logits, labels), mask)


# ------------------------------------------------------- sparse cached targets


def sparse_kl_per_token(logits, ids, log_probs, temperature=1.0):
  """KL(p_k || q) with p_k the stored top-k distribution renormalised to sum 1.

  ids [B, T, K] int, log_probs [B, T, K] teacher log-probs at `temperature`
  (entries of -inf are padding and are ignored). Only the K stored ids of q
  enter, so this is biased toward the head (the common baseline). -> [B, T].
  """
  lp = jax.lax.stop_gradient(log_probs.astype(jnp.float32))
  valid = lp > -jnp.inf
  lse = jax.nn.logsumexp(jnp.where(valid, lp, -jnp.inf), axis=-1, keepdims=True)
  lp_norm = jnp.where(valid, lp - lse, 0.0)
  p = jnp.where(valid, jnp.exp(lp_norm), 0.0)
  return _xlogy_diff(p, lp_norm, _gather(_log_q(logits, temperature), ids))


def sparse_kl(logits, ids, log_probs, mask, temperature=1.0):
  """Masked mean of `sparse_kl_per_token`."""
  return masked_mean(
      sparse_kl_per_token(logits, ids, log_probs, temperature), mask
  )


def _membership(ids, valid, vocab_size):
  """ids, valid [B, T, K] -> [B, T, V] bool: which vocabulary entries are stored."""
  lead = ids.shape[:-1]
  rows = math.prod(lead)
  flat_ids = jnp.clip(
      ids.reshape(rows, -1).astype(jnp.int32), 0, vocab_size - 1
  )
  hits = jnp.zeros((rows, vocab_size), jnp.int8)
  hits = hits.at[jnp.arange(rows)[:, None], flat_ids].max(
      valid.reshape(rows, -1).astype(jnp.int8)
  )
  return (hits > 0).reshape(*lead, vocab_size)


def ghost_kl_per_token(logits, ids, log_probs, tail, temperature=1.0):
  """Forward KL over K+1 classes: the K stored ids plus a "ghost" tail class.

  Teacher: p_i = exp(log_probs_i) for the stored ids (no renormalisation) and
  `tail` [B, T] = 1 - sum_i p_i for the ghost. Student: q_i for the stored ids
  and q_ghost = sum of q outside them, computed exactly as a logsumexp over
  the complement (no 1 - sum cancellation, finite at logits of +-1e4).
  Valid ids (log_probs > -inf) must be distinct within a position. -> [B, T].
  """
  z = logits.astype(jnp.float32) / temperature
  lse_all = jax.nn.logsumexp(z, axis=-1)
  log_q = z - lse_all[..., None]
  lp = jax.lax.stop_gradient(log_probs.astype(jnp.float32))
  valid = lp > -jnp.inf
  p = jnp.where(valid, jnp.exp(jnp.where(valid, lp, 0.0)), 0.0)
  head = _xlogy_diff(p, lp, _gather(log_q, ids))

  stored = _membership(ids, valid, z.shape[-1])
  has_rest = ~jnp.all(stored, axis=-1)
  log_q_ghost = (
      jax.nn.logsumexp(jnp.where(stored, -jnp.inf, z), axis=-1) - lse_all
  )
  t = jnp.clip(jax.lax.stop_gradient(tail.astype(jnp.float32)), 0.0, 1.0)
  use = (t > 0) & has_rest  # no complement (all ids stored): no ghost term
  safe_t = jnp.where(use, t, 1.0)
  ghost = jnp.where(use, t * (jnp.log(safe_t) - log_q_ghost), 0.0)
  return head + ghost


def ghost_kl(logits, ids, log_probs, tail, mask, temperature=1.0):
  """Masked mean of `ghost_kl_per_token`."""
  return masked_mean(
      ghost_kl_per_token(logits, ids, log_probs, tail, temperature), mask
  )


def sampled_kl_per_token(
    logits, ids, counts, temperature=1.0, include_entropy=False
):
  """Cross-entropy against the empirical distribution p_hat = counts / sum(counts).

  ids [B, T, N] sampled ids, counts [B, T, N] (0 = padding). Returns
  -sum p_hat log q, an unbiased estimate of H(p, q) = KL(p || q) + H(p), whose
  gradient is an unbiased estimate of the forward-KL gradient. With
  `include_entropy=True` returns KL(p_hat || q) = that minus H(p_hat) (>= 0,
  0 when q = p_hat; ids must then be unique). Same gradient either way. -> [B, T].
  """
  c = jax.lax.stop_gradient(counts.astype(jnp.float32))
  total = jnp.sum(c, axis=-1, keepdims=True)
  p_hat = c / jnp.where(total > 0, total, 1.0)
  lq = _gather(_log_q(logits, temperature), ids)
  loss = -jnp.sum(p_hat * lq, axis=-1)
  if include_entropy:
    loss = loss + jnp.sum(
        jnp.where(
            p_hat > 0, p_hat * jnp.log(jnp.where(p_hat > 0, p_hat, 1.0)), 0.0
        ),
        -1,
    )
  return loss


def sampled_kl(
    logits, ids, counts, mask, temperature=1.0, include_entropy=False
):
  """Masked mean of `sampled_kl_per_token`."""
  return masked_mean(
      sampled_kl_per_token(logits, ids, counts, temperature, include_entropy),
      mask,
  )


def topk_tail_kl_per_token(
    logits, ids, log_probs, tail, tail_ids, tail_counts, temperature=1.0
):
  """Forward KL to a top-k head with a sampled tail.

  The teacher is known exactly on the K stored ids (p_i = exp(log_probs_i),
  not renormalised) and by M draws from p restricted to the other ids
  (``tail_ids``/``tail_counts`` [B, T, M], counts 0 = padding) scaled by the
  tail mass ``tail`` [B, T]. The target is that decoded distribution,
  ``p_i`` on the head and ``tail * counts_j / M`` on the drawn tail ids, and
  the loss KL(target || q) >= 0. Its gradient is an unbiased estimate of the
  gradient of the full forward KL(p || q): the head term is exact and the
  drawn ids' expected weight is p_j for every tail id j. With tail == 0 it is
  exactly the head's KL (the draws get no weight). -> [B, T].
  """
  log_q = _log_q(logits, temperature)
  lp = jax.lax.stop_gradient(log_probs.astype(jnp.float32))
  valid = lp > -jnp.inf
  p = jnp.where(valid, jnp.exp(jnp.where(valid, lp, 0.0)), 0.0)
  head = _xlogy_diff(p, lp, _gather(log_q, ids))
  t = jnp.clip(jax.lax.stop_gradient(tail.astype(jnp.float32)), 0.0, 1.0)
  c = jax.lax.stop_gradient(tail_counts.astype(jnp.float32))
  total = jnp.sum(c, axis=-1, keepdims=True)
  w = t[..., None] * c / jnp.where(total > 0, total, 1.0)  # target mass
  rest = _xlogy_diff(
      w, jnp.log(jnp.where(w > 0, w, 1.0)), _gather(log_q, tail_ids)
  )
  return head + rest


def topk_tail_kl(
    logits, ids, log_probs, tail, tail_ids, tail_counts, mask, temperature=1.0
):
  """Masked mean of `topk_tail_kl_per_token`."""
  return masked_mean(
      topk_tail_kl_per_token(
          logits, ids, log_probs, tail, tail_ids, tail_counts, temperature
      ),
      mask,
  )


# ------------------------------------------------------- dense (online) teacher


DIVERGENCES = ("forward", "reverse", "jsd")


def _check_divergence(kind: str, beta) -> tuple[str, float]:
  """Validates (kind, beta); JSD at beta 0 or 1 is forward or reverse KL."""
  if kind not in DIVERGENCES:
    raise ValueError(
        f"divergence kind must be 'forward', 'reverse' or 'jsd', got {kind!r}"
    )
  beta = float(beta)
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"divergence beta must be in [0, 1], got {beta}")
  if kind == "jsd" and beta == 0.0:
    kind = "forward"
  if kind == "jsd" and beta == 1.0:
    kind = "reverse"
  return kind, beta


def _divergence(log_p, log_q, kind: str, beta: float):
  """The divergence between teacher p and student q over the last axis.

  log_p may hold -inf (exact zeros; teacher side, no gradient); log_q the
  student's log-probs, -inf only where its class does not exist (then p is 0
  there too). See `dense_kd_per_token` for the kinds.
  """
  p = jnp.exp(log_p)
  q = jnp.exp(log_q)
  safe_log_q = jnp.where(q > 0, log_q, 0.0)
  if kind == "forward":
    return _xlogy_diff(p, log_p, log_q)
  if kind == "reverse":
    return jnp.sum(
        jnp.where(q > 0, q * (safe_log_q - jnp.maximum(log_p, LOG_FLOOR)), 0.0),
        axis=-1,
    )
  log_m = jnp.logaddexp(
      jnp.maximum(log_p, LOG_FLOOR) + math.log(beta), log_q + math.log1p(-beta)
  )
  kl_pm = _xlogy_diff(p, log_p, log_m)
  kl_qm = jnp.sum(jnp.where(q > 0, q * (safe_log_q - log_m), 0.0), axis=-1)
  return (beta * kl_pm + (1.0 - beta) * kl_qm) / (beta * (1.0 - beta))


def dense_kd_per_token(
    logits, teacher_logits, temperature=1.0, kind="forward", beta=0.5
):
  """Full-vocabulary divergence between teacher p and student q at `temperature`.

  teacher_logits [B, T, V] (may hold -inf: exact zeros). kind:
  - 'forward': KL(p || q) (mean-seeking; what the sparse targets estimate);
  - 'reverse': KL(q || p) (mode-seeking);
  - 'jsd': generalised JSD(beta) of the GKD paper with m = beta p + (1-beta) q,
    JSD = beta KL(p || m) + (1-beta) KL(q || m), *divided by beta (1-beta)*.
    The division makes it continuous in beta with KL(p || q) at beta = 0 and
    KL(q || p) at beta = 1, and keeps its scale near the optimum equal to KL's
    for every beta (so sweeping beta needs no learning-rate retune). Multiply
    by beta (1 - beta) for the number GKD/TRL report. beta = 0.5 gives 4x the
    usual JSD.
  -> [B, T].
  """
  kind, beta = _check_divergence(kind, beta)
  log_q = _log_q(logits, temperature)
  log_p = jax.lax.stop_gradient(_log_q(teacher_logits, temperature))
  return _divergence(log_p, log_q, kind, beta)


def ghost_kd_per_token(
    logits, ids, log_probs, tail, temperature=1.0, kind="forward", beta=0.5
):
  """`dense_kd_per_token`'s divergences over the K+1 classes of a top-k target.

  The classes are the K stored ids and a "ghost" holding the rest: the teacher
  puts `exp(log_probs)` on the ids and `tail` on the ghost, the student its
  probabilities of the ids and the mass it puts outside them (as in
  `ghost_kl_per_token`, which 'forward' equals). What an on-policy run uses
  when the teacher's top-k stands in for its full distribution.
  ids, log_probs [B, T, K] (invalid ids: log_probs -inf), tail [B, T].
  -> [B, T].
  """
  kind, beta = _check_divergence(kind, beta)
  if kind == "forward":
    return ghost_kl_per_token(logits, ids, log_probs, tail, temperature)
  z = logits.astype(jnp.float32) / temperature
  lse_all = jax.nn.logsumexp(z, axis=-1)
  log_q = z - lse_all[..., None]
  lp = jax.lax.stop_gradient(log_probs.astype(jnp.float32))
  valid = lp > -jnp.inf
  stored = _membership(ids, valid, z.shape[-1])
  has_rest = ~jnp.all(stored, axis=-1)
  log_q_ghost = (
      jax.nn.logsumexp(jnp.where(stored, -jnp.inf, z), axis=-1) - lse_all
  )
  t = jnp.clip(jax.lax.stop_gradient(tail.astype(jnp.float32)), 0.0, 1.0)
  log_t = jnp.where(t > 0, jnp.log(jnp.where(t > 0, t, 1.0)), -jnp.inf)
  classes_q = jnp.concatenate(
      [
          jnp.where(valid, _gather(log_q, ids), -jnp.inf),
          jnp.where(has_rest, log_q_ghost, -jnp.inf)[..., None],
      ],
      axis=-1,
  )
  classes_p = jnp.concatenate(
      [jnp.where(valid, lp, -jnp.inf), log_t[..., None]], axis=-1
  )
  return _divergence(classes_p, classes_q, kind, beta)


def dense_kd(
    logits, teacher_logits, mask, temperature=1.0, kind="forward", beta=0.5
):
  """Masked mean of `dense_kd_per_token`."""
  return masked_mean(
      dense_kd_per_token(logits, teacher_logits, temperature, kind, beta), mask
  )


# ------------------------------------------------------- mixing and schedules


def mix_losses(ce, kd, alpha, temperature):
  """alpha * CE + (1 - alpha) * T^2 * KD (Hinton et al.: T^2 keeps the soft-target
  gradient scale independent of T). alpha, temperature: floats or jnp scalars.
  """
  return alpha * ce + (1.0 - alpha) * jnp.square(temperature) * kd


def schedule(kind="constant", start=1.0, end=None, steps=1):
  """Returns step -> value (jnp float32), like an optax schedule.

  'constant': start. 'linear': start -> end over `steps`, then end.
  'cosine': half-cosine from start to end over `steps`, then end.
  """
  if kind == "constant":
    return lambda step: jnp.asarray(start, jnp.float32) + 0.0 * jnp.asarray(
        step, jnp.float32
    )
  if kind not in ("linear", "cosine"):
    raise ValueError(
        f"schedule kind must be 'constant', 'linear' or 'cosine', got {kind!r}"
    )
  if end is None or steps <= 0:
    raise ValueError(
        f"schedule {kind!r} needs `end` and steps > 0, got end={end}, steps={steps}"
    )

  def fn(step):
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / steps, 0.0, 1.0)
    if kind == "linear":
      return start + (end - start) * frac
    return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))

  return fn
