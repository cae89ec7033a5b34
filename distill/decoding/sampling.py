"""Choosing the next token from logits: greedy, temperature, nucleus.

``temperature == 0`` is greedy (argmax); otherwise softmax of
``logits / temperature`` cut to the nucleus ``top_p`` (the smallest set of
most likely tokens whose mass reaches top_p) and renormalised; with
``top_p >= 1`` a token is drawn straight from ``logits / temperature``. Both
choices are static flags of the compiled functions (``greedy``,
``nucleus``), made once from the caller's numbers. New token i
(0 = the one after the prompt) is drawn with ``jax.random.fold_in(key, i)``,
so a row's tokens do not depend on how the steps are split into calls.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def nucleus_for(top_p: float) -> bool:
  """Whether sampling at ``top_p`` cuts the distribution to a nucleus.

  Decided once, from the caller's number, and passed down as a static flag:
  without a nucleus a token is drawn straight from the logits, and the two
  vocabulary sorts the nucleus needs (most of a sampled decoding step on a
  CPU) are never compiled.
  """
  return float(top_p) < 1.0


def sampling_probs(
    logits: jax.Array, temperature, top_p, *, nucleus: bool = True
) -> jax.Array:
  """The distribution a token is drawn from: [..., V] -> probs [..., V] f32.

  softmax(logits / temperature), keeping only the nucleus: tokens sorted by
  probability are kept while the mass before them is < top_p (the most
  likely token always stays); top_p >= 1 keeps every token. ``nucleus=False``
  is the plain softmax (``top_p`` unused). Needs temperature > 0 (greedy
  decoding does not call this).
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  if not nucleus:
    return probs
  order = jnp.argsort(-probs, axis=-1)
  sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
  before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  keep_sorted = (before < top_p) | (jnp.asarray(top_p) >= 1.0)
  keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
  probs = jnp.where(keep, probs, 0.0)
  return probs / jnp.sum(probs, axis=-1, keepdims=True)


def pick(
    logits: jax.Array,
    key: jax.Array,
    temperature,
    top_p,
    *,
    greedy: bool,
    nucleus: bool,
) -> jax.Array:
  """Next tokens from logits [..., V] -> [...] int32.

  Greedy: the argmax. Else a draw from ``logits / temperature``, cut to the
  ``top_p`` nucleus when ``nucleus`` (static; see ``nucleus_for``).
  """
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if not nucleus:
    z = logits.astype(jnp.float32) / temperature
    return jax.random.categorical(key, z, axis=-1).astype(jnp.int32)
  probs = sampling_probs(logits, temperature, top_p)
  return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)
