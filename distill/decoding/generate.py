"""Generation with a KV cache for any model with ``init_cache`` / ``decode``.

Both the student and the teacher expose::

    cache = model.init_cache(batch, max_len, rollback=0)  # list of per-layer dicts
    logits, cache = model.decode(tokens, cache, positions)
        # tokens [B, t] int32, positions [B, t] (-1 = left padding)
        # -> logits [B, t, V] float32 (equal to a full forward at these rows)

(the cache layout is in ``distill.nn.attention``). This module runs them on
the device, a chunk of tokens per call: one jitted call prefills the
(left-padded) prompts and picks the first new token, then each call of one
jitted ``jax.lax.while_loop`` (``decode_loop``) feeds the last token, picks
the next, up to a static number of ``steps`` per call, and exits early once
every row has produced ``eos_id``. ``generate`` makes one such call for the
whole length (its step count rounded up to LENGTH_BUCKET); ``stream`` makes
one per ``chunk`` tokens and yields them one by one as each chunk arrives,
the next chunk already running. Shapes are fixed per call (the cache holds
``prompt + max_new_tokens`` rounded up to a multiple of LENGTH_BUCKET;
prompts are left-padded to a multiple of PROMPT_BUCKET), so everything
compiles once per batch size and bucket, not per token or length.
``continuations`` (on-policy training, the generated-text figures) runs the
same prefill and the same loop in one call, with no stop; speculative
decoding (``distill.speculative``) shares the prefill and the sampling.

    rows = generate(model, [[5, 6, 7]], 20, temperature=0.8, top_p=0.95,
                    eos_id=1, key=jax.random.key(0))     # [[new tokens...]]
    for tokens in stream(model, prompts, 20): ...        # [B] per step
    speed.measure_speed(model, prompt_len=128, new_tokens=64, batch=8)

Sampling (temperature, nucleus) is ``sampling``'s; timing is ``speed``'s.
"""

from __future__ import annotations

import functools
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distill.decoding import sampling

# ----------------------------------------------------------------------------
# Jitted pieces (compiled once per model structure and shape)


def per_model(static_argnames=(), donate_argnames=()):
  """Decorates ``fn(*graphdefs, *args)``: ``fn(*graphdefs)`` is its jit.

  ``graphdefs``: the structures of one or more models (the caller splits
  each model into graphdef and state and passes the states as arguments).
  The jitted function closes over the graphdefs and is cached per
  structure, so a call costs no hashing of them (a static argument would be
  hashed at every call, ~1 ms).
  """

  def wrap(fn):
    @functools.lru_cache(maxsize=32)
    def for_graph(*graphdefs):
      return jax.jit(
          functools.partial(fn, *graphdefs),
          static_argnames=static_argnames,
          donate_argnames=donate_argnames,
      )

    for_graph.__doc__ = fn.__doc__
    return for_graph

  return wrap


#: Prompts longer than this are prefilled this many tokens per decode call
#: (a ``lax.scan``), so a long prompt's scores are [chunk, cache] per layer
#: and its logits [chunk, V], not [P, P] and [P, V].
PREFILL_CHUNK = 512


