"""The benchmark binary reports every ratio, on the tiny config."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

import procs
from distill.core.errors import ConfigError
from distill.nn import blockwise
from experiments import bench_steps, benchmark, stdlib
from student.config import PRESETS
from student.model import Student
from teacher import config as teacher_config
from teacher.model import Teacher


@pytest.mark.slow  # ~1 min: compiles a train step per run kind
def test_benchmark_reports_every_ratio(tmp_path):
  out = tmp_path / "bench.json"
  result = procs.binary(
      "experiments.benchmark",
      "--config=experiments/stdlib.py:tiny",
      "--config.eval.speed.batch_sizes=(1,8)",  # tiny measures b1 only
      f"--out={out}",
      "--repeats=1",
      timeout=600,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  bench = json.loads(out.read_text())
  ratios = bench["students"]["step_time_over_ce"]
  assert set(ratios) == {
      "alm",
      "vocab",
      "vocab_topk",
      "online_alm",
      "online_vocab",
      "ce",
      "online",
      "online_topk",
      "sampled",
      "topk_ghost",
      "topk_sparse",
      "topk_tail",
      "on_policy",
  }
  assert ratios["ce"] == 1.0 and all(r > 0 for r in ratios.values())
  # Generating the rows and the teacher's pass come on top of a step.
  assert ratios["on_policy"] > ratios["sampled"]
  assert 0 < bench["students"]["train_flops_over_matmul"]
  assert 0 < bench["cache"]["cache_over_forward"]
  assert bench["cache"]["methods"] == ["label", "sample", "topk", "topk_tail"]
  for b in (1, 8):
    assert bench["decode"][f"batch_{b}"]["decode_student_over_teacher"] > 0
    for model in ("student", "teacher"):
      assert 0 < bench["decode"][f"batch_{b}"][f"{model}_over_roofline"]
  assert 0 < bench["teacher"]["train_flops_over_matmul"]
  assert set(bench["students"]["compile_s"]) == set(ratios)
  assert set(bench["students"]["ce_by_scan_layers"]) == {
      "scan_layers=False",
      "scan_layers=True",
  }
  assert bench["matmul_dtype"] == "float32" and bench["copy_bytes_per_s"] > 0
  moe = bench["moe"]
  assert set(moe["seconds"]) == {"ragged", "tokamax", "blocked"}
  assert moe["fastest"] in moe["seconds"] and moe["auto_picks"] == "blocked"


def test_attention_flops_count_every_visible_key():
  """Against a brute-force count of (query, key) pairs under the mask."""
  seq, window = 10, 4
  pairs = {
      kind: sum(
          1
          for q in range(seq)
          for k in range(seq)
          if k <= q and (kind == "global" or q - k < window)
      )
      for kind in ("local", "global")
  }
  got = bench_steps.attention_train_flops(
      ["local", "global", "local"], window, batch=3, seq=seq, heads=2,
      head_dim=8,
  )  # fmt: skip
  assert got == 3 * 4 * 8 * 2 * 3 * (2 * pairs["local"] + pairs["global"])


def test_decode_bytes_counts_params_experts_and_kv_cache():
  student = Student(PRESETS["tiny"], nnx.Rngs(0))
  params = sum(
      x.size * 4 for x in jax.tree.leaves(nnx.state(student, nnx.Param))
  )
  c = student.config
  # tiny: (local window 8, global); 20 positions of context, batch 2.
  kv = 2 * 2 * (8 + 20) * c.num_kv_heads * c.head_dim * 4
  assert benchmark.decode_bytes(student, 2, 20) == params + kv

  teacher = Teacher(teacher_config.get_preset("tiny"), nnx.Rngs(0))
  t = teacher.config
  expert = 3 * t.d_model * t.d_ff * 4  # one expert's bytes
  full = benchmark.decode_bytes(teacher, 8, 20)  # 8 x top-2 >= 5 experts
  one = benchmark.decode_bytes(teacher, 1, 20)  # 2 of 5 experts per layer
  kv_growth = 2 * 7 * 20 * t.num_kv_heads * t.head_dim * 4 * t.num_layers
  np.testing.assert_allclose(
      full - one, t.num_layers * 3 * expert + kv_growth, rtol=1e-9
  )


def test_unknown_run_kind_is_refused_before_any_work():
  with pytest.raises(ConfigError, match="unknown run kind.*'bogus'"):
    bench_steps.step_ratios(stdlib.get_config("tiny"), 512, 1, 1.0, ["bogus"])


def test_attention_cost_is_linear_in_the_row_but_a_global_layers_work():
  """The tiny student's layers (window 8), compiled at two lengths past one
  tile: the path's temporaries grow 4x for 4x the row, a local layer's
  FLOPs per token stay and a global layer's grow 4x (under the dense
  path's, which grow as much from the whole square)."""
  cost = benchmark.attention_cost(
      stdlib.get_config("tiny"), lengths=(1024, 4096)
  )
  assert cost["window"] == 8
  short, long = (cost["by_length"][n] for n in ("1024", "4096"))
  for kind in ("local", "global"):
    assert (
        long[kind]["path"]["temp_mib"]
        <= 4 * 1.3 * short[kind]["path"]["temp_mib"]
    )
    assert (
        long[kind]["dense"]["mflop_per_token"]
        > 3 * short[kind]["dense"]["mflop_per_token"]
    )
  local, glob = long["local"]["path"], long["global"]["path"]
  assert local["mflop_per_token"] == pytest.approx(
      short["local"]["path"]["mflop_per_token"], rel=0.1
  )
  # A global layer: the causal triangle's tile pairs (the zigzag schedule
  # of 8 tiles: 36 of 64), each forward and backward with the scores
  # recomputed (7 products against the dense path's 6).
  q_tiles, _, tiles = blockwise.schedule(4096 // blockwise.BLOCK, None, 512)
  assert glob["mflop_per_token"] == pytest.approx(
      long["global"]["dense"]["mflop_per_token"]
      * 7
      / 6
      * q_tiles.size
      / tiles**2,
      rel=0.02,
  )
  assert (
      glob["mflop_per_token"] > 2.5 * short["global"]["path"]["mflop_per_token"]
  )
  assert (
      glob["mflop_per_token"] < 0.7 * long["global"]["dense"]["mflop_per_token"]
  )
  assert local["temp_mib"] < long["local"]["dense"]["temp_mib"] / 10
