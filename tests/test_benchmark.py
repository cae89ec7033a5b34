"""The benchmark binary reports every ratio, on the tiny config."""

import json

import pytest

import procs


@pytest.mark.slow  # ~1 min: compiles a train step per run kind
def test_benchmark_reports_every_ratio(tmp_path):
  out = tmp_path / "bench.json"
  result = procs.binary(
      "experiments.benchmark",
      "--config=experiments/stdlib.py:tiny",
      f"--out={out}",
      "--repeats=1",
      timeout=600,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  bench = json.loads(out.read_text())
  ratios = bench["students"]["step_time_over_ce"]
  assert set(ratios) == {
      "ce",
      "online",
      "online_topk",
      "sampled",
      "topk_ghost",
      "topk_sparse",
  }
  assert ratios["ce"] == 1.0 and all(r > 0 for r in ratios.values())
  assert 0 < bench["students"]["train_flops_over_matmul"]
  assert 0 < bench["cache"]["cache_over_forward"]
  assert bench["cache"]["methods"] == ["sample", "topk"]
  for b in (1, 8):
    assert bench["decode"][f"batch_{b}"]["decode_student_over_teacher"] > 0
