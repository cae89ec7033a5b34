"""Stage 4: train students: distilled from the teacher, and the CE baseline.

    python -m distill.train --config=experiments/stdlib.py --workdir=W [--run=NAME]

Each run in ``config.distill.runs`` (or only ``--run``) trains a student into
``W/student/<run>/`` (a model folder: ``config.json``, orbax checkpoints with
the data iterator state, ``metrics.jsonl``, TensorBoard events,
``summary.json``). The kinds of run:

==============  =========  =================================================
run             mode       target and loss
==============  =========  =================================================
``ce``          ce         hard labels only: the baseline
``online``      online     the teacher in the loop, full-vocabulary
                           ``dense_kd``
``online_topk`` online     the teacher's top-k (``config.cache.k``) and
                           tail, computed on the fly, ``ghost_kl``
``sampled``     offline    cached sampled ids and counts, ``sampled_kl``
``topk_ghost``  offline    cached top-k and tail mass, ``ghost_kl``
``topk_sparse`` offline    cached top-k renormalised, ``sparse_kl``
``topk_tail``   offline    cached top-k head exact plus draws from the
                           teacher outside it, scaled by the tail mass,
                           ``topk_tail_kl`` (unbiased for the forward KL)
``on_policy``   on_policy  the student's own continuations of prompts,
                           scored by the teacher in the loop (a share
                           ``lam`` of the steps; the others as ``sampled``;
                           ``distill.on_policy``)
==============  =========  =================================================

These are presets. A run can also be given by its parts (``distill.runs``),
so that a sweep needs no code: a preset with parts changed,
``sampled@n=16`` (16 of the cached draws), ``topk_sparse@k=8`` (the first 8
cached ids), ``topk_tail@m=16`` (16 of the cached tail draws),
``on_policy@lam=0.5``, or every part,
``mode=offline,target=topk,loss=ghost_kl,k=16``. Its folder is the spec with
``@`` and ``,`` as ``_`` and ``=`` dropped (``W/student/sampled_n16``). The
part ``q=int8`` (or fp8, int4, int8_dynamic) makes a run quantisation-aware:
the student trains through fake quantisation of its projections
(``student.quantize``) and its folder loads as the quantised model. The
part ``feat=cosine`` (or mse) adds feature distillation to an online run
(``distill.features``).

Starting from a student: ``from=sampled`` starts a run from the finished
run in ``W/student/sampled`` (listed before it), and ``--init_from=DIR``
(or ``config.distill.init_from``) every run this command trains from any
student model folder (a run, its ``best/``, an export). Such a run trains
for ``config.distill.continue_train`` (by default a shorter schedule at a
lower rate) with a fresh optimizer, so the recipe "offline KD, then a short
on-policy phase" is two runs of one config, and ``sampled@from=sampled``
(the same steps on the cache) is its control.

Every run of one config sees the same packed rows in the same order (the
first ``config.cache.max_rows`` rows, which the cache holds, shuffled with
the same seed; the CE and online runs read them whether or not the cache
exists yet, so the stages may run in any order), so they differ only in the
target. The loss is
``alpha * CE + (1 - alpha) * T^2 * KD``; offline runs use the cache's
temperature, online runs may follow a temperature schedule.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from absl import flags
from flax import nnx

from data import pipeline, student_vocab, token_bytes
from data import tokenizer as tok
from distill import features, on_policy, run_data
from distill.losses import vocab
from distill.objective import loss_fn_for
from distill.core import checkpoint as ckpt
from distill.core import cli, configs, layout, sharding
from distill.core.errors import UserError
from distill.evals import validation

# Run specs live in distill.runs; these names stay importable from here.
from distill.runs import (  # pylint: disable=unused-import
    LOSSES,
    RUN_KINDS,
    SIZES,
    RunKind,
    run_kind,
)
from distill.training import loop as trainer
from student import config as student_config
from student import quantize
from student.model import Student
from teacher import config as teacher_config
from teacher import load_teacher

_RUN = flags.DEFINE_string(
    "run", None, "Train only this run of config.distill.runs."
)
_INIT_FROM = flags.DEFINE_string(
    "init_from",
    None,
    "Start the run(s) from this student model folder (W/student/<run>, its"
    " best/ or an export) instead of random parameters; default"
    " config.distill.init_from.",
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


run_folder = layout.run_folder  # a run spec's folder under W/student


def _teacher_or_none(config, workdir: str):
  path = layout.teacher_dir(workdir)
  if ckpt.latest_step(path) is None:
    return None
  return load_teacher(path, **teacher_config.runtime_settings(config))


def on_policy_config(config, kind: RunKind) -> on_policy.OnPolicyConfig:
  """``config.distill.on_policy``, with the run's ``lam`` if it gives one."""
  cfg = configs.from_section(
      on_policy.OnPolicyConfig,
      config.distill.on_policy,
      where="config.distill.on_policy",
  )
  if kind.lam is not None:
    cfg = dataclasses.replace(cfg, lam=kind.lam)
  return cfg.check(run_data.rows_of(config, kind)[0])


