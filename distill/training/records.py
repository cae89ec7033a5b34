"""A run's metrics: ``metrics.jsonl`` and TensorBoard event files."""

from __future__ import annotations

import json
import os

from absl import logging

from distill.core import files

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
  """Appends metrics to ``metrics.jsonl`` and TensorBoard event files."""

  def __init__(self, out_dir: str):
    self._path = os.path.join(out_dir, METRICS_FILE)
    self._tb = None
    try:
      # Optional: imported only when present.
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

      self._tb = SummaryWriter(os.path.join(out_dir, "tb"))
    except ImportError:  # Optional: the JSONL file has everything.
      logging.warning(
          "tensorboardX is not installed; metrics go to %s only", self._path
      )

  def write(
      self, step: int, metrics: dict[str, float], prefix: str = ""
  ) -> None:
    record = {"step": int(step), **_flat(metrics, prefix)}
    with open(self._path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for key, value in record.items():
        if key != "step":
          self._tb.add_scalar(key, value, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _flat(metrics: dict, prefix: str) -> dict[str, float]:
  """Nested dicts of numbers as one level: {"a": {"b": 1}} -> {"a/b": 1.0}."""
  out = {}
  for key, value in metrics.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}/"))
    else:
      out[prefix + key] = float(value)
  return out


def read_metrics(out_dir: str) -> list[dict[str, float]]:
  """The records of a run's ``metrics.jsonl``, oldest first."""
  path = os.path.join(out_dir, METRICS_FILE)
  if not os.path.isfile(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(out_dir: str, step: int) -> None:
  """After a resume from ``step``, drops records the lost steps had written."""
  records = [r for r in read_metrics(out_dir) if r["step"] <= step]
  path = os.path.join(out_dir, METRICS_FILE)
  if os.path.isfile(path):
    files.write_text(path, "".join(json.dumps(r) + "\n" for r in records))
