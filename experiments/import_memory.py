"""Peak host memory of ``teacher.import_hf`` on a large random checkpoint.

    python -m experiments.import_memory --out=/tmp/mixtral-like --layers=8

Writes a random Mixtral-shaped Hugging Face checkpoint (bfloat16 safetensors
in 1 GB shards, config.json, a word-level tokenizer.json; no torch needed),
then imports it in a child process onto the default mesh and reports that
process's peak resident memory next to the model's size. On a CPU the
"devices" are host memory too, so the peak there holds the model itself plus
what the importer stages; the difference is the staging.

Measured on the development machine (2 cores, 24 GiB, 8 simulated CPU
devices) with the defaults (8 layers, d_model 1024, 8 experts of 3584,
vocab 32000: 0.80B parameters, 1.61 GB in bfloat16): see the README.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import threading
import time

import ml_dtypes
import numpy as np
from absl import app, flags
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models

_OUT = flags.DEFINE_string("out", None, "Folder for the checkpoint and W/.")
_LAYERS = flags.DEFINE_integer("layers", 8, "Decoder layers.")
_D = flags.DEFINE_integer("d_model", 1024, "Hidden size.")
_F = flags.DEFINE_integer("d_ff", 3584, "Expert hidden size.")
_E = flags.DEFINE_integer("experts", 8, "Experts per layer.")
_V = flags.DEFINE_integer("vocab", 32000, "Vocabulary.")
_MEASURE = flags.DEFINE_string(
    "measure", None, "(internal) Measure streaming this checkpoint."
)


def write_checkpoint(out: str, layers: int, d: int, f: int, e: int, v: int):
  """A random Mixtral-shaped checkpoint; returns its parameter count."""
  os.makedirs(out, exist_ok=True)
  heads, kv, head_dim = 16, 4, d // 16
  rng = np.random.default_rng(0)

  def w(*shape):
    return (0.02 * rng.standard_normal(shape, np.float32)).astype(
        ml_dtypes.bfloat16
    )

  shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
  shapes["lm_head.weight"] = (v, d)
  for i in range(layers):
    p = f"model.layers.{i}."
    shapes[p + "input_layernorm.weight"] = (d,)
    shapes[p + "post_attention_layernorm.weight"] = (d,)
    for name, rows in (("q", heads), ("k", kv), ("v", kv)):
      shapes[p + f"self_attn.{name}_proj.weight"] = (rows * head_dim, d)
    shapes[p + "self_attn.o_proj.weight"] = (d, heads * head_dim)
    shapes[p + "block_sparse_moe.gate.weight"] = (e, d)
    for x in range(e):
      q = p + f"block_sparse_moe.experts.{x}."
      shapes[q + "w1.weight"] = (f, d)
      shapes[q + "w3.weight"] = (f, d)
      shapes[q + "w2.weight"] = (d, f)
  weight_map, shard, size, index = {}, {}, 0, 0

  def flush():
    nonlocal shard, size, index
    if shard:
      name = f"model-{index:05d}.safetensors"
      save_file(shard, os.path.join(out, name))
      weight_map.update({k: name for k in shard})
      shard, size, index = {}, 0, index + 1

  for key, shape in shapes.items():
    shard[key] = w(*shape)
    size += shard[key].nbytes
    if size > 1 << 30:
      flush()
  flush()
  with open(
      os.path.join(out, "model.safetensors.index.json"), "w", encoding="utf-8"
  ) as fh:
    json.dump({"weight_map": weight_map}, fh)
  config = {
      "model_type": "mixtral",
      "architectures": ["MixtralForCausalLM"],
      "vocab_size": v,
      "hidden_size": d,
      "intermediate_size": f,
      "num_hidden_layers": layers,
      "num_attention_heads": heads,
      "num_key_value_heads": kv,
      "num_local_experts": e,
      "num_experts_per_tok": 2,
      "rms_norm_eps": 1e-5,
      "rope_theta": 1e6,
      "tie_word_embeddings": False,
      "torch_dtype": "bfloat16",
  }
  with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as fh:
    json.dump(config, fh)
  words = {f"w{i}": i for i in range(v - 1)}
  words["[UNK]"] = v - 1
  Tokenizer(models.WordLevel(words, unk_token="[UNK]")).save(
      os.path.join(out, "tokenizer.json")
  )
  return sum(int(np.prod(s)) for s in shapes.values())


def _anonymous_memory() -> int:
  """This process's anonymous resident memory in bytes (RssAnon: resident
  size would also count the memory-mapped safetensors files' pages)."""
  with open("/proc/self/status", encoding="utf-8") as f:
    return int(re.search(r"RssAnon:\s+(\d+)", f.read())[1]) * 1024


def measure_load(hf_dir: str) -> tuple[int, int, int]:
  """Anonymous memory with jax up, once the weights are on the default mesh,
  and its peak while they stream there (sampled every 2 ms by a thread)."""
  # pylint: disable=import-outside-toplevel
  import jax

  from distill.core import sharding
  from teacher import hf

  jax.devices()
  base, peak, done = _anonymous_memory(), [0], threading.Event()

  def watch():
    while not done.is_set():
      peak[0] = max(peak[0], _anonymous_memory())
      time.sleep(0.002)

  watcher = threading.Thread(target=watch, daemon=True)
  watcher.start()
  config = hf.teacher_config_from_hf(
      hf.read_hf_config(hf_dir), param_dtype="bfloat16"
  )
  with sharding.use(sharding.make_mesh()):
    model = hf.load_hf_weights(hf_dir, config)
  done.set()
  watcher.join()
  after = _anonymous_memory()
  del model
  return base, after, max(peak[0], after)


def main(argv):
  del argv
  if _MEASURE.value:
    print(*measure_load(_MEASURE.value))
    return
  out = _OUT.value
  if not out:
    raise app.UsageError("--out is required")
  hf_dir = os.path.join(out, "hf")
  started = time.time()
  params = write_checkpoint(
      hf_dir, _LAYERS.value, _D.value, _F.value, _E.value, _V.value
  )
  print(
      f"wrote {params / 1e9:.2f}B parameters ({params * 2 / 1e9:.2f} GB) in"
      f" {time.time() - started:.0f}s"
  )
  largest = _E.value * _D.value * _F.value * 2
  model_gb = params * 2 / 1e9
  # 1. Only the streaming, in a child process of its own.
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "experiments.import_memory",
          f"--measure={hf_dir}",
      ],
      check=True,
      capture_output=True,
      text=True,
  )
  base, after, peak = (int(x) for x in result.stdout.split()[-3:])
  print(
      f"streaming onto the mesh: anonymous memory {base / 1e9:.2f} GB with"
      f" jax up, {after / 1e9:.2f} GB with the model on the devices (the"
      f" model: {model_gb:.2f} GB; CPU devices are host memory), peak"
      f" {peak / 1e9:.2f} GB: staging took {(peak - after) / 1e9:.3f} GB at"
      f" most; the largest parameter is {largest / 1e9:.3f} GB"
  )
  # 2. The whole stage (orbax's save included), as a user runs it.
  started = time.time()
  subprocess.run(
      [
          sys.executable,
          "-m",
          "teacher.import_hf",
          f"--hf_dir={hf_dir}",
          f"--workdir={os.path.join(out, 'W')}",
          "--overwrite",
      ],
      check=True,
      capture_output=True,
  )
  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
  print(
      f"teacher.import_hf: {time.time() - started:.0f}s; peak resident"
      f" {peak / 1e9:.2f} GB (the save stages its own host copy)"
  )


if __name__ == "__main__":
  app.run(main)
