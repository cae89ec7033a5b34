"""Stage 4: train students: distilled from the teacher, and the CE baseline.

    python -m distill.train --config=experiments/stdlib.py --workdir=W [--run=NAME]

Each run in ``config.distill.runs`` (or only ``--run``) trains a student into
``W/student/<run>/`` (a model folder: ``config.json``, orbax checkpoints with
the data iterator state, ``metrics.jsonl``, TensorBoard events,
``summary.json``). The kinds of run:

==============  =======  ===================================================
run             mode     target and loss
==============  =======  ===================================================
``ce``          ce       hard labels only: the baseline
``online``      online   the teacher in the loop, full-vocabulary ``dense_kd``
``online_topk`` online   the teacher's top-k (``config.cache.k``) and tail,
                         computed on the fly, ``ghost_kl``
``sampled``     offline  cached sampled ids and counts, ``sampled_kl``
``topk_ghost``  offline  cached top-k and tail mass, ``ghost_kl``
``topk_sparse`` offline  cached top-k renormalised, ``sparse_kl``
==============  =======  ===================================================

Every run of one config sees the same packed rows in the same order (the CE
and online runs read the rows the cache covers, shuffled with the same seed),
so they differ only in the target. The loss is
``alpha * CE + (1 - alpha) * T^2 * KD``; offline runs use the cache's
temperature, online runs may follow a temperature schedule.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx

from data import cache, cache_format, pipeline
from data import tokenizer as tok
from distill import losses
from distill.core import checkpoint as ckpt
from distill.core import cli, configs, layout, sharding
from distill.core.errors import UserError
from distill.evals import validation
from distill.training import loop as trainer
from student import config as student_config
from student.model import Student
from teacher import load_teacher


@dataclasses.dataclass(frozen=True)
class RunKind:
  """What a run learns from: its mode, cached target and KD loss."""

  mode: str  # ce | online | offline
  target: str | None = None  # offline: topk | sample
  loss: str | None = None  # sparse_kl | ghost_kl | sampled_kl | dense


RUN_KINDS = {
    "ce": RunKind("ce"),
    "online": RunKind("online", loss="dense"),
    "online_topk": RunKind("online", "topk", "ghost_kl"),
    "sampled": RunKind("offline", "sample", "sampled_kl"),
    "topk_ghost": RunKind("offline", "topk", "ghost_kl"),
    "topk_sparse": RunKind("offline", "topk", "sparse_kl"),
}

_RUN = flags.DEFINE_string(
    "run", None, "Train only this run of config.distill.runs."
)


def model_config(config, vocab_size: int) -> student_config.StudentConfig:
  return configs.from_preset(
      student_config.PRESETS,
      config.student.preset,
      config.student.model,
      what="student",
      vocab_size=vocab_size,
  )


def loop_config(config) -> trainer.LoopConfig:
  """The students' optimisation settings, ``config.distill.train``."""
  loop = configs.from_section(
      trainer.LoopConfig, config.distill.train, where="config.distill.train"
  )
  return dataclasses.replace(loop, replay_check_every=config.replay_check_every)


def student_vocab_size(workdir: str, teacher=None) -> int:
  """The student's vocabulary: the teacher's when there is one, else the tokenizer's.

  Hugging Face checkpoints pad their embedding past the tokenizer (Qwen3-MoE:
  151,936 rows for about 151.7k tokens; OLMoE: 50,304 for 50,280), and the
  student must score every id the teacher's targets can hold. A teacher with
  fewer rows than the tokenizer has tokens cannot have produced this data.
  """
  tokenizer_vocab = pipeline.prepared_vocab_size(workdir)
  if teacher is None:
    return tokenizer_vocab
  if teacher.config.vocab_size < tokenizer_vocab:
    raise UserError(
        f"The teacher in {workdir}/teacher has {teacher.config.vocab_size}"
        f" embedding rows but {layout.tokenizer_path(workdir)} has"
        f" {tokenizer_vocab} tokens: they were not made together. Prepare the"
        " data with the teacher's tokenizer (import the teacher first)."
    )
  return teacher.config.vocab_size


def run_kind(run: str) -> RunKind:
  if run not in RUN_KINDS:
    raise UserError(
        f"Unknown distillation run {run!r}; the runs are"
        f" {sorted(RUN_KINDS)}."
    )
  return RUN_KINDS[run]


