"""Generation with a KV cache for any model with ``init_cache`` / ``decode``.

Both the student and the teacher expose::

    cache = model.init_cache(batch, max_len, rollback=0)  # list of per-layer dicts
    logits, cache = model.decode(tokens, cache, positions)
        # tokens [B, t] int32, positions [B, t] (-1 = left padding)
        # -> logits [B, t, V] float32 (equal to a full forward at these rows)

(the cache layout is in ``distill.nn.attention``). This module runs them: one
prefill of the (left-padded) prompts, then one jitted step per new token
that feeds the previous token and picks the next one. The step's shapes are
fixed (the cache is allocated for ``prompt + max_new_tokens`` up front,
rounded up to a multiple of LENGTH_BUCKET; prompts are left-padded to a
multiple of PROMPT_BUCKET), so it compiles once per batch size and bucket,
not per token.

    rows = generate(model, [[5, 6, 7]], 20, temperature=0.8, top_p=0.95,
                    eos_id=1, key=jax.random.key(0))     # [[new tokens...]]
    for tokens in stream(model, prompts, 20): ...        # [B] per step
    measure_speed(model, prompt_len=128, new_tokens=64, batch=8)

Sampling: ``temperature == 0`` is greedy (argmax); otherwise softmax of
``logits / temperature`` cut to the nucleus ``top_p`` (the smallest set of
most likely tokens whose mass reaches top_p) and renormalised.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# ----------------------------------------------------------------------------
# Sampling


def sampling_probs(logits: jax.Array, temperature, top_p) -> jax.Array:
  """The distribution a token is drawn from: [..., V] -> probs [..., V] f32.

  softmax(logits / temperature), keeping only the nucleus: tokens sorted by
  probability are kept while the mass before them is < top_p (the most
  likely token always stays); top_p >= 1 keeps every token. Needs
  temperature > 0 (greedy decoding does not call this).
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  order = jnp.argsort(-probs, axis=-1)
  sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
  before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  keep_sorted = (before < top_p) | (jnp.asarray(top_p) >= 1.0)
  keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
  probs = jnp.where(keep, probs, 0.0)
  return probs / jnp.sum(probs, axis=-1, keepdims=True)


