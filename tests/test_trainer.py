"""The shared training loop: learning, SIGTERM, exact resume, finished runs."""

import errno
import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from data import pipeline
from distill.core import checkpoint as ckpt
from distill.core import layout, stop
from distill import losses
from distill.training import loop as trainer


class Bigram(nnx.Module):
  """The smallest model with the trainer's interface."""

  def __init__(self, vocab, dim, rngs):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.head = nnx.Linear(dim, vocab, rngs=rngs)

  def hidden(self, tokens, segment_ids=None, positions=None):
    return self.embed(tokens), {}

  def logits_from_hidden(self, hidden):
    return self.head(hidden).astype(jnp.float32)


def loss_fn(model, batch, step, *frozen):
  x = pipeline.model_inputs(batch)
  hidden, _ = model.hidden(x["inputs"])
  ce = losses.cross_entropy(
      model.logits_from_hidden(hidden), x["labels"], x["mask"]
  )
  return ce, {"ce": ce}


@pytest.fixture(scope="module")
def data_dir(tiny_prepared):
  return layout.data_dir(tiny_prepared)


def _run(
    out_dir,
    data_dir,
    steps=8,
    kill_at=None,
    lr=3e-2,
    loss=loss_fn,
    eval_every=4,
    on_eval=None,
    replay_check_every=0,
    signum=signal.SIGTERM,
    log_every=1,
):
  if not os.path.isfile(os.path.join(out_dir, ckpt.CONFIG_FILE)):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, ckpt.CONFIG_FILE), "w") as f:
      f.write('{"kind": "test", "model": {}}')
  model = Bigram(512, 16, nnx.Rngs(0))
  cfg = trainer.LoopConfig(
      steps=steps,
      learning_rate=lr,
      warmup_steps=2,
      log_every=log_every,
      eval_every=eval_every,
      checkpoint_every=4,
      replay_check_every=replay_check_every,
  )
  seen = [0]

  def maybe_stop(batch):
    # grain reads ahead, so the signal lands a step or two after this fetch.
    seen[0] += 1
    if kill_at is not None and seen[0] == kill_at:
      os.kill(os.getpid(), signum)
    return batch

  def make_iterator():
    return iter(
        pipeline.make_dataset(
            data_dir,
            "train",
            seq_len=32,
            batch_size=4,
            seed=0,
            process_index=0,
            process_count=1,
        ).map(maybe_stop)
    )

  evals = []

  def eval_fn(model, step):
    evals.append(step)
    if on_eval is not None:
      on_eval(model, step)
    # A made-up validation curve with its minimum at step 12.
    return {"loss": abs(step - 12) + 1.0}

  result = trainer.train(
      out_dir=out_dir,
      model=model,
      loss_fn=loss,
      make_iterator=make_iterator,
      cfg=cfg,
      eval_fn=eval_fn,
  )
  return result, evals


def test_loss_falls_and_metrics_are_written(tmp_path, data_dir):
  result, evals = _run(str(tmp_path / "run"), data_dir, steps=30, lr=5e-2)
  assert result.status == "finished" and result.step == 30
  records = [
      r for r in trainer.read_metrics(str(tmp_path / "run")) if "loss" in r
  ]
  assert len(records) == 30
  assert np.mean([r["loss"] for r in records[-5:]]) < records[0]["loss"] - 0.5
  # Compilation is timed on its own and kept out of the throughput.
  first = {r["first_step_seconds"] for r in records}
  assert len(first) == 1 and first.pop() > 0
  assert "tokens_per_second" not in records[0]
  assert all(r["tokens_per_second"] > 0 for r in records[1:])
  assert evals == [4, 8, 12, 16, 20, 24, 28, 30]
  assert ckpt.latest_step(str(tmp_path / "run")) == 30
  assert os.listdir(tmp_path / "run" / "tb")
  best = str(tmp_path / "run" / trainer.BEST_DIR)
  assert ckpt.latest_step(best) == 12
  assert json.load(open(os.path.join(best, "best.json"))) == {
      "step": 12,
      "loss": 1.0,
  }
  restored = ckpt.restore_params(best, Bigram(512, 16, nnx.Rngs(5)))
  final = ckpt.restore_params(
      str(tmp_path / "run"), Bigram(512, 16, nnx.Rngs(5))
  )
  assert not np.allclose(restored.head.kernel[...], final.head.kernel[...])


