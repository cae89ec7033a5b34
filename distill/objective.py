"""What a distillation run minimises: ``loss_fn_for(kind, ...)``.

One function per run kind (``distill.runs.RunKind``) for the training loop:
the student's hidden states once, then the loss over sequence chunks
(``distill.losses.chunked_loss``) with the per-token term of the run:

- ce: cross-entropy on the labels;
- online: ``alpha * CE + (1 - alpha) * T^2 * KD`` against the teacher in
  the step (full vocabulary, or its top-k with the tail as one class), plus
  the feature term (``distill.features``) when the run has one;
- offline: the same mix against the batch's cached target, at the cache's
  temperature;
- offline across tokenizers, on the student's own tokens: loss ``alm``
  (target ``label``), ``alm_alpha * CE + (1 - alm_alpha) * ALM``, ALM
  matching the teacher's likelihood of each aligned chunk of text
  (``distill.losses.alm``); loss ``vocab_uld`` (target ``sample`` or
  ``topk``), the offline mix above with the teacher's target projected
  onto the student's tokens plus ULD on what cannot be
  (``distill.losses.vocab``); the settings are
  ``config.distill.cross_tokenizer``;
- on_policy: an offline batch as above; a batch of the student's own
  continuations (``distill.on_policy``) trains on ``T^2`` times the
  divergence to the teacher at the generated positions only.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from data import align, pipeline, sparse_targets
from distill import features, losses, on_policy
from distill.losses import alm
from distill.losses import vocab
from distill.runs import RunKind


def _schedules(d):
  alpha = losses.schedule(d.alpha_schedule, d.alpha, d.alpha_end, d.train.steps)
  temperature = losses.schedule(
      d.temperature_schedule, d.temperature, d.temperature_end, d.train.steps
  )
  return alpha, temperature


_CACHED_KEYS = (
    "ids", "log_probs", "tail", "counts", "tail_ids", "tail_counts",
    "unmapped_probs", "aligned",
)  # fmt: skip


def _cached_kd(kind: RunKind, logits, t, temperature, cross=None):
  """The KD term of an offline batch: its cached target's loss (``cross``:
  ``(unmapped student ids, ULD weight)`` of a vocab_uld run)."""
  if kind.loss == "vocab_uld":
    unmapped_ids, weight = cross
    return vocab.vocab_uld_per_token(
        logits,
        t["ids"],
        t.get("log_probs"),
        t["unmapped_probs"],
        t["aligned"],
        unmapped_ids,
        temperature,
        weight,
        counts=t.get("counts"),
        labels=t["labels"],
    )
  if kind.loss == "sparse_kl":
    return losses.sparse_kl_per_token(
        logits, t["ids"], t["log_probs"], temperature
    )
  if kind.loss == "ghost_kl":
    return losses.ghost_kl_per_token(
        logits, t["ids"], t["log_probs"], t["tail"], temperature
    )
  if kind.loss == "topk_tail_kl":
    return losses.topk_tail_kl_per_token(
        logits,
        t["ids"],
        t["log_probs"],
        t["tail"],
        t["tail_ids"],
        t["tail_counts"],
        temperature,
    )
  return losses.sampled_kl_per_token(logits, t["ids"], t["counts"], temperature)


def loss_fn_for(
    kind: RunKind,
    d,
    cache_temperature: float | None = None,
    topk_k: int = 64,
    *,
    on_policy_cfg: on_policy.OnPolicyConfig | None = None,
    feature_pairs: tuple[tuple[int, int], ...] = (),
    feature_weight: float = 1.0,
    cross_cfg: dict[str, float] | None = None,
    unmapped_ids=None,
    pieces=None,
):
  """``loss_fn(model, batch, step, *frozen, extras=None)`` for the trainer.

  ``topk_k`` is the k of the ``online_topk`` run (the cache's k);
  ``on_policy_cfg`` how an on_policy run scores its on-policy batches (those
  with ``on_policy.MASK``); ``feature_pairs`` the (student, teacher) blocks
  of a run with feature distillation, whose projections are ``extras``, and
  ``feature_weight`` its term's weight; ``cross_cfg``
  (``config.distill.cross_tokenizer``) and ``unmapped_ids`` (bool [V]: the
  student ids no teacher token maps to) those of a cross-tokenizer run, and
  ``pieces`` (``data.align.teacher_pieces``) an online vocab_uld run's.
  """
  alpha_at, temperature_at = _schedules(d)
  chunk = d.loss_chunk
  student_blocks = tuple(s for s, _ in feature_pairs)
  teacher_blocks = tuple(t for _, t in feature_pairs)

  def loss_fn(model, batch, step, *frozen, extras=None):
    x = pipeline.model_inputs(batch)
    hidden, aux = model.hidden(
        x["inputs"], x["segment_ids"], x["positions"], features=student_blocks
    )
    if kind.loss == "alm":
      teacher = frozen[0] if kind.mode == "online" else None
      return _alm_loss(model, hidden, x, batch, cross_cfg or {}, chunk, teacher)
    alpha = alpha_at(step)
    generated = on_policy.MASK in batch  # the student's own continuations
    if kind.reads_cache and not generated:  # The cache fixed the temperature.
      temperature = jnp.asarray(cache_temperature, jnp.float32)
    else:
      temperature = temperature_at(step)
    targets: dict[str, Any] = {"labels": x["labels"]}
    mask = batch[on_policy.MASK] if generated else x["mask"]
    metrics = {"alpha": alpha, "temperature": temperature}
    t_aux: dict[str, Any] = {}
    if kind.cross_tokenizer and kind.mode == "online":  # vocab_uld
      (teacher,) = frozen
      targets.update(
          _teacher_at_student_labels(teacher, batch),
          aligned=batch["aligned"],
          piece_depth=batch["piece_depth"],
          piece_prefix=batch["piece_prefix"],
      )
    elif kind.needs_teacher and (kind.mode == "online" or generated):
      (teacher,) = frozen
      t_hidden, t_aux = teacher.hidden(
          x["inputs"],
          x["segment_ids"],
          x["positions"],
          features=teacher_blocks,
      )
      targets["teacher_hidden"] = jax.lax.stop_gradient(t_hidden)

    if kind.mode == "ce":
      per_token = _ce_per_token
    elif kind.cross_tokenizer and kind.mode == "online":
      per_token = _online_vocab_per_token(
          teacher, topk_k, (alpha, temperature), cross_cfg or {},
          unmapped_ids, pieces,
      )  # fmt: skip
    elif generated:  # No labels of the corpus: the divergence alone.
      per_token = _on_policy_per_token(teacher, on_policy_cfg, temperature)
    elif kind.mode == "online":
      per_token = _online_per_token(
          teacher, kind, d, topk_k, alpha, temperature
      )
    else:
      # Cached targets are per position: [B, L, K] or [B, L], like the labels.
      targets.update({k: batch[k] for k in _CACHED_KEYS if k in batch})
      cross = (unmapped_ids, (cross_cfg or {}).get("uld_weight", 1.0))
      per_token = _offline_per_token(kind, alpha, temperature, cross)
    loss = losses.chunked_loss(
        hidden, model.logits_from_hidden, per_token, targets, mask, chunk
    )
    if kind.mode == "on_policy":
      metrics["on_policy"] = jnp.float32(generated)
    if feature_pairs:
      term = features.feature_loss(
          extras, aux["features"], t_aux["features"], x["mask"], kind.feat
      )
      metrics["feature_loss"] = term
      loss = loss + feature_weight * term
    return loss, metrics

  return loss_fn


def _teacher_inputs(batch):
  """The teacher's own row of a cross-tokenizer online batch, as
  ``pipeline.model_inputs`` gives it."""
  return pipeline.model_inputs(
      {
          "tokens": batch["teacher_tokens"],
          "segment_ids": batch["teacher_segment_ids"],
          "positions": batch["teacher_positions"],
      }
  )


def _teacher_at_student_labels(teacher, batch):
  """The teacher's hidden states on its own row, taken at the position
  aligned with each student label (``teacher_position``)."""
  t = _teacher_inputs(batch)
  hidden, _ = teacher.hidden(t["inputs"], t["segment_ids"], t["positions"])
  picked = jnp.take_along_axis(
      hidden, batch["teacher_position"][..., None], axis=1
  )
  return {"teacher_hidden": jax.lax.stop_gradient(picked)}


def _online_vocab_per_token(teacher, k, mix, cfg, unmapped_ids, pieces):
  """vocab_uld against the teacher's top-k computed in the step (as the
  cache would store it) and projected onto the student's next token as the
  host projects a cached one, mixed with CE (``mix``: alpha,
  temperature)."""
  alpha, temperature = mix
  table = jnp.asarray(pieces)

  def per_token(logits, t):
    t_logits = teacher.logits_from_hidden(t["teacher_hidden"])
    log_p = jax.nn.log_softmax(t_logits / temperature, axis=-1)
    ids, log_probs, _ = sparse_targets.topk_targets(log_p, k)
    shape = ids.shape
    flat = lambda x: x.reshape(-1, *x.shape[2:])
    projected = align.project_topk(
        flat(ids),
        flat(log_probs),
        table,
        flat(t["piece_prefix"]),
        flat(t["piece_depth"]),
        xp=jnp,
    )
    ids, log_probs, unmapped = (x.reshape(shape) for x in projected)
    kd = vocab.vocab_uld_per_token(
        logits,
        ids,
        log_probs,
        unmapped,
        t["aligned"],
        unmapped_ids,
        temperature,
        cfg.get("uld_weight", 1.0),
        labels=t["labels"],
    )
    ce = losses.cross_entropy_per_token(logits, t["labels"])
    return losses.mix_losses(ce, kd, alpha, temperature)

  return per_token


def _alm_loss(model, hidden, x, batch, cfg, chunk, teacher=None):
  """A cross-tokenizer batch (``data.align.CrossTokenizerRows``): CE on the
  student's own labels mixed with ALM on the aligned chunks; one pass over
  the output layer gives both. ``teacher``: an online run's, whose label
  log-probs on its own row are summed per chunk here."""
  log_p = alm.label_log_probs(
      hidden, model.logits_from_hidden, x["labels"], chunk
  )
  if teacher is None:
    teacher_chunks = batch["chunk_log_probs"]
  else:
    t = _teacher_inputs(batch)
    t_hidden, _ = teacher.hidden(t["inputs"], t["segment_ids"], t["positions"])
    t_log_p = alm.label_log_probs(
        jax.lax.stop_gradient(t_hidden),
        teacher.logits_from_hidden,
        t["labels"],
        chunk,
    )
    teacher_chunks = jax.lax.stop_gradient(
        alm.chunk_log_likelihoods(
            t_log_p, batch["teacher_chunk"], batch["chunk_valid"].shape[1]
        )
    )
  alpha = jnp.float32(cfg.get("alm_alpha", 0.5))
  ce = -losses.masked_mean(log_p, x["mask"])
  term, chunks = alm.alm_loss(
      log_p,
      batch["chunk"],
      teacher_chunks,
      batch["chunk_valid"],
      cfg.get("alm_tau", 1.0),
  )
  loss = alpha * ce + (1.0 - alpha) * term
  return loss, {"alpha": alpha, "ce": ce, "alm": term, "chunks": chunks}


# Per-token losses: ``per_token(logits [B, c, V], targets of the chunk) ->
# [B, c]``, as ``losses.chunked_loss`` calls them.


def _ce_per_token(logits, t):
  return losses.cross_entropy_per_token(logits, t["labels"])


def _on_policy_per_token(teacher, cfg: on_policy.OnPolicyConfig, temperature):
  """The divergence to the teacher on the student's own tokens (no labels
  of the corpus): over the full vocabulary, or the teacher's top-k and its
  tail."""

  def per_token(logits, t):
    t_logits = teacher.logits_from_hidden(t["teacher_hidden"])
    if cfg.target == "topk":
      log_p = jax.nn.log_softmax(t_logits / temperature, axis=-1)
      ids, log_probs, tail = sparse_targets.topk_targets(log_p, cfg.k)
      kd = losses.ghost_kd_per_token(
          logits, ids, log_probs, tail, temperature, cfg.divergence, cfg.beta
      )
    else:
      kd = losses.dense_kd_per_token(
          logits, t_logits, temperature, cfg.divergence, cfg.beta
      )
    return jnp.square(temperature) * kd

  return per_token


def _online_per_token(teacher, kind: RunKind, d, topk_k, alpha, temperature):
  """KD to the teacher in the loop (its full distribution, or what a top-k
  cache would have stored), mixed with CE."""

  def per_token(logits, t):
    t_logits = teacher.logits_from_hidden(t["teacher_hidden"])
    if kind.target == "topk":
      log_p = jax.nn.log_softmax(t_logits / temperature, axis=-1)
      ids, log_probs, tail = sparse_targets.topk_targets(log_p, topk_k)
      kd = losses.ghost_kl_per_token(logits, ids, log_probs, tail, temperature)
    else:
      kd = losses.dense_kd_per_token(
          logits, t_logits, temperature, d.dense_kind, d.jsd_beta
      )
    ce = losses.cross_entropy_per_token(logits, t["labels"])
    return losses.mix_losses(ce, kd, alpha, temperature)

  return per_token


def _offline_per_token(kind: RunKind, alpha, temperature, cross=None):
  """KD to the cached target, mixed with CE."""

  def per_token(logits, t):
    kd = _cached_kd(kind, logits, t, temperature, cross)
    ce = losses.cross_entropy_per_token(logits, t["labels"])
    return losses.mix_losses(ce, kd, alpha, temperature)

  return per_token
