"""The logit cache's size: bytes per token of each cached target.

``cache_figures`` reads a cache's manifest and measures each method's bytes
per token by re-encoding a sample of records with that target alone (a
record may hold several); ``target_bytes_per_token`` does it for one target
read through a view (a run that reads fewer ids or draws than were cached).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from data import cache, cache_format
from distill.core import checkpoint as ckpt
from distill.core import layout


def cache_figures(
    workdir: str, teacher=None, sample_records: int = 64
) -> dict[str, Any] | None:
  """Bytes per cached token of each method, and the cache's writing time.

  A record may hold both targets; each method's size is measured by
  re-encoding a sample of records with that target alone. None without a
  cache; a damaged cache, or one that another teacher than ``teacher``
  wrote, is refused.
  """
  directory = layout.cache_dir(workdir)
  if not os.path.isfile(os.path.join(directory, cache.MANIFEST)):
    return None
  manifest = cache.read_manifest(directory)
  if teacher is not None:
    cache.check_matches(
        manifest,
        {"teacher_fingerprint": ckpt.fingerprint(teacher)},
        directory,
    )
  out: dict[str, Any] = {
      "records": manifest["num_records"],
      "seq_len": manifest["seq_len"],
      "methods": manifest["methods"],
      "k": manifest["k"],
      "num_samples": manifest["num_samples"],
      "tail_k": manifest.get("tail_k", 0),
      "tail_samples": manifest.get("tail_samples", 0),
      "seconds": sum(s.get("seconds", 0.0) for s in manifest["shards"]),
      "file_bytes_per_token": sum(s["bytes"] for s in manifest["shards"])
      / (manifest["num_records"] * manifest["seq_len"]),
  }
  for method in manifest["methods"]:
    out[f"{method}_bytes_per_token"] = target_bytes_per_token(
        directory, manifest, method, None, sample_records
    )
  return out


def target_bytes_per_token(
    directory: str,
    manifest: dict[str, Any],
    target: str,
    view: cache.TargetView | None,
    sample_records: int = 64,
) -> float:
  """Bytes per token a cache of just this target (read through ``view``)
  would take: the first ``sample_records`` records re-encoded with it alone."""
  src = cache.CacheSource(directory, target, manifest, view)
  sizes = []
  for i in range(min(sample_records, manifest["num_records"])):
    r = src[i]
    record = cache_format.encode_record(
        r["tokens"],
        r["segment_ids"],
        vocab_size=manifest["vocab_size"],
        **cache_format_arrays(target, r),
    )
    sizes.append(len(record))
  return float(np.mean(sizes)) / manifest["seq_len"]


def cache_format_arrays(method: str, r: dict[str, Any]) -> dict[str, Any]:
  """A ``CacheSource`` item's target as ``encode_record`` keywords."""
  if method == "topk":
    return {
        "topk_ids": r["ids"],
        "topk_log_probs": r["log_probs"],
        "topk_tail": r["tail"],
    }
  if method == "topk_tail":
    return {
        "tt_ids": r["ids"],
        "tt_log_probs": r["log_probs"],
        "tt_tail": r["tail"],
        "tt_sample_ids": r["tail_ids"],
        "tt_sample_counts": r["tail_counts"],
    }
  if method == "label":
    return {"label_log_probs": r["label_log_probs"]}
  return {"sample_ids": r["ids"], "sample_counts": r["counts"]}