def test_sigterm_then_resume_matches_running_through(tmp_path, data_dir):
  straight, _ = _run(str(tmp_path / "a"), data_dir)
  with pytest.raises(stop.Stopped) as stopped:
    _run(str(tmp_path / "b"), data_dir, kill_at=3)
  assert stopped.value.signum == signal.SIGTERM
  assert stopped.value.exit_status == 143
  step = ckpt.latest_step(str(tmp_path / "b"))
  assert 1 <= step < 8
  assert str(stopped.value) == (
      f"train: stopped by SIGTERM; checkpoint saved at step {step}. Rerun the"
      " same command to resume."
  )
  resumed, _ = _run(str(tmp_path / "b"), data_dir)
  assert resumed.status == "finished"
  want = {
      r["step"]: r["loss"]
      for r in trainer.read_metrics(str(tmp_path / "a"))
      if "loss" in r
  }
  got = {
      r["step"]: r["loss"]
      for r in trainer.read_metrics(str(tmp_path / "b"))
      if "loss" in r
  }
  assert sorted(got) == list(range(1, 9))
  for step in range(1, 9):
    assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), step


def test_a_stop_between_two_log_lines_logs_what_running_through_logs(
    tmp_path, data_dir
):
  """Logged metrics are means over the steps since the last log line: the
  checkpoint keeps the steps not logged yet, so a run stopped between two
  lines (here before step 4) writes the same records as one that was not."""
  read = lambda out: [
      {k: v for k, v in r.items() if k in ("step", "loss", "ce")}
      for r in trainer.read_metrics(out)
      if "loss" in r
  ]
  straight = str(tmp_path / "a")
  _run(straight, data_dir, log_every=4, eval_every=100)
  out = str(tmp_path / "b")
  with pytest.raises(stop.Stopped):
    _run(out, data_dir, log_every=4, eval_every=100, kill_at=1)
  assert 1 <= ckpt.latest_step(out) < 4  # between two log lines
  _run(out, data_dir, log_every=4, eval_every=100)
  assert read(out) == read(straight) and [r["step"] for r in read(out)] == [
      4,
      8,
  ]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_on_a_checkpoint_step_saves_it_once_and_stops(
    tmp_path, data_dir, signum
):
  """Step 4 is checkpointed by the schedule; a SIGTERM or Ctrl-C in its
  evaluation stops the run there (it once crashed saving step 4 twice), and
  the rerun goes on to the end."""

  def signal_at_4(model, step):
    del model
    if step == 4:
      os.kill(os.getpid(), signum)

  out = str(tmp_path / "run")
  with pytest.raises(stop.Stopped) as stopped:
    _run(out, data_dir, on_eval=signal_at_4)
  assert stopped.value.exit_status == 128 + signum
  assert "checkpoint saved at step 4" in str(stopped.value)
  assert sorted(os.listdir(os.path.join(out, ckpt.CHECKPOINT_DIR))) == ["4"]
  # The handlers are the caller's again once the loop has stopped.
  assert signal.getsignal(signal.SIGINT) is not stop._handle
  result, evals = _run(out, data_dir)
  assert result.status == "finished" and result.step == 8 and evals == [8]


def test_a_signal_on_the_last_step_lets_the_run_finish(tmp_path, data_dir):
  """A signal in the last step's evaluation: the run is complete, so it
  finishes (its caller writes the summary) and the stop comes at the next
  safe point, here the next check."""

  def signal_at_8(model, step):
    del model
    if step == 8:
      os.kill(os.getpid(), signal.SIGTERM)

  with stop.watching():
    result, _ = _run(str(tmp_path / "run"), data_dir, on_eval=signal_at_8)
    assert result.status == "finished" and result.step == 8
    with pytest.raises(stop.Stopped, match="next: stopped by SIGTERM"):
      stop.check("next")


