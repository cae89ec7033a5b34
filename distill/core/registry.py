"""Loading a model folder by its kind, through loaders the models register.

The ground floor cannot import the models that stand on it, so each model
package registers a loader for the kinds it reads when it is imported::

    registry.register("teacher", load_teacher)          # teacher/__init__.py

and ``load_model(directory)`` picks the loader by the folder's
``config.json``: its ``"kind"`` (folders this project writes) or, for a
Hugging Face folder, its ``"model_type"``.
"""

from __future__ import annotations

from typing import Any, Callable

from distill.core import checkpoint

_LOADERS: dict[str, Callable[[str], Any]] = {}


def register(kind: str, loader: Callable[[str], Any]) -> None:
  """Makes ``load_model`` read folders of ``kind`` with ``loader(dir)``."""
  _LOADERS[kind] = loader


def folder_kind(directory: str) -> str:
  """The kind of a model folder: config.json's "kind" or "model_type"."""
  payload = checkpoint.read_config(directory)
  kind = payload.get("kind") or payload.get("model_type")
  if not kind:
    raise checkpoint.ModelFolderError(
        f"{directory}/{checkpoint.CONFIG_FILE} has neither 'kind' (a folder"
        " written by this project) nor 'model_type' (a Hugging Face folder);"
        " cannot tell what it holds"
    )
  return kind


def load_model(directory: str, **runtime):
  """The model in ``directory``, loaded by the loader of its kind
  (``runtime``: settings of how it runs, passed to that loader)."""
  kind = folder_kind(directory)
  if kind not in _LOADERS:
    raise checkpoint.ModelFolderError(
        f"{directory!r} holds a {kind!r} model, which no imported model package"
        f" reads (known: {sorted(_LOADERS)})."
    )
  return _LOADERS[kind](directory, **runtime)
