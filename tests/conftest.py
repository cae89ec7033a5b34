"""Test-wide settings: 8 simulated CPU devices for sharding tests.

XLA reads the flag once, when the backend starts, so it is set before anything
imports jax.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The test models are tiny: compiling them costs far more than running them,
# and XLA's cheapest backend optimisation level compiles about a quarter
# faster (the tiny end-to-end run: 46 s -> 36 s on 2 cores). Subprocesses
# inherit it.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# The project's modules are imported after the environment above is set.
# pylint: disable=wrong-import-position
import gc
import shutil

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from data import pipeline, prepare
from distill.core import checkpoint, layout
from experiments import stdlib
from teacher import cache_logits
from teacher import train as teacher_train
from teacher.model import Teacher


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops every compiled program after each test module.

  XLA's CPU backend maps each executable's code into memory; one process
  running the whole suite would otherwise keep thousands of them alive and
  run into the kernel's limit on memory mappings (vm.max_map_count, 65,530),
  where compiling segfaults.
  """
  yield
  jax.clear_caches()
  gc.collect()


def copy_workdir(src: str, dst) -> str:
  """A private copy of a shared workdir, for a test that writes into it."""
  shutil.copytree(src, dst)
  return str(dst)


def write_random_teacher(workdir: str, final_norm_scale: float | None = None):
  """A random (untrained) tiny teacher in ``W/teacher``; returns the model.

  ``final_norm_scale`` sharpens its distribution without training.
  """
  config = stdlib.get_config("tiny")
  cfg = teacher_train.model_config(
      config, pipeline.prepared_vocab_size(workdir)
  )
  model = Teacher(cfg, rngs=nnx.Rngs(0))
  if final_norm_scale is not None:
    scale = model.final_norm.scale
    scale[...] = jnp.full_like(scale[...], final_norm_scale)
  teacher_dir = layout.teacher_dir(workdir)
  checkpoint.write_config(teacher_dir, "teacher", cfg, source="test")
  checkpoint.save_params(teacher_dir, model)
  return model


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory) -> str:
  """A workdir with the tiny config's prepared data (the stdlib corpus).

  Shared by every module that needs one: read it, or copy it
  (``copy_workdir``) before writing.
  """
  workdir = str(tmp_path_factory.mktemp("tiny_prepared"))
  prepare.prepare(stdlib.get_config("tiny"), workdir)
  return workdir


@pytest.fixture(scope="session")
def tiny_cached(tiny_prepared, tmp_path_factory) -> str:
  """``tiny_prepared`` with a random tiny teacher and the tiny config's
  logit cache. Shared: copy it before writing."""
  workdir = copy_workdir(tiny_prepared, tmp_path_factory.mktemp("c") / "w")
  write_random_teacher(workdir)
  cache_logits.cache_logits(stdlib.get_config("tiny"), workdir)
  return workdir