def test_a_finished_run_without_its_summary_gets_it_on_rerun(
    tmp_path, data_dir
):
  """Stopped or killed between its last checkpoint and its summary, a run
  is finished; the rerun writes the summary the run would have written."""
  out = str(tmp_path / "run")
  result, _ = _run(out, data_dir)
  want = trainer.summarize(out, result, kind="test")
  os.remove(os.path.join(out, trainer.SUMMARY_FILE))
  again, _ = _run(out, data_dir)
  assert again.status == "already finished"
  assert trainer.summarize(out, again, kind="test") == want
  with open(os.path.join(out, trainer.SUMMARY_FILE)) as f:
    assert json.load(f) == want


def test_a_finished_run_is_not_trained_again(tmp_path, data_dir, capsys):
  _run(str(tmp_path / "run"), data_dir, steps=4)
  capsys.readouterr()
  result, evals = _run(str(tmp_path / "run"), data_dir, steps=4)
  assert result.status == "already finished" and not evals
  assert "nothing to do" in capsys.readouterr().out


def test_schedule_warms_up_and_decays():
  cfg = trainer.LoopConfig(
      steps=100,
      learning_rate=1.0,
      warmup_steps=10,
      end_learning_rate_fraction=0.1,
  )
  schedule = trainer.learning_rate_schedule(cfg)
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(100)) == pytest.approx(0.1)
  assert float(schedule(55)) < float(schedule(20))


def _nan_at(bad_steps):
  """loss_fn whose loss is NaN at the given (0-based) step values."""

  def loss(model, batch, step, *frozen):
    ce, metrics = loss_fn(model, batch, step, *frozen)
    bad = jnp.isin(step, jnp.asarray(bad_steps))
    return jnp.where(bad, jnp.nan, ce), metrics

  return loss


def test_a_non_finite_step_changes_nothing_and_is_counted(tmp_path, data_dir):
  kernels = {}

  def snapshot(model, step):
    kernels[step] = np.array(model.head.kernel[...])

  result, _ = _run(
      str(tmp_path / "run"),
      data_dir,
      steps=6,
      loss=_nan_at([2, 3]),  # the third and fourth steps
      eval_every=1,
      on_eval=snapshot,
  )
  assert result.status == "finished"
  np.testing.assert_array_equal(kernels[3], kernels[2])
  np.testing.assert_array_equal(kernels[4], kernels[2])
  assert not np.array_equal(kernels[5], kernels[4])
  records = {  # the training records (eval/ ones are written apart)
      r["step"]: r
      for r in trainer.read_metrics(str(tmp_path / "run"))
      if "learning_rate" in r
  }
  assert "loss" not in records[3] and "loss" not in records[4]  # no NaN logged
  assert records[2]["skipped_steps"] == 0 and records[6]["skipped_steps"] == 2
  assert all(np.isfinite(r["loss"]) for r in records.values() if "loss" in r)


def test_too_many_bad_steps_stop_in_one_line_and_keep_the_checkpoint(
    tmp_path, data_dir
):
  out = str(tmp_path / "run")
  with pytest.raises(ckpt.NonFiniteError) as error:
    _run(out, data_dir, steps=12, loss=_nan_at([5, 6, 7, 8, 9]))
  message = str(error.value)
  assert "3 steps in a row" in message and "at step 8" in message
  assert "non-finite loss (batch rows" in message
  assert "the last checkpoint, step 4, is kept" in message
  assert ckpt.latest_step(out) == 4
  restored = ckpt.restore_params(out, Bigram(512, 16, nnx.Rngs(5)))
  ckpt.check_finite(nnx.state(restored, nnx.Param), "restored")


def test_no_writer_saves_non_finite_parameters(tmp_path):
  model = Bigram(512, 16, nnx.Rngs(0))
  model.head.kernel[...] = model.head.kernel[...].at[0, 0].set(jnp.nan)
  with pytest.raises(ckpt.NonFiniteError, match="head.*nothing was written"):
    ckpt.save_params(str(tmp_path / "m"), model)
  assert not os.path.exists(tmp_path / "m" / ckpt.CHECKPOINT_DIR)


