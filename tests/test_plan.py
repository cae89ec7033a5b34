"""The plan: every stage compiled ahead of time for a topology, measured."""

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import procs
from distill import planning

from distill.core import sharding, topology
from distill.core.errors import ConfigError, UserError
from experiments import plan as plan_binary
from experiments import stdlib
from teacher import moe as moe_lib

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason="needs libtpu: pip install -e '.[tpu]'"
)


def _tiny():
  config = stdlib.get_config("tiny")
  config.data.batch_size = 8  # a row per device of cpu:8
  return config


@pytest.fixture(scope="module")
def tiny_plan():
  """The tiny config planned on cpu:8: a run of each mode, every stage."""
  config = _tiny()
  topo = topology.resolve("cpu:8")
  runs = ["sampled", "online", "on_policy"]
  mesh = sharding.make_mesh(config.get("mesh"), devices=topo.devices)
  programs = planning.programs(config, mesh, runs=runs)
  result = plan_binary.plan(config, topo, runs=runs, log=lambda _: None)
  return config, mesh, programs, result


def test_every_stage_of_the_tiny_config_compiles(tiny_plan):
  _, _, programs, result = tiny_plan
  names = [p["name"] for p in result["programs"]]
  assert names == [
      "teacher step",
      "cache pass",
      "student sampled",
      "student online",
      "student on_policy",
      "generate on_policy",
      "validation",
      "decode b1",
      "decode b8",
  ]
  assert names == [p.name for p in programs]
  assert result["fits"] and not result["verdicts"]
  for m in result["programs"]:
    assert m["peak"] > 0 and m["compile_s"] > 0
    # Matmul FLOPs counted from the program are at least the model's
    # (a training step recomputes its loss chunks' logits, no more than 2x).
    assert 0.95 <= m["flops"] / m["model_flops"] < 2.0, m
  assert "teacher step" in result["table"] and "/model" in result["table"]


def test_a_teacher_on_short_rows_first_plans_both_steps():
  config = _tiny()
  config.teacher.train.update(dict(short_steps=2, short_seq_len=8))
  mesh = sharding.make_mesh(None, devices=topology.resolve("cpu:8").devices)
  programs = planning.programs(config, mesh, stages=["teacher"])
  shapes = {p.name: p.args[2]["tokens"].shape for p in programs}
  # The short phase: as many tokens a step as the long rows' batch.
  assert shapes == {
      "teacher step": (8, 33),
      "teacher step, short rows": (32, 9),
  }


def test_arguments_are_the_parameters_and_optimizer_split_over_devices(
    tiny_plan,
):
  """XLA's argument bytes per device equal each array's share of one device
  (parameters and optimizer state split by the rules, the batch by rows)."""
  _, mesh, programs, result = tiny_plan
  measured = {m["name"]: m for m in result["programs"]}
  steps = [
      p for p in programs if p.name.startswith(("student", "teacher step"))
  ]
  assert len(steps) == 4
  for program in programs:
    expected = planning.array_bytes(program.args, per_device=True)
    # A scalar argument the program does not read (the step, in a loss
    # without a schedule) is dropped from the compiled program.
    leaves = jax.tree.leaves(
        jax.tree.map(
            lambda x: nnx.state(x) if isinstance(x, nnx.Module) else x,
            program.args,
            is_leaf=lambda x: isinstance(x, nnx.Module),
        )
    )
    scalars = [x for x in leaves if not x.shape]
    unread = measured[program.name]["arguments"] - expected
    if program in steps:
      assert -4 * len(scalars) <= unread <= 0, program.name
    else:  # a pass that reads part of a model (the teacher's head) drops the rest
      assert unread <= 0, program.name
  for program in steps:  # the updated state takes the donated buffers
    trained = planning.array_bytes(program.args[:2], per_device=True)
    assert measured[program.name]["aliased"] == trained, program.name
  # A pass that only reads its models returns no copy of them.
  validation = measured["validation"]
  assert validation["outputs"] < validation["arguments"] / 4
  # The student's parameters and Adam's two moments are split 8 ways (fsdp)
  # where the rules split them: its argument bytes are far below the whole.
  step = next(p for p in programs if p.name == "student sampled")
  whole = step.state_bytes
  assert measured["student sampled"]["arguments"] < whole / 2
  assert mesh.shape["fsdp"] == 8


def test_programs_by_name_and_a_name_that_is_not_there():
  config = _tiny()
  topo = topology.resolve("cpu:8")
  result = plan_binary.plan(
      config, topo, stages=["export"], names=["decode b8"], log=lambda _: None
  )
  assert [m["name"] for m in result["programs"]] == ["decode b8"]
  with pytest.raises(UserError, match=r"none named \['decode b3'\]"):
    plan_binary.plan(config, topo, stages=["export"], names=["decode b3"])