def pick(
    logits: jax.Array, key: jax.Array, temperature, top_p, *, greedy: bool
) -> jax.Array:
  """Next tokens from logits [..., V] -> [...] int32 (argmax when greedy)."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  probs = sampling_probs(logits, temperature, top_p)
  return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------
# Jitted pieces (compiled once per model structure and shape)


def per_model(static_argnames=(), donate_argnames=()):
  """Decorates ``fn(graphdef, state, ...)``: ``fn(graphdef)`` is then its jit.

  The jitted function closes over the graphdef (the model's structure) and
  is cached per structure, so a call costs no hashing of the graphdef (a
  static argument would be hashed at every call, ~1 ms per token).
  """

  def wrap(fn):
    @functools.lru_cache(maxsize=32)
    def for_graph(graphdef):
      return jax.jit(
          functools.partial(fn, graphdef),
          static_argnames=static_argnames,
          donate_argnames=donate_argnames,
      )

    for_graph.__doc__ = fn.__doc__
    return for_graph

  return wrap


@per_model(static_argnames=("max_len", "rollback"))
def prefill(
    graphdef, state, tokens, positions, *, max_len: int, rollback: int = 0
):
  """A fresh cache filled with a prompt: ``prefill(graphdef)(state, ...)``.

  tokens, positions [B, P] -> (logits of the last column [B, V], cache).
  """
  model = nnx.merge(graphdef, state)
  cache = model.init_cache(tokens.shape[0], max_len, rollback=rollback)
  logits, cache = model.decode(tokens, cache, positions)
  return logits[:, -1], cache


@per_model(donate_argnames=("cache",))
def decode(graphdef, state, tokens, cache, positions):
  """``model.decode`` under jit (the cache buffers are donated)."""
  return nnx.merge(graphdef, state).decode(tokens, cache, positions)


@functools.partial(jax.jit, static_argnames=("greedy",))
def _pick(logits, key, step, temperature, top_p, *, greedy):
  return pick(
      logits, jax.random.fold_in(key, step), temperature, top_p, greedy=greedy
  )


@per_model(static_argnames=("greedy",), donate_argnames=("cache",))
def _step(
    graphdef,
    state,
    cache,
    tokens,
    positions,
    key,
    step,
    temperature,
    top_p,
    *,
    greedy,
):
  """Feeds tokens [B] at positions [B]; returns (next tokens [B], cache)."""
  model = nnx.merge(graphdef, state)
  logits, cache = model.decode(tokens[:, None], cache, positions[:, None])
  return (
      _pick(logits[:, 0], key, step, temperature, top_p, greedy=greedy),
      cache,
  )


# ----------------------------------------------------------------------------
# Generation


#: Prompt widths and cache lengths are rounded up to these multiples, so
#: prompts of nearby lengths share one compilation of every function.
PROMPT_BUCKET = 16
LENGTH_BUCKET = 64


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def left_pad(
    prompts: Sequence[Sequence[int]], bucket: int = 1
) -> tuple[np.ndarray, np.ndarray]:
  """Right-aligns prompts: (tokens [B, P] int32 (0 padded), positions [B, P]).

  Real tokens of row b sit at positions 0..len_b-1; padding has position -1.
  P is the longest prompt rounded up to a multiple of ``bucket``.
  """
  lengths = [len(p) for p in prompts]
  if not prompts or min(lengths) < 1:
    raise ValueError(
        "every prompt needs at least one token (e.g. the BOS/EOS id)"
    )
  width = round_up(max(lengths), bucket)
  tokens = np.zeros((len(prompts), width), np.int32)
  positions = np.full((len(prompts), width), -1, np.int32)
  for b, p in enumerate(prompts):
    tokens[b, width - len(p) :] = p
    positions[b, width - len(p) :] = np.arange(len(p))
  return tokens, positions


def _as_rows(prompt_tokens) -> list[list[int]]:
  if isinstance(prompt_tokens, (jax.Array, np.ndarray)):
    array = np.asarray(prompt_tokens)
    return [array.tolist()] if array.ndim == 1 else array.tolist()
  rows = list(prompt_tokens)
  if rows and np.ndim(rows[0]) == 0:  # one flat prompt
    return [[int(t) for t in rows]]
  return [[int(t) for t in np.asarray(r).reshape(-1)] for r in rows]


def stream(
    model: nnx.Module,
    prompt_tokens,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    key: jax.Array | None = None,
) -> Iterator[np.ndarray]:
  """Yields the next token of every row, [B] int32, one step at a time.

  prompt_tokens: [B, P] ints, or a list of prompts of any lengths (they are
  left-padded), or one flat prompt. Stops after ``max_new_tokens`` steps or
  when every row has produced ``eos_id``; a row that has finished yields -1.
  ``key`` seeds sampling (default key 0; unused when greedy).
  """
  rows = _as_rows(prompt_tokens)
  if max_new_tokens <= 0:
    return
  tokens, positions = left_pad(rows, PROMPT_BUCKET)
  max_len = round_up(max(map(len, rows)) + max_new_tokens, LENGTH_BUCKET)
  greedy = temperature <= 0
  key = jax.random.key(0) if key is None else key
  temperature = np.float32(max(temperature, 1e-6))
  top_p = np.float32(top_p)
  graphdef, state = nnx.split(model)
  logits, cache = prefill(graphdef)(state, tokens, positions, max_len=max_len)
  step = _step(graphdef)
  token = _pick(logits, key, 0, temperature, top_p, greedy=greedy)
  next_pos = jnp.asarray(positions[:, -1] + 1)
  done = np.zeros(len(rows), bool)
  for i in range(max_new_tokens):
    nxt = None
    if i + 1 < max_new_tokens:  # dispatch the next step before reading this one
      nxt, cache = step(
          state,
          cache,
          token,
          next_pos + i,
          key,
          i + 1,
          temperature,
          top_p,
          greedy=greedy,
      )
    host = np.asarray(token)
    yield np.where(done, -1, host).astype(np.int32)
    if eos_id is not None:
      done |= host == eos_id
    if done.all() or nxt is None:
      return
    token = nxt


def generate(
    model: nnx.Module,
    prompt_tokens,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    key: jax.Array | None = None,
    callback=None,
) -> list[list[int]]:
  """New tokens of every prompt: a list (one per row) of token lists.

  A row stops after ``max_new_tokens`` tokens or at ``eos_id`` (included).
  ``callback(tokens [B])`` is called after every step (see ``stream``).
  """
  rows = _as_rows(prompt_tokens)
  out: list[list[int]] = [[] for _ in rows]
  for tokens in stream(
      model,
      rows,
      max_new_tokens,
      temperature=temperature,
      top_p=top_p,
      eos_id=eos_id,
      key=key,
  ):
    for b, t in enumerate(tokens):
      if t >= 0:
        out[b].append(int(t))
    if callback is not None:
      callback(tokens)
  return out


# ----------------------------------------------------------------------------
# Speed


@per_model(static_argnames=("steps",))
def _greedy_loop(graphdef, state, cache, logits, positions, *, steps: int):
  """``steps`` greedy decode steps in one compiled loop -> last tokens [B]."""
  model = nnx.merge(graphdef, state)

  def body(i, carry):
    cache, logits = carry
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out, cache = model.decode(token[:, None], cache, (positions + i)[:, None])
    return cache, out[:, 0]

  cache, logits = jax.lax.fori_loop(0, steps, body, (cache, logits))
  return jnp.argmax(logits, axis=-1)


def median_time(fn, repeats: int) -> tuple[float, Any]:
  """Times ``fn()``: one warm-up call (compilation), then ``repeats`` timed
  calls, each waited for (``block_until_ready``) -> (median seconds, the
  warm-up call's result)."""
  result = jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
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

  Prefill: one jitted call over [batch, prompt_len] tokens (cache included).
  Decode: ``new_tokens`` greedy single-token steps from that cache in one
  jitted loop (no Python per token). Each is warmed up first (compilation
  excluded) and timed ``repeats`` times with block_until_ready; the median
  is reported. Returns {"prefill_tokens_per_s", "decode_tokens_per_s",
  "prefill_s", "decode_s", "batch", "prompt_len", "new_tokens"}; tokens/s
  count every row (batch * tokens / seconds).
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
  max_len = prompt_len + new_tokens
  run_prefill = lambda: prefill(graphdef)(
      state, tokens, positions, max_len=max_len
  )
  prefill_s, (logits, cache) = median_time(run_prefill, repeats)
  start = jnp.full((batch,), prompt_len, jnp.int32)
  decode_s, _ = median_time(
      lambda: _greedy_loop(graphdef)(
          state, cache, logits, start, steps=new_tokens
      ),
      repeats,
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
