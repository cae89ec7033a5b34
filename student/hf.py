"""Hugging Face Gemma 3 text format <-> our student.

A Hugging Face folder is what ``transformers.Gemma3ForCausalLM.save_pretrained``
writes: ``config.json`` (model_type "gemma3_text"), ``model.safetensors`` (or
shards named in ``model.safetensors.index.json``) and, when exported with a
tokenizer, ``tokenizer.json`` + ``tokenizer_config.json`` +
``special_tokens_map.json``.

Tensor layout (torch ``nn.Linear`` weights are [out, in]; the head is tied, so
``lm_head.weight`` is not written)::

    model.embed_tokens.weight                  [V, D]     <- embed.embedding
    model.layers.i.self_attn.q_proj.weight     [N*H, D]   <- q_proj.kernel [D, N, H]
    model.layers.i.self_attn.{k,v}_proj.weight [K*H, D]   <- {k,v}_proj.kernel [D, K, H]
    model.layers.i.self_attn.o_proj.weight     [D, N*H]   <- o_proj.kernel [N, H, D]
    model.layers.i.self_attn.{q,k}_norm.weight [H]
    model.layers.i.mlp.{gate,up}_proj.weight   [F, D]     <- kernel [D, F]
    model.layers.i.mlp.down_proj.weight        [D, F]     <- kernel [F, D]
    model.layers.i.{input,post_attention,pre_feedforward,post_feedforward}_layernorm.weight
    model.norm.weight

Norm weights carry over unchanged: both sides compute ``x_hat * (1 + w)``.
Only safetensors are read; pickled ``.bin`` weights are refused (unpickling
runs code) and nothing in the folder is ever executed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Callable, Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import numpy as st_numpy

from data import tokenizer as tok_lib
from distill.core import checkpoint, files
from student.config import StudentConfig
from student.model import Student, abstract_student

MODEL_TYPE = "gemma3_text"
ARCHITECTURE = "Gemma3ForCausalLM"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
#: Our tokenizer's special tokens (the Gemma convention: ids 0, 1, 2).
SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "eos_token": "<eos>",
    "bos_token": "<bos>",
}
GEMMA_SPECIAL_IDS = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
MAX_POSITIONS = 32_768  # written as max_position_embeddings (Gemma 3 270M/1B)

_KIND_TO_HF = {"local": "sliding_attention", "global": "full_attention"}
_HF_TO_KIND = {v: k for k, v in _KIND_TO_HF.items()}
# Gemma3TextConfig's defaults for keys a config.json may leave out.
_HF_DEFAULTS = {
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-6,
    "sliding_window": 4096,
    "hidden_activation": "gelu_pytorch_tanh",
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "attention_bias": False,
    "tie_word_embeddings": True,
    "use_bidirectional_attention": False,
}
_NORMS = {
    "pre_attn_norm": "input_layernorm",
    "post_attn_norm": "post_attention_layernorm",
    "pre_mlp_norm": "pre_feedforward_layernorm",
    "post_mlp_norm": "post_feedforward_layernorm",
}


class HFFormatError(checkpoint.ModelFolderError):
  """A Hugging Face folder this module cannot read (or a config it cannot write)."""


# ----------------------------------------------------------------------------
# config.json


def hf_config(
    config: StudentConfig,
    *,
    special_ids: Mapping[str, int] | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
  """The transformers ``Gemma3TextConfig`` for ``config`` as a config.json dict.

  RoPE is written both as transformers 5's ``rope_parameters`` (per layer
  type) and as the older ``rope_theta`` / ``rope_local_base_freq`` /
  ``rope_scaling`` keys that earlier readers use.
  """
  ids = dict(GEMMA_SPECIAL_IDS if special_ids is None else special_ids)
  full = {"rope_type": "default", "rope_theta": config.rope_global_base}
  scaling = None
  if config.rope_global_scaling != 1.0:
    scaling = {"rope_type": "linear", "factor": config.rope_global_scaling}
    full.update(scaling)
  q_scalar = config.query_pre_attn_scalar or config.head_dim
  if float(q_scalar).is_integer():
    q_scalar = int(q_scalar)
  return {
      "architectures": [ARCHITECTURE],
      "model_type": MODEL_TYPE,
      "vocab_size": config.vocab_size,
      "hidden_size": config.d_model,
      "intermediate_size": config.d_ff,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "hidden_activation": "gelu_pytorch_tanh",
      "max_position_embeddings": MAX_POSITIONS,
      "rms_norm_eps": config.rms_eps,
      "query_pre_attn_scalar": q_scalar,
      "sliding_window": config.window,
      "layer_types": [_KIND_TO_HF[k] for k in config.layer_kinds],
      "rope_parameters": {
          "sliding_attention": {
              "rope_type": "default",
              "rope_theta": config.rope_local_base,
          },
          "full_attention": full,
      },
      "rope_theta": config.rope_global_base,
      "rope_local_base_freq": config.rope_local_base,
      "rope_scaling": scaling,
      "final_logit_softcapping": config.final_logit_softcap,
      "attn_logit_softcapping": None,
      "attention_bias": False,
      "attention_dropout": 0.0,
      "use_bidirectional_attention": False,
      "tie_word_embeddings": True,
      "initializer_range": 0.02,
      "use_cache": True,
      "dtype": dtype,
      **ids,
  }


def _refuse(where: str, what: str) -> HFFormatError:
  return HFFormatError(
      f"{where}: {what}; this reader takes Gemma 3 text models"
      f" ({ARCHITECTURE}, model_type {MODEL_TYPE!r}) only"
  )


def _layer_pattern(types: list[str], where: str) -> tuple[str, ...]:
  unknown = sorted(set(types) - set(_HF_TO_KIND))
  if unknown:
    raise _refuse(where, f"unknown layer_types {unknown}")
  kinds = [_HF_TO_KIND[t] for t in types]
  for period in range(1, len(kinds) + 1):  # shortest pattern that tiles them
    if all(kinds[i] == kinds[i % period] for i in range(len(kinds))):
      return tuple(kinds[:period])
  raise AssertionError("unreachable")


def _rope(hf: dict, where: str) -> tuple[float, float, float]:
  """(local base, global base, global linear factor) from either rope format."""
  params = hf.get("rope_parameters")
  if params:
    local = params.get("sliding_attention") or {}
    full = dict(params.get("full_attention") or {})
  else:
    local = {
        "rope_type": "default",
        "rope_theta": hf.get("rope_local_base_freq", 10_000.0),
    }
    full = {
        "rope_type": "default",
        "rope_theta": hf.get("rope_theta", 1_000_000.0),
    }
    full.update(hf.get("rope_scaling") or {})
  for name, p in (("sliding_attention", local), ("full_attention", full)):
    rope_type = p.get("rope_type", p.get("type", "default"))
    if rope_type not in ("default", "linear") or (
        name == "sliding_attention" and rope_type != "default"
    ):
      raise _refuse(
          where,
          f"RoPE type {rope_type!r} for {name} is not supported"
          " (default everywhere, or linear scaling on full attention)",
      )
  factor = (
      float(full.get("factor", 1.0))
      if full.get("rope_type", full.get("type")) == "linear"
      else 1.0
  )
  return (
      float(local.get("rope_theta", 10_000.0)),
      float(full.get("rope_theta", 1_000_000.0)),
      factor,
  )


def config_from_hf(
    hf: Mapping[str, Any], where: str = "config.json"
) -> StudentConfig:
  """A StudentConfig from a transformers Gemma 3 text config.json dict."""
  model_type = hf.get("model_type")
  if model_type == "gemma3":
    raise _refuse(
        where,
        "model_type 'gemma3' is the multimodal Gemma 3 (4B and"
        " up); export its text model (Gemma3ForCausalLM) first",
    )
  if model_type != MODEL_TYPE:
    raise _refuse(where, f"unsupported model_type {model_type!r}")
  hf = {**_HF_DEFAULTS, **hf}
  checks = {
      "hidden_activation": ("gelu_pytorch_tanh",),
      "attention_bias": (False,),
      "attn_logit_softcapping": (None,),
      "use_bidirectional_attention": (False, None),
      "tie_word_embeddings": (True,),
  }
  for key, allowed in checks.items():
    if hf[key] not in allowed:
      raise _refuse(
          where,
          f"{key}={hf[key]!r} is not supported (expected"
          f" {' or '.join(map(repr, allowed))})",
      )
  num_layers = int(hf["num_hidden_layers"])
  types = hf.get("layer_types")
  if types is None:  # transformers' fallback: every n-th layer is full
    n = int(
        hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
    )
    types = [
        "sliding_attention" if (i + 1) % n else "full_attention"
        for i in range(num_layers)
    ]
  if len(types) != num_layers:
    raise _refuse(where, f"{len(types)} layer_types for {num_layers} layers")
  pattern = _layer_pattern(list(types), where)
  if "local" in pattern and not hf["sliding_window"]:
    raise _refuse(where, "sliding layers without a sliding_window")
  local_base, global_base, factor = _rope(hf, where)
  return StudentConfig(
      vocab_size=int(hf["vocab_size"]),
      d_model=int(hf["hidden_size"]),
      num_layers=num_layers,
      num_heads=int(hf["num_attention_heads"]),
      num_kv_heads=int(hf["num_key_value_heads"]),
      head_dim=int(hf["head_dim"]),
      d_ff=int(hf["intermediate_size"]),
      layer_pattern=pattern,
      window=int(hf["sliding_window"] or 1),
      rope_local_base=local_base,
      rope_global_base=global_base,
      rope_global_scaling=factor,
      query_pre_attn_scalar=float(hf["query_pre_attn_scalar"]),
      rms_eps=float(hf["rms_norm_eps"]),
      final_logit_softcap=(
          None
          if hf["final_logit_softcapping"] is None
          else float(hf["final_logit_softcapping"])
      ),
  )


# ----------------------------------------------------------------------------
# Tensors


_Convert = tuple[
    str, Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]
]


def _tensor_map(config: StudentConfig) -> Iterator[tuple[tuple, _Convert]]:
  """(our param path, (HF name, ours->HF, HF->ours)) for every parameter."""
  d, n, k, h = (
      config.d_model,
      config.num_heads,
      config.num_kv_heads,
      config.head_dim,
  )
  same = (lambda a: a, lambda a: a)
  transpose = (lambda a: a.T, lambda a: a.T)

  def qkv(heads):  # [D, heads, H] <-> [heads*H, D]
    return (
        lambda a: a.reshape(d, heads * h).T,
        lambda a: a.T.reshape(d, heads, h),
    )

  out = (lambda a: a.reshape(n * h, d).T, lambda a: a.T.reshape(n, h, d))
  yield ("embed", "embedding"), ("model.embed_tokens.weight", *same)
  yield ("final_norm", "scale"), ("model.norm.weight", *same)
  for i in range(config.num_layers):
    pre = f"model.layers.{i}."
    for ours, theirs in _NORMS.items():
      yield ("blocks", i, ours, "scale"), (pre + theirs + ".weight", *same)
    a = ("blocks", i, "attn")
    yield a + ("q_proj", "kernel"), (pre + "self_attn.q_proj.weight", *qkv(n))
    yield a + ("k_proj", "kernel"), (pre + "self_attn.k_proj.weight", *qkv(k))
    yield a + ("v_proj", "kernel"), (pre + "self_attn.v_proj.weight", *qkv(k))
    yield a + ("o_proj", "kernel"), (pre + "self_attn.o_proj.weight", *out)
    yield a + ("q_norm", "scale"), (pre + "self_attn.q_norm.weight", *same)
    yield a + ("k_norm", "scale"), (pre + "self_attn.k_norm.weight", *same)
    for proj in ("gate_proj", "up_proj", "down_proj"):
      yield ("blocks", i, "mlp", proj, "kernel"), (
          pre + f"mlp.{proj}.weight",
          *transpose,
      )


def params_to_hf(
    model: Student, dtype: str = "float32"
) -> dict[str, np.ndarray]:
  """The model's parameters as transformers tensors (numpy, contiguous)."""
  flat = dict(nnx.state(model, nnx.Param).flat_state())
  tensors = {}
  for path, (name, to_hf, _) in _tensor_map(model.config):
    value = np.asarray(flat.pop(path).get_value(), np.float32)
    tensors[name] = np.ascontiguousarray(to_hf(value)).astype(jnp.dtype(dtype))
  if flat:
    raise AssertionError(
        f"parameters without a Hugging Face name: {sorted(flat)}"
    )
  return tensors


