"""What every binary shares: ``--config``, ``--workdir`` and clean errors.

Usage in a binary::

    from distill.core import cli
    FLAGS = cli.define_flags()

    def main(argv):
      config, workdir = cli.setup(argv)
      library_function(config, workdir)

    if __name__ == "__main__":
      cli.run(main)
"""

from __future__ import annotations

import os
import sys
import uuid
from typing import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from distill.core.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config file, e.g. experiments/stdlib.py or experiments/stdlib.py:tiny."
    " Single values are overridden with --config.KEY=VALUE.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Folder every stage reads from and writes into."
)


def check_workdir(workdir: str | None) -> str:
  """Creates ``workdir`` if needed and proves it is writable."""
  if not workdir:
    raise UserError(
        "--workdir is required: the folder every stage writes into."
    )
  workdir = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write-test-{uuid.uuid4().hex}")
    with open(probe, "w", encoding="utf-8") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise UserError(
        f"--workdir={workdir} is not writable ({e.strerror});"
        " choose a folder you can write to."
    ) from e
  return workdir


def setup_config(argv):
  """Checks the arguments and ``--config``; returns the config."""
  if len(argv) > 1:
    raise UserError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None:
    raise UserError("--config is required, e.g. --config=experiments/stdlib.py")
  if not flags.FLAGS["verbosity"].present:
    # Orbax and TFDS log every step at INFO; keep the progress bars readable.
    # --verbosity=0 brings the INFO lines back.
    logging.set_verbosity(logging.WARNING)
  logging.info("Config:\n%s", _CONFIG.value)
  return _CONFIG.value


def setup(argv):
  """Checks the flags; returns ``(config, workdir)``."""
  config = setup_config(argv)
  return config, check_workdir(_WORKDIR.value)


def run(main: Callable):
  """``app.run`` that prints a UserError as one line and exits 1."""

  def guarded(argv):
    try:
      return main(argv)
    except UserError as e:
      logging.error("%s", e)
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)

  app.run(guarded)
