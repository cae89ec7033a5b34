"""How fast the config's models train, cache and decode, against what the
machine can do, measured inside one process.

    python -m experiments.benchmark --config=experiments/stdlib.py --out=/tmp/bench.json
    python -m experiments.benchmark --config=experiments/stdlib.py:gpu --runs=ce,sampled

Timings on a shared or small machine are noisy, so every figure is a ratio of
two timings taken in the same process, with the absolute times beside the
machine they came from. Measured here:

- ``matmul_flops_per_s``: a large square matmul in the students' compute
  dtype (bfloat16 on accelerators): the rate the training steps are held to;
  ``copy_bytes_per_s``: a large array copy (bytes read + written per second),
  the memory bandwidth decoding is held to.
- ``students``: a training step of the config's student with each run's loss
  (``--runs``; offline runs get targets of the cache's shapes, online runs the
  teacher in the loop, an on_policy run generates every step: its time is
  the student's generation of the rows plus the step on them; a
  cross-tokenizer run gets an aligned batch of the same shapes, as if the
  student spoke the teacher's tokenizer: the alignment itself is host work
  in the input pipeline, not in the step), as
  ``step_time_over_ce``; the CE step's
  ``train_flops_over_matmul`` (model FLOPs utilisation: FLOPs per step over
  step time, over the matmul rate), ``compile_s`` per run, and the CE step
  compiled with ``scan_layers`` on and off.
- ``teacher``: its pretraining step (CE + router losses), the same way;
  ``moe``: one of its MoE layers forward and backward on a training batch
  per grouped-matmul implementation, the fastest, and what "auto" picks.
- ``cache``: throughput of the cache's jitted teacher pass (forward plus every
  configured target) over the forward alone, same batch
  (``cache_over_forward``; the stage overlaps host encoding and writing with
  it).
- ``attention``: one local and one global layer's forward and backward at
  the student's shapes (heads, window) for rows of 4k to 32k tokens, read
  from the compiled and traced program (not timed): temporaries and
  matrix-product FLOPs per token of the path the layer runs (blockwise)
  against the dense one, which grows as the square of the row.
- ``prepare`` (only when named): the prepare stage on local-files corpora
  of 20 and 200 MiB with one and two workers: peak memory (the larger over
  the smaller) and tokens/s (two workers over one); see
  ``experiments.bench_prepare``.
- ``decode``: batch-1 and batch-8 greedy decode tokens/s of the student and
  the teacher (KV cache, the compiled loop ``generate`` runs), each over its
  memory roofline: ``batch x copy_bytes_per_s / bytes read per step``, the
  parameters a step touches (as stored; for the MoE the shared weights plus
  min(E, batch x top_k) of its E experts per layer) plus the KV cache.

Training FLOPs per step are ``6 x active parameters x tokens`` plus attention:
``3 x 4 x H x N x (keys each query sees)`` summed over layers and queries
(QK^T and PV, forward and twice that backward; a query sees min(position + 1,
window) keys, whole rows as one document). ``compile_s`` is a first call's
time minus a compiled call's: tracing and compilation.

Random weights and random targets of the right shapes are used: step time does
not depend on what the weights have learned.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from distill import planning
from distill import train as distill_train
from distill.core import cli
from distill.core.errors import ConfigError
from distill.decoding import speed as decode_speed
from distill.evals import report
from distill.nn import attention
from experiments import bench_prepare, bench_steps
from student.model import Student
from teacher import targets as teacher_targets
from teacher import train as teacher_train
from teacher.model import Teacher

_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions (median).")
SECTIONS = ("students", "teacher", "moe", "cache", "decode", "attention")
# Run only when named: minutes of work and ~250 MB of corpus written to /tmp.
OPT_IN = ("prepare",)
_SECTIONS = flags.DEFINE_list(
    "sections",
    None,
    f"Only these sections (default all of {', '.join(SECTIONS)}; also"
    f" {', '.join(OPT_IN)}, only when named).",
)
_RUNS = flags.DEFINE_list(
    "runs",
    None,
    "Student run kinds to time (default: every kind; ce is always timed).",
)


# ----------------------------------------------------------------------------
# The cache pass and decoding


def cache_ratio(config, vocab: int, repeats: int) -> dict[str, Any]:
  """The cache's teacher pass (forward + targets) over the forward alone."""
  c = config.cache
  teacher = Teacher(teacher_train.model_config(config, vocab), rngs=nnx.Rngs(1))
  b, t = c.batch_size, config.data.seq_len
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(3, vocab, (b, t)), jnp.int32)
  segments = jnp.ones((b, t), jnp.int32)
  positions = jnp.tile(jnp.arange(t, dtype=jnp.int32), (b, 1))
  forward = nnx.jit(lambda m, x, s, p: m(x, s, p))
  targets = teacher_targets.make_target_fn(
      tuple(c.methods),
      c.k,
      c.num_samples,
      c.temperature,
      c.stratified,
      c.tail_k,
      c.tail_samples,
      c.get("position_chunk", 0),
  )
  key = jax.random.key(0)
  rows = jnp.arange(b, dtype=jnp.int32)
  compile_s, seconds = {}, {}
  compile_s["forward"], seconds["forward"] = bench_steps.timed(
      lambda: forward(teacher, tokens, segments, positions), repeats
  )
  compile_s["cache_pass"], seconds["cache_pass"] = bench_steps.timed(
      lambda: targets(teacher, tokens, segments, positions, key, rows, tokens),
      repeats,
  )
  return {
      "seconds": seconds,
      "compile_s": compile_s,
      "methods": list(c.methods),
      "batch": [b, t],
      "cache_over_forward": seconds["forward"] / seconds["cache_pass"],
  }