def params_from_hf(
    model: Student, tensors: Mapping[str, np.ndarray], where: str = "weights"
) -> Student:
  """Fills ``model`` (abstract or concrete) from transformers tensors."""
  flat = dict(nnx.state(model, nnx.Param).flat_state())
  remaining = dict(tensors)
  embed = remaining.get("model.embed_tokens.weight")
  head = remaining.pop("lm_head.weight", None)
  if head is not None and (
      embed is None
      or not np.array_equal(
          np.asarray(head, np.float32), np.asarray(embed, np.float32)
      )
  ):
    raise HFFormatError(
        f"{where}: lm_head.weight differs from the embeddings;"
        " the student ties them"
    )
  new, missing = {}, []
  for path, (name, _, from_hf) in _tensor_map(model.config):
    if name not in remaining:
      missing.append(name)
      continue
    want = flat[path].get_value()
    value = from_hf(np.asarray(remaining.pop(name), np.float32))
    if value.shape != want.shape:
      raise HFFormatError(
          f"{where}: {name} has shape {value.shape} after conversion,"
          f" expected {want.shape} from config.json"
      )
    new[path] = jnp.asarray(value, want.dtype)
  if missing:
    raise HFFormatError(
        f"{where}: missing tensors {missing[:5]}"
        f"{' ...' if len(missing) > 5 else ''}"
    )
  if remaining:
    raise HFFormatError(
        f"{where}: unexpected tensors {sorted(remaining)[:5]}"
        " (not a Gemma 3 text checkpoint?)"
    )
  nnx.update(model, nnx.State.from_flat_path(new))
  return model


