"""Stopping cleanly on SIGTERM (preemption) or SIGINT (Ctrl-C).

Preemptible machines (Cloud TPU and spot VMs, Slurm) send SIGTERM, then
SIGKILL after a grace period; a person presses Ctrl-C. Either way every
stage stops at its next point where stopping loses nothing: the training
loop after its step (it saves a checkpoint first), the cache pass between
batches (its complete shards stay), evaluation and export between models.
There it raises ``Stopped``, which no stage catches: the binary, and
``experiments.run`` with every stage after it, ends with one line and the
signal's exit status (143 for SIGTERM, 130 for SIGINT), and the same
command resumes. A second Ctrl-C ends the process at once.

    with stop.watching():          # binaries get this from cli.run
      for model in models:
        stop.check("evaluate")     # raises Stopped once a signal came
        ...

In a multi-process run every process must stop at the same point (the
work between two points is collective): loops that are collective ask
``stop.agreed()``, which is the main process's answer.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

from distill.core import sharding

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
  """A stage stopped on a signal; its work so far is saved."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum

  @property
  def exit_status(self) -> int:
    """128 + the signal's number, as a shell reports a process the signal
    ended: 143 for SIGTERM, 130 for SIGINT."""
    return 128 + self.signum


_received: list[int] = []
_previous: dict[int, object] = {}
_nesting = [0]  # how many ``watching`` blocks are open


def _handle(signum, frame) -> None:
  del frame
  if signum == signal.SIGINT and signal.SIGINT in _received:
    print("\ninterrupted again: exiting now", file=sys.stderr, flush=True)
    os._exit(128 + signum)  # pylint: disable=protected-access
  if signum not in _received:
    _received.append(signum)


@contextlib.contextmanager
def watching() -> Iterator[None]:
  """Turns SIGTERM and SIGINT into a request to stop while inside.

  Nested uses share one request; the previous handlers come back when the
  outermost ends, and with them the default behaviour. Outside the main
  thread (where Python cannot handle signals) nothing is installed.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  if _nesting[0] == 0:
    _received.clear()
    for signum in SIGNALS:
      _previous[signum] = signal.signal(signum, _handle)
  _nesting[0] += 1
  try:
    yield
  finally:
    _nesting[0] -= 1
    if _nesting[0] == 0:
      for signum, handler in _previous.items():
        signal.signal(signum, handler)
      _previous.clear()


def requested() -> int | None:
  """The first signal received while watching, or None (always None once
  the outermost ``watching`` has ended)."""
  return _received[0] if _received and _nesting[0] else None


def agreed() -> int | None:
  """Whether the main process was asked to stop, the same in every process
  (collective: every process must call it at the same point); the signal
  this process received, else SIGTERM, or None."""
  signum = requested()
  if not sharding.main_says(signum is not None):
    return None
  return signum or signal.SIGTERM


def name(signum: int) -> str:
  return signal.Signals(signum).name


def stopped(where: str, signum: int, saved: str) -> Stopped:
  """The Stopped error of a stage: ``where`` it stopped, what was
  ``saved``, and that the same command resumes."""
  return Stopped(
      f"{where}: stopped by {name(signum)}; {saved}. Rerun the same command"
      " to resume.",
      signum,
  )


def check(where: str, saved: str = "everything finished so far is kept"):
  """Raises Stopped if a signal came (see ``stopped``)."""
  signum = requested()
  if signum is not None:
    raise stopped(where, signum, saved)