def decode_bytes(model, batch: int, context: int) -> float:
  """Bytes one decode step reads: parameters as stored (for an MoE, the
  shared weights plus min(E, batch x top_k) of its E experts per layer)
  plus the KV cache of ``context`` positions (local layers: their window)."""
  params = nnx.state(model, nnx.Param)
  size = lambda leaf: leaf.size * leaf.dtype.itemsize
  total = float(sum(size(leaf) for leaf in jax.tree.leaves(params)))
  config = model.config
  for block in model.blocks:
    moe = getattr(block, "moe", None)
    if moe is not None:
      experts = sum(size(w[...]) for w in (moe.gate, moe.up, moe.down))
      used = min(config.num_experts, batch * config.top_k)
      total -= experts * (1 - used / config.num_experts)
    a = block.attn
    keys = min(context, a.window) if a.window else context
    kv_dtype = jnp.dtype(config.dtype)
    total += 2 * batch * keys * a.num_kv_heads * a.head_dim * kv_dtype.itemsize
  return total


def decode_ratio(
    config, vocab: int, repeats: int, bandwidth: float
) -> dict[str, Any]:
  """Greedy decode tokens/s of the student and the teacher per batch size,
  over each one's memory roofline, and the student's over the teacher's."""
  e = config.eval.speed
  models = {
      "student": Student(
          distill_train.model_config(config, vocab), rngs=nnx.Rngs(0)
      ),
      "teacher": Teacher(
          teacher_train.model_config(config, vocab), rngs=nnx.Rngs(1)
      ),
  }
  out: dict[str, Any] = {}
  for b in e.batch_sizes:
    row: dict[str, Any] = {}
    for name, model in models.items():
      speed = decode_speed.measure_speed(
          model, e.prompt_len, e.new_tokens, b, repeats=repeats
      )
      context = e.prompt_len + e.new_tokens // 2  # the mean over the steps
      roofline = b * bandwidth / decode_bytes(model, b, context)
      row[f"{name}_tokens_per_s"] = speed["decode_tokens_per_s"]
      row[f"{name}_roofline_tokens_per_s"] = roofline
      row[f"{name}_over_roofline"] = speed["decode_tokens_per_s"] / roofline
    row["decode_student_over_teacher"] = (
        row["student_tokens_per_s"] / row["teacher_tokens_per_s"]
    )
    out[f"batch_{b}"] = row
  return out