def read_tensors(directory: str) -> dict[str, np.ndarray]:
  """All tensors of a safetensors folder (single file or sharded with index)."""
  single = os.path.join(directory, WEIGHTS_FILE)
  index = os.path.join(directory, WEIGHTS_INDEX)
  if os.path.isfile(single):
    return st_numpy.load_file(single)
  if os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    tensors = {}
    for name in shards:
      if os.path.basename(name) != name or not name.endswith(".safetensors"):
        raise HFFormatError(
            f"{index}: shard name {name!r} is not a safetensors"
            " file in this folder"
        )
      tensors.update(st_numpy.load_file(os.path.join(directory, name)))
    return tensors
  pickled = sorted(
      p
      for p in os.listdir(directory)
      if p.endswith((".bin", ".pt", ".pth", ".ckpt"))
  )
  if pickled:
    raise HFFormatError(
        f"{directory!r} has only pickled weights ({', '.join(pickled)}); they are"
        " not loaded because unpickling can run arbitrary code. Convert them to"
        " safetensors (model.save_pretrained(dir) in transformers writes"
        f" {WEIGHTS_FILE}) and retry"
    )
  raise HFFormatError(f"{directory!r} has no {WEIGHTS_FILE} or {WEIGHTS_INDEX}")


def is_hf_folder(directory: str) -> bool:
  """True if directory/config.json has a transformers ``model_type``."""
  path = os.path.join(directory, checkpoint.CONFIG_FILE)
  if not os.path.isfile(path):
    return False
  with open(path, encoding="utf-8") as f:
    return "model_type" in json.load(f)


