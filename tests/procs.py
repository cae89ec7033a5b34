"""Running the binaries as a user would, and interrupting them mid-run."""

import json
import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def device_env(devices: int) -> dict[str, str]:
  """This process's environment for a process that sees ``devices``
  simulated CPU devices (1: a laptop's)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  flags = [
      f
      for f in env.get("XLA_FLAGS", "").split()
      if not f.startswith("--xla_force_host_platform_device_count")
  ]
  env["XLA_FLAGS"] = " ".join(
      flags + [f"--xla_force_host_platform_device_count={devices}"]
  )
  return env


def binary(module, *args, timeout=300, env=None):
  """Runs ``python -m module args`` in the repo; returns the CompletedProcess.

  ``env``: the environment (default this process's)."""
  return subprocess.run(
      [sys.executable, "-m", module, *args],
      cwd=REPO,
      env=dict(env or os.environ, JAX_PLATFORMS="cpu"),
      capture_output=True,
      text=True,
      timeout=timeout,
  )


def last_step(metrics_path):
  if not os.path.isfile(metrics_path):
    return 0
  with open(metrics_path) as f:
    steps = [json.loads(line)["step"] for line in f if line.strip()]
  return max(steps, default=0)


def sigterm_after(module, args, metrics_path, after_step, timeout=300):
  """Starts the binary, sends SIGTERM once ``metrics_path`` reaches a step.

  Returns ``(returncode, stdout+stderr)``.
  """
  proc = subprocess.Popen(
      [sys.executable, "-m", module, *args],
      cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )
  deadline = time.time() + timeout
  while proc.poll() is None and time.time() < deadline:
    if last_step(metrics_path) >= after_step:
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.02)
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def losses_by_step(metrics_path):
  with open(metrics_path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return {r["step"]: r["loss"] for r in records if "loss" in r}


def sigkill_after(module, args, seconds, timeout=300):
  """Starts the binary and kills it (SIGKILL: no handler runs) after
  ``seconds``, unless it finished first. Returns its return code."""
  proc = subprocess.Popen(
      [sys.executable, "-m", module, *args],
      cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  try:
    proc.wait(timeout=seconds)
  except subprocess.TimeoutExpired:
    proc.send_signal(signal.SIGKILL)
  return proc.wait(timeout=timeout)