def attention_cost(
    config, lengths=(4096, 8192, 32768), vocab: int = 256
) -> dict[str, Any]:
  """One local and one global layer of the config's student, forward and
  backward, for rows of each length: temporary MiB of the compiled program
  (XLA's memory analysis) and matrix-product MFLOP per token (counted on
  the traced program with every scan step, ``planning.matmul_flops``: XLA's
  cost analysis counts a loop body once), on the path ``self_attention``
  takes (``path``: blockwise past one tile) and on the dense one
  (``attention_mask`` + ``attend``). Compiled, never run."""
  model = distill_train.model_config(config, vocab)

  def cost(length, fn):
    shape = lambda heads: jax.ShapeDtypeStruct(
        (1, length, heads, model.head_dim), jnp.float32
    )
    grad = jax.grad(lambda q, k, v, s: jnp.sum(fn(q, k, v, s)), (0, 1, 2))
    args = (
        shape(model.num_heads),
        shape(model.num_kv_heads),
        shape(model.num_kv_heads),
        jax.ShapeDtypeStruct((1, length), jnp.int32),
    )
    compiled = jax.jit(grad).trace(*args).lower().compile()
    flops = planning.matmul_flops(jax.make_jaxpr(grad)(*args))
    return {
        "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20,
        "mflop_per_token": flops / length / 1e6,
    }

  def dense(window):
    def fn(q, k, v, s):
      index = attention.default_positions(q)
      mask = attention.attention_mask(s, s, index, index, window=window)
      return attention.attend(q, k, v, mask, scale=model.query_scale)

    return fn

  path = lambda window: lambda q, k, v, s: attention.self_attention(
      q, k, v, s, window=window, scale=model.query_scale, impl="xla"
  )
  layers = {"local": model.window, "global": None}
  return {
      "heads": [model.num_heads, model.num_kv_heads, model.head_dim],
      "window": model.window,
      "by_length": {
          str(length): {
              kind: {
                  "path": cost(length, path(window)),
                  "dense": cost(length, dense(window)),
              }
              for kind, window in layers.items()
          }
          for length in lengths
      },
  }


def benchmark(
    config, repeats: int = 5, runs=None, sections=None
) -> dict[str, Any]:
  """The sections named (default every one of SECTIONS) as a dict."""
  sections = list(sections or SECTIONS)
  unknown = sorted(set(sections) - set(SECTIONS + OPT_IN))
  if unknown:
    raise ConfigError(f"--sections: unknown {unknown}; use {SECTIONS + OPT_IN}")
  vocab = config.data.vocab_size
  dtype = distill_train.model_config(config, vocab or 256).dtype
  out: dict[str, Any] = {"machine": report.machine_description()}
  if {"students", "teacher", "decode"} & set(sections):
    out["matmul_dtype"] = dtype
    out["matmul_flops_per_s"] = bench_steps.matmul_flops(dtype, repeats=repeats)
    out["copy_bytes_per_s"] = bench_steps.copy_bandwidth(repeats=repeats)
  matmul = out.get("matmul_flops_per_s")
  make = {
      "students": lambda: bench_steps.step_ratios(
          config, vocab, repeats, matmul, runs
      ),
      "teacher": lambda: bench_steps.teacher_step(
          config, vocab, repeats, matmul
      ),
      "moe": lambda: bench_steps.moe_impls(config, vocab, repeats),
      "cache": lambda: cache_ratio(config, vocab, repeats),
      "decode": lambda: decode_ratio(
          config, vocab, repeats, out["copy_bytes_per_s"]
      ),
      "attention": lambda: attention_cost(config, vocab=vocab or 256),
      "prepare": lambda: bench_prepare.measure(
          sizes_mb=(20, 200), workers=(1, 2)
      ),
  }
  for name in SECTIONS + OPT_IN:
    if name in sections:
      out[name] = make[name]()
  return out


def main(argv):
  config = cli.setup_config(argv)
  result = benchmark(config, _REPEATS.value, _RUNS.value, _SECTIONS.value)
  text = json.dumps(result, indent=2)
  print(text)
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  cli.run(main)
