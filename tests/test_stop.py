"""distill.core.stop: signals become a request to stop at a safe point."""

import os
import signal
import subprocess
import sys

import pytest

import procs
from distill.core import stop


def test_a_signal_is_a_request_until_checked():
  before = signal.getsignal(signal.SIGTERM)
  with stop.watching():
    assert stop.requested() is None
    stop.check("here")  # nothing received: nothing raised
    os.kill(os.getpid(), signal.SIGTERM)
    with stop.watching():  # nested: the same request
      assert stop.requested() == signal.SIGTERM
    with pytest.raises(stop.Stopped) as raised:
      stop.check("here", "all is kept")
  assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
  assert raised.value.exit_status == 143
  assert str(raised.value) == (
      "here: stopped by SIGTERM; all is kept. Rerun the same command to"
      " resume."
  )
  with stop.watching():  # a new watch starts with no request
    assert stop.requested() is None


def test_a_second_ctrl_c_exits_at_once():
  """The first Ctrl-C asks for a stop at the next safe point; a second,
  before that point, ends the process there and then with status 130."""
  program = (
      "import os, signal, time\n"
      "from distill.core import stop\n"
      "with stop.watching():\n"
      "  os.kill(os.getpid(), signal.SIGINT)\n"
      "  assert stop.requested() == signal.SIGINT\n"
      "  print('asked', flush=True)\n"
      "  os.kill(os.getpid(), signal.SIGINT)\n"
      "  time.sleep(30)\n"
      "  print('not reached', flush=True)\n"
  )
  result = subprocess.run(
      [sys.executable, "-c", program],
      cwd=procs.REPO,
      env=procs.device_env(1),
      capture_output=True,
      text=True,
      timeout=60,
  )
  assert result.returncode == 130, result.stderr
  assert result.stdout == "asked\n"
  assert result.stderr.strip() == "interrupted again: exiting now"
