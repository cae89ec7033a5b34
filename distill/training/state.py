"""What one training run trains, restores and saves.

``State`` holds the model (and its ``extras``), their optimizer and the
shardings the step keeps them in; ``restore`` loads a checkpoint into it
and the data iterator; ``TrainStep`` is the compiled step that updates it.
A checkpoint's items: ``params``, ``opt_state``, ``extras`` (when there are
some), the data iterator's state and the log meter's window.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from distill.core import checkpoint as ckpt
from distill.core import sharding
from distill.training.optimizer import LoopConfig, make_optimizer

# The checkpoint item holding the data iterator's state, as JSON: with
# data.worker_count=0 the index of the next global batch, the same in every
# process and for any process count (an elastic restart on fewer hosts goes
# on with the same batch); with prefetch workers grain's per-worker state.
DATA_STATE = "data_state"
# The item holding the parameters of ``extras`` (trained, not the model's).
EXTRAS = "extras"
# Before: grain's own per-process item (``process_<i>-of-<n>.json`` files).
_GRAIN_DATA = "data"


# The metrics of the steps since the last log line, kept with a checkpoint
# so that a run resumed between two log lines logs what it would have.
METER = "meter"


def _meter_restore_args(out_dir: str, step: int) -> dict[str, Any]:
  """The restore argument of a checkpoint's meter item (older ones have
  none)."""
  step_dir = os.path.join(out_dir, ckpt.CHECKPOINT_DIR, str(step))
  if os.path.isdir(os.path.join(step_dir, METER)):
    return {METER: ocp.args.JsonRestore()}
  return {}


def _data_restore_args(out_dir: str, step: int, iterator) -> dict[str, Any]:
  """The restore argument of a checkpoint's data item, whichever it has."""
  step_dir = os.path.join(out_dir, ckpt.CHECKPOINT_DIR, str(step))
  if os.path.isdir(os.path.join(step_dir, _GRAIN_DATA)):
    return {_GRAIN_DATA: grain.checkpoint.CheckpointRestore(iterator)}
  return {DATA_STATE: ocp.args.JsonRestore()}


class WithExtras(nnx.Module):
  """The model and its ``extras``: what the optimizer trains together."""

  def __init__(self, model: nnx.Module, extras: nnx.Module):
    self.model = model
    self.extras = extras


@dataclasses.dataclass
class State:
  """The model (and its ``extras``), their optimizer, and where they live.

  ``trainable`` is what the step differentiates: the model, or the model
  and its extras together; ``placement``: the shardings of its parameters
  and of the optimizer state, which every step keeps.
  """

  model: nnx.Module
  extras: nnx.Module | None
  trainable: nnx.Module
  optimizer: nnx.Optimizer
  placement: tuple[Any, Any]

  @classmethod
  def place(cls, model, extras, frozen, cfg: LoopConfig, mesh) -> "State":
    """Parameters, optimizer state and frozen modules on the mesh, by the
    rules; the compiled step keeps them there."""
    trainable = model if extras is None else WithExtras(model, extras)
    sharding.place(trainable, mesh)
    for module in frozen:
      sharding.place(module, mesh)
    optimizer = sharding.place(
        nnx.Optimizer(trainable, make_optimizer(cfg), wrt=nnx.Param), mesh
    )
    placement = (
        sharding.state_shardings(nnx.state(trainable, nnx.Param), mesh),
        sharding.state_shardings(nnx.state(optimizer), mesh),
    )
    return cls(model, extras, trainable, optimizer, placement)

  def items(self, make) -> dict[str, Any]:
    """The checkpoint items of the arrays, each wrapped by ``make``
    (``ocp.args.StandardSave`` or ``StandardRestore``)."""
    items = {
        "params": make(nnx.state(self.model, nnx.Param)),
        "opt_state": make(nnx.state(self.optimizer)),
    }
    if self.extras is not None:
      items[EXTRAS] = make(nnx.state(self.extras, nnx.Param))
    return items