def _schedules(d):
  alpha = losses.schedule(d.alpha_schedule, d.alpha, d.alpha_end, d.train.steps)
  temperature = losses.schedule(
      d.temperature_schedule, d.temperature, d.temperature_end, d.train.steps
  )
  return alpha, temperature


def loss_fn_for(
    kind: RunKind, d, cache_temperature: float | None = None, topk_k: int = 64
):
  """``loss_fn(model, batch, step, *frozen)`` for the trainer.

  ``topk_k`` is the k of the ``online_topk`` run (the cache's k).
  """
  alpha_at, temperature_at = _schedules(d)
  chunk = d.loss_chunk

  def loss_fn(model, batch, step, *frozen):
    x = pipeline.model_inputs(batch)
    hidden, _ = model.hidden(x["inputs"], x["segment_ids"], x["positions"])
    alpha = alpha_at(step)
    if kind.mode == "offline":  # The cache fixed the temperature.
      temperature = jnp.asarray(cache_temperature, jnp.float32)
    else:
      temperature = temperature_at(step)
    targets: dict[str, Any] = {"labels": x["labels"]}

    if kind.mode == "ce":

      def per_token(logits, t):
        return losses.cross_entropy_per_token(logits, t["labels"])

    elif kind.mode == "online":
      (teacher,) = frozen
      t_hidden, _ = teacher.hidden(
          x["inputs"], x["segment_ids"], x["positions"]
      )
      targets["teacher_hidden"] = jax.lax.stop_gradient(t_hidden)

      def per_token(logits, t):
        t_logits = teacher.logits_from_hidden(t["teacher_hidden"])
        if kind.target == "topk":  # What a top-k cache would have stored.
          log_p = jax.nn.log_softmax(t_logits / temperature, axis=-1)
          ids, log_probs, tail = cache_format.topk_targets(log_p, topk_k)
          kd = losses.ghost_kl_per_token(
              logits, ids, log_probs, tail, temperature
          )
        else:
          kd = losses.dense_kd_per_token(
              logits, t_logits, temperature, d.dense_kind, d.jsd_beta
          )
        ce = losses.cross_entropy_per_token(logits, t["labels"])
        return losses.mix_losses(ce, kd, alpha, temperature)

    else:
      # Cached targets are per position: [B, L, K] or [B, L], like the labels.
      targets.update(
          {
              k: batch[k]
              for k in ("ids", "log_probs", "tail", "counts")
              if k in batch
          }
      )

      def per_token(logits, t):
        if kind.loss == "sparse_kl":
          kd = losses.sparse_kl_per_token(
              logits, t["ids"], t["log_probs"], temperature
          )
        elif kind.loss == "ghost_kl":
          kd = losses.ghost_kl_per_token(
              logits, t["ids"], t["log_probs"], t["tail"], temperature
          )
        else:
          kd = losses.sampled_kl_per_token(
              logits, t["ids"], t["counts"], temperature
          )
        ce = losses.cross_entropy_per_token(logits, t["labels"])
        return losses.mix_losses(ce, kd, alpha, temperature)

    loss = losses.chunked_loss(
        hidden, model.logits_from_hidden, per_token, targets, x["mask"], chunk
    )
    return loss, {"alpha": alpha, "temperature": temperature}

  return loss_fn


def _teacher_or_none(workdir: str):
  path = layout.teacher_dir(workdir)
  if ckpt.latest_step(path) is None:
    return None
  return load_teacher(path)


def cache_expectations(config, target: str, teacher=None) -> dict[str, Any]:
  """What a logit cache must hold for an offline run on ``target``.

  The config's cache settings that shape the target (temperature, and k or
  N), and, when a teacher is in the workdir, its fingerprint: a cache that a
  different (or since retrained) teacher wrote is refused.
  """
  c = config.cache
  expect: dict[str, Any] = {"temperature": c.temperature}
  if target == "topk":
    expect["k"] = c.k
  else:
    expect["num_samples"] = c.num_samples
  if teacher is not None:
    expect["teacher_fingerprint"] = ckpt.fingerprint(teacher)
  return expect


def train_run(config, workdir: str, run: str) -> dict[str, Any]:
  """Trains one run on the mesh of ``config.mesh``; returns its summary
  (also ``summary.json``)."""
  with sharding.use(sharding.from_config(config)):
    return _train_run(config, workdir, run)


