"""The evaluation report a person reads: report.md's tables.

Its plots are ``plots``'s.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import jax

from distill.evals import metrics


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


def position_buckets(models: dict[str, dict[str, Any]]) -> list[str]:
  """The position buckets (``metrics.position_labels``, in order) any model
  has a validation loss for."""
  seen = {b for e in models.values() for b in e.get("loss_by_position", {})}
  return [b for b in metrics.position_labels() if b in seen]


def quality_per_byte(
    models: dict[str, dict[str, Any]],
) -> dict[str, list[tuple[float, float, str]]]:
  """{target/loss: [(cache bytes per token, gain over CE, run), ...]
  ascending} for the offline students, when there is a CE baseline."""
  ce = ce_baseline(models)
  if ce is None:
    return {}
  lines: dict[str, list[tuple[float, float, str]]] = {}
  for name, e in models.items():
    if (
        e.get("mode") == "offline"
        and e.get("tokenizer") != "own"
        and e.get("cache_bytes_per_token")
        and not e.get("quantization")  # those are about weight bytes
        and "init" not in (e.get("parts") or {})  # more steps than CE's
    ):
      method = f"{e['target']} / {e['loss_kind']}"
      point = (e["cache_bytes_per_token"], ce["loss"] - e["loss"], name)
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
  x = h.get("cross_tokenizer") or {}
  if x.get("gain_bpb") is not None:
    line = (
        f"- Best student with its own tokenizer `{x['best']}`:"
        f" {x['gain_bpb']:+.4f} bits/byte against its own CE baseline"
    )
    if x.get("share") is not None:
      line += (
          f", {x['share']:.0%} of the best same-tokenizer student's"
          f" {x['same_tokenizer_gain_bpb']:+.4f}"
      )
    lines.append(line + ".")
  return "\n".join(lines) + "\n\n" if lines else ""


def _across_tokenizers(models: dict[str, dict[str, Any]]) -> str:
  """Every model in bits per byte, against the CE baseline of its own
  tokenizer: the comparison across vocabularies."""
  if not any(e.get("tokenizer") == "own" for e in models.values()):
    return ""
  baselines = {
      side: ce_baseline(models, own=side == "own")
      for side in ("own", "teacher")
  }
  rows = []
  for name, e in models.items():
    side = "own" if e.get("tokenizer") == "own" else "teacher"
    ce = baselines[side]
    bpb = e.get("bits_per_byte")
    rows.append(
        [
            name,
            _kind(e),
            side,
            e.get("vocab_size"),
            e["loss"],
            bpb,
            None
            if ce is None or bpb is None or name == "teacher"
            else ce["bits_per_byte"] - bpb,
        ]
    )
  return (
      "\n## Across tokenizers\n\n"
      + (
          "Students that speak their own tokenizer beside those that speak the"
          " teacher's, on the same validation text: nats/token differ in what a"
          " token is, bits per byte do not. The gain is over the CE baseline of"
          " the same tokenizer, in bits per byte.\n\n"
      )
      + _table(
          [
              "model",
              "kind",
              "tokenizer",
              "vocab",
              "val loss (nats/token)",
              "bits/byte",
              "gain over its CE (bits/byte)",
          ],
          rows,
      )
  )


def ce_baseline(
    models: dict[str, dict[str, Any]], own: bool = False
) -> dict[str, Any] | None:
  """The report entry of the cross-entropy baseline run of the teacher's
  tokenizer (``own``: of the student's own), if there is one."""
  return next(
      (
          e
          for e in models.values()
          if e.get("mode") == "ce" and (e.get("tokenizer") == "own") == own
      ),
      None,
  )


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
            None
            if ce is None or e.get("tokenizer") == "own"
            else ce["loss"] - e["loss"],
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
  parts.append(_across_tokenizers(models))
  parts += [
      _by_position(models),
      _kv_cache(models),
      _speed(models),
      _speculative(models),
      _continuations(models),
      _cache(result.get("cache")),
  ]
  for plot in result.get("plots", []):
    parts.append(f"\n![{plot}]({plot})\n")
    if plot in _CAPTIONS:
      parts.append(f"\n{_CAPTIONS[plot]}\n")
  return "".join(parts)


_QUANTISED = (
    " Hollow markers: quantised variants (PTQ, QAT), in their float parent's"
    " colour. A point that would cover another is drawn a marker's width or"
    " more beside it (the data are exact; only the drawing moves)."
)
# Under each plot in report.md: what it draws, and from where.
_CAPTIONS = {
    "validation_loss.png": (
        "Left: the eval/loss each run logged while it trained, on its"
        " training-time eval batches (`teacher.train.eval_batches`,"
        " `distill.eval_batches`). Right: each model's val loss of the tables"
        " above, on this stage's `eval.batches`. Both take the first batches"
        " of the same fixed-seed order of the validation split, but not as"
        " many (the titles give the tokens), so a run's last logged point is"
        " not its table figure: compare models by the right panel." + _QUANTISED
    ),
    "quality_vs_speed.png": "Val loss as in the tables." + _QUANTISED,
    "quality_vs_weight_bytes.png": "Val loss as in the tables." + _QUANTISED,
    "loss_by_position.png": (
        "Val loss per position bucket as in the loss-by-position table."
        + _QUANTISED
    ),
    "quality_per_byte.png": (
        "Gain over CE as in the distillation table: a line per cached"
        " target and loss (its runs after the colon), in its first run's"
        " colour; the online runs, which need no cache, as dashed lines."
    ),
}


def _quality(models: dict[str, dict[str, Any]]) -> str:
  header = [
      "model",
      "kind",
      "step",
      "val loss",
      "bits/byte",
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
          e.get("bits_per_byte"),
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
      "Val loss is in nats per token of the model's own tokenizer; bits/byte"
      " is the same loss over the UTF-8 bytes of the text it predicted, in"
      " bits (models with different tokenizers compare on it). KL is"
      " KL(teacher ‖ model) over the full vocabulary; ECE is the top-1"
      " expected calibration error.\n\n" + _table(header, rows)
  )


def _by_position(models: dict[str, dict[str, Any]]) -> str:
  """Validation loss per position bucket (rows long enough for two)."""
  buckets = position_buckets(models)
  if len(buckets) < 2:
    return ""
  rows = [
      [n] + [e.get("loss_by_position", {}).get(b) for b in buckets]
      for n, e in models.items()
  ]
  tokens = next(
      (
          e["tokens_by_position"]
          for e in models.values()
          if e.get("tokens_by_position")
      ),
      {},
  )
  rows.append(
      ["(tokens)"] + [int(tokens[b]) if b in tokens else None for b in buckets]
  )
  return (
      "\n## Loss by position\n\nValidation loss (nats/token) of the tokens"
      " whose document has this many tokens before them in the row (the"
      " context they are predicted from).\n\n"
      + _table(["model"] + buckets, rows)
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
      f" written in {cache['seconds']:.1f} s of teacher passes and writes"
      " (the shards' own time: the console's figure adds compiling).\n"
  )
  return "".join(parts)
