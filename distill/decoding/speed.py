"""Decode speed: tokens per second of a model's compiled decode loop.

``measure_speed`` times the loop ``generate`` runs, after a prefill, at a
batch size and prompt length; ``median_time`` times any call.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distill.decoding import generate


def median_time(fn, repeats: int, setup=None) -> tuple[float, Any]:
  """Times ``fn()``: one warm-up call (compilation), then ``repeats`` timed
  calls, each waited for (``block_until_ready``) -> (median seconds, the
  warm-up call's result). With ``setup``, each call is ``fn(setup())`` and
  setup's time (waited for too) is not counted."""
  arg = lambda: () if setup is None else (jax.block_until_ready(setup()),)
  result = jax.block_until_ready(fn(*arg()))
  times = []
  for _ in range(repeats):
    args = arg()
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times), result


def measure_speed(
    model: nnx.Module,
    prompt_len: int,
    new_tokens: int,
    batch: int = 1,
    *,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
  """Prefill and decode throughput of ``model`` on random tokens.

  Timed exactly as ``generate`` runs ``new_tokens + 1`` greedy tokens of
  [batch, prompt_len] prompts without an eos_id: prefill is its first call
  (the prompts into a fresh cache, and the first token); decode its second,
  ``new_tokens`` steps in the compiled while loop. Each is warmed up first
  (compilation excluded) and timed ``repeats`` times with
  block_until_ready; the median is reported (decode starts from a fresh
  prefill every time, made outside the timing). Returns
  {"prefill_tokens_per_s", "decode_tokens_per_s", "prefill_s", "decode_s",
  "batch", "prompt_len", "new_tokens"}; tokens/s count every row (batch *
  tokens / seconds).
  """
  if prompt_len < 1 or new_tokens < 1 or batch < 1:
    raise ValueError("prompt_len, new_tokens and batch must be >= 1")
  vocab = model.config.vocab_size
  tokens = jax.random.randint(
      jax.random.key(seed), (batch, prompt_len), 0, vocab, jnp.int32
  )
  positions = jnp.broadcast_to(
      jnp.arange(prompt_len, dtype=jnp.int32), (batch, prompt_len)
  )
  graphdef, state = nnx.split(model)
  key, temperature, top_p, no_eos = (
      jax.random.key(0),
      np.float32(1e-6),
      np.float32(1.0),
      -1,
  )
  run_prefill = lambda: generate.start(graphdef)(
      state,
      tokens,
      positions,
      key,
      temperature,
      top_p,
      no_eos,
      max_len=generate.cache_len(prompt_len, new_tokens + 1),
      greedy=True,
      nucleus=False,
  )
  prefill_s, _ = median_time(run_prefill, repeats)
  loop = generate.decode_loop(graphdef)
  decode_s, _ = median_time(
      lambda started: loop(
          state,
          *started,
          new_tokens,
          key,
          temperature,
          top_p,
          no_eos,
          steps=generate.round_up(new_tokens, generate.LENGTH_BUCKET),
          greedy=True,
          nucleus=False,
      ),
      repeats,
      setup=run_prefill,
  )
  return {
      "prefill_tokens_per_s": batch * prompt_len / prefill_s,
      "decode_tokens_per_s": batch * new_tokens / decode_s,
      "prefill_s": prefill_s,
      "decode_s": decode_s,
      "batch": batch,
      "prompt_len": prompt_len,
      "new_tokens": new_tokens,
  }
