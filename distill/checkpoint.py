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
import json
import os
import typing
from typing import Any, Callable, TypeVar

import orbax.checkpoint as ocp
from flax import nnx

from distill.errors import UserError

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"

C = TypeVar("C")


class ModelFolderError(UserError):
  """A model folder is missing, incomplete or of the wrong kind."""


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
        " incompatible version")
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


def write_config(directory: str, kind: str, model_config: Any,
                 **extra: Any) -> str:
  """Writes ``directory/config.json`` atomically; returns its path."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, CONFIG_FILE)
  payload = {"kind": kind, "model": config_to_dict(model_config), **extra}
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  return path


def read_config(directory: str, kind: str | None = None) -> dict[str, Any]:
  """Reads ``directory/config.json``, checking the kind when one is given."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise ModelFolderError(
        f"{directory!r} is not a model folder: {CONFIG_FILE} is missing. Pass a"
        " teacher/, student/<run>/ or export/<run>/ folder written by this tool.")
  with open(path) as f:
    payload = json.load(f)
  if kind is not None and payload.get("kind") != kind:
    raise ModelFolderError(
        f"{path} describes a {payload.get('kind')!r} model, not a {kind!r} one")
  return payload


def load_model(directory: str):
  """The teacher or student in a model folder this project wrote, chosen by
  the "kind" in its config.json."""
  if read_config(directory).get("kind") == "teacher":
    from teacher import load_teacher  # pylint: disable=g-import-not-at-top
    return load_teacher(directory)
  from student import load_student  # pylint: disable=g-import-not-at-top
  return load_student(directory)


def checkpoint_manager(directory: str, *, max_to_keep: int | None = 3,
                       best_fn: Callable[[Any], float] | None = None,
                       keep_checkpoints_without_metrics: bool = True,
                       read_only: bool = False) -> ocp.CheckpointManager:
  """The orbax manager over ``directory/checkpoints``."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=not read_only,
      best_fn=best_fn,
      best_mode="min",
      keep_checkpoints_without_metrics=keep_checkpoints_without_metrics,
      read_only=read_only,
  )
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(directory, CHECKPOINT_DIR)), options=options)


def save_params(directory: str, model: nnx.Module, step: int = 0) -> None:
  """Writes a params-only checkpoint of ``model`` at ``step``."""
  with checkpoint_manager(directory, max_to_keep=None) as mngr:
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(nnx.state(model, nnx.Param))), force=True)
    mngr.wait_until_finished()


def latest_step(directory: str) -> int | None:
  """The latest complete checkpoint step in a model folder, or None."""
  if not os.path.isdir(os.path.join(directory, CHECKPOINT_DIR)):
    return None
  with checkpoint_manager(directory, read_only=True) as mngr:
    return mngr.latest_step()


def restore_params(directory: str, model: nnx.Module,
                   step: int | None = None) -> nnx.Module:
  """Restores the "params" item into ``model`` (abstract or concrete)."""
  step = latest_step(directory) if step is None else step
  if step is None:
    raise ModelFolderError(
        f"{directory!r} has no complete checkpoint under {CHECKPOINT_DIR}/; the"
        " stage that writes it has not finished (rerun it to resume)")
  target = nnx.state(model, nnx.Param)
  with checkpoint_manager(directory, read_only=True) as mngr:
    restored = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target)))
  nnx.update(model, restored["params"])
  return model
