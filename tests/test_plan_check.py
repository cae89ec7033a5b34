"""experiments/plan_check.py: the plan against the run's own peak memory.

The comparison itself needs devices that count their memory (a GPU run is
in the README); here: its arithmetic, what each process is given, and the
refusal on a CPU host.
"""

import procs
import pytest

from experiments import plan_check

GIB = 2**30


def _plan(*peaks):
  return {
      "programs": [{"name": f"p{i}", "peak": p} for i, p in enumerate(peaks)]
  }


def test_a_stage_is_compared_by_its_largest_program():
  row = plan_check.compare(
      _plan(2 * GIB, 9 * GIB), {"memory": {"peak": 10 * GIB}}, 0.10
  )
  assert row["program"] == "p1" and row["planned"] == 9 * GIB
  assert row["run"] == 10 * GIB
  assert row["ratio"] == pytest.approx(0.9) and row["within"]
  # Just past the tolerance, either way.
  assert not plan_check.compare(
      _plan(8.9 * GIB), {"memory": {"peak": 10 * GIB}}, 0.10
  )["within"]
  assert not plan_check.compare(
      _plan(11.1 * GIB), {"memory": {"peak": 10 * GIB}}, 0.10
  )["within"]
  # A run whose devices count nothing cannot be within anything.
  blind = plan_check.compare(_plan(GIB), {"memory": None}, 0.10)
  assert blind["run"] is None and blind["ratio"] is None
  assert not blind["within"]
  text = plan_check.table({"distill sampled": row, "cache": blind})
  lines = text.splitlines()
  assert lines[1].split()[-1] == "0.900"
  assert lines[2].endswith("off")


def test_each_distill_run_is_planned_and_run_alone():
  argv = [
      "plan_check",
      "--config=experiments/stdlib.py:gpu",
      "--config.distill.train.steps=20",
      "--config.distill.runs=('sampled','online')",
      "--workdir=/tmp/w",
      "--tolerance=0.2",
  ]
  steps = plan_check.steps(["teacher", "distill"], ("sampled", "online"))
  assert [name for name, _, _ in steps] == [
      "teacher", "distill sampled", "distill online"
  ]  # fmt: skip
  _, plan_flags, run_flags = steps[1]
  assert "--runs=sampled" in plan_flags
  assert "--config.distill.runs=('sampled',)" in run_flags
  # The config's own list of runs is not passed beside the run's.
  assert plan_check.config_flags(argv, runs=False) == [
      "--config=experiments/stdlib.py:gpu",
      "--config.distill.train.steps=20",
  ]
  assert len(plan_check.config_flags(argv)) == 3


def test_a_host_whose_devices_count_no_memory_is_refused(tmp_path):
  result = procs.binary(
      "experiments.plan_check",
      "--config=experiments/stdlib.py:tiny",
      f"--workdir={tmp_path}",
  )
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      "error: the devices here keep no count of their memory (CPUs do not):"
      " run the check on GPUs or TPUs"
  ]
  assert not list(tmp_path.iterdir())  # nothing run, nothing written
