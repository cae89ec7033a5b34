"""Teacher pretraining binary: learns, resumes exactly, refuses mixed configs."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data import pipeline
from distill.core import checkpoint as ckpt
from distill.core import layout
from distill.core.errors import UserError
from experiments import stdlib
from teacher import train as teacher_train
from teacher.model import Teacher

import procs

TINY = "--config=experiments/stdlib.py:tiny"
# Long enough that a SIGTERM lands mid-run; logged every step.
OVERRIDES = [
    "--config.teacher.train.steps=40",
    "--config.teacher.train.log_every=1",
    "--config.teacher.train.checkpoint_every=50",
    "--config.teacher.train.eval_every=50",
]


@pytest.fixture(scope="module")
def prepared(tiny_prepared):
  return tiny_prepared


def _copy(prepared, path):
  shutil.copytree(prepared, path)
  return str(path)


@pytest.mark.slow  # ~70 s: two binaries, one stopped and resumed
def test_sigterm_and_resume_match_running_through(prepared, tmp_path):
  straight = _copy(prepared, tmp_path / "a")
  result = procs.binary(
      "teacher.train", TINY, f"--workdir={straight}", *OVERRIDES
  )
  assert result.returncode == 0, result.stderr[-2000:]
  want = procs.losses_by_step(
      os.path.join(straight, "teacher", "metrics.jsonl")
  )
  assert sorted(want) == list(range(1, 41))
  assert (
      sum(want[s] for s in range(36, 41))
      < sum(want[s] for s in range(1, 6)) - 0.5
  )

  stopped = _copy(prepared, tmp_path / "b")
  metrics = os.path.join(stopped, "teacher", "metrics.jsonl")
  code, out = procs.sigterm_after(
      "teacher.train",
      [TINY, f"--workdir={stopped}", *OVERRIDES],
      metrics,
      after_step=3,
  )
  assert code == 143 and "stopped by SIGTERM" in out, out[-2000:]
  stop_step = ckpt.latest_step(os.path.join(stopped, "teacher"))
  assert 3 <= stop_step < 40
  result = procs.binary(
      "teacher.train", TINY, f"--workdir={stopped}", *OVERRIDES
  )
  assert result.returncode == 0, result.stderr[-2000:]
  got = procs.losses_by_step(metrics)
  assert sorted(got) == list(range(1, 41))
  for step in range(1, 41):
    assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-5), step
  summary = json.load(open(os.path.join(stopped, "teacher", "summary.json")))
  assert summary["params"]["active"] < summary["params"]["total"]
  assert 0 < summary["eval/loss"] < 10


def test_other_config_is_refused_and_imported_teacher_is_kept(
    prepared, tmp_path
):
  workdir = _copy(prepared, tmp_path / "w")
  config = stdlib.get_config("tiny")
  config.teacher.train.steps = 2
  teacher_train.train(config, workdir)
  other = stdlib.get_config("tiny")
  other.teacher.model.num_layers = 3
  with pytest.raises(UserError, match="another configuration"):
    teacher_train.train(other, workdir)
  # A folder written by teacher.import_hf is never retrained.
  path = os.path.join(workdir, "teacher", ckpt.CONFIG_FILE)
  payload = json.load(open(path))
  payload["source"], payload["hf_dir"] = "import_hf", "/somewhere"
  json.dump(payload, open(path, "w"))
  assert teacher_train.train(other, workdir)["imported"]


def test_short_rows_first_then_the_long_ones(prepared, tmp_path):
  config = stdlib.get_config("tiny")
  assert pipeline.row_phases(config) == [(8, 32, 4)]  # off: one phase
  config.teacher.train.update(dict(steps=3, short_steps=2, short_seq_len=8))
  # As many tokens a step as a batch of config.data unless told.
  assert pipeline.row_phases(config) == [(2, 8, 16), (3, 32, 4)]
  config.teacher.train.short_batch_size = 8
  assert pipeline.row_phases(config) == [(2, 8, 8), (3, 32, 4)]
  # The long variant: 150 steps of 4 rows of 1,024 tokens, 30 of 8,192.
  long = stdlib.get_config("long")
  assert pipeline.row_phases(long) == [(150, 1024, 4), (180, 8192, 1)]
  for variant in stdlib.VARIANTS:  # every variant's schedule is valid
    pipeline.row_phases(stdlib.get_config(variant))
  workdir = _copy(prepared, tmp_path / "w")
  summary = teacher_train.train(config, workdir)
  assert np.isfinite(summary["eval/loss"])
  saved = os.path.join(
      workdir, "teacher", "checkpoints", "3", "data_state", "metadata"
  )
  state = json.load(open(saved))
  assert (state["phase"], state["taken"]) == (1, 1)
  for bad, match in (
      (dict(short_seq_len=32), "short_seq_len=32 must be in"),
      (dict(short_seq_len=0), "short_seq_len=0 must be in"),
      (dict(short_steps=3), "short_steps=3 must be in"),
      (dict(short_batch_size=-1), "short_batch_size=-1 must be at least 0"),
  ):
    wrong = stdlib.get_config("tiny")
    wrong.teacher.train.update(
        {**dict(steps=3, short_steps=2, short_seq_len=8), **bad}
    )
    with pytest.raises(UserError, match=match):
      teacher_train.train(wrong, str(tmp_path / "never"))
    assert not os.path.exists(tmp_path / "never" / "teacher")


def test_training_without_prepared_data_says_what_to_run(tmp_path):
  with pytest.raises(UserError, match="data.prepare"):
    teacher_train.train(stdlib.get_config("tiny"), str(tmp_path))


def test_expert_load_metrics_on_a_hand_built_routing():
  # Two layers, four experts, 8 assignments each. Layer 0: 4, 2, 2, 0;
  # layer 1: even. Relative to the uniform share (2 of 8): 2, 1, 1, 0 and 1s.
  load = np.array([[4, 2, 2, 0], [2, 2, 2, 2]])
  metrics = {
      k: float(v)
      for k, v in teacher_train.expert_load_metrics(jnp.asarray(load)).items()
  }
  assert metrics == pytest.approx(
      {
          "expert_load/0": 1.5,
          "expert_load/1": 1.0,
          "expert_load/2": 1.0,
          "expert_load/3": 0.5,
          "expert_load_max_over_uniform": 1.5,
          "expert_load_min_over_uniform": 0.5,
      }
  )
  # No MoE layer: nothing to report rather than a division by zero.
  assert teacher_train.expert_load_metrics(jnp.zeros((0, 4))) == {}


def test_loss_function_reports_every_experts_load(prepared):
  config = stdlib.get_config("tiny")
  cfg = teacher_train.model_config(
      config, pipeline.prepared_vocab_size(prepared)
  )
  model = Teacher(cfg, rngs=nnx.Rngs(0))
  batch = next(
      iter(
          pipeline.make_dataset(
              layout.data_dir(prepared),
              "train",
              seq_len=config.data.seq_len,
              batch_size=2,
              seed=0,
          )
      )
  )
  _, metrics = teacher_train.loss_fn_for(cfg, 16)(model, batch, 0)
  shares = [float(metrics[f"expert_load/{e}"]) for e in range(cfg.num_experts)]
  # Shares relative to uniform average to exactly 1 across experts.
  assert np.mean(shares) == pytest.approx(1.0, abs=1e-5)
  assert (
      float(metrics["expert_load_min_over_uniform"])
      <= min(shares)
      <= max(shares)
      <= float(metrics["expert_load_max_over_uniform"])
  )
