"""The evaluation report a person reads: markdown tables and PNG plots."""

from __future__ import annotations

import os
import platform
from typing import Any

from distill import trainer


def machine_description() -> str:
  import jax
  devices = jax.devices()
  return (f"{platform.machine()}, {os.cpu_count()} CPU cores, {devices[0].platform}"
          f" x{len(devices)} ({devices[0].device_kind}), jax {jax.__version__}")


def _fmt(value, digits=3) -> str:
  if value is None:
    return "–"
  if isinstance(value, float):
    return f"{value:.{digits}f}"
  if isinstance(value, int):
    return f"{value:,}"
  return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def _kind(entry: dict[str, Any]) -> str:
  if entry.get("mode") is None:
    return "teacher"
  return " / ".join(str(entry[k]) for k in ("mode", "target", "loss_kind") if entry.get(k))


def write_plots(out_dir: str, workdir: str, models: dict[str, dict[str, Any]]) -> list[str]:
  """Validation loss over training per run; quality against decode speed."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  written = []
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, entry in models.items():
    records = [r for r in trainer.read_metrics(entry["path"]) if "eval/loss" in r]
    if records:
      ax.plot([r["step"] for r in records], [r["eval/loss"] for r in records],
              marker="o", label=name)
  ax.set_xlabel("training step")
  ax.set_ylabel("validation loss (nats/token)")
  ax.set_title("Validation loss during training")
  ax.grid(alpha=0.3)
  ax.legend()
  path = os.path.join(out_dir, "validation_loss.png")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  written.append(os.path.basename(path))

  points = [(n, e["decode"]["batch_1"]["decode_tokens_per_s"], e["loss"])
            for n, e in models.items() if e.get("decode")]
  if points:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, speed, loss in points:
      ax.scatter(speed, loss, s=40)
      ax.annotate(name, (speed, loss), textcoords="offset points", xytext=(5, 4))
    ax.set_xscale("log")
    ax.set_xlabel("decode tokens/s, batch 1 (log scale)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Quality against decode speed (lower left is better)")
    ax.grid(alpha=0.3)
    path = os.path.join(out_dir, "quality_vs_speed.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(os.path.basename(path))
  return written


def markdown(result: dict[str, Any]) -> str:
  models = result["models"]
  parts = ["# Evaluation report\n\n",
           f"Machine: {result['machine']}. Validation split; every number is"
           " also in `report.json`.\n\n",
           "## Quality\n\n",
           "KL is KL(teacher ‖ model) over the full vocabulary; ECE is the top-1"
           " expected calibration error.\n\n"]
  parts.append(_table(
      ["model", "kind", "step", "val loss", "perplexity", "KL to teacher",
       "top-1 agreement", "ECE", "params", "active params"],
      [[n, _kind(e), e["step"], e["loss"], e["perplexity"], e.get("kl_to_teacher"),
        e.get("top1_agreement"), e["ece"], e["params"]["total"], e["params"]["active"]]
       for n, e in models.items()]))
  contexts = list(next(iter(models.values()))["kv_cache_bytes_per_token"])
  parts.append("\n## KV cache\n\nBytes per token of context (bfloat16 K and V).\n\n")
  parts.append(_table(["model"] + [f"{int(c) // 1024}k" for c in contexts],
                      [[n] + [e["kv_cache_bytes_per_token"][c] for c in contexts]
                       for n, e in models.items()]))
  speed_rows = [[n] + [e["decode"][b][k] for b in ("batch_1", "batch_8")
                       for k in ("prefill_tokens_per_s", "decode_tokens_per_s")]
                for n, e in models.items() if e.get("decode")]
  if speed_rows:
    parts.append("\n## Speed\n\n")
    parts.append(_table(["model", "prefill tok/s (b1)", "decode tok/s (b1)",
                         "prefill tok/s (b8)", "decode tok/s (b8)"], speed_rows))
  spec_rows = [[n, s["gamma"], s["acceptance_rate"], s["tokens_per_teacher_call"],
                s["speedup"], s["matches_teacher"]]
               for n, e in models.items() for s in e.get("speculative", [])]
  if spec_rows:
    parts.append("\n## Speculative decoding (student drafts, teacher verifies)\n\n")
    parts.append(_table(["drafter", "γ", "acceptance", "tokens per teacher call",
                         "wall speed-up", "output = teacher greedy"], spec_rows))
  cache = result.get("cache")
  if cache:
    parts.append("\n## Logit cache\n\n")
    rows = [[m, cache.get(f"{m}_bytes_per_token"),
             cache["k"] if m == "topk" else cache["num_samples"]]
            for m in cache["methods"]]
    parts.append(_table(["method", "bytes per token (records)", "k or N"], rows))
    parts.append(f"\n{cache['records']:,} records of {cache['seq_len']} positions;"
                 f" {cache['file_bytes_per_token']:.1f} bytes per token in the shard"
                 f" files (both methods together, with the container overhead);"
                 f" written in {cache['seconds']:.1f} s.\n")
  for plot in result.get("plots", []):
    parts.append(f"\n![{plot}]({plot})\n")
  return "".join(parts)
