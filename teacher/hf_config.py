"""Hugging Face MoE configs -> TeacherConfig.

``read_hf_config`` reads a checkpoint folder's ``config.json`` (JSON only,
nothing executed); ``teacher_config_from_hf`` maps a Mixtral, Qwen2-MoE,
Qwen3-MoE or OLMoE config onto the teacher's fields, and refuses, naming the
field, what the teacher cannot compute the same way (scaled RoPE, a missing
size, another architecture). ``teacher.hf`` reads the weights.
"""

from __future__ import annotations

import json
import os
from typing import Any

from distill.core.errors import UserError
from teacher.config import TeacherConfig

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
_ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}


class HFImportError(UserError):
  """A Hugging Face folder this importer cannot (or will not) read."""


def read_hf_config(hf_dir: str) -> dict[str, Any]:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise HFImportError(
        f"{hf_dir!r} has no config.json: pass the folder of a Hugging Face"
        " checkpoint (the one holding config.json and *.safetensors)"
    )
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise HFImportError(f"{path} is not valid JSON: {e}") from e


def _rope(hf: dict[str, Any]) -> float:
  """rope_theta from `rope_parameters` (transformers 5) or the top level."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  rope_type = params.get(
      "rope_type", scaling.get("rope_type", scaling.get("type", "default"))
  )
  if rope_type != "default":
    raise HFImportError(
        f"RoPE type {rope_type!r} is not supported (only the default, unscaled"
        " RoPE of the base checkpoints); import a checkpoint without rope_scaling"
    )
  return float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))


def teacher_config_from_hf(
    hf: dict[str, Any],
    *,
    dtype: str | None = None,
    param_dtype: str = "float32",
) -> TeacherConfig:
  """Maps a transformers config.json (as a dict) to a TeacherConfig.

  Defaults follow each family's transformers configuration class (a missing
  key means its default there). Raises HFImportError for anything the teacher
  does not implement rather than importing a different model.
  """
  family = _check_supported(hf)
  fields = _attention_fields(hf, family)
  fields.update(
      vocab_size=hf["vocab_size"],
      num_layers=hf["num_hidden_layers"],
      rope_base=_rope(hf),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      rms_eps=float(
          hf.get(
              "rms_norm_eps", 1e-5 if family in ("mixtral", "olmoe") else 1e-6
          )
      ),
      router_aux_loss_coef=float(
          hf.get("router_aux_loss_coef", 0.01 if family == "olmoe" else 0.001)
      ),
      family=family,
      param_dtype=param_dtype,
      dtype=dtype or ("float32" if param_dtype == "float32" else "bfloat16"),
  )
  fields.update(_expert_fields(hf, family))
  fields.update(_family_fields(hf, family, fields))
  try:
    return TeacherConfig(**fields)
  except ValueError as e:
    raise HFImportError(
        f"config.json describes an unsupported model: {e}"
    ) from e


def _check_supported(hf: dict[str, Any]) -> str:
  """The config's family, or HFImportError for what the teacher lacks."""
  family = hf.get("model_type")
  if family not in FAMILIES:
    raise HFImportError(
        f"model_type {family!r} is not supported; the importer reads"
        f" {', '.join(FAMILIES)} checkpoints"
    )
  architectures = hf.get("architectures") or []
  want = _ARCHITECTURES[family]
  if architectures and want not in architectures:
    raise HFImportError(
        f"config.json names architectures {architectures}, not {want}: the"
        " importer reads causal language models (the teacher's logits); pass"
        f" the {want} checkpoint"
    )
  missing = [k for k in ("num_hidden_layers", "vocab_size") if k not in hf]
  if missing:
    raise HFImportError(
        f"config.json lacks {', '.join(missing)} (required for a {family}"
        " model; transformers has no default for them); the file is"
        " incomplete"
    )
  if hf.get("quantization_config"):
    raise HFImportError(
        "quantized checkpoints are not supported; import the"
        " unquantized (bf16/fp32) weights"
    )
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise HFImportError(
        f"hidden_act={act!r}: only 'silu' experts are supported"
    )
  if family in ("mixtral", "qwen3_moe", "olmoe") and hf.get("attention_bias"):
    raise HFImportError(
        f"{family} with attention_bias=true (a bias on o_proj too) is not"
        " supported"
    )
  return family


