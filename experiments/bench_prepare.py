"""The prepare stage at growing corpus sizes: peak memory and tokens/s.

``experiments.benchmark --sections=prepare`` runs it; on its own:

    python -m experiments.bench_prepare --sizes_mb=20,200 --workers=1,2

For each size it writes a local-files corpus of that many bytes, the standard
library repeated with varied text (copy ``k`` of a file renames every word of
four letters or more with a suffix of its own, so the copies are not the same
text), then runs ``python -m data.prepare`` on it in a fresh workdir once per
worker count, sampling the memory of the process and its workers (the sum of
their resident sets, and of the anonymous part of them, which leaves out the
pages of files the process reads through memory maps, every 50 ms). Reported
per run: peak memory, wall time,
the tokenizing time and tokens/s of the train split; and the ratios the
stage is held to: peak memory of the largest corpus over the smallest, and
tokens/s of the most workers over one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import psutil
from absl import app, flags

from data import corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORD = re.compile(r"\b([A-Za-z_]{4,})\b")


def _suffix(k: int) -> str:
  letters = ""
  while True:
    letters += chr(ord("a") + k % 26)
    k //= 26
    if not k:
      return letters


def write_corpus(root: str, size_bytes: int) -> int:
  """Writes copies of the standard library's files under ``root`` until
  ``size_bytes``; returns the bytes written (a finished folder is reused)."""
  done = os.path.join(root, "DONE")
  if os.path.isfile(done):
    with open(done, encoding="utf-8") as f:
      return int(f.read())
  sources = [corpus.read_text(p)[0] for p in corpus.stdlib_files()]
  written, k = 0, 0
  while written < size_bytes:
    folder = os.path.join(root, f"copy{k:04d}")
    os.makedirs(folder, exist_ok=True)
    suffix = _suffix(k)
    for i, text in enumerate(sources):
      if written >= size_bytes:
        break
      varied = (
          _WORD.sub(lambda m, s=suffix: m.group(1) + s, text) if k else text
      )
      data = varied.encode("utf-8")
      with open(os.path.join(folder, f"f{i:05d}.py"), "wb") as f:
        f.write(data)
      written += len(data)
    k += 1
  with open(done, "w", encoding="utf-8") as f:
    f.write(str(written))
  return written


def _anonymous(pid: int) -> int | None:
  """The process's resident anonymous memory (Linux: RssAnon), which a
  memory map of the files read does not count; None where unknown."""
  try:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("RssAnon:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _tree_memory(process: psutil.Process) -> tuple[int, int]:
  """(resident, resident anonymous) bytes of the process and its children."""
  rss = anon = 0
  for p in [process] + process.children(recursive=True):
    try:
      resident = p.memory_info().rss
    except psutil.Error:
      continue
    rss += resident
    own = _anonymous(p.pid)
    anon += resident if own is None else own
  return rss, anon


def run_prepare(corpus_dir: str, workdir: str, workers: int) -> dict[str, Any]:
  """One ``data.prepare`` run; its peak memory, wall and train split."""
  command = [
      sys.executable,
      "-m",
      "data.prepare",
      "--config=experiments/stdlib.py",
      "--config.data.source=files",
      f"--config.data.files_glob={corpus_dir}/**/*.py",
      f"--config.data.prepare_workers={workers}",
      f"--workdir={workdir}",
  ]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  start = time.perf_counter()
  child = subprocess.Popen(  # pylint: disable=consider-using-with
      command,
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  peak, watched = [0, 0], psutil.Process(child.pid)

  def sample():
    while child.poll() is None:
      peak[:] = map(max, peak, _tree_memory(watched))
      time.sleep(0.05)

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  _, err = child.communicate()
  sampler.join()
  if child.returncode:
    raise RuntimeError(f"data.prepare failed: {err[-2000:]}")
  with open(
      os.path.join(workdir, "data", "prepare.json"), encoding="utf-8"
  ) as f:
    train = json.load(f)["splits"]["train"]
  return {
      "workers": workers,
      "peak_rss_bytes": peak[0],
      "peak_anon_bytes": peak[1],
      "wall_s": round(time.perf_counter() - start, 2),
      "train_tokens": train["num_tokens"],
      "tokenize_s": train["tokenize_seconds"],
      "tokens_per_s": round(train["num_tokens"] / train["tokenize_seconds"]),
  }


def measure(sizes_mb, workers, root: str | None = None) -> dict[str, Any]:
  """Every size x worker count, and the ratios (see the module doc)."""
  root = root or tempfile.mkdtemp(prefix="bench_prepare_")
  out: dict[str, Any] = {"runs": []}
  for size in sizes_mb:
    folder = os.path.join(root, f"corpus_{size}mb")
    written = write_corpus(folder, size << 20)
    for count in workers:
      workdir = tempfile.mkdtemp(dir=root, prefix=f"w{size}_{count}_")
      run = dict(run_prepare(folder, workdir, count), corpus_bytes=written)
      out["runs"].append(run)
      print(json.dumps(run), flush=True)
  by = {(r["corpus_bytes"], r["workers"]): r for r in out["runs"]}
  sizes = sorted({r["corpus_bytes"] for r in out["runs"]})
  most = max(workers)
  for key in ("peak_rss_bytes", "peak_anon_bytes"):
    out[f"{key[:-6]}_largest_over_smallest"] = round(
        by[sizes[-1], most][key] / by[sizes[0], most][key], 3
    )
  if min(workers) < most:
    out["tokens_per_s_most_over_one_worker"] = {
        str(s): round(
            by[s, most]["tokens_per_s"] / by[s, min(workers)]["tokens_per_s"], 3
        )
        for s in sizes
    }
  return out


def _define_flags():
  """The binary's flags (only when run as one: experiments.benchmark imports
  this module)."""
  flags.DEFINE_list("sizes_mb", ["20", "200"], "Corpus sizes in MiB.")
  flags.DEFINE_list("workers", ["1", "2"], "prepare_workers values.")
  flags.DEFINE_string("root", None, "Folder for the corpora and runs.")


def main(argv):
  del argv
  f = flags.FLAGS
  result = measure(
      [int(s) for s in f.sizes_mb], [int(w) for w in f.workers], f.root
  )
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