def recorded_settings(
    run: str, kind: RunKind, d, init: dict[str, Any] | None
) -> dict[str, Any]:
  """What a run's folder records of how it was trained (compared on resume).

  The distillation settings that can change this run: not the config's list
  of other runs, and the on-policy, feature and continuation sections only
  for runs that use them (so a folder stays valid when they change or when
  a newer version adds such a section).
  """
  unused = {"runs", "init_from"}
  if kind.mode != "on_policy":
    unused.add("on_policy")
  if kind.feat is None:
    unused.add("features")
  if not kind.cross_tokenizer:
    unused.add("cross_tokenizer")
  if init is None:
    unused.add("continue_train")
  settings = {
      "run": run,
      **kind.settings(),
      "distill": {k: v for k, v in d.to_dict().items() if k not in unused},
  }
  if init is not None:
    settings["init_from"] = init
  # As config.json will hold them (tuples become lists).
  return json.loads(json.dumps(settings))


def _init_source(
    workdir: str, run: str, kind: RunKind, init_from: str | None
) -> str | None:
  """The model folder a run starts from, or None (random parameters)."""
  if kind.init is not None and init_from:
    raise UserError(
        f"Run {run!r} starts from W/student/{kind.init}; do not give"
        " --init_from (or config.distill.init_from) as well"
    )
  if kind.init is None:
    return init_from or None
  source = layout.student_dir(workdir, kind.init)
  if not trainer.is_finished(source):
    raise UserError(
        f"Run {run!r} starts from {source}, which has not finished training:"
        f" train that run first (list it before {run!r} in"
        " config.distill.runs)."
    )
  return source


def _initial_student(
    cfg: student_config.StudentConfig, seed: int, source: str | None
) -> tuple[Student, dict[str, Any] | None]:
  """A new student: random, or the parameters of ``source`` (its latest
  checkpoint) -> (model, what the run records of its start)."""
  model = Student(cfg, rngs=nnx.Rngs(seed))
  if source is None:
    return model, None
  payload = ckpt.read_config(source, kind="student")
  # A continuation may rescale its global layers' RoPE (rope=): the same
  # parameters, read at other positions.
  same = lambda c: {
      k: v
      for k, v in ckpt.what_it_computes(c).items()
      if k != "rope_global_scaling"
  }
  if same(payload["model"]) != same(cfg):
    raise UserError(
        f"The run would start from {source}, a student of another"
        " architecture than config.student describes; start from a run of"
        " this config."
    )
  step = ckpt.latest_step(source)
  model = ckpt.restore_params(source, model, step)
  record = {
      "path": os.path.abspath(source),
      "step": step,
      "fingerprint": ckpt.fingerprint(model),
  }
  return model, record


def train_run(
    config, workdir: str, run: str, init_from: str | None = None
) -> dict[str, Any]:
  """Trains one run on the mesh of ``config.mesh``; returns its summary
  (also ``summary.json``). ``init_from``: a student model folder to start
  from (default ``config.distill.init_from``; empty: random parameters)."""
  if init_from is None:
    init_from = config.distill.init_from
  with sharding.use(sharding.from_config(config)):
    return _train_run(config, workdir, run, init_from)


def _checked_needs(config, workdir, run, kind, teacher):
  """Refuses a run whose teacher or cached target is missing; returns its
  on-policy settings (None for other runs)."""
  if kind.needs_teacher and teacher is None:
    raise UserError(
        f"Run {run!r} needs the teacher in {workdir}/teacher; run"
        " `python -m teacher.train` or `teacher.import_hf` first."
    )
  policy = on_policy_config(config, kind) if kind.mode == "on_policy" else None
  if policy is not None and kind.target is None and policy.lam < 1:
    raise UserError(
        f"Run {run!r} has no cached target for its offline steps"
        f" (lam={policy.lam}); give one (on_policy's preset reads the"
        " sampled target) or set lam=1."
    )
  return policy


def _vocabulary(config, workdir: str, run: str, kind: RunKind, teacher):
  """(whether the run speaks the student's own tokenizer, the student's
  vocabulary size); a run that cannot speak it is refused."""
  own = student_vocab.own(config, kind.tok)
  if own and not student_vocab.own(config):
    raise UserError(
        f"Run {run!r} speaks the student's own tokenizer (tok=own), but"
        " config.student.tokenizer is 'teacher': give it one (e.g. 4096)."
    )
  if not own:
    return own, student_vocab_size(workdir, teacher)
  if not kind.any_tokenizer:
    raise UserError(
        f"Run {run!r} learns the teacher's distribution over the teacher's"
        " vocabulary, but this student has its own tokenizer"
        f" (config.student.tokenizer={student_vocab.setting(config)!r}):"
        " it can train ce, alm and vocab runs; add tok=teacher to train it"
        " on the teacher's."
    )
  return own, student_vocab.vocab_size(workdir, own)


