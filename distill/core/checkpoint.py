"""Model folders: one on-disk layout for teachers, students and exports.

A model folder (``W/teacher/``, ``W/student/<run>/``, ``W/export/<run>/``) holds::

    config.json            {"kind": "teacher" | "student", "model": {dataclass fields}, ...}
    checkpoints/<step>/    orbax CheckpointManager steps. Item "params" is the
                           ``nnx.State`` of the model's ``nnx.Param`` variables;
                           training adds items of its own ("opt_state", "data", "meta").

Anything that builds a model from a folder reads ``config.json``, builds the
module abstractly (``nnx.eval_shape``) and restores only the "params" item of
the latest step, so a training checkpoint and a params-only export load the
same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging as std_logging
import os
import typing
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from flax import nnx

from distill.core import files, layout, sharding
from distill.core.errors import UserError

CONFIG_FILE = layout.CONFIG_FILE
CHECKPOINT_DIR = "checkpoints"


class _QuietReadOnly(std_logging.Filter):
  """Drops orbax's notice that a read-only manager is read-only: it comes
  with every load and tells the user nothing."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Given directory is read only")


absl_logging.get_absl_logger().addFilter(_QuietReadOnly())

C = TypeVar("C")


class ModelFolderError(UserError):
  """A model folder is missing, incomplete or of the wrong kind."""


class NonFiniteError(UserError):
  """Parameters or a training step that are NaN or infinite."""


def check_finite(tree: Any, what: str) -> None:
  """Refuses to go on with a pytree that holds a NaN or an infinity.

  Every writer of parameters (checkpoints, exports) calls this first, so no
  file is ever written from a diverged model; ``what`` names it in the error.
  """
  bad = [
      jax.tree_util.keystr(path)
      for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
      if hasattr(leaf, "dtype")
      and jnp.issubdtype(leaf.dtype, jnp.inexact)
      and not bool(jnp.all(jnp.isfinite(leaf)))
  ]
  if bad:
    raise NonFiniteError(
        f"{what} has NaN or infinite values in {len(bad)} arrays (first"
        f" {bad[0]}); nothing was written. The run diverged: lower the"
        " learning rate, or resume from an earlier checkpoint."
    )


def fingerprint(model: nnx.Module) -> str:
  """sha256 of the model's config and every parameter, in a fixed order.

  What a logit cache records of the teacher that wrote it, so that readers
  can tell whether the teacher in the workdir is still that one.
  """
  digest = hashlib.sha256(
      json.dumps(what_it_computes(model.config), sort_keys=True).encode()
  )
  leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    digest.update(jax.tree_util.keystr(path).encode())
    leaf = sharding.gather(leaf)  # other hosts' parts too
    digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return digest.hexdigest()


#: Model config fields that say how a model runs (kernel, scanning,
#: rematerialisation), not what it computes: a model is the same model
#: whatever they are, so comparisons and fingerprints leave them out.
EXECUTION_FIELDS = ("attention_impl", "scan_layers", "remat")


def what_it_computes(config: Any) -> dict[str, Any]:
  """``config_to_dict`` of a model config (or of its dict) without the
  EXECUTION_FIELDS: equal for two configs of the same model."""
  data = config if isinstance(config, dict) else config_to_dict(config)
  return {k: v for k, v in data.items() if k not in EXECUTION_FIELDS}


def config_to_dict(config: Any) -> dict[str, Any]:
  """A frozen dataclass config as JSON-ready data (tuples become lists)."""
  return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(cls: type[C], data: dict[str, Any]) -> C:
  """Rebuilds a frozen dataclass config; lists become tuples, unknown keys fail."""
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(data) - names)
  if unknown:
    raise ModelFolderError(
        f"{cls.__name__} has no field(s) {unknown}; the folder was written by an"
        " incompatible version"
    )
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for key, value in data.items():
    if isinstance(value, list):
      value = _to_tuple(value)
    if value is not None and hints.get(key) is float and isinstance(value, int):
      value = float(value)
    kwargs[key] = value
  return cls(**kwargs)


def _to_tuple(value):
  return tuple(_to_tuple(v) if isinstance(v, list) else v for v in value)


def write_config(
    directory: str, kind: str, model_config: Any, **extra: Any
) -> str:
  """Writes ``directory/config.json`` atomically (in the main process of
  several only); returns its path."""
  path = os.path.join(directory, CONFIG_FILE)
  if not sharding.is_main():
    return path
  os.makedirs(directory, exist_ok=True)
  payload = {"kind": kind, "model": config_to_dict(model_config), **extra}
  return files.write_json(path, payload, sort_keys=True)


