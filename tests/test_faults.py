"""Faults as they come: a SIGKILL at a random moment of each long stage,
over several seeds; the rerun's outputs equal an uninterrupted run's.

(The shorter fault cases live with their stages: a full disk and damaged
inputs in test_errors.py, stale or edited caches in test_provenance.py,
non-finite steps in test_trainer.py, SIGTERM in the trainer tests, SIGTERM
and Ctrl-C in every stage of the main job in test_main_job.py.)
"""

import random
import shutil
import time

import numpy as np
import pytest
from flax import nnx

import procs
from conftest import copy_workdir
from data import cache
from distill.core import checkpoint as ckpt
from distill.core import layout
from distill.training import loop as trainer
from student import load_student
from teacher import load_teacher

TINY = "--config=experiments/stdlib.py:tiny"
SEEDS = (0, 1, 2)


def _straight(module, workdir, *args) -> float:
  """Runs the binary to the end; returns its wall time in seconds."""
  started = time.time()
  result = procs.binary(module, TINY, f"--workdir={workdir}", *args)
  assert result.returncode == 0, result.stderr[-3000:]
  return time.time() - started


def _kill_then_finish(module, workdir, seed, seconds, *args):
  """One SIGKILL at a moment drawn from ``seed`` within the ``seconds`` an
  uninterrupted run takes, then the same command again to the end."""
  at = random.Random(seed).uniform(0.3, 0.95) * seconds
  flags = (TINY, f"--workdir={workdir}", *args)
  procs.sigkill_after(module, flags, at)
  result = procs.binary(module, *flags)
  assert result.returncode == 0, result.stderr[-3000:]


def _same_params(a, b):
  for x, y in zip(
      nnx.state(a, nnx.Param).flat_state(), nnx.state(b, nnx.Param).flat_state()
  ):
    np.testing.assert_array_equal(np.asarray(x[1]), np.asarray(y[1]))


def _losses(out_dir):
  return [
      r["loss"]
      for r in trainer.read_metrics(out_dir)
      if "loss" in r and "learning_rate" in r
  ]


@pytest.mark.slow  # about 2 minutes: 7 runs of the binary
def test_teacher_train_survives_sigkill(tiny_prepared, tmp_path):
  args = (
      "--config.teacher.train.steps=24",
      "--config.teacher.train.checkpoint_every=4",
  )
  straight = copy_workdir(tiny_prepared, tmp_path / "straight")
  seconds = _straight("teacher.train", straight, *args)
  want = load_teacher(layout.teacher_dir(straight))
  for seed in SEEDS:
    w = copy_workdir(tiny_prepared, tmp_path / f"killed{seed}")
    _kill_then_finish("teacher.train", w, seed, seconds, *args)
    _same_params(load_teacher(layout.teacher_dir(w)), want)
    assert _losses(layout.teacher_dir(w)) == _losses(
        layout.teacher_dir(straight)
    )


@pytest.mark.slow  # about 1.5 minutes
def test_cache_logits_survives_sigkill(tiny_cached, tmp_path):
  args = ("--config.cache.max_rows=320", "--config.cache.rows_per_shard=32")
  straight = copy_workdir(tiny_cached, tmp_path / "straight")
  shutil.rmtree(layout.cache_dir(straight))
  seconds = _straight("teacher.cache_logits", straight, *args)
  want = cache.read_manifest(layout.cache_dir(straight))
  for seed in SEEDS:
    w = copy_workdir(tiny_cached, tmp_path / f"killed{seed}")
    shutil.rmtree(layout.cache_dir(w))
    _kill_then_finish("teacher.cache_logits", w, seed, seconds, *args)
    got = cache.read_manifest(layout.cache_dir(w))
    assert [s["sha256"] for s in got["shards"]] == [
        s["sha256"] for s in want["shards"]
    ]
    cache.verify(layout.cache_dir(w))


@pytest.mark.slow  # about 2 minutes
def test_distill_train_survives_sigkill(tiny_cached, tmp_path):
  args = (
      "--run=ce",  # online and offline runs resume alike; ce is quickest
      "--config.distill.train.steps=24",
      "--config.distill.train.checkpoint_every=4",
  )
  straight = copy_workdir(tiny_cached, tmp_path / "straight")
  seconds = _straight("distill.train", straight, *args)
  run = layout.student_dir(straight, "ce")
  want = load_student(run)
  for seed in SEEDS:
    w = copy_workdir(tiny_cached, tmp_path / f"killed{seed}")
    _kill_then_finish("distill.train", w, seed, seconds, *args)
    _same_params(load_student(layout.student_dir(w, "ce")), want)
    assert _losses(layout.student_dir(w, "ce")) == _losses(run)
    assert ckpt.latest_step(layout.student_dir(w, "ce")) == 24