def _cross_tokenizer_settings(config, workdir, kind, own, vocab_size):
  """``loss_fn_for``'s keywords of a cross-tokenizer run (none otherwise)."""
  if not kind.cross_tokenizer:
    return {}
  out = {"cross_cfg": dict(config.distill.cross_tokenizer)}
  if kind.loss == "vocab_uld":
    out["pieces"] = run_data.teacher_pieces(workdir, own)
    out["unmapped_ids"] = vocab.student_unmapped(
        out["pieces"][:, 0], vocab_size
    )
  return out


def _train_run(config, workdir: str, run: str, init_from) -> dict[str, Any]:
  kind = run_kind(run)
  d = config.distill
  teacher = _teacher_or_none(config, workdir)
  policy = _checked_needs(config, workdir, run, kind, teacher)
  own, vocab_size = _vocabulary(config, workdir, run, kind, teacher)
  cfg = model_config(config, vocab_size)
  if kind.rope is not None:
    cfg = dataclasses.replace(cfg, rope_global_scaling=kind.rope)
  seq_len, rows = run_data.rows_of(
      config, kind, student_vocab.seq_len(config, workdir, own)
  )
  feature_cfg = configs.from_section(
      features.FeatureConfig, d.features, where="config.distill.features"
  )
  pairs = ()
  if kind.feat is not None:
    pairs = features.resolve_pairs(
        feature_cfg.pairs, cfg.num_layers, teacher.config.num_layers
    )
  source = _init_source(workdir, run, kind, init_from)
  loop_cfg = loop_config(config)
  if source is not None:  # a continuation: its own, shorter schedule
    loop_cfg = dataclasses.replace(loop_cfg, **dict(d.continue_train))
  make_iterator, cache_temperature = run_data.batches(
      config, workdir, run, kind, teacher, vocab_size, own
  )
  model, init = _initial_student(cfg, config.seed, source)
  # Every input is checked: only now does the run get its folder.
  out_dir = _run_dir(
      workdir,
      run,
      cfg,
      recorded_settings(run, kind, d, init),
      student_vocab.tokenizer_path(workdir, own),
  )
  if kind.q is not None:  # the same parameters, seen through fake quantisation
    model = quantize.quantize(model, kind.q, qat=True)
  extras = None
  if pairs:  # learned maps to the teacher's width, not part of the student
    extras = features.Projections(
        len(pairs), cfg.d_model, teacher.config.d_model, seed=config.seed
    )
  result = trainer.train(
      out_dir=out_dir,
      model=model,
      cfg=loop_cfg,
      desc=f"student {run}",
      loss_fn=loss_fn_for(
          kind,
          d,
          cache_temperature,
          topk_k=config.cache.k,
          on_policy_cfg=policy,
          feature_pairs=pairs,
          feature_weight=feature_cfg.weight,
          **_cross_tokenizer_settings(config, workdir, kind, own, vocab_size),
      ),
      make_iterator=make_iterator,
      frozen=(teacher,) if kind.needs_teacher else (),
      eval_fn=validation.make_validation_fn(
          student_vocab.data_dir(workdir, own),
          seq_len=seq_len,
          batch_size=rows,
          max_batches=d.eval_batches,
          chunk_size=d.loss_chunk,
          # Another vocabulary: no KL to the teacher; bits per byte compare.
          teacher=None if own else teacher,
          byte_lengths=token_bytes.byte_lengths(
              tok.load_tokenizer(student_vocab.tokenizer_path(workdir, own))
          ),
      ),
      extras=extras,
      prepare=None
      if policy is None
      else on_policy.prepare_fn(policy, config.seed),
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


def _run_dir(
    workdir: str, run: str, cfg, settings: dict[str, Any], tokenizer_path: str
) -> str:
  """The run's folder, made with its config.json, or found holding this very
  run (the same model and settings: it resumes); any other is refused."""
  out_dir = layout.student_dir(workdir, run_folder(run))
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
  return out_dir


def train_all(
    config, workdir: str, init_from: str | None = None
) -> dict[str, dict[str, Any]]:
  """Trains every run of ``config.distill.runs`` in order."""
  runs = list(config.distill.runs)
  folders = []
  for run in runs:
    kind = run_kind(run)  # Fail on a typo before hours of training.
    if (
        kind.init is not None
        and kind.init not in folders
        and not trainer.is_finished(layout.student_dir(workdir, kind.init))
    ):
      raise UserError(
          f"Run {run!r} starts from W/student/{kind.init}, which no earlier"
          " run of config.distill.runs trains and which has not finished:"
          f" list the run of folder {kind.init!r} before it."
      )
    folders.append(run_folder(run))
  return {run: train_run(config, workdir, run, init_from) for run in runs}


def main(argv):
  config, workdir = cli.setup(argv)
  if _RUN.value:
    train_run(config, workdir, _RUN.value, _INIT_FROM.value)
  else:
    train_all(config, workdir, _INIT_FROM.value)


if __name__ == "__main__":
  cli.run(main)
