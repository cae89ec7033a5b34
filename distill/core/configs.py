"""Experiment configs meet model and loop dataclasses here, checked.

An experiment file is an ``ml_collections.ConfigDict``; models and the
training loop take frozen dataclasses. The conversion happens once, at the
edge, and refuses what it cannot place:

- ``model_section(cls, **overrides)``: the ``model`` section of an experiment
  config: one entry per field of ``cls``, ``None`` (take the preset's value)
  unless overridden, so ``--config.student.model.num_layers=4`` works for
  every field while the file states only what differs from its preset.
- ``from_preset(cls, presets, name, section, **fixed)``: the preset with the
  section's non-``None`` values (and ``fixed``) put in.
- ``from_section(cls, section, also=())``: a dataclass from a section whose
  keys must all be fields of ``cls`` (or named in ``also``, keys another
  part of the program reads); a misspelt key fails with a suggestion.

Every failure is a ``ConfigError`` naming the key and what would work.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Iterable, Mapping, TypeVar

import ml_collections
from ml_collections import config_dict

from distill.core.errors import ConfigError

C = TypeVar("C")


def _suggest(key: str, known: Iterable[str]) -> str:
  close = difflib.get_close_matches(key, list(known), n=1)
  return f" Did you mean {close[0]!r}?" if close else ""


def check_keys(
    where: str, keys: Iterable[str], known: Iterable[str], *, noun: str = "key"
) -> None:
  """Raises ConfigError for the first of ``keys`` that is not ``known``."""
  known = sorted(known)
  for key in keys:
    if key not in known:
      raise ConfigError(
          f"{where} has no {noun} {key!r}.{_suggest(key, known)} Known"
          f" {noun}s: {', '.join(known)}."
      )


def _field_type(hint: Any) -> type:
  """The plain type ml_collections checks and parses for a dataclass field."""
  if (
      isinstance(hint, types.UnionType)
      or typing.get_origin(hint) is typing.Union
  ):
    args = [a for a in typing.get_args(hint) if a is not types.NoneType]
    hint = args[0]
  origin = typing.get_origin(hint)
  return origin if origin is not None else hint


def model_section(cls: type, **overrides: Any) -> ml_collections.ConfigDict:
  """A section with every field of ``cls``: ``None`` or its override.

  ``vocab_size`` is left out: the vocabulary always comes from the data
  (the tokenizer, or an imported teacher's embedding).
  """
  hints = typing.get_type_hints(cls)
  fields = [f.name for f in dataclasses.fields(cls) if f.name != "vocab_size"]
  check_keys(cls.__name__, overrides, fields, noun="field")
  section = ml_collections.ConfigDict()
  for name in fields:
    section[name] = config_dict.placeholder(_field_type(hints[name]))
    if name in overrides:
      section[name] = overrides[name]
  return section


def overrides_of(section: Mapping[str, Any] | None) -> dict[str, Any]:
  """The values a ``model_section`` sets (its non-None entries)."""
  if section is None:
    return {}
  items = section.items() if hasattr(section, "items") else section
  return {k: v for k, v in dict(items).items() if v is not None}


def get_preset(
    presets: Mapping[str, C], name: str, *, what: str, **overrides: Any
) -> C:
  """The preset ``name`` with fields replaced by ``overrides``.

  ``what`` names the model in errors ("teacher", "student").
  """
  if name not in presets:
    raise ConfigError(
        f"unknown {what} preset {name!r}.{_suggest(name, presets)}"
        f" Presets: {', '.join(sorted(presets))}."
    )
  preset = presets[name]
  cls = type(preset)
  check_keys(
      cls.__name__,
      overrides,
      [f.name for f in dataclasses.fields(cls)],
      noun="field",
  )
  return dataclasses.replace(preset, **overrides)


def from_preset(
    presets: Mapping[str, C],
    name: str,
    section: Mapping[str, Any] | None,
    *,
    what: str,
    **fixed: Any,
) -> C:
  """``get_preset`` with a ``model_section``'s values, then ``fixed``."""
  return get_preset(
      presets, name, what=what, **{**overrides_of(section), **fixed}
  )


def from_section(
    cls: type[C],
    section: Mapping[str, Any],
    *,
    where: str,
    also: Iterable[str] = (),
) -> C:
  """``cls`` from a config section; every key must be a field or in ``also``.

  ``where`` names the section in errors (``config.teacher.train``).
  """
  names = [f.name for f in dataclasses.fields(cls)]
  values = dict(section.items())
  check_keys(where, values, names + list(also))
  return cls(**{k: v for k, v in values.items() if k in names})
