"""Student training: every run kind learns; offline runs resume exactly."""

import json
import os
import shutil

import pytest

from distill.core import checkpoint as ckpt
from distill.core import layout
from data import cache
from distill import train as distill_train
from distill.training import loop as trainer
from distill.core.errors import UserError
from experiments import stdlib

import procs

TINY = "--config=experiments/stdlib.py:tiny"


@pytest.fixture(scope="module")
def workdir(tiny_cached):
  """Prepared data, a random tiny teacher and its logit cache (shared)."""
  return tiny_cached


def _copy(workdir, path):
  shutil.copytree(workdir, path)
  return str(path)


@pytest.mark.slow  # ~150 s; the tiny end-to-end run checks the default runs
def test_every_run_kind_lowers_its_loss(workdir, tmp_path):
  w = _copy(workdir, tmp_path / "w")
  config = stdlib.get_config("tiny")
  config.distill.train.steps = 12
  config.distill.runs = tuple(distill_train.RUN_KINDS)
  summaries = distill_train.train_all(config, w)
  assert sorted(summaries) == sorted(config.distill.runs)
  for run, summary in summaries.items():
    records = [
        r
        for r in trainer.read_metrics(layout.student_dir(w, run))
        if "loss" in r
    ]
    assert records[-1]["loss"] < records[0]["loss"], run
    assert summary["steps"] == 12
    # The teacher exists, so the eval hook measures the student against it.
    assert (
        0 <= summary["eval/top1_agreement"] <= 1
        and summary["eval/kl_to_teacher"] > 0
    )
  assert summaries["sampled"]["kind"] == {
      "mode": "offline",
      "target": "sample",
      "loss": "sampled_kl",
  }


@pytest.mark.slow  # ~70 s: two binaries, one stopped and resumed
def test_offline_run_sigterm_and_resume_match_running_through(
    workdir, tmp_path
):
  args = [
      "--run=sampled",
      "--config.distill.train.steps=30",
      "--config.distill.train.log_every=1",
      "--config.distill.train.checkpoint_every=50",
      "--config.distill.train.eval_every=50",
  ]
  straight = _copy(workdir, tmp_path / "a")
  result = procs.binary("distill.train", TINY, f"--workdir={straight}", *args)
  assert result.returncode == 0, result.stderr[-2000:]
  want = procs.losses_by_step(
      os.path.join(straight, "student", "sampled", "metrics.jsonl")
  )

  stopped = _copy(workdir, tmp_path / "b")
  metrics = os.path.join(stopped, "student", "sampled", "metrics.jsonl")
  code, out = procs.sigterm_after(
      "distill.train",
      [TINY, f"--workdir={stopped}", *args],
      metrics,
      after_step=3,
  )
  assert code == 143 and "stopped by SIGTERM" in out, out[-2000:]
  assert 3 <= ckpt.latest_step(os.path.join(stopped, "student", "sampled")) < 30
  result = procs.binary("distill.train", TINY, f"--workdir={stopped}", *args)
  assert result.returncode == 0, result.stderr[-2000:]
  got = procs.losses_by_step(metrics)
  assert sorted(got) == sorted(want) == list(range(1, 31))
  for step in got:
    assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-5), step


def test_online_run_needs_a_teacher_and_names_the_stage(workdir, tmp_path):
  w = _copy(workdir, tmp_path / "w")
  shutil.rmtree(os.path.join(w, "teacher"))
  with pytest.raises(UserError, match="teacher.train"):
    distill_train.train_run(stdlib.get_config("tiny"), w, "online")


def test_unknown_run_is_refused_before_training(workdir):
  config = stdlib.get_config("tiny")
  config.distill.runs = ("ce", "sampeld")
  with pytest.raises(UserError, match="sampeld"):
    distill_train.train_all(config, workdir)


def test_offline_run_refuses_a_cache_for_another_sequence_length(
    workdir, tmp_path
):
  w = _copy(workdir, tmp_path / "w")
  manifest_path = os.path.join(w, "logits", "manifest.json")
  manifest = json.load(open(manifest_path))
  manifest["seq_len"] = 999  # as a cache made for another length says
  json.dump(cache.seal(manifest), open(manifest_path, "w"))
  with pytest.raises(UserError, match="seq_len"):
    distill_train.train_run(stdlib.get_config("tiny"), w, "topk_ghost")


def test_ce_sees_the_same_rows_before_and_after_the_cache(workdir, tmp_path):
  """The stages in either order: a CE run trained before the cache exists
  reads exactly the rows (and order) it reads after, so its losses agree
  bit for bit; a cache of other rows is refused for offline runs."""
  config = stdlib.get_config("tiny")
  before = _copy(workdir, tmp_path / "before")
  shutil.rmtree(layout.cache_dir(before))
  after = _copy(workdir, tmp_path / "after")
  losses = {}
  for name, w in (("before", before), ("after", after)):
    distill_train.train_run(config, w, "ce")
    losses[name] = procs.losses_by_step(
        os.path.join(layout.student_dir(w, "ce"), trainer.METRICS_FILE)
    )
  assert losses["before"] == losses["after"] and len(losses["after"]) > 1
  fewer = stdlib.get_config("tiny")
  fewer.cache.max_rows = config.cache.max_rows - 16
  with pytest.raises(UserError, match="num_records"):
    distill_train.train_run(fewer, after, "sampled")
