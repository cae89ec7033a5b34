"""The training loop shared by teacher pretraining and student distillation.

``train(...)`` owns everything around the step: AdamW with warmup + cosine and
gradient clipping, resumable orbax checkpoints that hold the parameters, the
optimizer state and the grain iterator state (so a resumed run sees exactly
the batches it would have seen), an eval hook every ``eval_every`` steps,
metrics to TensorBoard event files and ``metrics.jsonl``, the parameters of
the best evaluation kept in ``best/``, a progress bar, and SIGTERM and
Ctrl-C handling (save at the step, then raise ``distill.core.stop.Stopped``).
A run whose last checkpoint is at ``steps`` is finished, and calling
``train`` again does nothing.

The caller supplies the model, a ``loss_fn(model, batch, step) -> (loss,
metrics)`` and a factory for the training iterator; the output folder is a
model folder (see ``distill.core.checkpoint``), so ``load_teacher`` /
``load_student`` read it directly. Optionally: ``extras``, a module trained
with the model but kept out of its parameters (checkpointed as an item of
its own, never in ``best/`` or an export: feature distillation's
projections), and ``prepare``, which turns each batch into the one the step
trains on and may run the model (on-policy distillation's generation).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from tqdm import tqdm

from distill.core import checkpoint as ckpt
from distill.core import files, sharding, stop
from distill.training.records import (  # pylint: disable=unused-import
    METRICS_FILE,
    MetricsWriter,
    read_metrics,
    truncate_metrics,
)
from distill.training.optimizer import (  # pylint: disable=unused-import
    LoopConfig,
    learning_rate_schedule,
    make_optimizer,
)
from distill.training.replay import (  # pylint: disable=unused-import
    SilentCorruptionError,
    replayed_step,
)
from distill.training.state import (  # pylint: disable=unused-import
    DATA_STATE,
    EXTRAS,
    METER,
    State,
    WithExtras,
    restore,
    train_step_fn,
)

SUMMARY_FILE = "summary.json"


BEST_DIR = "best"


def _save_best(
    out_dir: str,
    model: nnx.Module,
    step: int,
    metrics: dict[str, float],
    key: str,
) -> bool:
  """Keeps ``out_dir/best/`` (a model folder) at the lowest ``metrics[key]``."""
  best_dir = os.path.join(out_dir, BEST_DIR)
  record_path = os.path.join(best_dir, "best.json")
  if key not in metrics:
    return False
  better = True
  if os.path.isfile(record_path):
    with open(record_path, encoding="utf-8") as f:
      better = json.load(f)[key] > metrics[key]
  # Every process saves (orbax writes one checkpoint from all), so all take
  # the main process's decision.
  if not sharding.main_says(better):
    return False
  if sharding.is_main():
    os.makedirs(best_dir, exist_ok=True)
    with open(os.path.join(out_dir, ckpt.CONFIG_FILE), encoding="utf-8") as f:
      files.write_text(os.path.join(best_dir, ckpt.CONFIG_FILE), f.read())
  ckpt.save_params(best_dir, model, step, max_to_keep=1)  # every process
  if sharding.is_main():
    files.write_json(record_path, {"step": step, key: metrics[key]})
  return True


@dataclasses.dataclass
class TrainResult:
  """How a call of ``train`` ended, and the metrics it logged last."""

  step: int
  status: str  # "finished" or "already finished"
  last_metrics: dict[str, float]


def _report_bad_step(desc, step, metrics, batch, in_a_row, cfg, mngr):
  """Logs a skipped non-finite step; stops the run after too many in a row.

  The message names the step, the loss terms that were not finite and the
  batch's rows (``row``: indices into the training rows), and says which
  checkpoint is kept: the skipped steps changed no parameter.
  """
  terms = sorted(
      k for k, v in metrics.items() if not math.isfinite(float(np.asarray(v)))
  )
  rows = batch.get("row")
  rows = "?" if rows is None else ", ".join(str(int(r)) for r in rows)
  terms = ", ".join(terms) or "parameters after the update"
  what = f"step {step}: non-finite {terms} (batch rows {rows})"
  logging.warning("%s: skipped %s", desc, what)
  if in_a_row >= cfg.max_bad_steps:
    kept = mngr.latest_step()
    raise ckpt.NonFiniteError(
        f"{desc}: {in_a_row} steps in a row were not finite, the last at"
        f" {what}; stopped (max_bad_steps={cfg.max_bad_steps}). No parameter"
        " was updated by them and no checkpoint was written from them"
        + (f"; the last checkpoint, step {kept}, is kept" if kept else "")
        + ". Lower the learning rate or check those rows."
    )


def is_finished(out_dir: str) -> bool:
  """True when the run in ``out_dir`` finished: its summary (written at the
  end) is of its latest checkpoint step."""
  path = os.path.join(out_dir, SUMMARY_FILE)
  if not os.path.isfile(path):
    return False
  with open(path, encoding="utf-8") as f:
    steps = json.load(f).get("steps")
  return steps is not None and steps == ckpt.latest_step(out_dir)


def summarize(
    out_dir: str, result: TrainResult, **fields: Any
) -> dict[str, Any]:
  """The run's summary, kept in ``out_dir/summary.json``.

  A run that has just finished writes ``fields``, its step count and its last
  metrics there; a run that was already finished returns what it wrote then.
  One that finished but was stopped or killed before its summary gets it
  now, its last metrics read from the records of its last step (the same
  values the run logged).
  """
  path = os.path.join(out_dir, SUMMARY_FILE)
  if result.status != "finished" and os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  last = dict(result.last_metrics)
  if result.status != "finished":
    for record in read_metrics(out_dir):
      if record["step"] == result.step:
        last.update({k: v for k, v in record.items() if k != "step"})
  summary = {**fields, "steps": result.step, **last}
  if sharding.is_main():
    files.write_json(path, summary)
  return summary


def train(
    *,
    out_dir: str,
    model: nnx.Module,
    loss_fn: Callable,
    make_iterator: Callable[[], Iterator],
    cfg: LoopConfig,
    eval_fn: Callable[[nnx.Module, int], dict[str, float]] | None = None,
    frozen: tuple[nnx.Module, ...] = (),
    best_metric: str | None = "loss",
    desc: str = "train",
    mesh: jax.sharding.Mesh | None = None,
    extras: nnx.Module | None = None,
    prepare: Callable[[nnx.Module, dict, int], dict] | None = None,
) -> TrainResult:
  """Trains ``model`` in place for ``cfg.steps`` steps, resuming if possible.

  Args:
    out_dir: the run's model folder; its ``config.json`` must already exist.
    model: the module to train (its initial parameters are used when there is
      no checkpoint yet).
    loss_fn: ``(model, batch, step, *frozen) -> (loss, metrics dict)``, traced
      under jit; gradients are taken with respect to ``model`` only.
    make_iterator: returns a fresh grain iterator over training batches.
    cfg: optimisation settings.
    eval_fn: ``(model, step) -> metrics``, called every ``cfg.eval_every`` steps
      and at the end; its metrics are written with an ``eval/`` prefix.
    frozen: modules the loss reads but does not train (the teacher in online
      distillation). They are jit arguments, not constants baked into the
      compiled step.
    best_metric: the eval metric (lower is better) whose best value's
      parameters are kept in ``out_dir/best/``, a model folder of its own,
      besides the last ``cfg.keep_checkpoints`` training checkpoints.
    mesh: the device mesh (default: the active one, else every device on
      ``fsdp``). The model, its optimizer state and ``frozen`` are placed on it
      by ``distill.core.sharding``'s rules; each batch the iterator yields is
      this process's rows of the global batch.
    extras: a module trained with ``model`` (one optimizer) whose parameters
      are not the model's: checkpointed as the item ``extras``, left out of
      ``best/`` and of anything that loads the folder as a model. With it,
      ``loss_fn`` is called with ``extras=`` the module as a keyword.
    prepare: ``(model, batch, step) -> batch``, called outside the step's
      gradient on each global batch (on the mesh) before the step; it may
      run the model (which is not differentiated through it) and return a
      batch of another structure (the step compiles once per structure).
  """
  mesh = mesh if mesh is not None else sharding.active() or sharding.make_mesh()
  mngr = ckpt.checkpoint_manager(out_dir, max_to_keep=cfg.keep_checkpoints)
  step = mngr.latest_step() or 0
  if step >= cfg.steps:
    print(
        f"{desc}: already finished at step {step} ({out_dir}); nothing to do."
    )
    mngr.close()
    return TrainResult(step, "already finished", {})
  writer = None
  try:
    with sharding.use(mesh):  # activations and the eval hook on it too
      state = State.place(model, extras, frozen, cfg, mesh)
      iterator = make_iterator()
      window = restore(mngr, out_dir, step, state, iterator) if step else []
      # Records past the checkpoint (all of them, without one) are of steps
      # the resumed run will take again.
      if sharding.is_main():
        truncate_metrics(out_dir, step)
        writer = MetricsWriter(out_dir)
      run = _Run(
          out_dir=out_dir,
          cfg=cfg,
          desc=desc,
          mesh=mesh,
          mngr=mngr,
          state=state,
          iterator=iterator,
          train_step=train_step_fn(
              loss_fn, extras is not None, state.placement
          ),
          frozen=tuple(frozen),
          prepare=prepare,
          eval_fn=eval_fn,
          best_metric=best_metric,
          writer=writer,
          window=window,
      )
      return run.from_step(step)
  finally:
    mngr.close()
    if writer is not None:
      writer.close()


# ----------------------------------------------------------------------------
# The loop


class _Meter:
  """What the steps since the last log line measured: their metrics (the
  finite ones), tokens per second after the first (compiling) step, and
  the steps skipped as not finite."""

  def __init__(self, desc: str):
    self.desc = desc
    self.window: list[dict[str, Any]] = []
    self.skipped = 0
    self.bad_in_a_row = 0
    self.tokens = 0
    self.started = time.time()
    self.first_step_s: float | None = None

  def count(self, metrics, finite: bool, tokens: int) -> None:
    if self.first_step_s is None:  # compilation, then one step
      self.first_step_s = time.time() - self.started
      logging.info(
          "%s: first step %.1f s (compilation included)",
          self.desc,
          self.first_step_s,
      )
      self.started = time.time()  # throughput after it
    else:
      self.tokens += tokens
    if finite:
      self.window.append(metrics)
      self.bad_in_a_row = 0
    else:
      self.skipped += 1
      self.bad_in_a_row += 1

  def means(self, learning_rate: float) -> dict[str, float]:
    """The window's mean metrics and the run's counters; starts a new
    window."""
    means = {
        k: float(np.mean([float(m[k]) for m in self.window]))
        for k in (self.window[0] if self.window else {})
    }
    means["learning_rate"] = learning_rate
    if self.tokens:  # steps after the first (compiling) one
      means["tokens_per_second"] = self.tokens / max(
          time.time() - self.started, 1e-9
      )
    means["first_step_seconds"] = self.first_step_s
    means["skipped_steps"] = float(self.skipped)
    self.window = []
    return means


def _due(step: int, every: int, last: int) -> bool:
  return step % every == 0 or step == last


@dataclasses.dataclass
class _Run:
  """One call of ``train``: the loop and what each of its steps does."""

  out_dir: str
  cfg: LoopConfig
  desc: str
  mesh: jax.sharding.Mesh
  mngr: Any
  state: State
  iterator: Any
  train_step: Callable
  frozen: tuple[nnx.Module, ...]
  prepare: Callable | None
  eval_fn: Callable | None
  best_metric: str | None
  writer: MetricsWriter | None
  window: list[dict[str, float]] = dataclasses.field(default_factory=list)
  meter: _Meter | None = None
  last: dict[str, float] = dataclasses.field(default_factory=dict)

  def from_step(self, step: int) -> TrainResult:
    """Steps from ``step`` to ``cfg.steps``. A SIGTERM or Ctrl-C stops it
    after the step it lands in: the step is checkpointed, then
    ``stop.Stopped`` is raised."""
    cfg = self.cfg
    meter = self.meter = _Meter(self.desc)
    meter.window = list(self.window)  # what the checkpoint had not logged
    with (
        stop.watching(),
        tqdm(
            total=cfg.steps,
            initial=step,
            desc=self.desc,
            unit="step",
            dynamic_ncols=True,
            disable=not sharding.is_main(),
        ) as bar,
    ):
      signum = stop.agreed()  # a signal during setup or an earlier run
      if signum is not None:
        raise stop.stopped(
            self.desc,
            signum,
            f"checkpoint saved at step {step}" if step else "nothing trained",
        )
      while step < cfg.steps:
        batch = next(self.iterator)
        metrics, finite, tokens = self.step(batch, step)
        step += 1
        meter.count(metrics, finite, tokens)
        if not finite:
          _report_bad_step(
              self.desc,
              step,
              metrics,
              batch,
              meter.bad_in_a_row,
              cfg,
              self.mngr,
          )
        bar.update(1)
        if _due(step, cfg.log_every, cfg.steps):
          self.log(step, meter, bar)
        if self.eval_fn is not None and _due(step, cfg.eval_every, cfg.steps):
          self.evaluate(step)
        if _due(step, cfg.checkpoint_every, cfg.steps):
          self.save(step)
        # Every process stops at the same step (the save is collective); a
        # run at its last step finishes (its summary is written) and the
        # stop comes at the next safe point.
        signum = stop.agreed()
        if signum is not None and step < cfg.steps:
          self.save(step)
          bar.close()
          raise stop.stopped(
              self.desc, signum, f"checkpoint saved at step {step}"
          )
    return TrainResult(step, "finished", self.last)

  def step(self, host_batch, step: int):
    """One optimisation step on this process's rows of a global batch ->
    (metrics, finite, tokens trained on)."""
    batch = sharding.put_batch(host_batch, self.mesh)
    if self.prepare is not None:
      batch = self.prepare(self.state.model, batch, step)
    args = (batch, jnp.asarray(step, jnp.int32), self.frozen)
    every = self.cfg.replay_check_every
    state = self.state
    if every and (step + 1) % every == 0:
      metrics, finite = replayed_step(
          self.train_step,
          state.trainable,
          state.optimizer,
          args,
          self.desc,
          step + 1,
      )
    else:
      metrics, finite = self.train_step(state.trainable, state.optimizer, *args)
    tokens = math.prod(batch["tokens"].shape) - len(batch["tokens"])
    return metrics, bool(finite), tokens  # bool() waits for the step

  def log(self, step: int, meter: _Meter, bar) -> None:
    means = meter.means(float(learning_rate_schedule(self.cfg)(step - 1)))
    if self.writer is not None:
      self.writer.write(step, means)
    if "loss" in means:
      bar.set_postfix(loss=f"{means['loss']:.3f}")
    self.last = means

  def evaluate(self, step: int) -> None:
    eval_metrics = self.eval_fn(self.state.model, step)
    if self.writer is not None:
      self.writer.write(step, eval_metrics, prefix="eval/")
    if self.best_metric:
      _save_best(
          self.out_dir, self.state.model, step, eval_metrics, self.best_metric
      )
    self.last.update({"eval/" + k: v for k, v in eval_metrics.items()})

  def save(self, step: int) -> None:
    """Checkpoints the state and the data position at ``step`` (once: a
    step already saved is not written again)."""
    if self.mngr.latest_step() == step:
      return
    state = self.state
    window = [
        {k: float(v) for k, v in m.items()}
        for m in (self.meter.window if self.meter else ())
    ]
    ckpt.check_finite(
        nnx.state(state.model, nnx.Param), f"{self.desc} at step {step}"
    )
    self.mngr.save(
        step,
        args=ocp.args.Composite(
            **state.items(ocp.args.StandardSave),
            **{DATA_STATE: ocp.args.JsonSave(self.iterator.get_state())},
            **{METER: ocp.args.JsonSave({"window": window})},
        ),
        force=True,
    )
    self.mngr.wait_until_finished()
