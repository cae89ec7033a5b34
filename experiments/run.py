"""The main job: every stage in order, each skipped when done, resumed when not.

A stage this version does not have yet is reported and skipped. When the
experiment imports a Hugging Face teacher (``config.teacher.hf_dir``), the
teacher stage runs first, so the data is tokenized with its tokenizer.

    python -m experiments.run --config=experiments/stdlib.py --workdir=/tmp/kd

Each stage is also its own binary (see the README); this one calls the same
library functions in one process. ``--stages=prepare,teacher`` runs a subset.
"""

from __future__ import annotations

import importlib
import importlib.util
import time

from absl import flags, logging

from distill.core import cli

# (stage, module, function): the function takes (config, workdir).
STAGES = (
    ("prepare", "data.prepare", "prepare"),
    ("teacher", "teacher.train", "stage"),
    ("cache", "teacher.cache_logits", "cache_logits"),
    ("distill", "distill.train", "train_all"),
    ("evaluate", "distill.evaluate", "evaluate"),
    ("export", "student.export", "export_all"),
)

_STAGES = flags.DEFINE_list(
    "stages", None, "Only these stages, in pipeline order (default: all).")


def available(module: str, function: str) -> bool:
  if importlib.util.find_spec(module) is None:
    return False
  return hasattr(importlib.import_module(module), function)


def stage_order(config) -> tuple[tuple[str, str, str], ...]:
  """STAGES, with the teacher first when it is imported: the data must then be
  tokenized with the teacher's own tokenizer, which the import brings."""
  from teacher import train as teacher_train  # pylint: disable=g-import-not-at-top
  if teacher_train.hf_dir_of(config) is None:
    return STAGES
  return (STAGES[1], STAGES[0]) + STAGES[2:]


def run_all(config, workdir: str, only: list[str] | None = None) -> list[str]:
  """Runs the stages in order; returns the names of those that ran."""
  names = [name for name, _, _ in STAGES]
  unknown = sorted(set(only or ()) - set(names))
  if unknown:
    raise cli.UserError(f"Unknown stage(s) {unknown}; the stages are {names}.")
  ran = []
  for name, module, function in stage_order(config):
    if only and name not in only:
      continue
    if not available(module, function):
      print(f"run: stage {name!r} ({module}) is not built in this version yet;"
            " skipping it.")
      continue
    print(f"run: stage {name} ...")
    start = time.time()
    getattr(importlib.import_module(module), function)(config, workdir)
    logging.info("stage %s finished in %.1fs", name, time.time() - start)
    print(f"run: stage {name} done in {time.time() - start:.1f}s")
    ran.append(name)
  return ran


def main(argv):
  config, workdir = cli.setup(argv)
  run_all(config, workdir, _STAGES.value)


if __name__ == "__main__":
  cli.run(main)