def _prefill(
    model, tokens, positions, max_len: int, rollback: int, chunk: int = 0
):
  """Traced body of ``prefill`` (``start`` shares it): the prompt in one
  decode call, or in ``chunk`` tokens per call (default ``PREFILL_CHUNK``)
  when it is longer (left-padded to whole chunks; the same cache and
  logits)."""
  batch, length = tokens.shape
  cache = model.init_cache(batch, max_len, rollback=rollback)
  chunk = chunk or PREFILL_CHUNK
  if length <= chunk:
    logits, cache = model.decode(tokens, cache, positions)
    return logits[:, -1], cache
  count = -(-length // chunk)
  pad = count * chunk - length
  tokens = jnp.pad(tokens, ((0, 0), (pad, 0)))
  positions = jnp.pad(positions, ((0, 0), (pad, 0)), constant_values=-1)
  split = lambda x: jnp.moveaxis(x.reshape(batch, count, chunk), 1, 0)

  def step(cache, xs):
    logits, cache = model.decode(xs[0], cache, xs[1])
    return cache, logits[:, -1]

  cache, last = jax.lax.scan(step, cache, (split(tokens), split(positions)))
  return last[-1], cache


@per_model(static_argnames=("max_len", "rollback"))
def prefill(
    graphdef, state, tokens, positions, *, max_len: int, rollback: int = 0
):
  """A fresh cache filled with a prompt: ``prefill(graphdef)(state, ...)``.

  tokens, positions [B, P] -> (logits of the last column [B, V], cache).
  """
  return _prefill(
      nnx.merge(graphdef, state), tokens, positions, max_len, rollback
  )


@per_model(donate_argnames=("cache",))
def decode(graphdef, state, tokens, cache, positions):
  """``model.decode`` under jit (the cache buffers are donated)."""
  return nnx.merge(graphdef, state).decode(tokens, cache, positions)


class Cursor(NamedTuple):
  """Where a generation stands between calls (all on the device).

  token [B] int32: the last picked token (not yet fed to the model).
  position [B] int32: the position ``token`` will be fed at.
  done [B] bool: the row has produced eos_id (``token`` included).
  step () int32: the index of ``token`` among the new tokens (0 = first).
  """

  token: jax.Array
  position: jax.Array
  done: jax.Array
  step: jax.Array


def _first(
    model,
    tokens,
    positions,
    key,
    temperature,
    top_p,
    eos_id,
    *,
    max_len: int,
    greedy: bool,
    nucleus: bool,
):
  """Prefills a fresh cache with the prompts and picks the first new token.

  tokens, positions [B, P] (left-padded); the token is drawn with
  ``fold_in(key, 0)``; eos_id: -1 for none -> (cache, Cursor at step 0).
  """
  logits, cache = _prefill(model, tokens, positions, max_len, 0)
  token = sampling.pick(
      logits,
      jax.random.fold_in(key, 0),
      temperature,
      top_p,
      greedy=greedy,
      nucleus=nucleus,
  )
  cursor = Cursor(token, positions[:, -1] + 1, token == eos_id, jnp.int32(0))
  return cache, cursor


def _loop(
    model,
    cache,
    cursor: Cursor,
    limit,
    key,
    temperature,
    top_p,
    eos_id,
    *,
    steps: int,
    greedy: bool,
    nucleus: bool,
):
  """Up to ``min(limit, steps)`` more tokens of every row, in one while loop.

  Each step feeds ``cursor.token`` and picks the next token with
  ``fold_in(key, step)``; the loop stops early once every row is done.
  -> (cache, the new Cursor, tokens [B, steps] int32 (-1 for a row that
  had finished before that step, and in the columns after ``count``),
  count () int32: the steps taken).
  """
  limit = jnp.minimum(limit, steps)

  def cond(carry):
    count, _, _, cursor = carry
    return (count < limit) & ~jnp.all(cursor.done)

  def body(carry):
    count, out, cache, cursor = carry
    logits, cache = model.decode(
        cursor.token[:, None], cache, cursor.position[:, None]
    )
    step = cursor.step + 1
    token = sampling.pick(
        logits[:, 0],
        jax.random.fold_in(key, step),
        temperature,
        top_p,
        greedy=greedy,
        nucleus=nucleus,
    )
    out = out.at[:, count].set(jnp.where(cursor.done, -1, token))
    cursor = Cursor(
        token, cursor.position + 1, cursor.done | (token == eos_id), step
    )
    return count + 1, out, cache, cursor

  out = jnp.full((cursor.token.shape[0], steps), -1, jnp.int32)
  count, out, cache, cursor = jax.lax.while_loop(
      cond, body, (jnp.int32(0), out, cache, cursor)
  )
  return cache, cursor, out, count


# The two halves every generation is made of, each compiled once per model
# structure (``per_model``), bucketed shape and sampling mode: ``stream``
# and ``generate`` call them in turn, ``continuations`` runs both in one
# call, and ``speed.measure_speed`` times them.


@per_model(static_argnames=("max_len", "greedy", "nucleus"))
def start(graphdef, state, *args, max_len: int, greedy: bool, nucleus: bool):
  """``_first`` under jit: (state, tokens, positions, key, temperature,
  top_p, eos_id) -> (cache, Cursor)."""
  return _first(
      nnx.merge(graphdef, state),
      *args,
      max_len=max_len,
      greedy=greedy,
      nucleus=nucleus,
  )


@per_model(
    static_argnames=("steps", "greedy", "nucleus"), donate_argnames=("cache",)
)
def decode_loop(
    graphdef,
    state,
    cache,
    cursor,
    *args,
    steps: int,
    greedy: bool,
    nucleus: bool,
):
  """``_loop`` under jit (the cache buffers are donated): (state, cache,
  cursor, limit, key, temperature, top_p, eos_id) -> (cache, Cursor,
  tokens [B, steps], count)."""
  return _loop(
      nnx.merge(graphdef, state),
      cache,
      cursor,
      *args,
      steps=steps,
      greedy=greedy,
      nucleus=nucleus,
  )


# ----------------------------------------------------------------------------
# Generation


#: Prompt widths, cache lengths and ``generate``'s loop step counts are
#: rounded up to these multiples, so prompts and lengths that are close
#: share one compilation of every function.
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


def cache_len(prompt_len: int, max_new_tokens: int) -> int:
  """Cache length for ``max_new_tokens`` after a prompt (bucketed)."""
  return round_up(prompt_len + max_new_tokens, LENGTH_BUCKET)


def stream(
    model: nnx.Module,
    prompt_tokens,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    key: jax.Array | None = None,
    chunk: int = 32,
) -> Iterator[np.ndarray]:
  """Yields the next token of every row, [B] int32, one step at a time.

  prompt_tokens: [B, P] ints, or a list of prompts of any lengths (they are
  left-padded), or one flat prompt. Stops after ``max_new_tokens`` steps or
  when every row has produced ``eos_id``; a row that has finished yields -1.
  ``key`` seeds sampling (default key 0; unused when greedy). The tokens
  come from the device ``chunk`` steps per call (the first one alone, with
  the prefill); the next chunk runs while this one is yielded.
  """
  if chunk < 1:
    raise ValueError(f"chunk={chunk} must be >= 1")
  rows = _as_rows(prompt_tokens)
  if max_new_tokens <= 0:
    return
  tokens, positions = left_pad(rows, PROMPT_BUCKET)
  mode = dict(greedy=temperature <= 0, nucleus=sampling.nucleus_for(top_p))
  key = jax.random.key(0) if key is None else key
  temperature = np.float32(max(temperature, 1e-6))
  top_p = np.float32(top_p)
  eos_id = -1 if eos_id is None else eos_id
  graphdef, state = nnx.split(model)
  cache, cursor = start(graphdef)(
      state,
      tokens,
      positions,
      key,
      temperature,
      top_p,
      eos_id,
      max_len=cache_len(max(map(len, rows)), max_new_tokens),
      **mode,
  )
  loop = decode_loop(graphdef)
  # (tokens [B, n] on the device, how many of the n are real, how many
  # were asked for): fewer than asked means every row is done.
  pending = [(cursor.token[:, None], 1, 1)]
  left = max_new_tokens - 1
  while pending:
    if left > 0:  # dispatch the next chunk before reading this one
      limit = min(chunk, left)
      left -= limit
      cache, cursor, out, count = loop(
          state,
          cache,
          cursor,
          limit,
          key,
          temperature,
          top_p,
          eos_id,
          steps=chunk,
          **mode,
      )
      pending.append((out, count, limit))
    out, count, limit = pending.pop(0)
    out, count = np.array(out), int(count)
    for i in range(count):
      yield out[:, i]
    if count < limit:
      return


def generate(
    model: nnx.Module,
    prompt_tokens,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    key: jax.Array | None = None,
) -> list[list[int]]:
  """New tokens of every prompt: a list (one per row) of token lists.

  A row stops after ``max_new_tokens`` tokens or at ``eos_id`` (included).
  Arguments as in ``stream``; the whole generation is two device calls
  (prefill, then one loop whose step count is ``max_new_tokens - 1``
  rounded up to LENGTH_BUCKET, so nearby lengths share its compilation).
  """
  rows = _as_rows(prompt_tokens)
  steps = list(
      stream(
          model,
          rows,
          max_new_tokens,
          temperature=temperature,
          top_p=top_p,
          eos_id=eos_id,
          key=key,
          chunk=round_up(max(max_new_tokens - 1, 1), LENGTH_BUCKET),
      )
  )
  if not steps:
    return [[] for _ in rows]
  # -1 only follows a row's eos_id, so the real tokens are a prefix.
  return [row[row >= 0].tolist() for row in np.stack(steps, axis=1)]


@per_model(static_argnames=("new_tokens", "greedy"))
def continue_fn(
    graphdef, state, prompts, key, temperature, *, new_tokens: int, greedy
):
  """Both halves in one call, on equal-length prompts, with no stop:
  prompts [B, P] -> [B, new_tokens]."""
  model = nnx.merge(graphdef, state)
  positions = jnp.zeros_like(prompts) + jnp.arange(
      prompts.shape[1], dtype=jnp.int32
  )
  # No nucleus (top_p 1) and no end-of-sequence id (-1).
  top_p, no_eos, mode = jnp.float32(1.0), -1, dict(greedy=greedy, nucleus=False)
  cache, cursor = _first(
      model,
      prompts,
      positions,
      key,
      temperature,
      top_p,
      no_eos,
      max_len=cache_len(prompts.shape[1], new_tokens),
      **mode,
  )
  steps = new_tokens - 1
  _, _, out, _ = _loop(
      model,
      cache,
      cursor,
      steps,
      key,
      temperature,
      top_p,
      no_eos,
      steps=steps,
      **mode,
  )
  return jnp.concatenate([cursor.token[:, None], out], axis=1)


def continuations(
    model: nnx.Module,
    prompts: jax.Array,
    new_tokens: int,
    *,
    temperature: float = 1.0,
    key: jax.Array | None = None,
) -> jax.Array:
  """Exactly ``new_tokens`` new tokens after each prompt, on the device.

  prompts [B, P] int32 (a jax array, possibly spread over a mesh, every row
  P real tokens at positions 0..P-1) -> [B, new_tokens] int32, in one
  jitted call that never goes through the host (what on-policy training
  calls at every step). No end-of-sequence stop, no nucleus; sampling is
  ``generate``'s, token i drawn with ``fold_in(key, i)``, so the rows equal
  ``generate``'s for the same prompts, key and temperature (0: greedy).
  """
  if new_tokens < 1:
    raise ValueError(f"new_tokens={new_tokens} must be >= 1")
  graphdef, state = nnx.split(model)
  return continue_fn(graphdef)(
      state,
      jnp.asarray(prompts, jnp.int32),
      jax.random.key(0) if key is None else key,
      np.float32(max(temperature, 1e-6)),
      new_tokens=new_tokens,
      greedy=temperature <= 0,
  )