def test_an_offline_step_counts_the_teacher_the_stage_keeps_beside_it(
    tiny_plan,
):
  """Every distill run loads the teacher (its validation scores against
  it): an offline step runs beside it, an online step has it among its
  arguments. On an H200 the gpu variant's offline step peaked at the
  plan's step plus the teacher's bytes (experiments/plan_check.py)."""
  _, _, programs, result = tiny_plan
  measured = {m["name"]: m for m in result["programs"]}
  online = next(p for p in programs if p.name == "student online")
  teacher = planning.array_bytes(online.args[4], per_device=True)
  assert teacher > 0
  offline = measured["student sampled"]
  assert teacher <= offline["resident"] < teacher + 64  # + unread scalars
  assert measured["student online"]["resident"] < teacher // 10
  parts = ("arguments", "outputs", "temporaries", "code", "resident")
  assert offline["peak"] == sum(offline[k] for k in parts) - offline["aliased"]
  # Validation runs inside a run's loop, beside its optimizer state.
  assert measured["validation"]["resident"] > 0
  assert "beside" in result["table"]


def test_flops_count_scanned_layers_once_per_layer():
  """XLA counts a scanned layer stack's body once; the plan's own count
  does not: scanned and unrolled students count the same matmul FLOPs."""
  config = _tiny()
  config.student.model.num_layers = 4
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  counted = {}
  for scan in (False, True):
    config.student.model.scan_layers = scan
    (program,) = planning.programs(
        config, mesh, stages=["distill"], runs=["ce"], names=["student ce"]
    )
    with sharding.use(mesh):
      counted[scan] = planning.matmul_flops(program.trace().jaxpr)
  assert counted[True] == pytest.approx(counted[False], rel=1e-6)


def test_a_megablox_kernel_counts_the_grouped_flops_it_declares():
  """megablox's Pallas calls count as ragged_dot does, forward and
  backward: 2 x rows x K x N a grouped matmul (rows padded to 8 here)."""
  lhs = jax.ShapeDtypeStruct((64, 32), jnp.float32)
  rhs = jax.ShapeDtypeStruct((4, 32, 48), jnp.float32)
  sizes = jax.ShapeDtypeStruct((4,), jnp.int32)
  one = 2.0 * 64 * 32 * 48
  for dot in (moe_lib.megablox_dot, jax.lax.ragged_dot):
    forward = jax.make_jaxpr(dot)(lhs, rhs, sizes)
    assert planning.matmul_flops(forward) == one, dot
    both = jax.make_jaxpr(
        jax.grad(lambda a, b, dot=dot: jnp.sum(dot(a, b, sizes)), (0, 1))
    )(lhs, rhs)
    assert planning.matmul_flops(both) == 3 * one, dot


def test_a_config_that_cannot_fit_says_so_in_one_line_and_exits_1(
    tmp_path,
):
  memory_out = tmp_path / "memory.json"
  result = procs.binary(
      "experiments.plan",
      "--config=experiments/stdlib.py:tiny",
      "--topology=cpu:8",
      "--stages=export",
      "--memory_gib=0.000001",
      f"--memory_out={memory_out}",
      env=procs.device_env(8),
  )
  assert result.returncode == 1, result.stderr[-2000:]
  verdicts = [
      line for line in result.stderr.splitlines() if "does not fit" in line
  ]
  assert len(verdicts) == 2  # decode b1 and b8
  assert verdicts[0].startswith("decode b1 does not fit: it needs")
  assert "GiB per device" in verdicts[0] and "config.mesh" in verdicts[0]
  assert "decode b8" in result.stdout  # the table is printed all the same
  # --memory_out, asked of any binary, is written however it ends; CPUs
  # keep no count of their memory (GPUs and TPUs do).
  assert json.loads(memory_out.read_text()) == {"device": "cpu", "memory": None}


# The TPU compiler's two messages (the second found planning online KD with
# a Qwen3-30B-A3B teacher on v5e-64), shortened.
_REFUSALS = [
    "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory"
    " required for HLO temporaries (16.49G) exceeds available HBM (15.75G).",
    "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent"
    " error. Ran out of memory in memory space hbm. Used 17.58G of 15.75G"
    " hbm. Exceeded hbm capacity by 1.83G.\n\nTotal hbm usage >= 17.83G:\n"
    "    reserved        258.03M \n    program          16.49G \n"
    "    arguments         1.09G \n\nProgram hbm requirement 16.49G:\n"
    "    global            7.22M\n    HLO temp         16.23G (98.0%"
    " utilization)\n",
]


