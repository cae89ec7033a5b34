"""Cross-tokenizer distillation: a vocabulary mapping plus ULD.

The teacher's top-k next-token distribution is carried into the student's
vocabulary through the student's tokenization of each teacher token
(``data.align.project_topk``): a teacher token the student spells as one
token maps to it (the exact mapping of TRL's GOLD trainer); one it spells
as several gives its probability to its first piece where it starts, and,
conditioned on the pieces so far, to the next piece inside it (GOLD's
merging of split tokens, here exact when the student's BPE merges are a
prefix of the teacher's). The student learns the projected distribution
with the loss of the same-tokenizer run on that target: the sparse KL of a
top-k (``sparse_kl_per_token``) or the sampled KL of a sample (each draw
goes to its piece; draws inconsistent with the pieces so far drop out, so
the rest estimate the conditional distribution). Teacher mass on tokens the
student cannot spell at all (specials without a counterpart; text a
non-byte-level student cannot tokenize) is compared without a mapping, by
sorted probabilities:
the L1 distance between those probabilities and the student's largest ones
on ids no teacher token maps to, each sorted (Universal Logit Distillation,
Boizard et al. 2024; zero between byte-level BPEs).

With one tokenizer every teacher token is one student token, every label
has a target, and the loss is the ``topk_sparse`` run's (top-k) or the
``sampled`` run's (sample), value for value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from distill.losses import terms


def student_unmapped(id_map: np.ndarray, student_vocab: int) -> np.ndarray:
  """bool [V_student]: the student ids no teacher token maps to
  (``id_map``: a student id per teacher id, e.g. each one's first piece)."""
  out = np.ones(student_vocab, bool)
  out[id_map[(id_map >= 0) & (id_map < student_vocab)]] = False
  return out


def uld_per_token(logits, unmapped_probs, unmapped_ids, temperature=1.0):
  """Sum over ranks of |p_sorted - q_sorted|: the teacher's unmapped
  probabilities [B, T, k] (descending, zero-padded) against the student's
  k largest probabilities on ``unmapped_ids`` (bool [V]). -> [B, T]."""
  k = unmapped_probs.shape[-1]
  q = jax.nn.softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  q = jnp.where(jnp.asarray(unmapped_ids), q, 0.0)
  top = jax.lax.top_k(q, min(k, q.shape[-1]))[0]
  p = jax.lax.stop_gradient(unmapped_probs.astype(jnp.float32))
  return jnp.sum(jnp.abs(p[..., : top.shape[-1]] - top), axis=-1)


def vocab_uld_per_token(
    logits,
    ids,
    log_probs,
    unmapped_probs,
    aligned,
    unmapped_ids: np.ndarray | None,
    temperature=1.0,
    uld_weight=1.0,
    counts=None,
    labels=None,
):
  """KD at the labels with a projected target, 0 elsewhere: the sparse KL
  over the projected top-k (``log_probs``, -inf padding), or with
  ``counts`` (a projected sample) the sampled KL, plus ``uld_weight`` times
  ULD on the unprojectable rest. Where the projection kept nothing (no
  draw, or no top-k id, agrees with the pieces so far: the teacher put the
  text's token outside them), the target is the text's own next piece,
  ``labels`` (all of it, at the same temperature), when given. -> [B, T]."""
  first = jnp.arange(ids.shape[-1]) == 0
  if counts is not None:
    empty = jnp.sum(counts, axis=-1) == 0
  else:
    empty = jnp.all(log_probs == -jnp.inf, axis=-1)
  if labels is not None:  # one draw (or all the mass) on the text's piece
    fill = empty[..., None] & first
    ids = jnp.where(fill, labels[..., None], ids)
    if counts is not None:
      counts = jnp.where(fill, 1.0, counts)
    else:
      log_probs = jnp.where(fill, 0.0, log_probs)
  # One softmax of the student's logits serves both cases.
  if counts is not None:
    kd = terms.sampled_kl_per_token(logits, ids, counts, temperature)
  else:
    kd = terms.sparse_kl_per_token(logits, ids, log_probs, temperature)
  if unmapped_ids is not None and np.any(unmapped_ids):
    kd = kd + uld_weight * uld_per_token(
        logits, unmapped_probs, unmapped_ids, temperature
    )
  return jnp.where(aligned, kd, 0.0)
