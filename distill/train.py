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
``topk_tail``   offline  cached top-k head exact plus draws from the teacher
                         outside it, scaled by the tail mass,
                         ``topk_tail_kl`` (unbiased for the forward KL)
==============  =======  ===================================================

These are presets. A run can also be given by its parts, so that a sweep
needs no code: a preset with parts changed, ``sampled@n=16`` (16 of the
cached draws), ``topk_sparse@k=8`` (the first 8 cached ids), ``topk_tail@m=16``
(16 of the cached tail draws), or every part,
``mode=offline,target=topk,loss=ghost_kl,k=16``. Its folder is the spec with
``@`` and ``,`` as ``_`` and ``=`` dropped (``W/student/sampled_n16``). The
part ``q=int8`` (or fp8, int4, int8_dynamic) makes a run quantisation-aware:
the student trains through fake quantisation of its projections
(``student.quantize``) and its folder loads as the quantised model.

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
from student import quantize
from student.model import Student
from teacher import load_teacher


@dataclasses.dataclass(frozen=True)
class RunKind:
  """What a run learns from: its mode, cached target and KD loss, and how
  much of the cached target it reads (None: all of it; see
  ``data.cache.TargetView``)."""

  mode: str  # ce | online | offline
  target: str | None = None  # offline: topk | sample | topk_tail
  # sparse_kl | ghost_kl | sampled_kl | topk_tail_kl | dense
  loss: str | None = None
  k: int | None = None  # topk: the first k of the cached k ids
  n: int | None = None  # sample: n of the cached N draws
  m: int | None = None  # topk_tail: m of the cached M tail draws
  # Quantisation-aware: train through fake quantisation of this scheme
  # (``student.quantize``); the run's folder then loads quantised.
  q: str | None = None

  def settings(self) -> dict[str, Any]:
    """The run's parts as its folder records them (unset sizes left out)."""
    parts = dataclasses.asdict(self)
    return {
        key: value
        for key, value in parts.items()
        if value is not None or key not in (*SIZES, "q")
    }

  def view(self, seed: int) -> cache.TargetView | None:
    if self.k is None and self.n is None and self.m is None:
      return None
    return cache.TargetView(self.k, self.n, self.m, seed)


#: The size each offline target can be read at (``RunKind`` fields).
SIZES = {"k": "topk", "n": "sample", "m": "topk_tail"}
#: The KD losses each target (offline) or mode (online) can train with.
LOSSES = {
    "topk": ("ghost_kl", "sparse_kl"),
    "sample": ("sampled_kl",),
    "topk_tail": ("topk_tail_kl",),
}