@pytest.mark.parametrize("message", _REFUSALS)
def test_a_program_the_compiler_refuses_for_memory_gets_a_verdict(
    monkeypatch, message
):
  """The TPU compiler checks the chip's memory itself and raises; the plan
  reads the temporaries from its message and says the program does not fit."""
  config = _tiny()
  mesh = sharding.make_mesh(devices=jax.devices()[:8])
  (program,) = planning.programs(
      config, mesh, stages=["export"], names=["decode b1"]
  )

  class Refusing:

    def __init__(self, traced):
      self.traced = traced
      self.jaxpr = traced.jaxpr

    def lower(self):
      return self

    def compile(self):
      raise jax.errors.JaxRuntimeError(message)

  real = program.trace
  monkeypatch.setattr(program, "trace", lambda: Refusing(real()))
  m = planning.measure(program, mesh)
  assert m.refused.startswith("RESOURCE_EXHAUSTED")
  assert m.temporaries == int(16.49 * 2**30)
  assert m.arguments > 0 and m.flops > 0
  line = plan_binary.verdict(m, program, 16 * 2**30, processes=1)
  assert line.startswith("decode b1 does not fit (the compiler refused it)")
  # The compiler's limit is a little below the chip's memory: a refused
  # program does not fit, whatever its peak.
  assert not plan_binary.fits(m, 2 * m.peak)
  program.stage = "distill"  # a training step: remat is a knob, until set
  assert "--config.student.model.remat=full" in plan_binary.verdict(
      m, program, 16 * 2**30, processes=1
  )
  assert "remat" not in plan_binary.verdict(
      m, program, 16 * 2**30, processes=1, remat="full"
  )


def test_find_batch_finds_the_most_rows_that_fit():
  """With a memory between two batch sizes' peaks, the search lands on the
  larger one that fits (the validation pass: quick to compile)."""
  config = _tiny()
  topo = topology.resolve("cpu:8")
  mesh = sharding.make_mesh(devices=topo.devices)
  peaks = {}
  for rows in (8, 16, 24):
    config.data.batch_size = rows
    (program,) = planning.programs(
        config, mesh, stages=["distill"], runs=["ce"], names=["validation"]
    )
    peaks[rows] = planning.measure(program, mesh).peak
  assert peaks[8] < peaks[16] < peaks[24]
  config.data.batch_size = 8
  log = []
  rows, m = plan_binary.find_batch(
      config,
      mesh,
      program,
      (peaks[16] + peaks[24]) // 2,
      log.append,
      runs=["ce"],
  )
  assert rows == 16 and m.peak == peaks[16]
  assert len(log) <= 5  # guided by the line through the peaks, not bisection


def _search(peak_of, memory=95.0, limit=2048):
  """``find_batch``'s search on made-up peaks (GiB by units; None: the
  compiler refuses, reporting the line's figure): (the answer, the sizes
  compiled in order)."""
  gib = 2**30

  def measure(units):
    peak = peak_of(units)
    return planning.Measure(
        name="x", arguments=0, outputs=0, aliased=0, code=0,
        temporaries=int((peak or 6 + 3.2 * (units - 1)) * gib),
        flops=0.0, xla_flops=0.0, model_flops=0.0, estimated_s=None,
        compile_s=0.0, rows=units, tokens=units,
        refused=None if peak is not None else "RESOURCE_EXHAUSTED",
    )  # fmt: skip

  peaks = {u: measure(u) for u in (1, 2)}
  order = []
  while (
      u := plan_binary.next_units(peaks, int(memory * gib), limit)
  ) is not None:
    assert u not in peaks  # never compiles a size twice
    peaks[u] = measure(u)
    order.append(u)
  best = max(
      u for u, m in peaks.items() if plan_binary.fits(m, int(memory * gib))
  )
  return best, order


def test_the_search_for_rows_is_short_when_peaks_are_linear():
  """Peaks on a line (6 GiB + 3.2 a size) up to the compiler's limit: the
  answer, in a few compiles."""
  best, order = _search(lambda u: 6 + 3.2 * (u - 1) if u <= 28 else None)
  assert best == 28 and len(order) <= 4, order


def test_the_search_for_rows_ends_when_the_compiler_flattens_the_peaks():
  """Near the chip's memory the peaks flatten (the TPU compiler trades
  recomputation for memory): past 26 sizes the peak creeps up by 0.1 GiB
  a size until the compiler refuses past 40. The search must not walk
  there one size at a time (it did: 28, 29, 30, ...)."""

  def peak(u):
    if u > 40:
      return None
    return 6 + 3.2 * (u - 1) if u <= 26 else 86 + 0.1 * (u - 26)

  best, order = _search(peak)
  assert best == 40 and len(order) <= 6, order