def read_config(directory: str, kind: str | None = None) -> dict[str, Any]:
  """Reads ``directory/config.json``, checking the kind when one is given.

  Without ``kind`` any JSON object is returned (a Hugging Face folder's
  too); with it, the folder must be one this project wrote for that kind.
  """
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise ModelFolderError(
        f"{directory!r} is not a model folder: {CONFIG_FILE} is missing. Pass a"
        " teacher/, student/<run>/ or export/<run>/ folder written by this"
        " tool, or a Hugging Face folder."
    )
  try:
    with open(path, encoding="utf-8") as f:
      payload = json.load(f)
  except ValueError as e:
    raise ModelFolderError(
        f"{path} is not valid JSON ({e}); the folder is damaged."
    ) from e
  if not isinstance(payload, dict):
    raise ModelFolderError(f"{path} does not hold a JSON object.")
  if kind is not None and payload.get("kind") != kind:
    if "kind" not in payload and "model_type" not in payload:
      raise ModelFolderError(
          f"{path} has neither 'kind' (a folder written by this project) nor"
          " 'model_type' (a Hugging Face folder); cannot tell what it holds"
      )
    what = payload.get("kind") or f"Hugging Face {payload.get('model_type')}"
    raise ModelFolderError(
        f"{path} describes a {what!r} model, not a {kind!r} one"
    )
  return payload


def checkpoint_manager(
    directory: str, *, max_to_keep: int | None = 3, read_only: bool = False
) -> ocp.CheckpointManager:
  """The orbax manager over ``directory/checkpoints``.

  A read-only manager (every load) is asked for exactly what read-only
  means, so orbax has nothing to warn about.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else max_to_keep,
      save_interval_steps=0 if read_only else 1,
      create=not read_only,
      read_only=read_only,
      # What a killed save left (orbax's temporary step folders) goes.
      cleanup_tmp_directories=not read_only,
  )
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(directory, CHECKPOINT_DIR)), options=options
  )


def save_params(
    directory: str,
    model: nnx.Module,
    step: int = 0,
    *,
    max_to_keep: int | None = None,
) -> None:
  """Writes a params-only checkpoint of ``model`` at ``step`` (keeping the
  latest ``max_to_keep`` steps of the folder; None: all).

  Checkpoints at or after ``step`` go first: they were left by a run killed
  ahead of this one (between saving its best model and recording it, say),
  which the resumed run writes again.
  Refuses (``NonFiniteError``) parameters that are not finite.
  """
  check_finite(nnx.state(model, nnx.Param), f"the model for {directory}")
  with checkpoint_manager(directory, max_to_keep=max_to_keep) as mngr:
    # Every process deletes the same steps (a delete is collective): the
    # ones the main process saw before any went.
    stale = [s for s in mngr.all_steps() if s >= step]
    for s in sharding.main_ints(stale):
      mngr.delete(s)
    mngr.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(nnx.state(model, nnx.Param))
        ),
        force=True,
    )
    mngr.wait_until_finished()


def latest_step(directory: str) -> int | None:
  """The latest complete checkpoint step in a model folder, or None."""
  if not os.path.isdir(os.path.join(directory, CHECKPOINT_DIR)):
    return None
  with checkpoint_manager(directory, read_only=True) as mngr:
    return mngr.latest_step()


def restore_params(
    directory: str, model: nnx.Module, step: int | None = None
) -> nnx.Module:
  """Restores the "params" item into ``model`` (abstract or concrete).

  On the active mesh (``sharding.use``) each parameter is read straight into
  its place there, by the mesh's rules: each device reads only its part, and
  the saving mesh or device count does not matter.
  """
  step = latest_step(directory) if step is None else step
  if step is None:
    raise ModelFolderError(
        f"{directory!r} has no complete checkpoint under {CHECKPOINT_DIR}/; the"
        " stage that writes it has not finished (rerun it to resume)"
    )
  target = nnx.state(model, nnx.Param)
  mesh = sharding.active()
  if mesh is not None:
    target = sharding.abstract_state(target, mesh)
  with checkpoint_manager(directory, read_only=True) as mngr:
    try:
      restored = mngr.restore(
          step,
          args=ocp.args.Composite(params=ocp.args.StandardRestore(target)),
      )
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise damaged(directory, step, e, mngr.all_steps()) from e
  nnx.update(model, restored["params"])
  return model


def damaged(
    directory: str, step: int, error: Exception, steps
) -> ModelFolderError:
  """The error for a checkpoint step orbax cannot read, naming the step
  folder and the step before it to fall back to."""
  folder = os.path.join(directory, CHECKPOINT_DIR, str(step))
  earlier = [s for s in steps if s < step]
  detail = " ".join(str(error).split())[:200]
  return ModelFolderError(
      f"checkpoint {folder} is damaged or unreadable ({type(error).__name__}:"
      f" {detail}); remove that folder"
      + (
          f" to fall back to step {max(earlier)}"
          if earlier
          else " and rerun the stage that wrote it"
      )
  )
