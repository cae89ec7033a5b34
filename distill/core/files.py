"""Atomic writes: a file or folder appears whole under its final name, or not
at all.

Everything is written under a temporary name unique to the writer (process
and random suffix, so several hosts writing to one shared filesystem never
collide) and renamed into place; a crash leaves at most a temporary that the
next writer ignores or removes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from typing import Any, Callable, Iterator

from distill.core import sharding


def temp_name(path: str) -> str:
  """A sibling of ``path`` that no other writer uses."""
  return f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _replace_with(path: str, write: Callable[[str], Any]) -> str:
  """``write(tmp)`` then renames tmp to ``path``; on failure removes tmp."""
  tmp = temp_name(path)
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  return path


def write_text(path: str, text: str) -> str:
  """Writes ``text`` to ``path`` atomically, making its folder if need be;
  returns ``path``."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

  def write(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)

  return _replace_with(path, write)


def copy(src: str, dst: str) -> str:
  """Copies the file ``src`` to ``dst`` atomically; returns ``dst``."""
  return _replace_with(dst, lambda tmp: shutil.copyfile(src, tmp))


def give_default_mode(path: str) -> None:
  """Gives a file the mode a plain ``open(path, "w")`` would have (0666 less
  the umask), for writers that create files private (0600)."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)


def write_json(path: str, payload: Any, *, sort_keys: bool = False) -> str:
  """Writes ``payload`` as indented JSON to ``path`` atomically."""
  return write_text(path, json.dumps(payload, indent=2, sort_keys=sort_keys))


@contextlib.contextmanager
def atomic_dir(final: str, *, shared: bool = False) -> Iterator[str]:
  """Yields a fresh temporary folder that replaces ``final`` on success.

  An older ``final`` is moved aside first and removed after the rename; on an
  exception the temporary folder is removed and ``final`` is left as it was.
  ``shared=True``: every process of a multi-process run writes into the same
  temporary folder (orbax writes one checkpoint from all of them); the main
  process makes, renames (or, on an exception, removes) it, and all of them
  wait for one another before the writing, after it and after the rename.
  """
  parent = os.path.dirname(os.path.abspath(final))
  main = not shared or sharding.is_main()
  if shared:  # One name every process finds; a killed run's is replaced.
    tmp = os.path.join(parent, "." + os.path.basename(final) + ".writing")
    if main:
      shutil.rmtree(tmp, ignore_errors=True)
      os.makedirs(tmp)  # (and its parents)
    sharding.barrier(f"atomic_dir start {final}")
  else:
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, "." + os.path.basename(temp_name(final)))
    os.makedirs(tmp)
  try:
    yield tmp
  except BaseException:
    if main:
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  if shared:
    sharding.barrier(f"atomic_dir written {final}")
  if main:
    old = None
    if os.path.exists(final):
      old = tmp + ".old"
      shutil.rmtree(old, ignore_errors=True)  # a killed run's
      os.replace(final, old)
    os.replace(tmp, final)
    if old:
      shutil.rmtree(old, ignore_errors=True)
  if shared:  # Nobody reads ``final`` before it is there.
    sharding.barrier(f"atomic_dir renamed {final}")
