"""The report's headline: what distillation gained, from the per-model entries."""

from __future__ import annotations

from typing import Any

from distill.evals import report


def headline(models: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """The comparison the pipeline exists for, from the per-model entries.

  ``distill_gain``: CE-baseline loss minus the best distilled student's loss
  (positive: distillation helped); ``teacher_gain``: CE-baseline loss minus
  the teacher's; ``decode_speedup_b1``: the best student's batch-1 decode
  tokens/s over the teacher's. Quantised students (PTQ variants, QAT runs)
  and continuations of another student (``from=``, more steps than the
  baseline) are compared in their own rows, not here; so are students
  with their own tokenizer (``cross_tokenizer``, in bits per byte). Missing
  pieces give None.
  """
  distilled = {
      n: e
      for n, e in models.items()
      if n != "teacher"
      and e.get("tokenizer") != "own"
      and e.get("mode") not in (None, "ce")
      and not e.get("quantization")  # trained float students only
      # Continuations of another student train longer than the baseline;
      # they are compared with their own control.
      and "init" not in (e.get("parts") or {})
  }
  ce = report.ce_baseline(models)
  teacher = models.get("teacher")
  best = (
      min(distilled, key=lambda n: distilled[n]["loss"]) if distilled else None
  )
  out: dict[str, Any] = {
      "best_distilled": best,
      "distill_gain": None,
      "teacher_gain": None,
      "decode_speedup_b1": None,
  }
  if best and ce:
    out["distill_gain"] = ce["loss"] - distilled[best]["loss"]
  if teacher and ce:
    out["teacher_gain"] = ce["loss"] - teacher["loss"]
  decode = (
      lambda e: e.get("decode", {})
      .get("batch_1", {})
      .get("decode_tokens_per_s")
  )
  if best and teacher and decode(distilled[best]) and decode(teacher):
    out["decode_speedup_b1"] = decode(distilled[best]) / decode(teacher)
  crossed = cross_tokenizer_headline(models, best)
  if crossed:
    out["cross_tokenizer"] = crossed
  return out


def cross_tokenizer_headline(
    models: dict[str, dict[str, Any]], best_shared: str | None
) -> dict[str, Any] | None:
  """Students with their own tokenizer against their own CE baseline, in
  bits per byte (the text is the same, the tokens are not), beside what the
  best same-tokenizer student gains over its CE baseline: ``share`` is the
  first gain over the second. None without such students."""
  own = {
      n: e
      for n, e in models.items()
      if e.get("tokenizer") == "own"
      and not e.get("quantization")
      and "init" not in (e.get("parts") or {})
      and e.get("bits_per_byte") is not None
  }
  if not own:
    return None
  ce = report.ce_baseline(own, own=True)
  distilled = {n: e for n, e in own.items() if e.get("mode") != "ce"}
  best = (
      min(distilled, key=lambda n: distilled[n]["bits_per_byte"])
      if distilled
      else None
  )
  out: dict[str, Any] = {"best": best, "gain_bpb": None}
  if best and ce:
    out["gain_bpb"] = ce["bits_per_byte"] - distilled[best]["bits_per_byte"]
  shared_ce = report.ce_baseline(models)
  out["same_tokenizer_gain_bpb"] = None
  if best_shared and shared_ce and shared_ce.get("bits_per_byte"):
    out["same_tokenizer_gain_bpb"] = (
        shared_ce["bits_per_byte"] - models[best_shared]["bits_per_byte"]
    )
  gains = (out["gain_bpb"], out["same_tokenizer_gain_bpb"])
  out["share"] = (
      gains[0] / gains[1] if None not in gains and gains[1] > 0 else None
  )
  return out
