"""The main job: every stage in order, each skipped when done, resumed when not.

When the experiment imports a Hugging Face teacher (``config.teacher.hf_dir``),
the teacher stage runs first, so the data is tokenized with its tokenizer.

    python -m experiments.run --config=experiments/stdlib.py --workdir=/tmp/kd

Each stage is also its own binary (see the README); this one calls the same
library functions in one process. ``--stages=prepare,teacher`` runs a subset.

SIGTERM (a preemption) or Ctrl-C stops the stage it lands in at its next safe
point, starts no further stage, and exits with status 143 (130 for Ctrl-C);
the same command then resumes where it stopped.
"""

from __future__ import annotations

import time
from typing import Callable

from absl import flags, logging

from data import prepare
from distill import evaluate
from distill import train as distill_train
from distill.core import cli, stop
from student import export
from teacher import cache_logits
from teacher import train as teacher_train

# (stage, function(config, workdir)), in pipeline order.
STAGES: tuple[tuple[str, Callable], ...] = (
    ("prepare", prepare.prepare),
    ("teacher", teacher_train.stage),
    ("cache", cache_logits.cache_logits),
    ("distill", distill_train.train_all),
    ("evaluate", evaluate.evaluate),
    ("export", export.export_all),
)

_STAGES = flags.DEFINE_list(
    "stages", None, "Only these stages, in pipeline order (default: all)."
)


def stage_order(config) -> tuple[tuple[str, Callable], ...]:
  """STAGES, with the teacher first when it is imported: the data must then be
  tokenized with the teacher's own tokenizer, which the import brings."""
  if teacher_train.hf_dir_of(config) is None:
    return STAGES
  return (STAGES[1], STAGES[0]) + STAGES[2:]


def run_all(config, workdir: str, only: list[str] | None = None) -> list[str]:
  """Runs the stages in order; returns the names of those that ran."""
  names = [name for name, _ in STAGES]
  unknown = sorted(set(only or ()) - set(names))
  if unknown:
    raise cli.UserError(f"Unknown stage(s) {unknown}; the stages are {names}.")
  ran = []
  for name, function in stage_order(config):
    if only and name not in only:
      continue
    stop.check("run", f"the stages before {name} are done")
    print(f"run: stage {name} ...")
    start = time.time()
    function(config, workdir)
    logging.info("stage %s finished in %.1fs", name, time.time() - start)
    print(f"run: stage {name} done in {time.time() - start:.1f}s")
    ran.append(name)
  return ran


def main(argv):
  config, workdir = cli.setup(argv)
  run_all(config, workdir, _STAGES.value)


if __name__ == "__main__":
  cli.run(main)
