r"""Will it fit, and how fast? Every stage compiled ahead of time for a topology.

    python -m experiments.plan --config=experiments/hf_moe.py --topology=v5p-64
    python -m experiments.plan --config=experiments/stdlib.py:tiny --topology=cpu:8
    python -m experiments.plan --config=... --topology=v6e-64 --find_batch --out=plan.json

Compiles, on the config's mesh over the topology's devices and without
allocating anything, the programs the stages run (the same jitted functions):
the teacher's training step (when it is trained here), the cache pass, each
run's training step (online and on-policy runs with the teacher resident; an
on-policy run's generation too), the validation pass, and a decode step of
the student at batch 1 and 8 with a full cache of ``config.data.seq_len``.
A TPU slice (``v5p-64``, ``v6e-64``, ``2xv5p-64``...) compiles on this host
with libtpu (``pip install -e '.[tpu]'``) and no TPU; ``cpu:N`` and
``local`` need nothing more (``distill/core/topology.py`` lists the names).

Per program, per device: arguments (parameters, optimizer state, the batch),
temporaries and outputs, what the stage keeps on the device beside them
(``beside``: the teacher an offline run loads for its validation), their
peak against the device's memory, the FLOPs of the program (matmuls, loops
counted as often as they run) over the model FLOPs it must do at the least
(``distill/planning/flops.py``), XLA's own estimate of its seconds where its
cost model gives one, and the compile time. A program that does not fit is
one line saying what it needs, what there is, and what to change; the
command then exits with status 1.
``--find_batch`` finds, by compiles, the rows a step can take on this
topology (a multiple of the devices the batch splits over) with the next
multiple not fitting: the most, where the peaks grow with the rows.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import jax
from absl import flags

from distill import planning

from distill.core import cli, files, sharding, stop, topology
from distill.core.errors import UserError

GIB = topology.GIB
STAGES = ("teacher", "cache", "distill", "export")


def _gib(n: float) -> str:
  return f"{n / GIB:.2f}"


def _size(n: float) -> str:
  """Bytes in the unit that reads best: 512 B, 12.3 MiB, 3.21 GiB."""
  for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.3g} {unit}"
  return f"{n:.0f} B"


def _flops(n: float) -> str:
  for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
    if n >= scale:
      return f"{n / scale:.3g} {unit}"
  return f"{n:.3g}"


def _ratio(a, b) -> str:
  return f"{a / b:.2f}" if b and math.isfinite(a) else "-"


def table(rows: list[planning.Measure], memory: int) -> str:
  """The plan as a text table, one line per program."""
  head = (
      "program", "rows", "arguments", "temporaries", "outputs", "beside",
      "peak", "free", "FLOP/device", "/model", "XLA est s", "compile s",
  )  # fmt: skip
  lines = [head]
  for m in rows:
    lines.append((
        m.name, str(m.rows), _size(m.arguments), _size(m.temporaries),
        _size(m.outputs), _size(m.resident), _size(m.peak),
        f"{1 - m.peak / memory:.0%}",
        _flops(m.flops), _ratio(m.flops, m.model_flops),
        f"{m.estimated_s:.3g}" if m.estimated_s else "-", f"{m.compile_s:.0f}",
    ))  # fmt: skip
  widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
  return "\n".join(
      "  ".join(
          cell.ljust(w) if i == 0 else cell.rjust(w)
          for i, (cell, w) in enumerate(zip(line, widths))
      )
      for line in lines
  )


def fits(m: planning.Measure, memory: int) -> bool:
  """Whether the program fits: compiled (the TPU compiler refuses what
  does not fit its own limit, a little below the chip's memory) and its
  peak within ``memory``."""
  return m.refused is None and m.peak <= memory


def verdict(
    m: planning.Measure,
    program: planning.Program,
    memory: int,
    processes: int,
    remat: str = "none",
) -> str:
  """One line on a program that does not fit: what, needed, there, knobs
  (``remat``: the model's setting; full remat is not offered twice)."""
  knobs = []
  if program.stage == "cache":  # its knob counts one process's rows
    knobs.append(
        f"fewer rows (config.cache.batch_size={program.rows // processes}"
        f" per process, {program.rows} in all; --find_batch)"
    )
  elif program.rows_knob:
    knobs.append(
        f"fewer rows (config.{program.rows_knob}={program.rows}; --find_batch)"
    )
  if program.stage in ("teacher", "distill") and remat != "full":
    model = "teacher" if program.stage == "teacher" else "student"
    knobs.append(f"remat (--config.{model}.model.remat=full)")
  knobs.append("a mesh that splits the parameters more (config.mesh)")
  refused = " (the compiler refused it)" if m.refused else ""
  return (
      f"{m.name} does not fit{refused}: it needs {_gib(m.peak)} GiB per"
      f" device and {_gib(memory)} GiB are there; try {', or '.join(knobs)}."
  )


def _with_rows(config, program: planning.Program, rows: int, processes: int):
  """A copy of ``config`` whose ``program`` takes ``rows`` rows a step."""
  config = config.copy_and_resolve_references()
  if program.stage == "cache":
    config.cache.batch_size = rows // processes
  else:
    config.data.batch_size = rows
  return config


def next_units(peaks: dict[int, planning.Measure], memory: int,
               limit: int) -> int | None:  # fmt: skip
  """The next batch size (in units of the batch's step) for ``find_batch``
  to compile, or None when the most that fits is known: the largest
  fitting size of ``peaks`` is one below the smallest failing one (or at
  ``limit``). ``peaks`` holds at least two sizes, the smallest fitting.

  Until a size fails, the next is where the line through the smallest and
  the largest fitting sizes' peaks meets ``memory`` (a step's peak grows
  about linearly in its rows), but at least a quarter more than the
  largest: near the chip's memory the peaks flatten (the TPU compiler
  trades recomputation for memory), and the line would creep a size at a
  time (v5p-64's sampled step: 90.3, 90.6, 90.6 GiB at 28, 29 and 30 rows
  per chip). Between a fitting and a failing size, bisection: a refused
  program's figure is the compiler's, not a point on the line.
  """
  fitting = sorted(u for u, m in peaks.items() if fits(m, memory))
  low = fitting[-1]
  failing = sorted(
      u for u, m in peaks.items() if u > low and not fits(m, memory)
  )
  if failing:
    high = failing[0]
    return None if high == low + 1 else (low + high) // 2
  if low >= limit:
    return None
  u0 = fitting[0]
  slope = (peaks[low].peak - peaks[u0].peak) / (low - u0)
  guess = low + (memory - peaks[low].peak) / slope if slope > 0 else limit
  return min(max(int(guess), low + -(-low // 4)), limit)


def find_batch(config, mesh, program: planning.Program, memory: int, log,
               known: planning.Measure | None = None,
               runs=None):  # fmt: skip
  """The most rows ``program`` takes within ``memory``, a multiple of the
  devices a batch splits over (and of the processes). Returns (rows, its
  Measure), or (0, None) when even the fewest do not fit. Rows that fit
  with the next multiple not fitting: near the chip's memory the TPU
  compiler's peaks are not monotonic in the rows (v6e-64's sampled step:
  31.3 GiB at 1,024 rows, 29.4 at 1,280), so a larger size may fit too.

  Compiles one and two steps' worth, then where ``next_units`` says: four
  compiles more where the peaks are linear, bisection's count where they
  are not (the hf_moe default on v5p-64: 5 to 7 more). ``known``: the
  program's own measure, a first point for free. ``runs``: the runs the
  plan has (the validation pass runs beside the largest of their states).
  """
  ways = sharding.batch_ways(mesh)
  processes = planning.processes(mesh)
  step = max(ways, processes)
  peaks: dict[int, planning.Measure] = {}
  if known is not None and known.rows % step == 0:
    peaks[known.rows // step] = known

  def measure(units: int) -> None:
    rows = units * step
    stop.check("plan", f"nothing is written; the search was at {rows} rows")
    rebuilt = planning.programs(
        _with_rows(config, program, rows, processes),
        mesh,
        stages=[program.stage],
        runs=_runs_of(program) or runs,
        names=[program.name],
    )[0]
    peaks[units] = m = planning.measure(rebuilt, mesh)
    refused = " (refused)" if m.refused else ""
    log(
        f"plan: {program.name} with {rows} rows: peak {_size(m.peak)}"
        f"{refused}, compiled in {m.compile_s:.0f}s"
    )

  for units in (1, 2):
    if units not in peaks:
      measure(units)
  if not fits(peaks[1], memory):
    return 0, None
  limit = (1 << 16) // step  # a bound on the search, not on the answer
  while (units := next_units(peaks, memory, limit)) is not None:
    measure(units)
  low = max(u for u, m in peaks.items() if fits(m, memory))
  return low * step, peaks[low]


def _runs_of(program: planning.Program):
  for prefix in ("student ", "generate "):
    if program.name.startswith(prefix):
      return [program.name[len(prefix) :]]
  return None


def plan(config, topo: topology.Topology, *, stages=None, runs=None,
         names=None, find=False, memory=None,
         log=print) -> dict[str, Any]:  # fmt: skip
  """Compiles every program; returns the plan (as ``--out`` writes it)."""
  memory = memory or topo.memory_per_device
  mesh = sharding.make_mesh(config.get("mesh"), devices=topo.devices)
  log(f"plan: {topo.description}; mesh {sharding.describe(mesh)}")
  programs = planning.programs(config, mesh, stages=stages, runs=runs)
  if names:
    have = [p.name for p in programs]
    missing = sorted(set(names) - set(have))
    if missing:
      raise UserError(
          f"--programs: none named {missing} in these stages and runs; they"
          f" have {have}"
      )
    programs = [p for p in programs if p.name in names]
  measures, verdicts, batches = [], [], {}
  for i, program in enumerate(programs):
    stop.check("plan", f"nothing is written; {i} programs were compiled")
    log(f"plan: compiling {program.name} ({i + 1}/{len(programs)}) ...")
    m = planning.measure(program, mesh)
    measures.append(m)
    log(
        f"plan: {program.name}: peak {_size(m.peak)} of {_size(memory)},"
        f" compiled in {m.compile_s:.0f}s"
    )
    if not fits(m, memory):
      model = "teacher" if program.stage == "teacher" else "student"
      remat = config[model].model.get("remat") or "none"
      verdicts.append(
          verdict(m, program, memory, planning.processes(mesh), remat)
      )
    if find and program.rows_knob:
      rows, _ = find_batch(
          config, mesh, program, memory, log, known=m, runs=runs
      )
      batches[program.name] = {
          "rows": rows,
          "rows_per_device": rows / sharding.batch_ways(mesh),
          "knob": program.rows_knob,
      }
  return {
      "topology": topo.name,
      "description": topo.description,
      "mesh": sharding.describe(mesh),
      "memory_per_device": memory,
      "programs": [m.as_dict() for m in measures],
      "fits": not verdicts,
      "verdicts": verdicts,
      "find_batch": batches,
      "table": table(measures, memory),
  }


def _define_flags():
  # Defined only when run as a binary (importing adds no flags, so tests and
  # other binaries may import this module).
  flags.DEFINE_string(
      "topology",
      "local",
      "What to compile for: a Cloud TPU slice (v5p-64, v5e-16, v6e-64,"
      " 2xv5p-64), a grid (v5p:2x4x4), cpu:N, or local (this process's"
      " devices).",
  )
  flags.DEFINE_list(
      "stages",
      None,
      "Only these: teacher, cache, distill, export (the decode steps).",
  )
  flags.DEFINE_list(
      "runs", None, "Only these runs of config.distill.runs (default: all)."
  )
  flags.DEFINE_list(
      "programs",
      None,
      "Only the programs of these names (as the table names them, e.g."
      " 'student ce,validation').",
  )
  flags.DEFINE_bool(
      "find_batch",
      False,
      "Find the most rows per step that fit, per program.",
  )
  flags.DEFINE_float(
      "memory_gib",
      None,
      "Memory per device in GiB (default: the topology's; a TPU's HBM).",
  )
  flags.DEFINE_string("out", None, "Write the plan as JSON here.")


def main(argv):
  f = flags.FLAGS
  config = cli.setup_config(argv)
  if f.topology != "local":
    # Compiling for other devices: this host's accelerator (or libtpu on a
    # host without a TPU) is not wanted, only its CPU.
    jax.config.update("jax_platforms", "cpu")
  # Executables for devices this host does not have are not worth caching.
  jax.config.update("jax_enable_compilation_cache", False)
  unknown = sorted(set(f.stages or ()) - set(STAGES))
  if unknown:
    raise UserError(f"--stages: unknown {unknown}; use some of {STAGES}")
  topo = topology.resolve(f.topology)
  memory = int(f.memory_gib * GIB) if f.memory_gib else None
  start = time.time()
  result = plan(
      config, topo, stages=f.stages, runs=f.runs, names=f.programs,
      find=f.find_batch, memory=memory,
  )  # fmt: skip
  result["seconds"] = time.time() - start
  print(result["table"])
  for name, found in result["find_batch"].items():
    print(f"find_batch: {name}: {found['rows']} rows ({found['knob']})")
  if f.out:
    files.write_json(f.out, result)
    print(f"plan: wrote {f.out}")
  for line in result["verdicts"]:
    print(line, file=sys.stderr)
  print(f"plan: {len(result['programs'])} programs in {result['seconds']:.0f}s")
  if result["verdicts"]:
    sys.exit(1)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
