"""The evaluation report a person reads: markdown tables and PNG plots."""

from __future__ import annotations

import os
import platform
from typing import Any

import jax

from distill.training import loop as trainer


def machine_description() -> str:
  devices = jax.devices()
  return (
      f"{platform.machine()}, {os.cpu_count()} CPU cores, {devices[0].platform}"
      f" x{len(devices)} ({devices[0].device_kind}), jax {jax.__version__}"
  )


def _fmt(value, digits=3) -> str:
  if value is None:
    return "–"
  if isinstance(value, bool):
    return "yes" if value else "no"
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
  kind = " / ".join(
      str(entry[k]) for k in ("mode", "target", "loss_kind") if entry.get(k)
  )
  sizes = entry.get("sizes") or {}
  kind += "".join(f" {k}={v}" for k, v in sizes.items())
  parts = entry.get("parts") or {}
  kind += "".join(
      f" {'from' if k == 'init' else k}={v}" for k, v in parts.items()
  )
  if entry.get("quantization"):
    how = "PTQ" if entry.get("parent") else "QAT"
    kind += f" [{how} {entry['quantization']}]"
  return kind


def write_plots(out_dir: str, models: dict[str, dict[str, Any]]) -> list[str]:
  """Validation loss over training per run; quality against decode speed."""
  # Imported here: only the evaluate stage draws, and matplotlib is slow to
  # import and sets a backend.
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  written = []
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, entry in models.items():
    records = [
        r for r in trainer.read_metrics(entry["path"]) if "eval/loss" in r
    ]
    if records:
      ax.plot(
          [r["step"] for r in records],
          [r["eval/loss"] for r in records],
          marker="o",
          label=name,
      )
  ax.set_xlabel("training step")
  ax.set_ylabel("validation loss (nats/token)")
  ax.set_title("Validation loss during training")
  ax.legend()
  written.append(_save(plt, fig, ax, out_dir, "validation_loss.png"))

  points = [
      (n, e["decode"]["batch_1"]["decode_tokens_per_s"], e["loss"])
      for n, e in models.items()
      if e.get("decode")
  ]
  if points:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _labelled_points(ax, points)
    ax.set_xscale("log")
    ax.set_xlabel("decode tokens/s, batch 1 (log scale)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Quality against decode speed (lower right is better)")
    written.append(_save(plt, fig, ax, out_dir, "quality_vs_speed.png"))

  quantized = [
      (n, e["weight_bytes"], e["loss"])
      for n, e in models.items()
      if n != "teacher" and e.get("weight_bytes")
      and (e.get("quantization") or any(
          m.get("parent") == n for m in models.values()))
  ]  # fmt: skip
  if quantized:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _labelled_points(ax, [(n, b / 2**20, loss) for n, b, loss in quantized])
    ax.set_xlabel("weight MiB (as stored)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Quantised students against their float parents")
    written.append(_save(plt, fig, ax, out_dir, "quality_vs_weight_bytes.png"))

  lines = quality_per_byte(models)
  if lines:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, pts in sorted(lines.items()):
      ax.plot(
          [b for b, _ in pts], [g for _, g in pts], marker="o", label=method
      )
    for name, e in models.items():
      if e.get("mode") == "online":
        gain = ce_baseline(models)["loss"] - e["loss"]
        ax.axhline(gain, linestyle="--", color="gray")
        ax.text(
            0.01, gain, f" {name}", transform=ax.get_yaxis_transform(),
            va="bottom", color="gray",
        )  # fmt: skip
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("cache bytes per token (log scale)")
    ax.set_ylabel("validation gain over CE (nats/token)")
    ax.set_title("What each cached byte buys (higher is better)")
    ax.legend()
    written.append(_save(plt, fig, ax, out_dir, "quality_per_byte.png"))
  return written


def _labelled_points(ax, points) -> None:
  """A scatter of (name, x, y), each point labelled with its name."""
  for name, x, y in points:
    ax.scatter(x, y, s=40)
    ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4))


def _save(plt, fig, ax, out_dir: str, filename: str) -> str:
  """Grids ``ax``, writes ``fig`` to ``out_dir/filename`` and closes it;
  returns the file name."""
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, filename), dpi=110)
  plt.close(fig)
  return filename


def quality_per_byte(
    models: dict[str, dict[str, Any]],
) -> dict[str, list[tuple[float, float]]]:
  """{target/loss: [(cache bytes per token, gain over CE), ...] ascending}
  for the offline students, when there is a CE baseline."""
  ce = ce_baseline(models)
  if ce is None:
    return {}
  lines: dict[str, list[tuple[float, float]]] = {}
  for e in models.values():
    if (
        e.get("mode") == "offline"
        and e.get("cache_bytes_per_token")
        and not e.get("quantization")  # those are about weight bytes
        and "init" not in (e.get("parts") or {})  # more steps than CE's
    ):
      method = f"{e['target']} / {e['loss_kind']}"
      point = (e["cache_bytes_per_token"], ce["loss"] - e["loss"])
      lines.setdefault(method, []).append(point)
  return {m: sorted(pts) for m, pts in lines.items()}


