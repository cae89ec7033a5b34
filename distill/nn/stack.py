"""Running a model's stack of blocks: unrolled or scanned, with or without
rematerialisation.

A Python loop over L blocks traces (and XLA compiles) L copies of the block;
``scan=True`` traces one period of the stack and runs it under
``jax.lax.scan``, so compile time stops growing with depth. The blocks keep
their own parameters (the checkpoint layout does not change): inside the
jitted step, the parameters of blocks that sit the same place in the period
are stacked on a new leading axis for the scan, and the scan's gradient
slices them back.

The period is the shortest p for which every block has the structure of the
block p places before it (Gemma 3's five local + one global layers: p = 6;
a uniform stack: p = 1). Whole periods are scanned; the leftover blocks, and
a stack with no period shorter than itself but runs of identical blocks
(a first dense layer before MoE layers), run as runs of identical blocks
scanned one by one.

``remat`` trades compute for activation memory in training:

- ``none``: every activation of the forward pass is kept for the backward;
- ``full``: only each block's input is kept and the block is recomputed;
- ``dots``: matmul outputs are kept, the elementwise work between them is
  recomputed (``jax.checkpoint_policies.checkpoint_dots``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from distill.core.errors import ConfigError

REMAT_POLICIES = ("none", "full", "dots")

# block, x -> (x, aux): how a model calls one of its blocks.
BlockCall = Callable[[nnx.Module, jax.Array], tuple[jax.Array, Any]]


def check_remat(remat: str) -> str:
  """``remat`` if it is one of REMAT_POLICIES; a ConfigError otherwise."""
  if remat not in REMAT_POLICIES:
    raise ConfigError(
        f"unknown remat {remat!r}; expected one of {REMAT_POLICIES}"
    )
  return remat


def _checkpointed(fn, remat: str):
  if remat == "none":
    return fn
  policy = jax.checkpoint_policies.checkpoint_dots if remat == "dots" else None
  return jax.checkpoint(fn, policy=policy)


def period(graphdefs: Sequence[Any]) -> int:
  """The shortest p with graphdefs[i] == graphdefs[i - p] for every i >= p
  (len(graphdefs) when there is none)."""
  n = len(graphdefs)
  for p in range(1, n):
    if all(graphdefs[i] == graphdefs[i - p] for i in range(p, n)):
      return p
  return n


def _groups(graphdefs: Sequence[Any]) -> list[tuple[int, int, int]]:
  """(start, period, repeats) pieces that cover the stack in order."""
  n = len(graphdefs)
  p = period(graphdefs)
  if p < n:
    whole = n // p * p
    pieces = [(0, p, n // p)]
    return pieces + _runs(graphdefs, whole, n)
  return _runs(graphdefs, 0, n)


def _runs(graphdefs, start: int, stop: int) -> list[tuple[int, int, int]]:
  """Runs of identical consecutive blocks in [start, stop): (i, 1, length)."""
  pieces = []
  i = start
  while i < stop:
    j = i + 1
    while j < stop and graphdefs[j] == graphdefs[i]:
      j += 1
    pieces.append((i, 1, j - i))
    i = j
  return pieces


def run(
    blocks: Sequence[nnx.Module],
    call: BlockCall,
    x: jax.Array,
    *,
    scan: bool = False,
    remat: str = "none",
) -> tuple[jax.Array, list[Any]]:
  """x through every block in order -> (x, [aux of each block, in order]).

  ``call(block, x) -> (x, aux)`` runs one block (aux: any pytree, None for
  none). ``scan``/``remat``: see the module docstring.
  """
  check_remat(remat)
  if not scan and remat == "none":
    auxes = []
    for block in blocks:
      x, aux = call(block, x)
      auxes.append(aux)
    return x, auxes
  splits = [nnx.split(block) for block in blocks]
  graphdefs = [g for g, _ in splits]
  states = [s for _, s in splits]

  def one_period(defs):
    def body(x, period_states):
      auxes = []
      for graphdef, state in zip(defs, period_states):
        x, aux = call(nnx.merge(graphdef, state), x)
        auxes.append(aux)
      return x, auxes

    return _checkpointed(body, remat)

  auxes: list[Any] = [None] * len(blocks)
  if not scan:  # remat alone: each block checkpointed on its own
    for i, (graphdef, state) in enumerate(zip(graphdefs, states)):
      x, (auxes[i],) = one_period([graphdef])(x, [state])
    return x, auxes

  for start, p, repeats in _groups(graphdefs):
    body = one_period(graphdefs[start : start + p])
    if repeats == 1:
      x, got = body(x, states[start : start + p])
      auxes[start : start + p] = got
      continue
    stacked = [
        jax.tree.map(
            lambda *leaves: jnp.stack(leaves),
            *states[start + j : start + p * repeats : p],
        )
        for j in range(p)
    ]
    x, got = jax.lax.scan(body, x, stacked)
    for j in range(p):
      for r in range(repeats):
        auxes[start + r * p + j] = jax.tree.map(lambda a, r=r: a[r], got[j])
  return x, auxes
