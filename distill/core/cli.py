"""What every binary shares: ``--config``, ``--workdir`` and clean errors.

Every failure a user can act on ends the binary with one line on stderr,
``error: ...``, and exit status 1: a ``UserError`` from the library, a bad
``--config`` (missing file, unknown variant, misspelt or ill-typed
override), a bad flag, a full disk. ``--verbose`` (or the environment
variable ``FLASHDISTILL_VERBOSE=1``) shows the traceback instead.

SIGTERM and Ctrl-C (SIGINT) stop the binary at the stage's next safe point
(``distill.core.stop``): one line on stderr saying where it stopped and what
was kept, and the exit status 128 + the signal (143, 130); a second Ctrl-C
exits at once.

Usage in a binary::

    from distill.core import cli

    def main(argv):
      config, workdir = cli.setup(argv)
      library_function(config, workdir)

    if __name__ == "__main__":
      cli.run(main)
"""

from __future__ import annotations

import errno
import gc
import os
import re
import sys
import uuid
from typing import Callable, NoReturn, Sequence

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from distill.core import files, sharding, stop, topology
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
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0 when the stage runs as several processes (one per"
    " host); also FLASHDISTILL_COORDINATOR. Clusters JAX detects (SLURM, Open"
    " MPI) need none of the three flags.",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "How many processes run the stage."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index, 0 .. num_processes - 1."
)


def check_workdir(workdir: str | None) -> str:
  """Proves that ``workdir`` is writable; returns its absolute path.

  A workdir that does not exist yet is not made here (a stage that refuses
  its inputs then leaves nothing behind); its nearest existing parent must be
  a writable folder, and the stages make what they write.
  """
  if not workdir:
    raise UserError(
        "--workdir is required: the folder every stage writes into."
    )
  workdir = os.path.abspath(os.path.expanduser(workdir))
  existing = workdir
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  try:
    if not os.path.isdir(existing):
      raise NotADirectoryError(errno.ENOTDIR, "not a folder", existing)
    probe = os.path.join(existing, f".write-test-{uuid.uuid4().hex}")
    with open(probe, "w", encoding="utf-8") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise UserError(
        f"--workdir={workdir} is not writable ({e.strerror});"
        " choose a folder you can write to."
    ) from e
  return workdir


def start_processes() -> None:
  """Joins the other processes of a multi-process run (the flags
  ``--coordinator_address``, ``--num_processes``, ``--process_id``)."""
  sharding.initialize_distributed(
      _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
  )


def setup_config(argv):
  """Checks the arguments and ``--config``; returns the config."""
  if len(argv) > 1:
    raise UserError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None:
    raise UserError("--config is required, e.g. --config=experiments/stdlib.py")
  start_processes()
  logging.info("Config:\n%s", _CONFIG.value)
  return _CONFIG.value


def setup(argv):
  """Checks the flags; returns ``(config, workdir)``."""
  config = setup_config(argv)
  return config, check_workdir(_WORKDIR.value)


_VERBOSE_ENV = "FLASHDISTILL_VERBOSE"


def _verbose(argv: Sequence[str]) -> bool:
  return os.environ.get(_VERBOSE_ENV, "") not in ("", "0") or any(
      a in ("--verbose", "--verbose=true", "--verbose=1") for a in argv
  )


def _one_line(text: str) -> str:
  """An exception's text on one line: escaped newlines unfolded, and of a
  traceback quoted inside it (ml_collections quotes the config file's) only
  its last error."""
  text = text.replace("\\n", "\n")
  if "Traceback (most recent call last)" in text:
    errors = re.findall(r"^\s*[\w.]*(?:Error|Exception): (.*)$", text, re.M)
    if errors:
      text = errors[-1]
  return " ".join(text.split())


def _fail(message: str) -> NoReturn:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


def _check_config_path(argv: Sequence[str]) -> None:
  """A missing ``--config`` file, said plainly before ml_collections tries."""
  for arg in argv:
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1].split(":", 1)[0]
      if path and not os.path.isfile(path):
        here = sorted(
            os.path.join("experiments", f)
            for f in (
                os.listdir("experiments")
                if os.path.isdir("experiments")
                else []
            )
            if f.endswith(".py")
            and f[0] != "_"
            and f not in ("run.py", "benchmark.py")
        )
        _fail(
            f"--config={path}: no such file"
            + (f"; the experiments here are {', '.join(here)}" if here else "")
        )


_HELP = ("--help", "-h", "-?", "--helpshort")