def _train_run(config, workdir: str, run: str) -> dict[str, Any]:
  kind = run_kind(run)
  d = config.distill
  data_dir = layout.data_dir(workdir)
  tokenizer_path = layout.tokenizer_path(workdir)
  teacher = _teacher_or_none(workdir)
  if kind.mode == "online" and teacher is None:
    raise UserError(
        f"Run {run!r} needs the teacher in {workdir}/teacher; run"
        " `python -m teacher.train` or `teacher.import_hf` first."
    )
  vocab_size = student_vocab_size(workdir, teacher)
  cfg = model_config(config, vocab_size)
  out_dir = layout.student_dir(workdir, run)
  # As config.json will hold them (tuples become lists), to compare on resume.
  settings = json.loads(
      json.dumps(
          {"run": run, **dataclasses.asdict(kind), "distill": d.to_dict()}
      )
  )
  loop_cfg = loop_config(config)
  data, seed = config.data, config.seed
  num_rows = None
  cache_temperature = None
  cache_dir = layout.cache_dir(workdir)
  has_cache = os.path.isfile(os.path.join(cache_dir, cache.MANIFEST))
  if kind.mode == "offline" or (d.same_rows_as_cache and has_cache):
    manifest = cache.read_manifest(cache_dir)
    num_rows = manifest["num_records"]
    cache_temperature = manifest["temperature"]
  if kind.mode == "offline":
    expect = cache_expectations(config, kind.target, teacher)
    expect.update(
        tokenizer_hash=tok.tokenizer_hash(tokenizer_path),
        vocab_size=vocab_size,
        seq_len=data.seq_len,
    )
    cache.check_matches(manifest, expect, cache_dir)
    make_iterator = lambda: iter(
        cache.make_dataset(
            cache_dir,
            expect=expect,
            target=kind.target,
            batch_size=data.batch_size,
            seed=seed,
            worker_count=data.worker_count,
        )
    )
  else:
    make_iterator = lambda: iter(
        pipeline.make_dataset(
            data_dir,
            "train",
            seq_len=data.seq_len,
            batch_size=data.batch_size,
            seed=seed,
            worker_count=data.worker_count,
            num_rows=num_rows,
        )
    )

  # Every input is checked: only now does the run get its folder.
  if os.path.isfile(os.path.join(out_dir, ckpt.CONFIG_FILE)):
    existing = ckpt.read_config(out_dir, kind="student")
    if (
        ckpt.what_it_computes(existing["model"]) != ckpt.what_it_computes(cfg)
        or existing.get("settings") != settings
    ):
      raise UserError(
          f"{out_dir} holds a run with another configuration; training would mix"
          " the two. Use a new --workdir or remove that folder to start over."
      )
  else:
    ckpt.write_config(
        out_dir,
        "student",
        cfg,
        settings=settings,
        tokenizer_hash=tok.tokenizer_hash(tokenizer_path),
    )

  model = Student(cfg, rngs=nnx.Rngs(seed))
  result = trainer.train(
      out_dir=out_dir,
      model=model,
      cfg=loop_cfg,
      desc=f"student {run}",
      loss_fn=loss_fn_for(kind, d, cache_temperature, topk_k=config.cache.k),
      make_iterator=make_iterator,
      frozen=(teacher,) if kind.mode == "online" else (),
      eval_fn=validation.make_validation_fn(
          data_dir,
          seq_len=data.seq_len,
          batch_size=data.batch_size,
          max_batches=d.eval_batches,
          chunk_size=d.loss_chunk,
          teacher=teacher,
      ),
  )
  summary = trainer.summarize(
      out_dir,
      result,
      run=run,
      kind=dataclasses.asdict(kind),
      params=model.param_counts(),
  )
  if result.status == "finished":
    print(
        f"student {run}: validation loss"
        f" {summary.get('eval/loss', float('nan')):.3f}"
    )
  return summary


def train_all(config, workdir: str) -> dict[str, dict[str, Any]]:
  """Trains every run of ``config.distill.runs`` in order."""
  runs = list(config.distill.runs)
  for run in runs:
    run_kind(run)  # Fail on a typo before hours of training.
  return {run: train_run(config, workdir, run) for run in runs}


def main(argv):
  config, workdir = cli.setup(argv)
  if _RUN.value:
    train_run(config, workdir, _RUN.value)
  else:
    train_all(config, workdir)


if __name__ == "__main__":
  cli.run(main)