def restore(
    mngr, out_dir: str, step: int, state: State, iterator
) -> list[dict[str, float]]:
  """Loads checkpoint ``step`` into ``state`` and the data iterator;
  returns the metrics of its steps since the last log line.

  The targets are the arrays already on this mesh: orbax reads each
  device's part, whatever mesh or device count saved them.
  """
  try:
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(
            **state.items(ocp.args.StandardRestore),
            **_data_restore_args(out_dir, step, iterator),
            **_meter_restore_args(out_dir, step),
        ),
    )
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise ckpt.damaged(out_dir, step, e, mngr.all_steps()) from e
  nnx.update(state.model, restored["params"])
  nnx.update(state.optimizer, restored["opt_state"])
  if state.extras is not None:
    nnx.update(state.extras, restored[EXTRAS])
  if DATA_STATE in restored:
    iterator.set_state(restored[DATA_STATE])
  logging.info("Resumed %s from step %d", out_dir, step)
  return list(restored[METER]["window"]) if METER in restored else []


class TrainStep:
  """The compiled step: ``(trainable, optimizer, batch, step, frozen) ->
  (metrics, finite)``, updating both in place.

  A step whose loss, gradients or updated parameters are not finite changes
  nothing: the update is computed, then the old parameters and optimizer
  state (its step count included) are kept.

  The step is a ``jax.jit`` of the modules' states (``nnx.split``): the
  parameters and optimizer state are donated, so the updated ones take
  their buffers rather than living beside them, and the frozen modules
  (a teacher) are inputs only, never copied out (an ``nnx.jit`` would
  return every module it is given). ``trace`` traces it for the same
  arguments, as ``jax.jit``'s does.
  """

  def __init__(self, loss_fn: Callable, with_extras: bool, placement):
    def pure(graph, state, batch, step, frozen_graph, frozen_state):
      trainable, optimizer = nnx.merge(graph, state)
      frozen = nnx.merge(frozen_graph, frozen_state)

      def objective(trainable):
        if not with_extras:
          return loss_fn(trainable, batch, step, *frozen)
        return loss_fn(
            trainable.model, batch, step, *frozen, extras=trainable.extras
        )

      (loss, metrics), grads = nnx.value_and_grad(objective, has_aux=True)(
          trainable
      )
      grad_norm = optax.global_norm(grads)
      before = jax.tree.map(
          jnp.asarray,
          (nnx.state(trainable, nnx.Param), nnx.state(optimizer)),
      )
      optimizer.update(trainable, grads)
      after = (nnx.state(trainable, nnx.Param), nnx.state(optimizer))
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      for p in jax.tree.leaves(after[0]):
        finite &= jnp.all(jnp.isfinite(p))
      kept = jax.tree.map(lambda a, b: jnp.where(finite, a, b), after, before)
      kept = jax.lax.with_sharding_constraint(kept, placement)
      nnx.update(trainable, kept[0])
      nnx.update(optimizer, kept[1])
      metrics = {"loss": loss, "grad_norm": grad_norm, **metrics}
      return metrics, finite, nnx.state((trainable, optimizer))

    self._jitted = jax.jit(pure, donate_argnums=(1,))

  @staticmethod
  def _split(trainable, optimizer, batch, step, frozen):
    graph, state = nnx.split((trainable, optimizer))
    frozen_graph, frozen_state = nnx.split(tuple(frozen))
    return graph, state, batch, step, frozen_graph, frozen_state

  def __call__(self, trainable, optimizer, batch, step, frozen):
    metrics, finite, state = self._jitted(
        *self._split(trainable, optimizer, batch, step, frozen)
    )
    nnx.update((trainable, optimizer), state)
    return metrics, finite

  def trace(self, trainable, optimizer, batch, step, frozen):
    return self._jitted.trace(
        *self._split(trainable, optimizer, batch, step, frozen)
    )


def train_step_fn(loss_fn: Callable, with_extras: bool, placement) -> TrainStep:
  """The compiled training step (``TrainStep``)."""
  return TrainStep(loss_fn, with_extras, placement)
