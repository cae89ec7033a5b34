"""Cross-tokenizer distillation: a vocabulary mapping plus ULD.

Where the teacher's next token and the student's start at the same byte
(``data.align.starts``), both predict the text that follows one prefix, each
over its own vocabulary. Many tokens are spelled with the same bytes in both
(``data.align.vocab_map``): over those the teacher's top-k distribution is a
distribution over student ids, and the student learns it with the sparse KL
of same-tokenizer distillation (``sparse_kl_per_token``) - the exact
vocabulary mapping of TRL's GOLD trainer. The teacher's mass on tokens the
student cannot spell in one token is compared without a mapping, by sorted
probabilities: the L1 distance between the teacher's unmapped probabilities
and the student's largest probabilities on its ids no teacher token maps to,
each sorted (Universal Logit Distillation, Boizard et al. 2024; with one
vocabulary it is zero).

With one tokenizer every id maps to itself, every position is aligned and
the loss is the ``topk_sparse`` run's, value for value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from distill.losses import terms


def student_unmapped(id_map: np.ndarray, student_vocab: int) -> np.ndarray:
  """bool [V_student]: the student ids no teacher token maps to."""
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
):
  """KD at the aligned positions, 0 elsewhere: sparse KL over the mapped
  top-k ids (``log_probs`` -inf where unmapped) plus ``uld_weight`` times
  ULD on the rest. -> [B, T]."""
  kd = terms.sparse_kl_per_token(logits, ids, log_probs, temperature)
  if unmapped_ids is not None and np.any(unmapped_ids):
    kd = kd + uld_weight * uld_per_token(
        logits, unmapped_probs, unmapped_ids, temperature
    )
  return jnp.where(aligned, kd, 0.0)
