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

import dataclasses
import importlib.util
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from distill import on_policy, planning
from distill import train as distill_train
from distill.core import cli
from distill.core.errors import ConfigError
from distill.decoding import speed as decode_speed
from distill.evals import report
from distill.nn import attention
from distill.training import loop as trainer
from experiments import bench_prepare
from student.model import Student
from teacher import targets as teacher_targets
from teacher import moe as moe_lib
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
# What the machine can do


def _timed(fn, repeats: int) -> tuple[float, float]:
  """(compile seconds: first call minus a compiled one, median seconds)."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  seconds, _ = decode_speed.median_time(fn, repeats)
  return max(first - seconds, 0.0), seconds


def matmul_flops(dtype="float32", size: int | None = None, repeats=5) -> float:
  """FLOP/s of a square matmul in ``dtype`` (8192 on accelerators, 2048 on
  the CPU)."""
  if size is None:
    size = 2048 if jax.default_backend() == "cpu" else 8192
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  a = a.astype(dtype)
  f = jax.jit(lambda x: x @ x)
  return 2 * size**3 / decode_speed.median_time(lambda: f(a), repeats)[0]


def copy_bandwidth(num_bytes: int | None = None, repeats=5) -> float:
  """Bytes/s read plus written by an elementwise pass over a large array
  (256 MiB on the CPU, 2 GiB on accelerators)."""
  if num_bytes is None:
    num_bytes = 2**28 if jax.default_backend() == "cpu" else 2**31
  x = jnp.ones((num_bytes // 4,), jnp.float32)
  f = jax.jit(lambda x: x * 2.0)
  return 2 * num_bytes / decode_speed.median_time(lambda: f(x), repeats)[0]


def attention_train_flops(
    kinds, window: int | None, batch: int, seq: int, heads: int, head_dim: int
) -> float:
  """Attention FLOPs of one training step (see the module docstring): three
  times the forward pass's."""
  return 3 * planning.attention_flops(
      kinds, window, batch, seq, heads, head_dim
  )


def _train_flops(counts, kinds, window, heads, head_dim, batch, seq) -> float:
  return 6 * counts["active"] * batch * seq + attention_train_flops(
      kinds, window, batch, seq, heads, head_dim
  )


# ----------------------------------------------------------------------------
# Training steps


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
  tail_counts = rng.multinomial(c.tail_samples, np.ones(16) / 16, (b, t))
  topk_tail = {
      "ids": topk["ids"][..., : c.tail_k],
      "log_probs": topk["log_probs"][..., : c.tail_k],
      "tail": topk["tail"],
      "tail_ids": np.tile(np.arange(16, dtype=np.int32) + c.k, (b, t, 1)),
      "tail_counts": tail_counts.astype(np.int32),
  }
  return {"base": batch, "topk": topk, "sample": sample, "topk_tail": topk_tail}


def _cross_tokenizer_batch(kind, batches, config, vocab: int):
  """A cross-tokenizer run's batch and ``loss_fn_for`` keywords, as if the
  student spoke the teacher's tokenizer (each token its own chunk, every
  label aligned): the step's cost, not the data's meaning."""
  base = batches["base"]
  b, t = base["tokens"].shape[0], base["tokens"].shape[1] - 1
  every = np.ones((b, t), bool)
  spots = np.tile(np.arange(t, dtype=np.int32), (b, 1))
  batch: dict[str, np.ndarray] = {}
  if kind.mode == "online":
    batch.update({f"teacher_{k}": base[k] for k in base})
  pieces = np.full((vocab, 8), -1, np.int32)
  pieces[:, 0] = np.arange(vocab)
  settings = {"cross_cfg": dict(config.distill.cross_tokenizer)}
  if kind.loss == "alm":
    batch.update(chunk=spots, chunk_valid=every)
    if kind.mode == "online":
      batch["teacher_chunk"] = spots
    else:
      batch["chunk_log_probs"] = np.full((b, t), -3.0, np.float32)
    return batch, settings
  settings.update(pieces=pieces, unmapped_ids=np.zeros(vocab, bool))
  batch["aligned"] = every
  if kind.mode == "online":
    batch.update(
        teacher_position=spots,
        piece_depth=np.zeros((b, t), np.int32),
        piece_prefix=np.full((b, t, 8), -1, np.int32),
    )
    return batch, settings
  target = dict(batches[kind.target])
  target.pop("tail", None)
  if "counts" in target:
    target["counts"] = target["counts"].astype(np.float32)
  width = target["ids"].shape[-1]
  target["unmapped_probs"] = np.zeros((b, t, width), np.float32)
  batch.update(target)
  return batch, settings


