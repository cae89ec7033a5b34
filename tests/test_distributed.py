"""Several processes and device counts: the binaries as a user runs them.

Each test starts the stages as subprocesses with their own simulated device
count (``--xla_force_host_platform_device_count``); the multi-process ones
run two processes on localhost that talk through ``jax.distributed`` (gloo
collectives on the CPU). Names carry "distributed", "mesh" or "shard" for
``pytest -k "mesh or shard or distributed or elastic"``.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import copy_workdir

import procs
from data import cache, pipeline, shards
from distill.core import layout

pytestmark = pytest.mark.slow

TINY = "--config=experiments/stdlib.py:tiny"


def _run(module, *args, devices=8, timeout=600):
  result = subprocess.run(
      [sys.executable, "-m", module, *args],
      cwd=procs.REPO,
      env=procs.device_env(devices),
      capture_output=True,
      text=True,
      timeout=timeout,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_processes(module, *args, count=2, devices=2, timeout=600):
  """``count`` processes of one stage on localhost; their outputs."""
  address = f"localhost:{_free_port()}"
  running = [
      subprocess.Popen(
          [
              sys.executable,
              "-m",
              module,
              *args,
              f"--coordinator_address={address}",
              f"--num_processes={count}",
              f"--process_id={i}",
          ],
          cwd=procs.REPO,
          env=procs.device_env(devices),
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
      )
      for i in range(count)
  ]
  outs = [p.communicate(timeout=timeout) for p in running]
  for p, (_, err) in zip(running, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


def _losses(out_dir):
  return procs.losses_by_step(os.path.join(out_dir, "metrics.jsonl"))


def _close(a, b, tol):
  assert a.keys() == b.keys() and a
  for step in a:
    assert abs(a[step] - b[step]) <= tol, (step, a[step], b[step])


def test_mesh_teacher_train_binary_matches_one_device(tiny_prepared, tmp_path):
  losses = {}
  for devices in (8, 1):
    workdir = copy_workdir(tiny_prepared, tmp_path / f"d{devices}")
    _run(
        "teacher.train",
        TINY,
        "--config.data.batch_size=8",
        f"--workdir={workdir}",
        devices=devices,
    )
    losses[devices] = _losses(layout.teacher_dir(workdir))
  _close(losses[8], losses[1], 1e-4)


def test_distributed_two_processes_prepare_the_shards_of_one(tmp_path):
  """data.prepare in two processes (each tokenizing every other unit of each
  split) writes the same shards, byte for byte, as one process with two
  workers."""
  args = (TINY, "--config.data.shard_tokens=4096", "--verbosity=0")
  two, one = tmp_path / "two", tmp_path / "one"
  outs = _run_processes(
      "data.prepare",
      *args,
      "--config.data.prepare_workers=1",
      f"--workdir={two}",
  )
  done = []
  for index, (_, err) in enumerate(outs):
    said = re.search(
        rf"train: process {index} of 2 tokenized (\d+) of the (\d+) units", err
    )
    assert said, err[-2000:]
    done.append((int(said.group(1)), int(said.group(2))))
  # Each process did its half of the units (every other one).
  (a, units), (b, _) = done
  assert a + b == units and abs(a - b) <= 1 and units >= 16
  _run(
      "data.prepare",
      *args,
      "--config.data.prepare_workers=2",
      f"--workdir={one}",
      devices=1,
  )
  for split in ("train", "validation"):
    a = pipeline.tokens_dir(layout.data_dir(str(two)), split)
    b = pipeline.tokens_dir(layout.data_dir(str(one)), split)
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b)) and shards.MANIFEST in names
    for name in names:
      with (
          open(os.path.join(a, name), "rb") as fa,
          open(os.path.join(b, name), "rb") as fb,
      ):
        if name == shards.MANIFEST:
          ma, mb = json.load(fa), json.load(fb)
          for m in (ma, mb):
            m.pop("seconds"), m.pop("tokenize_seconds")
          assert ma == mb
        else:
          assert fa.read() == fb.read(), name


def test_distributed_two_processes_train_and_cache_like_one(
    tiny_prepared, tmp_path
):
  """Two processes on localhost (2 devices each) train the teacher on
  disjoint rows and agree on its parameters; the losses and the cache they
  write equal one process's with the same 4 devices."""
  overrides = (
      TINY,
      "--config.data.batch_size=8",
      "--config.teacher.train.steps=4",
      "--config.teacher.train.checkpoint_every=2",
      "--config.cache.batch_size=2",
      "--config.cache.max_rows=24",
      "--config.cache.rows_per_shard=8",
  )
  two = copy_workdir(tiny_prepared, tmp_path / "two")
  one = copy_workdir(tiny_prepared, tmp_path / "one")
  _run_processes("teacher.train", *overrides, f"--workdir={two}")
  _run("teacher.train", *overrides, f"--workdir={one}", devices=4)
  # Only process 0 wrote metrics: each record once.
  with open(os.path.join(layout.teacher_dir(two), "metrics.jsonl")) as f:
    records = [line for line in f if line.strip()]
  assert len(records) == len(set(records)) and records
  _close(
      _losses(layout.teacher_dir(two)), _losses(layout.teacher_dir(one)), 1e-4
  )
  # A run that lost a host: the two processes' checkpoint of step 2 goes on
  # in one process (4 devices) with the same batches and losses.
  lost = copy_workdir(tiny_prepared, tmp_path / "lost")
  shutil.copytree(layout.teacher_dir(two), layout.teacher_dir(lost))
  shutil.rmtree(os.path.join(layout.teacher_dir(lost), "checkpoints", "4"))
  os.remove(os.path.join(layout.teacher_dir(lost), "summary.json"))
  resumed = _run("teacher.train", *overrides, f"--workdir={lost}", devices=4)
  # Resumed at step 2 (the progress bar starts there), not started over.
  assert "2/4" in resumed.stderr and "0/4" not in resumed.stderr
  _close(
      _losses(layout.teacher_dir(lost)),
      _losses(layout.teacher_dir(two)),
      1e-4,
  )

  # Both processes hold the same parameters: each prints the fingerprint of
  # the saved teacher as it sees it (every part, gathered from both).
  check = "\n".join(
      [
          "import sys",
          "import jax",
          "from distill.core import checkpoint, sharding",
          "sharding.initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))",
          "from teacher import load_teacher",
          "with sharding.use(sharding.make_mesh()):",
          "  print('processes', jax.process_count())",
          "  model = load_teacher(sys.argv[3])",
          "  print('fingerprint', checkpoint.fingerprint(model))",
      ]
  )
  address = f"localhost:{_free_port()}"
  running = [
      subprocess.Popen(
          [
              sys.executable,
              "-c",
              check,
              address,
              str(i),
              layout.teacher_dir(two),
          ],
          cwd=procs.REPO,
          env=procs.device_env(2),
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
      )
      for i in range(2)
  ]
  prints = []
  for p in running:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert re.search(r"^processes 2$", out, re.M)  # really two processes
    prints.append(re.search(r"^fingerprint (\w+)$", out, re.M).group(1))
  assert prints[0] == prints[1] and len(prints[0]) == 64

  # The cache of that teacher: two processes each write their own shards
  # (0 and 2; 1), each pass 2 rows per process; one process alone passes 4
  # rows, so every device computes one row in both.
  outs = _run_processes("teacher.cache_logits", *overrides, f"--workdir={two}")
  # Shards 0 and 2 (8 rows each) from process 0, shard 1 from process 1.
  assert "cache: 16 rows" in outs[0][0] and "cache: 8 rows" in outs[1][0]
  alone = copy_workdir(tiny_prepared, tmp_path / "alone")
  shutil.copytree(layout.teacher_dir(two), layout.teacher_dir(alone))
  _run(
      "teacher.cache_logits",
      *overrides,
      "--config.cache.batch_size=4",
      f"--workdir={alone}",
      devices=4,
  )
  a, b = layout.cache_dir(two), layout.cache_dir(alone)
  ma, mb = cache.read_manifest(a), cache.read_manifest(b)
  assert [s["name"] for s in ma["shards"]] == [s["name"] for s in mb["shards"]]
  assert len(ma["shards"]) == 3
  for target in ma["methods"]:
    ra, rb = cache.CacheSource(a, target), cache.CacheSource(b, target)
    assert len(ra) == len(rb) == 24
    for i in range(len(ra)):
      for key, value in ra[i].items():
        np.testing.assert_array_equal(value, rb[i][key], err_msg=f"{i} {key}")