def _attention_fields(hf: dict[str, Any], family: str) -> dict[str, Any]:
  """Width and heads, with each family's defaults."""
  d = hf.get("hidden_size", {"mixtral": 4096, "olmoe": 2048}.get(family, 2048))
  heads = hf.get(
      "num_attention_heads", 32 if family in ("mixtral", "qwen3_moe") else 16
  )
  kv_default = {"mixtral": 8, "qwen2_moe": 16, "qwen3_moe": 4}.get(
      family, heads
  )
  return dict(
      d_model=d,
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or kv_default,
      head_dim=hf.get("head_dim") or d // heads,
  )


def _expert_fields(hf: dict[str, Any], family: str) -> dict[str, Any]:
  """How many experts, how many each token takes, and their router."""
  # transformers' attribute_map aliases the expert count, and version 5 writes
  # Qwen3-MoE's as num_local_experts while the hub configs say num_experts.
  num_experts = hf.get("num_experts", hf.get("num_local_experts"))
  if num_experts is None:
    num_experts = {
        "mixtral": 8,
        "qwen2_moe": 60,
        "qwen3_moe": 128,
        "olmoe": 64,
    }[family]
  if num_experts <= 0:
    raise HFImportError(
        f"num_experts={num_experts}: a dense model,"
        " not an MoE; the teacher importer needs experts"
    )
  if family == "mixtral":
    return dict(
        num_experts=num_experts,
        top_k=hf.get("num_experts_per_tok", 2),
        d_ff=hf.get("intermediate_size", 14336),
        norm_topk_prob=True,  # hard-coded in MixtralTopKRouter
        sliding_window=hf.get("sliding_window") or None,
    )
  return dict(
      num_experts=num_experts,
      top_k=hf.get(
          "num_experts_per_tok",
          {"qwen2_moe": 4, "qwen3_moe": 8, "olmoe": 8}[family],
      ),
      norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
  )


def _family_fields(
    hf: dict[str, Any], family: str, fields: dict[str, Any]
) -> dict[str, Any]:
  """What only some families have: Qwen's dense layers, window and shared
  expert, the q/k norms, OLMoE's clipping."""
  out: dict[str, Any] = {}
  layers = fields["num_layers"]
  if family in ("qwen2_moe", "qwen3_moe"):
    out["d_ff"] = hf.get(
        "moe_intermediate_size", 1408 if family == "qwen2_moe" else 768
    )
    step = hf.get("decoder_sparse_step", 1) or 1
    mlp_only = set(hf.get("mlp_only_layers") or [])
    dense = tuple(
        i for i in range(layers) if i in mlp_only or (i + 1) % step != 0
    )
    if dense:
      out.update(
          dense_layers=dense,
          dense_d_ff=hf.get(
              "intermediate_size", 5632 if family == "qwen2_moe" else 6144
          ),
      )
    out["sliding_window"] = _qwen_window(hf, family, layers)
  if family == "qwen2_moe":
    out["qkv_bias"] = bool(hf.get("qkv_bias", True))
    out["shared_expert_d_ff"] = hf.get("shared_expert_intermediate_size", 5632)
    if hf.get("attention_bias"):
      raise HFImportError("qwen2_moe with attention_bias is not supported")
  elif family == "qwen3_moe":
    out["qk_norm"] = "head"
  elif family == "olmoe":
    out["d_ff"] = hf.get("intermediate_size", 2048)
    out["qk_norm"] = "full"
    out["clip_qkv"] = hf.get("clip_qkv")
    heads, head_dim, d = (
        fields["num_heads"],
        fields["head_dim"],
        fields["d_model"],
    )
    if head_dim * heads != d:
      raise HFImportError(
          f"OLMoE with head_dim={head_dim} * heads={heads} != hidden_size={d}"
          " is not supported (its q/k norms assume hidden_size // heads)"
      )
  return out


def _qwen_window(hf: dict[str, Any], family: str, layers: int) -> int | None:
  if not hf.get("use_sliding_window", False):
    return None
  window = hf.get("sliding_window", 4096)
  if family == "qwen3_moe":  # every layer slides (Qwen3MoeAttention)
    return window
  types = hf.get("layer_types") or [
      "sliding_attention"
      if (i + 1) % 2 and i < hf.get("max_window_layers", 28)
      else "full_attention"
      for i in range(layers)
  ]
  if all(t == "full_attention" for t in types):
    return None
  if all(t == "sliding_attention" for t in types):
    return window
  raise HFImportError(
      "this Qwen2-MoE config uses a sliding window on some layers only"
      f" (layer_types={types}); the teacher supports all-global or"
      " all-sliding attention. Set use_sliding_window=false if the checkpoint"
      " was trained without it"
  )