def _step_timing(loss_fn, model, loop, batch, frozen, repeats, prepare=None):
  """(compile seconds, median seconds) of one training step of ``loss_fn``
  (after ``prepare(model, batch, step)``, the on-policy generation, if
  given)."""
  optimizer = nnx.Optimizer(model, trainer.make_optimizer(loop), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, batch, frozen):
    def objective(m):
      return loss_fn(m, batch, jnp.int32(0), *frozen)

    (loss, _), grads = nnx.value_and_grad(objective, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss

  if prepare is None:
    return _timed(lambda: step(model, optimizer, batch, frozen), repeats)
  batch = jax.tree.map(jnp.asarray, batch)
  return _timed(
      lambda: step(model, optimizer, prepare(model, batch, 0), frozen), repeats
  )


def step_ratios(
    config, vocab: int, repeats: int, matmul: float, runs=None
) -> dict[str, Any]:
  """The student's training step per run kind (over CE), its MFU and
  compile seconds, scanned and not."""
  kinds = distill_train.RUN_KINDS
  runs = ["ce"] + [r for r in (runs or kinds) if r != "ce"]
  unknown = sorted(set(runs) - set(kinds))
  if unknown:
    raise ConfigError(
        f"--runs: unknown run kind(s) {unknown}; expected some of"
        f" {sorted(kinds)}"
    )
  rng = np.random.default_rng(0)
  batches = _batch(config, vocab, rng)
  loop = distill_train.loop_config(config)
  s_cfg = distill_train.model_config(config, vocab)
  needs_teacher = any(kinds[r].needs_teacher for r in runs)
  teacher = (
      Teacher(teacher_train.model_config(config, vocab), rngs=nnx.Rngs(1))
      if needs_teacher
      else None
  )
  seconds, compile_s = {}, {}
  for run in runs:
    kind = kinds[run]
    policy, prepare = None, None
    if kind.mode == "on_policy":  # timed as a step that generates
      policy = dataclasses.replace(
          distill_train.on_policy_config(config, kind), lam=1.0
      )
      prepare = on_policy.prepare_fn(policy, config.seed)
    batch, cross = dict(batches["base"]), {}
    if kind.cross_tokenizer:
      extra, cross = _cross_tokenizer_batch(kind, batches, config, vocab)
      batch.update(extra)
    elif kind.reads_cache:
      batch.update(batches[kind.target])
    loss_fn = distill_train.loss_fn_for(
        kind,
        config.distill,
        cache_temperature=1.0,
        topk_k=config.cache.k,
        on_policy_cfg=policy,
        **cross,
    )
    frozen = (teacher,) if kind.needs_teacher else ()
    compile_s[run], seconds[run] = _step_timing(
        loss_fn,
        Student(s_cfg, rngs=nnx.Rngs(0)),
        loop,
        batch,
        frozen,
        repeats,
        prepare,
    )
  scanned = dataclasses.replace(s_cfg, scan_layers=not s_cfg.scan_layers)
  ce_loss = distill_train.loss_fn_for(
      kinds["ce"], config.distill, cache_temperature=1.0, topk_k=config.cache.k
  )
  other_compile, other_step = _step_timing(
      ce_loss,
      Student(scanned, rngs=nnx.Rngs(0)),
      loop,
      batches["base"],
      (),
      repeats,
  )
  b, t = config.data.batch_size, config.data.seq_len
  counts = Student.abstract(s_cfg).param_counts()
  flops = _train_flops(
      counts, s_cfg.layer_kinds, s_cfg.window, s_cfg.num_heads,
      s_cfg.head_dim, b, t,
  )  # fmt: skip
  by_scan = {
      s_cfg.scan_layers: (compile_s["ce"], seconds["ce"]),
      scanned.scan_layers: (other_compile, other_step),
  }
  return {
      "step_seconds": seconds,
      "step_time_over_ce": {
          run: s / seconds["ce"] for run, s in seconds.items()
      },
      "compile_s": compile_s,
      "ce_by_scan_layers": {
          f"scan_layers={k}": {"compile_s": v[0], "step_s": v[1]}
          for k, v in by_scan.items()
      },
      "student_params": counts["total"],
      "dtype": s_cfg.dtype,
      "tokens_per_step": b * t,
      "train_flops_per_step": flops,
      "train_flops_over_matmul": flops / seconds["ce"] / matmul,
  }


def teacher_step(
    config, vocab: int, repeats: int, matmul: float
) -> dict[str, Any]:
  """The teacher's pretraining step: seconds, compile seconds, MFU."""
  cfg = teacher_train.model_config(config, vocab)
  batch = _batch(config, vocab, np.random.default_rng(0))["base"]
  loop = teacher_train.loop_config(config)
  loss_fn = teacher_train.loss_fn_for(cfg, config.teacher.train.loss_chunk)
  compile_s, seconds = _step_timing(
      loss_fn,
      Teacher(cfg, rngs=nnx.Rngs(1)),
      loop,
      batch,
      (),
      repeats,
  )
  b, t = config.data.batch_size, config.data.seq_len
  counts = Teacher.abstract(cfg).param_counts()
  kinds = [
      attention.AttentionKind.LOCAL if cfg.sliding_window else "global"
  ] * cfg.num_layers
  flops = _train_flops(
      counts, kinds, cfg.sliding_window, cfg.num_heads, cfg.head_dim, b, t
  )
  return {
      "step_s": seconds,
      "compile_s": compile_s,
      "params": counts,
      "dtype": cfg.dtype,
      "tokens_per_s": b * t / seconds,
      "train_flops_per_step": flops,
      "train_flops_over_matmul": flops / seconds / matmul,
  }


def moe_impls(config, vocab: int, repeats: int) -> dict[str, Any]:
  """Forward + backward seconds of one of the teacher's MoE layers on a
  training batch, per grouped-matmul implementation (what ``moe_impl="auto"``
  should pick on this backend; tokamax only when it is installed)."""
  cfg = teacher_train.model_config(config, vocab)
  b, t = config.data.batch_size, config.data.seq_len
  x = jax.random.normal(jax.random.key(0), (b, t, cfg.d_model), jnp.float32)
  x = x.astype(cfg.dtype)
  impls = ["ragged", "blocked"]
  if importlib.util.find_spec("tokamax") is not None:
    impls.insert(1, "tokamax")
  if jax.default_backend() == "tpu":  # elsewhere the Pallas interpreter
    impls.insert(1, "megablox")

  @nnx.jit
  def fwd_bwd(layer, x):
    def loss(layer, x):
      y, aux = layer(x)
      return jnp.mean(jnp.square(y.astype(jnp.float32))) + aux["z_loss"]

    return nnx.grad(loss, argnums=(0, 1))(layer, x)

  seconds, compile_s = {}, {}
  for impl in impls:
    layer = moe_lib.MoE(
        cfg.d_model,
        cfg.d_ff,
        cfg.num_experts,
        cfg.top_k,
        rngs=nnx.Rngs(0),
        impl=impl,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
    )
    compile_s[impl], seconds[impl] = _timed(
        lambda layer=layer: fwd_bwd(layer, x), repeats
    )
  auto = moe_lib.MoE(
      cfg.d_model, cfg.d_ff, cfg.num_experts, cfg.top_k, rngs=nnx.Rngs(0)
  )
  return {
      "tokens": b * t,
      "seconds": seconds,
      "compile_s": compile_s,
      "fastest": min(seconds, key=seconds.get),
      "auto_picks": auto.resolved_impl(),
  }


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
  compile_s["forward"], seconds["forward"] = _timed(
      lambda: forward(teacher, tokens, segments, positions), repeats
  )
  compile_s["cache_pass"], seconds["cache_pass"] = _timed(
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
    out["matmul_flops_per_s"] = matmul_flops(dtype, repeats=repeats)
    out["copy_bytes_per_s"] = copy_bandwidth(repeats=repeats)
  matmul = out.get("matmul_flops_per_s")
  make = {
      "students": lambda: step_ratios(config, vocab, repeats, matmul, runs),
      "teacher": lambda: teacher_step(config, vocab, repeats, matmul),
      "moe": lambda: moe_impls(config, vocab, repeats),
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
