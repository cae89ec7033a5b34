"""Ratios that matter, measured inside one process.

    python -m experiments.benchmark --config=experiments/stdlib.py --out=/tmp/bench.json

Timings on a shared or small machine are noisy, so everything is reported as a
ratio of two timings taken in the same process on the same inputs, with the
absolute times beside the machine they came from. Measured here:

- ``step_time_over_ce``: a training step of the config's student with each
  distillation loss (sampled, top-k ghost, top-k sparse: targets of the
  cache's shapes; online and online_topk: the teacher in the loop) over a plain
  cross-entropy step, same batch;
- ``train_flops_over_matmul``: the achieved FLOP/s of the CE training step
  (6 x parameters x tokens) over that of a large float32 matmul;
- ``cache_over_forward``: throughput of the cache's jitted teacher pass
  (forward plus every configured target) over the forward alone, same batch
  (the device side of ``teacher.cache_logits``; the stage overlaps host
  encoding and writing with it);
- ``decode_student_over_teacher``: batch-1 and batch-8 greedy decode
  tokens/s of the student over the teacher's (KV cache, compiled loop).

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

from distill.core import cli
from distill.evals import report
from distill.training import loop as trainer
from distill.decoding import generate as gen
from distill import train as distill_train
from student.model import Student
from teacher import cache_logits
from teacher import train as teacher_train
from teacher.model import Teacher

_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions (median).")


def matmul_flops(size: int = 2048, repeats: int = 5) -> float:
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  return 2 * size**3 / gen.median_time(lambda: f(a), repeats)[0]


def _batch(
    config, vocab: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
  b, t = config.data.batch_size, config.data.seq_len
  c = config.cache
  batch = {
      "tokens": rng.integers(3, vocab, (b, t + 1)).astype(np.int32),
      "segment_ids": np.ones((b, t + 1), np.int32),
      "positions": np.tile(np.arange(t + 1, dtype=np.int32), (b, 1)),
  }
  log_probs = np.log(rng.dirichlet(np.ones(c.k), (b, t)) * 0.9).astype(
      np.float32
  )
  topk = {
      "ids": rng.integers(0, vocab, (b, t, c.k)).astype(np.int32),
      "log_probs": np.sort(log_probs, -1)[..., ::-1].copy(),
      "tail": np.full((b, t), 0.1, np.float32),
  }
  counts = rng.multinomial(c.num_samples, np.ones(16) / 16, (b, t))
  sample = {
      "ids": np.tile(np.arange(16, dtype=np.int32), (b, t, 1)),
      "counts": counts.astype(np.int32),
  }
  return {"base": batch, "topk": topk, "sample": sample}


def _step_seconds(loss_fn, model, optimizer, batch, frozen, repeats) -> float:
  """Median seconds of one compiled training step of ``loss_fn``."""

  @nnx.jit
  def step(model, optimizer, batch, frozen):
    def objective(m):
      return loss_fn(m, batch, jnp.int32(0), *frozen)

    (loss, _), grads = nnx.value_and_grad(objective, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss

  return gen.median_time(
      lambda: step(model, optimizer, batch, frozen), repeats
  )[0]


def step_ratios(config, vocab: int, repeats: int) -> dict[str, Any]:
  """Student step time per run kind, over the CE step time."""
  rng = np.random.default_rng(0)
  batches = _batch(config, vocab, rng)
  loop = distill_train.loop_config(config)
  s_cfg = distill_train.model_config(config, vocab)
  teacher = Teacher(teacher_train.model_config(config, vocab), rngs=nnx.Rngs(1))
  seconds = {}
  for run, kind in distill_train.RUN_KINDS.items():
    model = Student(s_cfg, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(
        model, trainer.make_optimizer(loop), wrt=nnx.Param
    )
    loss_fn = distill_train.loss_fn_for(
        kind, config.distill, cache_temperature=1.0, topk_k=config.cache.k
    )
    batch = dict(batches["base"])
    if kind.mode == "offline":
      batch.update(batches[kind.target])
    frozen = (teacher,) if kind.mode == "online" else ()
    seconds[run] = _step_seconds(
        loss_fn, model, optimizer, batch, frozen, repeats
    )
  tokens = config.data.batch_size * config.data.seq_len
  params = Student(s_cfg, rngs=nnx.Rngs(0)).param_counts()["total"]
  flops = matmul_flops(repeats=repeats)
  return {
      "step_seconds": seconds,
      "step_time_over_ce": {
          run: s / seconds["ce"] for run, s in seconds.items()
      },
      "student_params": params,
      "tokens_per_step": tokens,
      "matmul_flops_per_s": flops,
      "train_flops_over_matmul": 6 * params * tokens / seconds["ce"] / flops,
  }


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
  targets = cache_logits.make_target_fn(
      tuple(c.methods), c.k, c.num_samples, c.temperature, c.stratified
  )
  key = jax.random.key(0)
  rows = jnp.arange(b, dtype=jnp.int32)
  seconds = {
      "forward": gen.median_time(
          lambda: forward(teacher, tokens, segments, positions), repeats
      )[0],
      "cache_pass": gen.median_time(
          lambda: targets(teacher, tokens, segments, positions, key, rows),
          repeats,
      )[0],
  }
  return {
      "seconds": seconds,
      "methods": list(c.methods),
      "batch": [b, t],
      "cache_over_forward": seconds["forward"] / seconds["cache_pass"],
  }


def decode_ratio(config, vocab: int, repeats: int) -> dict[str, Any]:
  """Greedy decode tokens/s of the student over the teacher's, per batch size."""
  e = config.eval.speed
  student = Student(distill_train.model_config(config, vocab), rngs=nnx.Rngs(0))
  teacher = Teacher(teacher_train.model_config(config, vocab), rngs=nnx.Rngs(1))
  out: dict[str, Any] = {}
  for b in e.batch_sizes:
    s = gen.measure_speed(
        student, e.prompt_len, e.new_tokens, b, repeats=repeats
    )
    t = gen.measure_speed(
        teacher, e.prompt_len, e.new_tokens, b, repeats=repeats
    )
    out[f"batch_{b}"] = {
        "student_tokens_per_s": s["decode_tokens_per_s"],
        "teacher_tokens_per_s": t["decode_tokens_per_s"],
        "decode_student_over_teacher": s["decode_tokens_per_s"]
        / t["decode_tokens_per_s"],
    }
  return out


def benchmark(config, repeats: int = 5) -> dict[str, Any]:
  vocab = config.data.vocab_size
  return {
      "machine": report.machine_description(),
      "students": step_ratios(config, vocab, repeats),
      "cache": cache_ratio(config, vocab, repeats),
      "decode": decode_ratio(config, vocab, repeats),
  }


def main(argv):
  config = cli.setup_config(argv)
  result = benchmark(config, _REPEATS.value)
  text = json.dumps(result, indent=2)
  print(text)
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  cli.run(main)