def _headline(result: dict[str, Any]) -> str:
  h = result.get("summary") or {}
  lines = []
  if h.get("distill_gain") is not None:
    lines.append(
        f"- Best distilled student `{h['best_distilled']}`:"
        f" {h['distill_gain']:+.3f} nats/token against the CE baseline"
        " (positive: distillation helped)."
    )
  if h.get("teacher_gain") is not None:
    lines.append(
        f"- Teacher: {h['teacher_gain']:+.3f} nats/token against the CE"
        " baseline."
    )
  if h.get("decode_speedup_b1") is not None:
    lines.append(
        f"- `{h['best_distilled']}` decodes {h['decode_speedup_b1']:.1f}x"
        " as many tokens/s as the teacher (batch 1)."
    )
  return "\n".join(lines) + "\n\n" if lines else ""


def ce_baseline(models: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
  """The report entry of the cross-entropy baseline run, if there is one."""
  return next((e for e in models.values() if e.get("mode") == "ce"), None)


def _comparison(models: dict[str, dict[str, Any]], cache: dict | None) -> str:
  """Every student against the CE baseline, with what its target cost."""
  ce = ce_baseline(models)
  rows = []
  for name, e in models.items():
    if name == "teacher":
      continue
    method = (
        e.get("target") if e.get("mode") == "offline" else None
    )  # cache method
    per_token = e.get("cache_bytes_per_token")
    seconds = cache["seconds"] if cache and method else None
    rows.append(
        [
            name,
            _kind(e),
            e["loss"],
            None if ce is None else ce["loss"] - e["loss"],
            e.get("kl_to_teacher"),
            e["ece"],
            per_token,
            seconds,
        ]
    )
  return _table(
      [
          "student",
          "kind",
          "val loss",
          "gain over CE",
          "KL to teacher",
          "ECE",
          "cache bytes/token",
          "cache s",
      ],
      rows,
  )


def _continuations(models: dict[str, dict[str, Any]]) -> str:
  """The teacher's log-likelihood of each model's own continuations."""
  rows = []
  for name, e in models.items():
    c = e.get("continuations")
    if not c:
      continue
    spec = e.get("speculative") or [{}]
    rows.append(
        [
            name,
            _kind(e),
            c["teacher_loglik_greedy"],
            c["teacher_loglik_sampled"],
            c.get("model_loglik_sampled"),
            spec[0].get("acceptance_rate"),
        ]
    )
  if not rows:
    return ""
  tokens = next(
      e["continuations"]["tokens"]
      for e in models.values()
      if e.get("continuations")
  )
  return (
      "\n## Own continuations, scored by the teacher\n\n"
      "Each model continues held-out prompts; the teacher's mean"
      " log-probability per generated token (nats, higher is better:"
      f" {tokens} tokens per figure), greedy and sampled; the model's own"
      " log-likelihood of its samples, and its speculative acceptance as a"
      " drafter (the first γ) beside them.\n\n"
      + _table(
          [
              "model",
              "kind",
              "teacher log-lik (greedy)",
              "teacher log-lik (sampled)",
              "own log-lik (sampled)",
              "acceptance",
          ],
          rows,
      )
  )


def _target_table(cache: dict[str, Any], figures: dict[str, float]) -> str:
  """What each cached method keeps of the teacher (``distill.evals.targets``)."""
  rows = []
  for m in cache["methods"]:
    rows.append(
        [
            m,
            figures.get(f"{m}_coverage"),
            figures.get(f"{m}_unique"),
            figures.get(f"{m}_kl"),
            figures.get(f"{m}_missing"),
        ]
    )
  return (
      "\nWhat each target keeps of the teacher, on validation positions"
      f" (teacher entropy {figures['teacher_entropy']:.3f} nats/token):"
      " coverage = the teacher's mass on the top-k ids (the head), unique ="
      " distinct ids among the draws (the tail's), KL = KL(target ||"
      " teacher) of the decoded target (top-k: renormalised, as"
      " topk_sparse reads it; topk_ghost is exact on its k + 1 classes),"
      " missing = the teacher's mass on ids the target leaves out.\n\n"
      + _table(
          [
              "method",
              "coverage",
              "unique ids",
              "KL(target || teacher)",
              "missing mass",
          ],
          rows,
      )
  )


def markdown(result: dict[str, Any]) -> str:
  """``report.md``: the report's tables and plots, section by section."""
  models = result["models"]
  parts = [
      "# Evaluation report\n\n",
      f"Machine: {result['machine']}. Validation split; every number is"
      " also in `report.json`.\n\n",
      _headline(result),
      _quality(models),
  ]
  if any(n != "teacher" for n in models):
    parts.append(
        "\n## Distillation against the CE baseline\n\n"
        'Same student, same rows in the same order; "gain over CE" is'
        " the CE baseline's loss minus this student's. Cache bytes are"
        " per token of this run's target alone (tokens included); the"
        " cache time is the one teacher pass that wrote every target.\n\n"
    )
    parts.append(_comparison(models, result.get("cache")))
  parts += [
      _kv_cache(models),
      _speed(models),
      _speculative(models),
      _continuations(models),
      _cache(result.get("cache")),
  ]
  for plot in result.get("plots", []):
    parts.append(f"\n![{plot}]({plot})\n")
  return "".join(parts)


def _quality(models: dict[str, dict[str, Any]]) -> str:
  header = [
      "model",
      "kind",
      "step",
      "val loss",
      "perplexity",
      "KL to teacher",
      "top-1 agreement",
      "ECE",
      "params",
      "active params",
      "weight bytes",
  ]
  rows = [
      [
          n,
          _kind(e),
          e["step"],
          e["loss"],
          e["perplexity"],
          e.get("kl_to_teacher"),
          e.get("top1_agreement"),
          e["ece"],
          e["params"]["total"],
          e["params"]["active"],
          e.get("weight_bytes"),
      ]
      for n, e in models.items()
  ]
  return (
      "## Quality\n\n"
      "KL is KL(teacher ‖ model) over the full vocabulary; ECE is the top-1"
      " expected calibration error.\n\n" + _table(header, rows)
  )


def _kv_cache(models: dict[str, dict[str, Any]]) -> str:
  contexts = list(next(iter(models.values()))["kv_cache_bytes_per_token"])
  return (
      "\n## KV cache\n\nBytes per token of context (bfloat16 K and V).\n\n"
      + _table(
          ["model"] + [f"{int(c) // 1024}k" for c in contexts],
          [
              [n] + [e["kv_cache_bytes_per_token"][c] for c in contexts]
              for n, e in models.items()
          ],
      )
  )


def _speed(models: dict[str, dict[str, Any]]) -> str:
  sizes = sorted(
      {b for e in models.values() for b in e.get("decode", {})},
      key=lambda b: int(b.split("_")[1]),
  )
  rows = [
      [n]
      + [
          e["decode"].get(b, {}).get(k)
          for b in sizes
          for k in ("prefill_tokens_per_s", "decode_tokens_per_s")
      ]
      for n, e in models.items()
      if e.get("decode")
  ]
  if not rows:
    return ""
  header = ["model"] + [
      f"{what} tok/s (b{b.split('_')[1]})"
      for b in sizes
      for what in ("prefill", "decode")
  ]
  return (
      "\n## Speed\n\nTokens/s summed over the batch, medians of"
      " timed runs after a warm-up (compilation excluded).\n\n"
      + _table(header, rows)
  )


def _speculative(models: dict[str, dict[str, Any]]) -> str:
  rows = [
      [
          n,
          s["gamma"],
          s["acceptance_rate"],
          s["tokens_per_teacher_call"],
          s["speedup"],
          s["matches_teacher"],
      ]
      for n, e in models.items()
      for s in e.get("speculative", [])
  ]
  if not rows:
    return ""
  header = [
      "drafter",
      "γ",
      "acceptance",
      "tokens per teacher call",
      "wall speed-up",
      "output = teacher greedy",
  ]
  return (
      "\n## Speculative decoding (student drafts, teacher verifies)\n\n"
      "Greedy; wall speed-up is the teacher alone over teacher +"
      " drafter on the same prompts.\n\n" + _table(header, rows)
  )


def _cache(cache: dict[str, Any] | None) -> str:
  if not cache:
    return ""
  sizes = {
      "topk": f"k={cache['k']}",
      "sample": f"N={cache['num_samples']}",
      "topk_tail": f"k={cache.get('tail_k')}, M={cache.get('tail_samples')}",
  }
  rows = [
      [m, cache.get(f"{m}_bytes_per_token"), sizes.get(m)]
      for m in cache["methods"]
  ]
  parts = [
      "\n## Logit cache\n\n",
      _table(["method", "bytes per token (records)", "size"], rows),
  ]
  figures = cache.get("targets") or {}
  if figures:
    parts.append(_target_table(cache, figures))
  parts.append(
      f"\n{cache['records']:,} records of {cache['seq_len']} positions;"
      f" {cache['file_bytes_per_token']:.1f} bytes per token in the shard"
      f" files (every method together, with the container overhead);"
      f" written in {cache['seconds']:.1f} s.\n"
  )
  return "".join(parts)