def _help() -> NoReturn:
  """The binary's docstring and flags, and the flags every binary shares;
  exit status 0 (absl's own ``--help`` exits 1 and lists only the
  binary's)."""
  doc = (sys.modules["__main__"].__doc__ or "").strip()
  if doc:
    print(doc + "\n")
  print("flags:")
  for text in (
      flags.FLAGS.main_module_help(),
      flags.FLAGS.module_help(__name__),
  ):
    if text.strip():
      print(text.rstrip())
  print(
      "\n--config.KEY=VALUE overrides one value of the config; --helpfull lists"
      " every flag, JAX's and absl's too."
  )
  sys.exit(0)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config and flag errors as one line."""
  if any(a in _HELP for a in argv[1:]):
    _help()
  _check_config_path(argv)
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-exception-caught
    if _verbose(argv):
      raise
    message = _one_line(str(e))
    typo = re.search(r'Did you mean "(.+?)" instead of "(.+?)"', message)
    missing = re.fullmatch(r"""["']*(\w+)["']*""", message)
    if typo:
      message = (
          f"the config has no key {typo.group(2)!r}; did you mean"
          f" {typo.group(1)!r}?"
      )
    elif missing:  # ml_collections' bare KeyError of an unknown key
      overrides = [
          a.split("=", 1)[0]
          for a in argv
          if re.match(rf"--config\.[\w.]*\b{missing.group(1)}\b", a)
      ]
      message = f"the config has no key {missing.group(1)!r}" + (
          f" ({overrides[0]})" if overrides else ""
      )
    _fail(f"{message} (--verbose shows the traceback)")


flags.DEFINE_bool(
    "verbose", False, f"Show tracebacks of errors (or set {_VERBOSE_ENV}=1)."
)
_COMPILE_CACHE = flags.DEFINE_string(
    "compile_cache",
    None,
    "Folder of JAX's persistent compilation cache: a rerun (a resume after a"
    " preemption) loads its compiled programs instead of compiling them"
    " again. Default $JAX_COMPILATION_CACHE_DIR, else"
    " ~/.cache/flashdistill/jax; 'none' turns it off.",
)


_MEMORY_OUT = flags.DEFINE_string(
    "memory_out",
    None,
    "When the binary ends, write the devices' peak memory (bytes, as their"
    " allocators count it; GPUs and TPUs report it, CPUs do not) as JSON to"
    " this file. experiments/plan_check.py compares it with the plan.",
)


def _jax_started() -> bool:
  """Whether this process has started JAX's devices (no public API says)."""
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel

  started = getattr(xla_bridge, "backends_are_initialized", None)
  return started() if started is not None else True


def _report_memory(line: bool) -> None:
  """The devices' peak memory: one line on stdout where they count it (with
  ``line``), and ``--memory_out``'s file."""
  if not _MEMORY_OUT.value and not (line and _jax_started()):
    # Not asked for, and nothing to say: a binary that never used JAX (or
    # failed) is not made to start it, and a TPU library's noise with it.
    return
  memory = topology.device_memory()
  if memory is not None and line:
    print(
        f"device memory: peak {memory['peak'] / topology.GIB:.2f} GiB of"
        f" {memory['limit'] / topology.GIB:.1f} GiB"
        f" ({jax.local_devices()[0].device_kind})",
        flush=True,
    )
  if _MEMORY_OUT.value and sharding.is_main():
    files.write_json(
        _MEMORY_OUT.value,
        {"device": jax.local_devices()[0].device_kind, "memory": memory},
    )


def use_compile_cache(folder: str | None) -> str | None:
  """Turns on JAX's persistent compilation cache in ``folder`` (None: the
  default above; "none": off); returns the folder used."""
  if folder is None:
    folder = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "flashdistill", "jax"
    )
  if folder.lower() in ("", "none"):
    return None
  # No size bound by default: JAX's bounded cache lists the whole folder
  # at every write. $JAX_COMPILATION_CACHE_MAX_SIZE sets one.
  jax.config.update("jax_compilation_cache_dir", folder)
  return folder


def quiet_garbage_collector() -> None:
  """Collects cyclic garbage less often than Python's default.

  Tracing a JAX program makes and drops hundreds of thousands of small
  objects, each 700 of which start a collection by default, and every few
  of those walk everything the imports made (jax, flax, orbax: millions of
  objects) for nothing. The objects alive now are set aside for good
  (``gc.freeze``) and a collection waits for 50,000 new objects. On a
  2-core CPU the fast test suite's tests took 8% less time in all (806 and
  770 s before; 719 s with the threshold alone, 738 s with both), the
  speculative and compiled-decoding tests about 12% less.
  """
  gc.freeze()
  gc.set_threshold(50_000, 50, 1000)


def run(main: Callable):
  """``app.run`` whose user errors end in one line and exit status 1, and
  whose stops on a signal in one line and 128 + the signal."""

  def guarded(argv):
    quiet_garbage_collector()
    if not flags.FLAGS["verbosity"].present:
      # Orbax and TFDS log every step at INFO; keep the progress bars and
      # generated text readable. --verbosity=0 brings the INFO lines back.
      logging.set_verbosity(logging.WARNING)
    use_compile_cache(_COMPILE_CACHE.value)
    try:
      with stop.watching():
        main(argv)
    except stop.Stopped as e:
      print(str(e), file=sys.stderr, flush=True)
      sys.exit(e.exit_status)
    except KeyboardInterrupt:  # before a stage could watch for it
      print("interrupted", file=sys.stderr, flush=True)
      sys.exit(128 + stop.signal.SIGINT)
    except UserError as e:
      if _verbose(sys.argv):
        raise
      _fail(str(e))
    except Exception as e:  # pylint: disable=broad-exception-caught
      # A full disk, whoever met it: our writers raise OSError(ENOSPC);
      # orbax's and tensorstore's threads wrap it in their own errors.
      full = getattr(e, "errno", None) == errno.ENOSPC or (
          "No space left on device" in str(e)
      )
      if not full or _verbose(sys.argv):
        raise
      where = getattr(e, "filename", None) or "writing"
      _fail(
          f"the disk is full ({where}); free some space and rerun the same"
          " command: the stage resumes where it stopped"
      )
    finally:  # a failed run's peak too, where --memory_out asks for it
      _report_memory(line=sys.exc_info()[0] is None)

  app.run(guarded, flags_parser=_parse_flags)
