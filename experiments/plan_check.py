r"""Does the plan hold? Each stage planned, then run, on this machine's devices.

    python -m experiments.plan_check --config=experiments/stdlib.py:gpu \
        --workdir=/tmp/kd_check --config.teacher.train.steps=20 ...

For the teacher and cache stages, and for each of the config's distill runs,
two processes: ``experiments.plan --topology=local`` compiles the stage's
programs for the devices here and reads their peaks, then ``experiments.run``
runs the stage with ``--memory_out`` and reports the most device memory its
allocator had in use at once. The prepare stage runs first where the workdir
has no data. A table compares each one's largest planned peak with the run's;
the check fails (exit status 1) when one differs by more than ``--tolerance``
of the run's. ``--out`` writes the rows as JSON; each process's own plan and
memory JSON stay in ``W/plan_check/``.

Every ``--config`` flag (the file and its overrides) goes to both processes,
so a shorter run (fewer steps) checks the same shapes in less time. Only
devices that count their memory (GPUs, TPUs) can be checked: on a CPU host
the check stops at once. The workdir must hold no output of the stages it
checks (a finished stage would be skipped, not measured).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from absl import flags

from distill.core import cli, files, layout, topology
from distill.core.errors import UserError

#: The stages a plan covers, in pipeline order, and the folder each writes.
STAGES = {
    "teacher": layout.teacher_dir,
    "cache": layout.cache_dir,
    "distill": layout.students_dir,
}


def _define_flags():
  # Defined only when run as a binary: importing adds no flags (experiments.run
  # defines its own --stages).
  flags.DEFINE_list(
      "stages", list(STAGES), f"Which of {list(STAGES)} to check."
  )
  flags.DEFINE_float(
      "tolerance", 0.10, "How far (a fraction of the run's peak) a plan may be."
  )
  flags.DEFINE_string("out", None, "Write the comparison as JSON here.")


_RUNS = "--config.distill.runs="


def config_flags(argv: list[str], runs: bool = True) -> list[str]:
  """The ``--config`` flags of ``argv`` (the file and its overrides), which
  the plan and the run both take; without one of ``distill.runs`` where
  ``runs`` is False (a distill check names its own run)."""
  return [
      a for a in argv[1:]
      if a.startswith("--config") and (runs or not a.startswith(_RUNS))
  ]  # fmt: skip


def compare(plan: dict[str, Any], memory: dict | None, tolerance: float):
  """One stage's row: its largest planned peak (and which program), the
  run's peak, their ratio, and whether it is within ``tolerance``."""
  biggest = max(plan["programs"], key=lambda p: p["peak"])
  run = (memory or {}).get("memory") or {}
  ran = run.get("peak")
  ratio = biggest["peak"] / ran if ran else None
  return {
      "program": biggest["name"],
      "planned": biggest["peak"],
      "run": ran,
      "ratio": ratio,
      "within": ratio is not None and abs(ratio - 1) <= tolerance,
  }


def table(rows: dict[str, dict[str, Any]]) -> str:
  """The comparison as text, one line per stage."""
  gib = lambda n: "-" if n is None else f"{n / topology.GIB:.2f} GiB"
  width = max(len(s) for s in [*rows, "stage"])
  lines = [
      f"{'stage':<{width}} {'largest program':<20} {'planned':>11}"
      f" {'run':>11} {'plan/run':>9}"
  ]
  for stage, r in rows.items():
    ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
    lines.append(
        f"{stage:<{width}} {r['program']:<20} {gib(r['planned']):>11}"
        f" {gib(r['run']):>11} {ratio:>9}{'' if r['within'] else '  off'}"
    )
  return "\n".join(lines)


def _read(path: str):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _call(args: list[str], what: str) -> None:
  print(f"plan_check: {what} ...", flush=True)
  done = subprocess.run([sys.executable, "-m", *args], check=False)
  if done.returncode:
    raise UserError(f"{what} failed (exit status {done.returncode}); see above")


def _counts_memory() -> bool:
  """Whether this host's devices count their memory, asked of a child
  process: JAX on a GPU takes most of its memory when it starts, which the
  stages' processes need."""
  probe = (
      "from distill.core import topology;"
      "print(topology.device_memory() is not None)"
  )
  done = subprocess.run(
      [sys.executable, "-c", probe], capture_output=True, text=True,
      check=False,
  )  # fmt: skip
  return done.stdout.strip().endswith("True")


def steps(stages: list[str], runs) -> list[tuple[str, list[str], list[str]]]:
  """(row name, plan flags, run flags) of each check: one per stage, and
  the distill stage one per run, each in its own processes."""
  out = []
  for stage in stages:
    if stage != "distill":
      out.append((stage, [f"--stages={stage}"], [f"--stages={stage}"]))
      continue
    for run in runs:
      only = f"{_RUNS}({run!r},)"
      out.append((
          f"distill {run}",
          ["--stages=distill", f"--runs={run}", only],
          ["--stages=distill", only],
      ))  # fmt: skip
  return out


def check(argv, workdir: str, stages: list[str], runs, tolerance: float):
  """Plans and runs each stage (each distill run) in its own processes;
  returns the rows."""
  workdir_flag = f"--workdir={workdir}"
  folder = os.path.join(workdir, "plan_check")
  if not os.path.isdir(layout.data_dir(workdir)):
    _call(
        ["experiments.run", "--stages=prepare", *config_flags(argv),
         workdir_flag],
        "prepare",
    )  # fmt: skip
  rows = {}
  for name, plan_flags, run_flags in steps(stages, runs):
    slug = name.replace(" ", "_").replace("@", "_").replace("=", "_")
    plan_json = os.path.join(folder, f"plan_{slug}.json")
    run_json = os.path.join(folder, f"run_{slug}.json")
    passed = config_flags(argv, runs=not name.startswith("distill"))
    _call(
        ["experiments.plan", "--topology=local", f"--out={plan_json}",
         *passed, *plan_flags],
        f"planning {name}",
    )  # fmt: skip
    _call(
        ["experiments.run", f"--memory_out={run_json}", workdir_flag,
         *passed, *run_flags],
        f"running {name}",
    )  # fmt: skip
    rows[name] = compare(_read(plan_json), _read(run_json), tolerance)
    print(table({name: rows[name]}), flush=True)
  return rows


def main(argv):
  f = flags.FLAGS
  config = cli.setup_config(argv)
  workdir = cli.check_workdir(f.workdir)
  stages = [s for s in STAGES if s in f.stages]
  unknown = sorted(set(f.stages) - set(STAGES))
  if unknown:
    raise UserError(f"--stages: unknown {unknown}; use some of {list(STAGES)}")
  if not _counts_memory():
    raise UserError(
        "the devices here keep no count of their memory (CPUs do not): run"
        " the check on GPUs or TPUs"
    )
  for stage in stages:
    done = STAGES[stage](workdir)
    if os.path.exists(done):
      raise UserError(
          f"{done} exists: a stage that has run is skipped, not measured;"
          " give plan_check a workdir without it (data/ may stay)"
      )
  rows = check(sys.argv, workdir, stages, config.distill.runs, f.tolerance)
  print(table(rows))
  if f.out:
    files.write_json(f.out, {"tolerance": f.tolerance, **rows})
  off = [s for s, r in rows.items() if not r["within"]]
  if off:
    print(
        f"plan_check: the plan is off by more than {f.tolerance:.0%}"
        f" for {off}",
        file=sys.stderr,
    )
    sys.exit(1)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
