"""The training-step half of ``experiments.benchmark``: what the machine
can do (matmul rate, copy bandwidth) and the timed training steps of the
config's students and teacher (see that module's docstring for the
figures and how they are counted)."""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distill import on_policy, planning
from distill import train as distill_train
from distill.core.errors import ConfigError
from distill.decoding import speed as decode_speed
from distill.nn import attention
from distill.training import loop as trainer
from student.model import Student
from teacher import moe as moe_lib
from teacher import train as teacher_train
from teacher.model import Teacher

# ----------------------------------------------------------------------------
# What the machine can do


def timed(fn, repeats: int) -> tuple[float, float]:
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
    return timed(lambda: step(model, optimizer, batch, frozen), repeats)
  batch = jax.tree.map(jnp.asarray, batch)
  return timed(
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
    compile_s[impl], seconds[impl] = timed(
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