#: Named runs (presets); a run spec can start from one and change its parts.
RUN_KINDS = {
    "ce": RunKind("ce"),
    "online": RunKind("online", loss="dense"),
    "online_topk": RunKind("online", "topk", "ghost_kl"),
    "sampled": RunKind("offline", "sample", "sampled_kl"),
    "topk_ghost": RunKind("offline", "topk", "ghost_kl"),
    "topk_sparse": RunKind("offline", "topk", "sparse_kl"),
    "topk_tail": RunKind("offline", "topk_tail", "topk_tail_kl"),
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
  """The RunKind a run spec names.

  A spec is a preset name (``RUN_KINDS``: "sampled"), a preset with some
  parts changed ("sampled@n=16", "topk_sparse@k=8", "topk_tail@m=16"), or
  every part given ("mode=offline,target=sample,loss=sampled_kl,n=8").
  Parts: mode, target, loss, and the size read of the cached target: k
  (top-k ids), n (sample draws) or m (tail draws), at most what the cache
  holds. Raises UserError naming what is wrong.
  """
  preset, _, rest = run.partition("@")
  if "=" in preset:  # every part given
    preset, rest = None, run
  if preset is not None and preset not in RUN_KINDS:
    raise UserError(
        f"Unknown distillation run {run!r}; the named runs are"
        f" {sorted(RUN_KINDS)}, and a run may change their parts"
        " (e.g. 'sampled@n=16') or give them all"
        " ('mode=offline,target=topk,loss=sparse_kl,k=8')."
    )
  if not rest:
    return RUN_KINDS[preset]
  parts = dataclasses.asdict(RUN_KINDS[preset]) if preset else {}
  for item in rest.split(","):
    key, eq, value = item.partition("=")
    if not eq or key not in ("mode", "target", "loss", "q", *SIZES):
      raise UserError(
          f"Run {run!r}: {item!r} is not key=value with a key of mode,"
          " target, loss, k, n, m or q."
      )
    if key in SIZES:
      if not value.isdigit() or int(value) < 1:
        raise UserError(f"Run {run!r}: {key}={value!r} must be an integer >= 1")
      parts[key] = int(value)
    else:
      parts[key] = value
  if "mode" not in parts:
    raise UserError(f"Run {run!r}: give its mode (ce, online or offline)")
  kind = RunKind(**parts)
  _check_kind(run, kind)
  return kind


def _check_kind(run: str, kind: RunKind) -> None:
  bad = lambda why: UserError(f"Run {run!r}: {why}")
  if kind.q is not None and kind.q not in quantize.SCHEMES:
    raise bad(f"q={kind.q!r}; use one of {sorted(quantize.SCHEMES)}")
  if kind.mode not in ("ce", "online", "offline"):
    raise bad(f"mode={kind.mode!r}; use ce, online or offline")
  sizes = [key for key in SIZES if getattr(kind, key) is not None]
  if kind.mode == "ce":
    if kind.target or kind.loss or sizes:
      raise bad(
          "a ce run learns from labels only; give no target, loss or size"
      )
    return
  if kind.mode == "online":
    if (kind.target, kind.loss) not in ((None, "dense"), ("topk", "ghost_kl")):
      raise bad("an online run uses loss=dense, or target=topk with ghost_kl")
    if sizes:
      raise bad("an online run reads no cache; give no k, n or m")
    return
  if kind.target not in LOSSES:
    raise bad(f"target={kind.target!r}; use one of {sorted(LOSSES)}")
  if kind.loss not in LOSSES[kind.target]:
    raise bad(
        f"loss={kind.loss!r} does not fit target={kind.target!r};"
        f" use {' or '.join(LOSSES[kind.target])}"
    )
  for key in sizes:
    if SIZES[key] != kind.target:
      raise bad(f"{key} sizes a {SIZES[key]} target, not {kind.target}")


run_folder = layout.run_folder  # a run spec's folder under W/student


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
              for k in (
                  "ids",
                  "log_probs",
                  "tail",
                  "counts",
                  "tail_ids",
                  "tail_counts",
              )
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
        elif kind.loss == "topk_tail_kl":
          kd = losses.topk_tail_kl_per_token(
              logits,
              t["ids"],
              t["log_probs"],
              t["tail"],
              t["tail_ids"],
              t["tail_counts"],
              temperature,
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
  elif target == "topk_tail":
    expect.update(tail_k=c.tail_k, tail_samples=c.tail_samples)
  else:
    expect["num_samples"] = c.num_samples
  if teacher is not None:
    expect["teacher_fingerprint"] = ckpt.fingerprint(teacher)
  return expect


def _check_sizes(run: str, kind: RunKind, manifest: dict[str, Any]) -> None:
  """Refuses a view larger than the cached target."""
  cached = {
      "k": manifest.get("k"),
      "n": manifest.get("num_samples"),
      "m": manifest.get("tail_samples"),
  }
  for key in SIZES:
    want = getattr(kind, key)
    if want is not None and want > (cached[key] or 0):
      raise UserError(
          f"Run {run!r} reads {key}={want} but the cache holds"
          f" {cached[key]}: lower it, or cache more (config.cache)."
      )


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
  out_dir = layout.student_dir(workdir, run_folder(run))
  # As config.json will hold them (tuples become lists), to compare on resume.
  # Which other runs the config lists is not this run's business.
  distill_settings = {k: v for k, v in d.to_dict().items() if k != "runs"}
  settings = json.loads(
      json.dumps({"run": run, **kind.settings(), "distill": distill_settings})
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
    _check_sizes(run, kind, manifest)
    make_iterator = lambda: iter(
        cache.make_dataset(
            cache_dir,
            expect=expect,
            target=kind.target,
            view=kind.view(seed),
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
  if kind.q is not None:  # the same parameters, seen through fake quantisation
    model = quantize.quantize(model, kind.q, qat=True)
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
      kind=kind.settings(),
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
