"""Replayed steps: a check for silent data corruption.

Every ``replay_check_every`` steps the training loop computes the step twice
from the same state and batch; the two results must be equal bit for bit. A
flipped bit in memory or arithmetic shows up as a difference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from distill.core.errors import UserError


class SilentCorruptionError(UserError):
  """The same step, from the same state and batch, gave two results."""


@jax.jit
def _leaves_equal(a, b):
  """Per leaf: are the two trees' arrays equal bit for bit (NaN = NaN)?"""
  return [
      jnp.array_equal(x, y, equal_nan=jnp.issubdtype(x.dtype, jnp.inexact))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  ]


def replayed_step(train_step, model, optimizer, args, desc, step):
  """``train_step`` run twice from one state; the results must be equal bit
  for bit (a split-phase check for silent data corruption: a flipped bit in
  memory or arithmetic shows up as a difference)."""

  def snapshot():  # The arrays themselves (immutable), kept on the mesh.
    return jax.tree.map(lambda x: x, (nnx.state(model), nnx.state(optimizer)))

  # A copy: the step donates the state it is given to the state it returns.
  before = jax.tree.map(jnp.copy, snapshot())
  train_step(model, optimizer, *args)
  after_first = snapshot()
  nnx.update(model, before[0])
  nnx.update(optimizer, before[1])
  second = train_step(model, optimizer, *args)
  after_second = snapshot()
  paths = [
      jax.tree_util.keystr(path)
      for path, _ in jax.tree_util.tree_leaves_with_path(after_first)
  ]
  same = _leaves_equal(after_first, after_second)
  differ = [path for path, ok in zip(paths, same) if not bool(ok)]
  if differ:
    raise SilentCorruptionError(
        f"{desc}: step {step} computed twice from the same state and batch"
        f" gave different results in {len(differ)} arrays (first"
        f" {differ[0]}): the machine corrupts data silently. Stop using it;"
        " resume from the last checkpoint on another machine."
    )
  logging.info("%s: step %d replayed bit for bit", desc, step)
  return second