def load_hf(directory: str, param_dtype: str = "float32") -> Student:
  """A student from a transformers Gemma 3 text folder (safetensors only)."""
  where = os.path.join(directory, checkpoint.CONFIG_FILE)
  with open(where, encoding="utf-8") as f:
    config = config_from_hf(json.load(f), where)
  config = dataclasses.replace(config, param_dtype=param_dtype)
  return params_from_hf(
      abstract_student(config), read_tensors(directory), directory
  )


# ----------------------------------------------------------------------------
# Writing


def tokenizer_specials(
    tokenizer_json: str,
) -> tuple[dict[str, str], dict[str, int], int]:
  """The special tokens of a ``tokenizer.json``: (strings, ids, vocab size).

  Our tokenizer's are ``<pad>``/``<eos>``/``<bos>``; an imported teacher's
  tokenizer is matched by the usual names of other families
  (``data.tokenizer.special_ids``).
  """
  tok = tok_lib.load_tokenizer(tokenizer_json)
  ids = tok_lib.special_ids(tok)
  strings = {f"{role}_token": tok.id_to_token(i) for role, i in ids.items()}
  return (
      strings,
      {f"{role}_token_id": i for role, i in ids.items()},
      tok.get_vocab_size(with_added_tokens=True),
  )


def save_hf(
    directory: str,
    model: Student,
    *,
    tokenizer_json: str | None = None,
    dtype: str = "float32",
) -> str:
  """Writes a transformers Gemma 3 text folder into ``directory`` (created).

  With ``tokenizer_json`` the tokenizer is copied and its special-token ids go
  into config.json; without, the Gemma ids (pad 0, eos 1, bos 2) are written.
  """
  config = model.config
  checkpoint.check_finite(
      nnx.state(model, nnx.Param), f"the student for {directory}"
  )
  special_ids, special_tokens = None, SPECIAL_TOKENS
  if tokenizer_json is not None:
    special_tokens, special_ids, size = tokenizer_specials(tokenizer_json)
    if size > config.vocab_size:
      raise HFFormatError(
          f"{tokenizer_json} has {size} tokens, more than the"
          f" model's vocab_size={config.vocab_size}; export the"
          " student with the tokenizer it was trained with"
      )
  os.makedirs(directory, exist_ok=True)
  weights = os.path.join(directory, WEIGHTS_FILE)
  st_numpy.save_file(
      params_to_hf(model, dtype), weights, metadata={"format": "pt"}
  )
  files.give_default_mode(weights)  # safetensors writes 0600
  _write_json(
      os.path.join(directory, checkpoint.CONFIG_FILE),
      hf_config(config, special_ids=special_ids, dtype=dtype),
  )
  if tokenizer_json is not None:
    shutil.copyfile(tokenizer_json, os.path.join(directory, TOKENIZER_FILE))
    _write_json(
        os.path.join(directory, "special_tokens_map.json"), special_tokens
    )
    _write_json(
        os.path.join(directory, "tokenizer_config.json"),
        {
            # The generic fast tokenizer reads tokenizer.json as it is; a
            # GemmaTokenizer would impose Gemma's own normaliser and pre-tokeniser.
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "model_max_length": MAX_POSITIONS,
            **special_tokens,
        },
    )
  return directory


def _write_json(path: str, payload: Any) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
    f.write("\n")