def test_a_run_killed_between_saving_its_best_and_recording_it_resumes(
    tmp_path, data_dir
):
  out = str(tmp_path / "run")
  _run(out, data_dir, steps=8)
  best = os.path.join(out, trainer.BEST_DIR)
  assert ckpt.latest_step(best) == 8
  want = ckpt.restore_params(best, Bigram(512, 16, nnx.Rngs(5)))
  # The kill: best/ holds step 8 but its record is gone, and the main
  # checkpoint is still at step 4.
  os.remove(os.path.join(best, "best.json"))
  shutil.rmtree(os.path.join(out, ckpt.CHECKPOINT_DIR, "8"))
  result, evals = _run(out, data_dir, steps=8)
  assert result.status == "finished" and evals == [8]
  assert ckpt.latest_step(best) == 8
  assert json.load(open(os.path.join(best, "best.json")))["step"] == 8
  got = ckpt.restore_params(best, Bigram(512, 16, nnx.Rngs(5)))
  np.testing.assert_array_equal(got.head.kernel[...], want.head.kernel[...])


def test_save_params_replaces_the_steps_a_killed_run_left_ahead(tmp_path):
  folder = str(tmp_path / "m")
  for step, seed in ((3, 0), (7, 1), (5, 2)):
    ckpt.save_params(folder, Bigram(512, 16, nnx.Rngs(seed)), step)
  assert ckpt.latest_step(folder) == 5
  got = ckpt.restore_params(folder, Bigram(512, 16, nnx.Rngs(9)))
  want = Bigram(512, 16, nnx.Rngs(2))
  np.testing.assert_array_equal(got.head.kernel[...], want.head.kernel[...])


def test_a_run_killed_before_its_first_checkpoint_logs_each_step_once(
    tmp_path, data_dir
):
  out = str(tmp_path / "run")
  os.makedirs(out)
  with open(os.path.join(out, trainer.METRICS_FILE), "w") as f:
    f.write('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n')
  _run(out, data_dir, steps=3)
  steps = [r["step"] for r in trainer.read_metrics(out) if "loss" in r]
  assert steps == [1, 2, 3]


def test_replayed_steps_match_bit_for_bit(tmp_path, data_dir):
  _run(str(tmp_path / "plain"), data_dir, steps=6)
  _run(str(tmp_path / "checked"), data_dir, steps=6, replay_check_every=2)
  losses_of = lambda out: [
      r["loss"] for r in trainer.read_metrics(out) if "loss" in r
  ]
  assert losses_of(str(tmp_path / "checked")) == losses_of(
      str(tmp_path / "plain")
  )


def test_a_step_that_differs_on_replay_stops_the_run(tmp_path, data_dir):
  calls = [0]

  def flaky():  # a value the host changes between two equal calls
    calls[0] += 1
    return np.float32(calls[0])

  def loss(model, batch, step, *frozen):
    ce, metrics = loss_fn(model, batch, step, *frozen)
    noise = jax.pure_callback(flaky, jax.ShapeDtypeStruct((), jnp.float32))
    return ce * (1.0 + 1e-3 * noise), metrics

  with pytest.raises(
      trainer.SilentCorruptionError, match="step 2 computed twice"
  ):
    _run(
        str(tmp_path / "run"),
        data_dir,
        steps=4,
        loss=loss,
        replay_check_every=2,
    )


def test_a_full_disk_while_checkpointing_loses_nothing(
    tmp_path, data_dir, monkeypatch
):
  save = ocp.CheckpointManager.save

  def full_at_step_8(self, step, *args, **kwargs):
    if step == 8:
      raise OSError(errno.ENOSPC, "No space left on device")
    return save(self, step, *args, **kwargs)

  _run(str(tmp_path / "straight"), data_dir, steps=12)
  out = str(tmp_path / "run")
  with monkeypatch.context() as patch:
    patch.setattr(ocp.CheckpointManager, "save", full_at_step_8)
    with pytest.raises(OSError):
      _run(out, data_dir, steps=12)
  assert ckpt.latest_step(out) == 4  # the last good checkpoint is intact
  result, _ = _run(out, data_dir, steps=12)  # space again: it resumes
  assert result.status == "finished"
  want = losses_by_step(str(tmp_path / "straight"))
  got = losses_by_step(out)
  assert sorted(got) == list(range(1, 13))
  for step in got:
    assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), step


def losses_by_step(out_dir):
  return {
      r["step"]: r["loss"]
      for r in trainer.read_metrics(out_dir)
      if "loss" in r and "learning_rate" in r
  }
