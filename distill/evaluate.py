"""Stage 5: compare the teacher, the distilled students and the CE baseline.

    python -m distill.evaluate --config=experiments/stdlib.py --workdir=W

For the teacher and every run under ``W/student/`` (their latest
checkpoints), on the validation split: loss and perplexity, KL(teacher ||
model) over the full vocabulary, top-1 agreement with the teacher, expected
calibration error, parameters (total and active), KV-cache bytes per token at
several context lengths, prefill and decode tokens/s (batch 1 and 8), and
speculative decoding with each student drafting for the teacher. For the
logit cache: bytes per cached token of each method and the time it took.

Writes ``W/eval/report.json`` (every number), ``W/eval/report.md`` (tables a
person reads) and PNG plots: validation loss over training for every run, and
quality against decode speed. A report whose inputs (the checkpoints) have not
changed is not computed again.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from tqdm import tqdm

from data import pipeline
from data import prepare as prep
from distill import checkpoint as ckpt
from distill import cli, metrics, report
from distill.errors import UserError

EVAL_DIR = "eval"


def eval_dir(workdir: str) -> str:
  return os.path.join(workdir, EVAL_DIR)


def model_folders(workdir: str) -> dict[str, str]:
  """``{"teacher": path, "<run>": path, ...}`` of the folders with a checkpoint."""
  folders = {}
  teacher = os.path.join(workdir, "teacher")
  if ckpt.latest_step(teacher) is not None:
    folders["teacher"] = teacher
  student_root = os.path.join(workdir, "student")
  if os.path.isdir(student_root):
    for run in sorted(os.listdir(student_root)):
      path = os.path.join(student_root, run)
      if ckpt.latest_step(path) is not None:
        folders[run] = path
  return folders


def quality(model, teacher, data_dir: str, *, seq_len: int, batch_size: int,
            max_batches: int, chunk_size: int, num_bins: int) -> dict[str, float]:
  """Validation loss, perplexity, ECE and (with a teacher) KL and agreement."""
  if teacher is not None:
    step = nnx.jit(lambda m, t, b: metrics.token_sums(
        m, t, pipeline.model_inputs(b), chunk_size, num_bins))
    run = lambda b: step(model, teacher, b)
  else:
    step = nnx.jit(lambda m, b: metrics.token_sums(
        m, None, pipeline.model_inputs(b), chunk_size, num_bins))
    run = lambda b: step(model, b)
  ds = pipeline.make_dataset(data_dir, "validation", seq_len=seq_len,
                             batch_size=batch_size, shuffle=False, num_epochs=1,
                             drop_remainder=True, process_index=0, process_count=1)
  totals = None
  for i, batch in enumerate(ds):
    if max_batches and i >= max_batches:
      break
    sums = jax.device_get(run(batch))
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  if totals is None:
    raise UserError(f"The validation split under {data_dir} has no full batch of"
                    f" {batch_size} rows; lower config.data.batch_size.")
  count = float(totals["count"])
  out = {"loss": float(totals["ce"]) / count, "tokens": count,
         "ece": metrics.expected_calibration_error(totals["bins"])}
  out["perplexity"] = float(np.exp(min(out["loss"], 50.0)))
  if teacher is not None:
    out["kl_to_teacher"] = float(totals["kl_to_teacher"]) / count
    out["top1_agreement"] = float(totals["top1_agreement"]) / count
  return out


def cache_figures(workdir: str, sample_records: int = 64) -> dict[str, Any] | None:
  """Bytes per cached token of each method, and the cache's writing time.

  A record may hold both targets; each method's size is measured by
  re-encoding a sample of records with that target alone.
  """
  from data import cache, cache_format
  directory = os.path.join(workdir, "logits")
  try:
    manifest = cache.read_manifest(directory)
  except cache.CacheError:
    return None
  out: dict[str, Any] = {
      "records": manifest["num_records"], "seq_len": manifest["seq_len"],
      "methods": manifest["methods"], "k": manifest["k"],
      "num_samples": manifest["num_samples"],
      "seconds": sum(s.get("seconds", 0.0) for s in manifest["shards"]),
      "file_bytes_per_token": sum(s["bytes"] for s in manifest["shards"])
                              / (manifest["num_records"] * manifest["seq_len"])}
  source = {m: cache.CacheSource(directory, m, manifest) for m in manifest["methods"]}
  vocab = manifest["vocab_size"]
  n = min(sample_records, manifest["num_records"])
  for method, src in source.items():
    sizes = []
    for i in range(n):
      r = src[i]
      kwargs = ({"topk_ids": r["ids"], "topk_log_probs": r["log_probs"],
                 "topk_tail": r["tail"]} if method == "topk"
                else {"sample_ids": r["ids"], "sample_counts": r["counts"]})
      sizes.append(len(cache_format.encode_record(
          r["tokens"], r["segment_ids"], vocab_size=vocab, **kwargs)))
    out[f"{method}_bytes_per_token"] = float(np.mean(sizes)) / manifest["seq_len"]
  return out


def _load(name: str, path: str):
  if name == "teacher":
    from teacher import load_teacher
    return load_teacher(path)
  from student import load_student
  return load_student(path)


def _fingerprint(folders: dict[str, str], config) -> dict[str, Any]:
  return {"steps": {n: ckpt.latest_step(p) for n, p in folders.items()},
          "eval": config.eval.to_dict()}


def evaluate(config, workdir: str) -> dict[str, Any]:
  """Runs the stage; returns the report (also written to W/eval/report.json)."""
  folders = model_folders(workdir)
  if not folders:
    raise UserError(f"Nothing to evaluate in {workdir}: no teacher/ or student/<run>/"
                    " with a checkpoint. Run the teacher and distill stages first.")
  out_dir = eval_dir(workdir)
  json_path = os.path.join(out_dir, "report.json")
  fingerprint = json.loads(json.dumps(_fingerprint(folders, config)))
  if os.path.isfile(json_path):
    with open(json_path) as f:
      previous = json.load(f)
    if previous.get("inputs") == fingerprint:
      print(f"evaluate: report is up to date ({json_path}); nothing to do.")
      return previous

  e, data = config.eval, config.data
  data_dir = prep.data_dir(workdir)
  teacher = _load("teacher", folders["teacher"]) if "teacher" in folders else None
  models: dict[str, dict[str, Any]] = {}
  for name, path in tqdm(folders.items(), desc="evaluate", unit="model"):
    started = time.time()
    model = teacher if name == "teacher" else _load(name, path)
    entry: dict[str, Any] = {"path": path, "step": ckpt.latest_step(path)}
    if name != "teacher":
      settings = ckpt.read_config(path).get("settings", {})
      entry["mode"], entry["target"], entry["loss_kind"] = (
          settings.get("mode"), settings.get("target"), settings.get("loss"))
    entry.update(quality(model, None if name == "teacher" else teacher, data_dir,
                         seq_len=data.seq_len, batch_size=data.batch_size,
                         max_batches=e.batches, chunk_size=config.distill.loss_chunk,
                         num_bins=e.ece_bins))
    entry["params"] = model.param_counts()
    entry["kv_cache_bytes_per_token"] = metrics.model_kv_bytes(model.config)
    entry["seconds"] = round(time.time() - started, 2)
    models[name] = entry
    logging.info("evaluated %s: %s", name, entry)

  result = {"inputs": fingerprint, "models": models,
            "cache": cache_figures(workdir),
            "machine": report.machine_description()}
  os.makedirs(out_dir, exist_ok=True)
  result["plots"] = report.write_plots(out_dir, workdir, models)
  with open(json_path + ".tmp", "w") as f:
    json.dump(result, f, indent=2)
  os.replace(json_path + ".tmp", json_path)
  md_path = os.path.join(out_dir, "report.md")
  with open(md_path + ".tmp", "w") as f:
    f.write(report.markdown(result))
  os.replace(md_path + ".tmp", md_path)
  print(f"evaluate: wrote {md_path} and {json_path}")
  return result


def main(argv):
  config, workdir = cli.setup(argv)
  evaluate(config, workdir)


if __name__ == "__main__":
  cli.run(main)
