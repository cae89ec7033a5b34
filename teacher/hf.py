"""Hugging Face MoE checkpoints -> teacher model folders.

Reads a local folder holding ``config.json``, safetensors weights (one file, or
shards listed in ``model.safetensors.index.json``) and ``tokenizer.json`` of a
Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE causal LM, and writes ``W/teacher/``
(see distill/core/checkpoint.py) plus ``W/tokenizer.json``. Nothing from the folder
is executed: the config is JSON, the weights safetensors; pickled ``.bin``
weights are refused.

Weight layouts (torch Linear weights are [out, in]; ours are [in, ...out]):

    embed_tokens [V, D]                     -> embed.embedding [V, D]
    q_proj [N*H, D] (+ bias [N*H])          -> attn.q_proj.kernel [D, N, H] (+ bias [N, H])
    k_proj, v_proj [K*H, D]                 -> [D, K, H]
    o_proj [D, N*H]                         -> attn.o_proj.kernel [N, H, D]
    q_norm / k_norm [H] (Qwen3) or [N*H] / [K*H] (OLMoE) -> *.scale
    router gate [E, D]                      -> moe.router [D, E]
    experts.{e}.gate_proj / w1 [F, D]       -> moe.gate [E, D, F]   (stacked)
    experts.{e}.up_proj / w3 [F, D]         -> moe.up [E, D, F]
    experts.{e}.down_proj / w2 [D, F]       -> moe.down [E, F, D]
      or fused (transformers 5 without the legacy format):
      experts.gate_up_proj [E, 2F, D] and experts.down_proj [E, D, F]
    shared_expert.*_proj, shared_expert_gate [1, D] -> moe.shared_expert.*, ..._gate [D, 1]
    mlp.*_proj (dense layers)               -> mlp.*_proj.kernel
    lm_head [V, D]                          -> head.kernel [D, V] (absent when tied)
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from safetensors import safe_open

from data.tokenizer import tokenizer_hash
from distill.core import checkpoint, files, layout, sharding
from teacher.config import TeacherConfig
from teacher.hf_config import (  # pylint: disable=unused-import
    HFImportError,
    read_hf_config,
    teacher_config_from_hf,
)
from teacher.model import abstract_teacher

_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


# ----------------------------------------------------------------------------
# Weights


class SafetensorsReader:
  """Tensor-by-tensor access to a (possibly sharded) safetensors checkpoint."""

  def __init__(self, hf_dir: str):
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
      self._files = {k: os.path.join(hf_dir, v) for k, v in weight_map.items()}
      missing = sorted(
          {v for v in self._files.values() if not os.path.isfile(v)}
      )
      if missing:
        raise HFImportError(f"shards listed in {index} are missing: {missing}")
    else:
      shards = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
      if not shards:
        pickled = sorted(
            os.path.basename(p)
            for pat in _PICKLE_PATTERNS
            for p in glob.glob(os.path.join(hf_dir, pat))
        )
        what = (
            f"only pickled weights ({', '.join(pickled)})"
            if pickled
            else "no *.safetensors weights"
        )
        raise HFImportError(
            f"{hf_dir!r} has {what}. Only safetensors are read (unpickling"
            " can run arbitrary code); convert them first, e.g. load the"
            " model in transformers and save_pretrained(..., "
            "safe_serialization=True)"
        )
      self._files = {}
      for path in shards:
        with safe_open(path, framework="flax") as f:
          for key in f.keys():
            self._files[key] = path
    self._open: dict[str, Any] = {}
    self._stack = contextlib.ExitStack()

  def keys(self) -> set[str]:
    return set(self._files)

  def dtype(self, key: str) -> str:
    handle = self._handle(key)
    name = handle.get_slice(key).get_dtype()
    if name not in _DTYPES:
      raise HFImportError(
          f"tensor {key} has dtype {name}; expected one of"
          f" {sorted(_DTYPES)}"
      )
    return _DTYPES[name]

  def get(self, key: str) -> np.ndarray:
    """One tensor, read into host memory (numpy; bfloat16 via ml_dtypes)."""
    if key not in self._files:
      raise HFImportError(f"the checkpoint has no tensor {key!r}")
    return self._handle(key).get_tensor(key)

  def _handle(self, key):
    path = self._files[key]
    if path not in self._open:
      self._open[path] = self._stack.enter_context(
          safe_open(path, framework="numpy")
      )
    return self._open[path]

  def close(self):
    self._stack.close()
    self._open.clear()


def _normalise(key: str) -> str:
  """One spelling for the families' tensor names (Mixtral's legacy names)."""
  key = key.replace(".block_sparse_moe.", ".mlp.")
  return re.sub(
      r"(\.experts\.\d+)\.w([123])\.",
      lambda m: m.group(1)
      + {"1": ".gate_proj.", "2": ".down_proj.", "3": ".up_proj."}[m.group(2)],
      key,
  )


# The converter of per-expert tensors [out, in] -> one [E, in, out] parameter,
# filled an expert at a time (never all of a layer's HF tensors at once).
_STACK_TRANSPOSED = object()


def _read_param(reader, raw, names, convert, dtype) -> np.ndarray:
  """One parameter in our layout and ``dtype``, in host memory."""
  if convert is _STACK_TRANSPOSED:
    first = reader.get(raw[names[0]]).T
    out = np.empty((len(names),) + first.shape, dtype)
    out[0] = first
    del first
    for e, name in enumerate(names[1:], start=1):
      out[e] = reader.get(raw[name]).T
    return out
  return np.asarray(convert(*(reader.get(raw[name]) for name in names)), dtype)


def _param_sources(
    config: TeacherConfig, names: set[str]
) -> Iterator[tuple[tuple, list[str], Callable]]:
  """(our param path, HF tensor names, fn(tensors) -> our array) per param."""
  c = config
  n, k, h, d = c.num_heads, c.num_kv_heads, c.head_dim, c.d_model
  t = lambda w: w.T
  yield ("embed", "embedding"), ["model.embed_tokens.weight"], lambda w: w
  for i in range(c.num_layers):
    p = f"model.layers.{i}."
    b = ("blocks", i)
    yield b + ("attn_norm", "scale"), [
        p + "input_layernorm.weight"
    ], lambda w: w
    yield b + ("ffn_norm", "scale"), [
        p + "post_attention_layernorm.weight"
    ], lambda w: w
    a = p + "self_attn."
    yield (
        b + ("attn", "q_proj", "kernel"),
        [a + "q_proj.weight"],
        lambda w: w.T.reshape(d, n, h),
    )
    for name in ("k_proj", "v_proj"):
      yield (
          b + ("attn", name, "kernel"),
          [a + name + ".weight"],
          lambda w: w.T.reshape(d, k, h),
      )
    yield (
        b + ("attn", "o_proj", "kernel"),
        [a + "o_proj.weight"],
        lambda w: w.T.reshape(n, h, d),
    )
    if c.qkv_bias:
      yield b + ("attn", "q_proj", "bias"), [
          a + "q_proj.bias"
      ], lambda w: w.reshape(n, h)
      for name in ("k_proj", "v_proj"):
        yield (
            b + ("attn", name, "bias"),
            [a + name + ".bias"],
            lambda w: w.reshape(k, h),
        )
    if c.qk_norm != "none":
      for name in ("q_norm", "k_norm"):
        yield b + ("attn", name, "scale"), [a + name + ".weight"], lambda w: w
    m = p + "mlp."
    if not c.is_moe_layer(i):
      for name in ("gate_proj", "up_proj", "down_proj"):
        yield b + ("mlp", name, "kernel"), [m + name + ".weight"], t
      continue
    yield b + ("moe", "router"), [m + "gate.weight"], t
    if m + "experts.gate_up_proj" in names:
      f = c.d_ff
      yield (
          b + ("moe", "gate"),
          [m + "experts.gate_up_proj"],
          lambda w, f=f: np.swapaxes(w[:, :f], 1, 2),
      )
      yield (
          b + ("moe", "up"),
          [m + "experts.gate_up_proj"],
          lambda w, f=f: np.swapaxes(w[:, f:], 1, 2),
      )
      yield (
          b + ("moe", "down"),
          [m + "experts.down_proj"],
          lambda w: np.swapaxes(w, 1, 2),
      )
    else:
      for ours, theirs in (
          ("gate", "gate_proj"),
          ("up", "up_proj"),
          ("down", "down_proj"),
      ):
        keys = [f"{m}experts.{e}.{theirs}.weight" for e in range(c.num_experts)]
        yield b + ("moe", ours), keys, _STACK_TRANSPOSED
    if c.shared_expert_d_ff:
      for name in ("gate_proj", "up_proj", "down_proj"):
        yield (
            b + ("moe", "shared_expert", name, "kernel"),
            [m + "shared_expert." + name + ".weight"],
            t,
        )
      yield (
          b + ("moe", "shared_expert_gate", "kernel"),
          [m + "shared_expert_gate.weight"],
          t,
      )
  yield ("final_norm", "scale"), ["model.norm.weight"], lambda w: w
  if not c.tie_embeddings:
    yield ("head", "kernel"), ["lm_head.weight"], t


def load_hf_weights(
    hf_dir: str, config: TeacherConfig, reader: SafetensorsReader | None = None
) -> nnx.Module:
  """The teacher for `config` with its parameters read from `hf_dir`.

  Parameters are streamed one at a time: its tensors are read into host
  memory, converted to our layout (a layer's experts stacked), and each
  device of the active mesh (``distill.core.sharding.use``; outside one, the
  default device) receives only its part before the next parameter is read.
  Peak host memory is therefore about the largest single parameter (one
  layer's stacked expert weight), never the model.
  """
  own_reader = reader is None
  reader = reader or SafetensorsReader(hf_dir)
  mesh = sharding.active()
  try:
    raw = {_normalise(key): key for key in reader.keys()}
    model = abstract_teacher(config)
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    used = set()
    dtype = jnp.dtype(config.param_dtype)
    for path, names, convert in _param_sources(config, set(raw)):
      if path not in flat:
        raise AssertionError(f"importer maps to unknown parameter {path}")
      missing = [name for name in names if name not in raw]
      if missing:
        raise HFImportError(
            f"the checkpoint lacks {missing[0]!r} (needed for"
            f" {'.'.join(map(str, path))}); is config.json from the same model?"
        )
      host = _read_param(reader, raw, names, convert, dtype)
      target = flat[path]
      if tuple(host.shape) != tuple(target.shape):
        raise HFImportError(
            f"{names[0]} converts to shape {tuple(host.shape)} but"
            f" {'.'.join(map(str, path))} needs {tuple(target.shape)}"
        )
      if mesh is None:
        target.set_value(jnp.asarray(host))
      else:
        place = sharding.named(sharding.logical_names(target), host.shape, mesh)
        # Each device's part is copied out, so nothing (a CPU device's
        # zero-copy buffer included) keeps the whole host array alive.
        target.set_value(
            jax.make_array_from_callback(
                host.shape,
                place,
                lambda index, host=host: np.array(host[index]),
            )
        )
      del host
      used.update(names)
      del flat[path]
    if flat:
      raise AssertionError(f"parameters without a source: {sorted(flat)[:5]}")
    ignorable = re.compile(r".*rotary_emb\.inv_freq$|^lm_head\.weight$")
    unused = sorted(n for n in set(raw) - used if not ignorable.match(n))
    if unused:
      raise HFImportError(
          f"the checkpoint has {len(unused)} tensor(s) this config does not"
          f" use, e.g. {unused[:3]}; the config and weights disagree or the"
          " architecture has parts the teacher lacks"
      )
    nnx.update(model, state)
    return model
  finally:
    if own_reader:
      reader.close()


# ----------------------------------------------------------------------------
# The stage


def import_hf(
    hf_dir: str,
    workdir: str,
    *,
    param_dtype: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    flag: str = "--hf_dir",
) -> str:
  """Imports a Hugging Face MoE checkpoint into ``workdir/teacher``.

  The weights stream onto ``mesh`` (default: the active one, else every
  device on ``fsdp``), a parameter at a time (see ``load_hf_weights``), so a
  teacher larger than one device's memory (or the host's) imports on a mesh
  that holds it. With several processes each reads every tensor (a
  parameter at a time), keeps its own devices' parts, and orbax writes one
  checkpoint from all of them.

  Writes the model folder under a temporary name and renames it when complete;
  copies ``tokenizer.json`` to ``workdir/tokenizer.json`` (refusing to replace
  a different one). A finished import of the same folder is skipped.

  Args:
    hf_dir: local folder with config.json, *.safetensors, tokenizer.json.
    workdir: the pipeline's working folder.
    param_dtype: stored parameter dtype; default the checkpoint's own.
    dtype: compute dtype; default float32 for float32 weights, else bfloat16.
    overwrite: replace an existing ``workdir/teacher``.
    mesh: the device mesh the weights are placed on.
    flag: how the user named ``hf_dir``, for the error a wrong one gets.
  Returns:
    The teacher folder.
  """
  hf_dir = os.path.abspath(os.path.expanduser(hf_dir))
  if not os.path.isdir(hf_dir):
    raise HFImportError(f"{flag}={hf_dir} is not a folder")
  hf = read_hf_config(hf_dir)
  config = teacher_config_from_hf(
      hf,
      dtype=dtype,  # refuse early, before I/O
      param_dtype=param_dtype or "float32",
  )
  tokenizer_src, tokenizer_dst, tok_hash = _tokenizer_paths(hf_dir, workdir)
  teacher_dir = layout.teacher_dir(workdir)
  if os.path.exists(teacher_dir) and not overwrite:
    existing = _existing_import(teacher_dir)
    if existing == (hf_dir, tok_hash):
      logging.info("%s already holds this import; skipping", teacher_dir)
      if sharding.is_main():
        files.copy(tokenizer_src, tokenizer_dst)
      return teacher_dir
    raise HFImportError(
        f"{teacher_dir} already exists and is not an import of {hf_dir};"
        " remove it or pass --overwrite"
    )

  model, config = _read_weights(hf_dir, hf, config, param_dtype, dtype, mesh)
  with files.atomic_dir(
      teacher_dir, shared=jax.process_count() > 1
  ) as tmp:  # Replaces it on --overwrite.
    checkpoint.write_config(
        tmp,
        "teacher",
        config,
        family=config.family,
        source=hf_dir,
        tokenizer_hash=tok_hash,
        param_counts=model.param_counts(),
    )
    checkpoint.save_params(tmp, model, step=0)
  if sharding.is_main():
    files.copy(tokenizer_src, tokenizer_dst)
  logging.info("Wrote %s (%s parameters)", teacher_dir, model.param_counts())
  return teacher_dir


def _tokenizer_paths(hf_dir: str, workdir: str) -> tuple[str, str, str]:
  """(the checkpoint's tokenizer.json, the workdir's, its hash); refuses a
  checkpoint without one and a workdir prepared with another."""
  tokenizer_src = os.path.join(hf_dir, "tokenizer.json")
  if not os.path.isfile(tokenizer_src):
    raise HFImportError(
        f"{hf_dir} has no tokenizer.json (the fast-tokenizer file the pipeline"
        " uses); create it with transformers: AutoTokenizer.from_pretrained(dir)"
        ".save_pretrained(dir)"
    )
  tok_hash = tokenizer_hash(tokenizer_src)
  tokenizer_dst = layout.tokenizer_path(workdir)
  if (
      os.path.exists(tokenizer_dst)
      and tokenizer_hash(tokenizer_dst) != tok_hash
  ):
    raise HFImportError(
        f"{tokenizer_dst} exists and differs from {tokenizer_src}: this workdir"
        " was prepared with another tokenizer. Use a fresh --workdir (data,"
        " caches and students must share the teacher's tokenizer)"
    )
  return tokenizer_src, tokenizer_dst, tok_hash


def _read_weights(hf_dir, hf, config, param_dtype, dtype, mesh):
  """The teacher with the checkpoint's weights, streamed onto ``mesh``, and
  its config (stored in the checkpoint's own dtype when ``param_dtype`` is
  None)."""
  mesh = mesh if mesh is not None else sharding.active() or sharding.make_mesh()
  reader = SafetensorsReader(hf_dir)
  try:
    if param_dtype is None:
      param_dtype = reader.dtype(
          next(
              (
                  k
                  for k in sorted(reader.keys())
                  if k.endswith("embed_tokens.weight")
              ),
              sorted(reader.keys())[0],
          )
      )
      config = teacher_config_from_hf(hf, dtype=dtype, param_dtype=param_dtype)
    logging.info("Importing %s (%s) as %s", hf_dir, config.family, config)
    with sharding.use(mesh):
      return load_hf_weights(hf_dir, config, reader), config
  finally:
    reader.close()


def _existing_import(teacher_dir: str):
  try:
    payload = checkpoint.read_config(teacher_dir, kind="teacher")
  except checkpoint.ModelFolderError:
    return None
  if checkpoint.latest_step(teacher_dir) is None:
    return None
  return payload.get("source"), payload.get("tokenizer_hash")
