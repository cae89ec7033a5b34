"""The main job (``experiments.run`` on the tiny variant) as a user runs it:
on 8 devices against 1, and stopped by SIGTERM (a preemption) or Ctrl-C in
every stage, then resumed. One uninterrupted run on one device is the
reference of both.

(The fast suite's test_run.py checks what the main job writes; this module
is slow by nature: several whole runs of the binary.)
"""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from flax import nnx

import procs
from data import cache
from distill.core import layout
from distill.training import loop as trainer
from experiments import run
from student import load_student
from teacher import load_teacher

pytestmark = pytest.mark.slow

TINY = "--config=experiments/stdlib.py:tiny"
STAGES = [name for name, _ in run.STAGES]
# What a report entry holds that does not depend on the machine's speed.
REPORTED = ("loss", "ece", "kl_to_teacher", "top1_agreement", "continuations")


def _main_job(workdir, devices=1, stage=None, delay=0.0, signum=None):
  """``experiments.run`` on the tiny config from ``workdir`` (empty at
  first), with ``signum`` sent ``delay`` seconds after the job announces
  ``stage`` (if it gets there).

  Returns a dict: returncode, stdout's stage lines with the time each was
  read, stderr, when the signal went (None if never) and when the job
  ended.
  """
  stderr_path = workdir + ".stderr"
  with open(stderr_path, "w") as stderr:
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.run", TINY, f"--workdir={workdir}"],
        cwd=procs.REPO,
        env=dict(procs.device_env(devices), PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    lines = []  # (time read, line)
    reader = threading.Thread(
        target=lambda: lines.extend((time.time(), l) for l in proc.stdout)
    )
    reader.start()
    sent = None
    announced = f"run: stage {stage} ..."
    while signum and proc.poll() is None:
      if any(line.strip() == announced for _, line in list(lines)):
        time.sleep(delay)
        sent = time.time()
        proc.send_signal(signum)
        break
      time.sleep(0.02)
    returncode = proc.wait(timeout=1200)
    ended = time.time()
    reader.join()
  with open(stderr_path) as f:
    err = f.read()
  return dict(
      returncode=returncode,
      lines=[(t, l.strip()) for t, l in lines if l.startswith("run: stage")],
      stderr=err,
      sent=sent,
      ended=ended,
  )


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  """The main job run through on one device, from an empty workdir;
  returns the workdir and each stage's seconds."""
  workdir = str(tmp_path_factory.mktemp("one_device") / "w")
  result = _main_job(workdir)
  assert result["returncode"] == 0, result["stderr"][-3000:]
  seconds = {
      l.split()[2]: float(l.split()[-1].rstrip("s"))
      for _, l in result["lines"]
      if " done in " in l
  }
  assert list(seconds) == STAGES
  return workdir, seconds


def _losses(out_dir):
  return procs.losses_by_step(os.path.join(out_dir, trainer.METRICS_FILE))


def test_mesh_tiny_variant_end_to_end_matches_one_device(one_device, tmp_path):
  """experiments.run on the tiny variant: 8 devices (default mesh) and 1
  give the same per-step losses for the teacher and every student."""
  one, _ = one_device
  eight = str(tmp_path / "w")
  result = _main_job(eight, devices=8)
  assert result["returncode"] == 0, result["stderr"][-3000:]
  # tiny's 4-row batches: the log says where they went
  assert "8 cpu devices" in result["stderr"]

  def close(a, b, tol=1e-5):
    assert a.keys() == b.keys() and a
    for step in a:
      assert abs(a[step] - b[step]) <= tol, (step, a[step], b[step])

  close(_losses(layout.teacher_dir(eight)), _losses(layout.teacher_dir(one)))
  runs = layout.list_runs(one)
  assert runs and runs == layout.list_runs(eight)
  for name in runs:
    # Float runs agree to under 1e-6 (the two meshes add partial sums in
    # another order). A quantisation-aware run rounds its weights to int8
    # codes in every step: a last-bit difference that moves one weight
    # across a rounding boundary changes it by a whole code, and the loss by
    # about 1e-4 (measured at step 8: 9.5e-5 with XLA's default CPU code
    # splitting, 1.05e-4 with the suite's single module).
    close(
        _losses(layout.student_dir(eight, name)),
        _losses(layout.student_dir(one, name)),
        tol=5e-4 if "qint8" in name else 1e-5,
    )


def _outputs(workdir):
  """What a run of the main job leaves that must not depend on whether it
  was interrupted: every model's parameters and training losses, the
  cache's shards, the report's measured quality, the exported folders."""
  with open(os.path.join(workdir, "eval", "report.json")) as f:
    report = json.load(f)
  students = layout.list_runs(workdir)
  params = lambda model: [
      np.asarray(leaf) for _, leaf in nnx.state(model, nnx.Param).flat_state()
  ]
  return dict(
      params={
          "teacher": params(load_teacher(layout.teacher_dir(workdir))),
          **{
              s: params(load_student(layout.student_dir(workdir, s)))
              for s in students
          },
      },
      losses={
          "teacher": _losses(layout.teacher_dir(workdir)),
          **{s: _losses(layout.student_dir(workdir, s)) for s in students},
      },
      shards=[
          s["sha256"]
          for s in cache.read_manifest(layout.cache_dir(workdir))["shards"]
      ],
      report={
          name: {k: entry.get(k) for k in REPORTED}
          for name, entry in report["models"].items()
      },
      exported=sorted(os.listdir(os.path.join(workdir, "export"))),
  )


def test_a_signal_in_every_stage_stops_the_job_and_the_rerun_resumes(
    one_device, tmp_path
):
  """A signal at a random moment of each stage in turn, SIGTERM and Ctrl-C
  by turns, the same command rerun after each stop (as a preempted job
  is): the job exits with 128 + the signal and one line saying where it
  stopped, starts no stage after the signal, and the reruns end with the
  uninterrupted run's results (parameters, logged losses, cache, report,
  exports). The signal's moment is drawn with a fixed seed, as a fraction
  of the stage's time in the uninterrupted run."""
  straight, seconds = one_device
  workdir = str(tmp_path / "w")
  rng = random.Random(0)
  for i, stage in enumerate(STAGES):
    signum = (signal.SIGTERM, signal.SIGINT)[i % 2]
    name = signal.Signals(signum).name
    delay = rng.uniform(0.05, 0.95) * seconds[stage]
    result = _main_job(workdir, stage=stage, delay=delay, signum=signum)
    if result["sent"] is None:  # the job ended before it got there
      assert result["returncode"] == 0, result["stderr"][-3000:]
      continue
    if result["returncode"] == 0:  # the signal came after the last stage
      assert stage == STAGES[-1], (stage, result["stderr"][-3000:])
      continue
    message = result["stderr"].strip().splitlines()[-1]
    assert result["returncode"] == 128 + signum, result["stderr"][-3000:]
    assert f"stopped by {name}" in message and "Rerun" in message, message
    # It stops at the stage's next safe point: no stage starts after the
    # signal (a second's grace for the pipe).
    started = [
        l
        for t, l in result["lines"]
        if t > result["sent"] + 1.0 and l.endswith("...")
    ]
    assert not started, (stage, started, message)
    print(
        f"{name} {delay:.1f}s into {stage}: exited"
        f" {result['ended'] - result['sent']:.1f}s later: {message}"
    )
  result = _main_job(workdir)
  assert result["returncode"] == 0, result["stderr"][-3000:]
  got, want = _outputs(workdir), _outputs(straight)
  assert got["params"].keys() == want["params"].keys()
  for model, leaves in got["params"].items():
    assert len(leaves) == len(want["params"][model])
    for a, b in zip(leaves, want["params"][model]):
      np.testing.assert_array_equal(a, b, err_msg=model)
  for key in ("losses", "shards", "report", "exported"):
    assert got[key] == want[key], key