def test_the_search_for_rows_stops_at_its_limit():
  best, order = _search(lambda u: 1.0 + 1e-6 * u, limit=64)
  assert best == 64 and len(order) <= 8, order


@pytest.mark.parametrize(
    "chips,dims,shape",
    [(4, 3, (2, 2, 1)), (8, 3, (2, 2, 2)), (32, 3, (2, 4, 4)),
     (64, 3, (4, 4, 4)), (128, 3, (4, 4, 8)), (1, 2, (1, 1)),
     (8, 2, (2, 4)), (16, 2, (4, 4)), (64, 2, (8, 8)), (256, 2, (16, 16))],
)  # fmt: skip
def test_cloud_tpu_grids(chips, dims, shape):
  assert topology.grid(chips, dims) == shape


@pytest.mark.parametrize(
    "name,message",
    [
        ("v7x-8", "use a Cloud TPU name"),
        ("cpu:99", "xla_force_host_platform_device_count=99"),
        ("v5p-7", "counts cores"),
        ("v6e-12", "power of two"),
        ("v5p:2x2", "3 dimensions"),
    ],
)
def test_bad_topologies_say_what_would_work(name, message):
  with pytest.raises(ConfigError, match=message):
    topology.resolve(name)


@needs_libtpu
def test_a_tpu_mesh_chooses_the_tpu_implementations_on_a_cpu_host():
  topo = topology.resolve("v5p-8")
  assert topo.platform == "tpu" and len(topo.devices) == 4
  assert topo.memory_per_device == 95 * topology.GIB
  mesh = sharding.make_mesh(devices=topo.devices)
  layer = nnx.eval_shape(lambda: moe_lib.MoE(8, 16, 4, 2, rngs=nnx.Rngs(0)))
  assert jax.default_backend() == "cpu"
  assert layer.resolved_impl() == "blocked"  # this host's choice
  with sharding.use(mesh):
    assert sharding.platform() == "tpu"
    assert layer.resolved_impl() == "megablox"  # the TPU's
    seen = []

    @jax.jit
    def f(x):
      seen.append(sharding.platform())  # under jit: the abstract mesh's
      return x

    f.trace(jax.ShapeDtypeStruct((4,), jnp.float32))
  assert seen == ["tpu"]
  assert sharding.platform() == "cpu"


@needs_libtpu
@pytest.mark.slow  # ~1 min: compiles the tiny config's stages for a TPU
def test_the_tiny_config_planned_for_a_tpu_slice(tmp_path):
  out = tmp_path / "plan.json"
  result = procs.binary(
      "experiments.plan",
      "--config=experiments/stdlib.py:tiny",
      "--config.data.batch_size=8",
      "--topology=v5p-8",
      "--runs=sampled,online,on_policy",
      f"--out={out}",
      timeout=900,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  plan = json.loads(out.read_text())
  assert plan["fits"] and plan["mesh"].startswith("data=1 fsdp=4")
  assert "4 tpu devices" in plan["mesh"]
  names = [p["name"] for p in plan["programs"]]
  assert "cache pass" in names and "student on_policy" in names
  for m in plan["programs"]:
    assert 0 < m["peak"] < 95 * topology.GIB
    assert np.isfinite(m["flops"]) and m["flops"] >= 0.95 * m["model_flops"]


def test_cross_tokenizer_runs_compile_with_the_students_own_vocabulary():
  """A student with its own 300-entry tokenizer: each cross-tokenizer run
  (cached and online) compiles on cpu:8, holds less state than the same
  run on the teacher's 512 tokens, and its measured FLOPs are at least the
  model's."""
  config = _tiny()
  config.student.tokenizer = "300"
  mesh = sharding.make_mesh(
      config.get("mesh"), devices=topology.resolve("cpu:8").devices
  )
  runs = ["alm", "vocab", "online_alm", "online_vocab", "alm@tok=teacher"]
  programs = planning.student_programs(config, mesh, 512, runs=runs)
  assert [p.name for p in programs] == [f"student {r}" for r in runs] + [
      "validation"
  ]
  by_name = {p.name: p for p in programs}
  assert (
      by_name["student alm"].state_bytes
      < by_name["student alm@tok=teacher"].state_bytes
  )
  for program in programs[:-2]:
    m = planning.measure(program, mesh)
    assert m.peak > 0 and m.flops >= 0.95 * m.model_flops, program.name
