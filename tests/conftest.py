"""Test-wide settings: 8 simulated CPU devices for sharding tests.

XLA reads the flag once, when the backend starts, so it is set before anything
imports jax.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The test models are tiny: compiling them costs far more than running them.
# XLA's cheapest backend optimisation level compiles about a quarter faster
# (the tiny end-to-end run: 46 s -> 36 s on 2 cores); its older CPU fusion
# emitters and LLVM without its expensive passes halve what is left (three
# tiny students' training: 20 s of XLA compilation -> 9 s). One LLVM module
# per program instead of XLA's default split into parallel parts (which only
# pays with idle cores; the suite's workers fill both) compiles another tenth
# faster (three decoding and on-policy test modules, one process, cold cache:
# 105-110 s -> 95-100 s; the fast suite 321 s -> 303 s). They change how the
# same program is compiled, not what it computes, though a float result can
# differ in its last bit (test_main_job's quantisation-aware run shows where
# that matters). Subprocesses inherit them.
for _flag in (
    "--xla_backend_optimization_level=0",
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_parallel_codegen_split_count=1",
):
  if _flag.split("=")[0] not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + _flag
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Compiling is most of the suite's time, and many tests compile the same
# programs (a tiny student's step, its decode loop): JAX's persistent
# compilation cache keeps every executable on disk, so a program compiles
# once per suite (and not again in a later run, or in a binary a test starts
# as a subprocess: they inherit these). Its key is the program, the flags
# and the devices, never the values. (No size bound: with one, every write
# rereads the whole folder, and a suite writes thousands of entries.)
_JAX_CACHE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    ".pytest_cache",
    "jax",
)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _JAX_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# The project's modules are imported after the environment above is set.
# pylint: disable=wrong-import-position
import gc
import shutil

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from data import pipeline, prepare
from distill.core import checkpoint, cli, layout
from experiments import stdlib
from teacher import cache_logits
from teacher import train as teacher_train
from teacher.model import Teacher

# Tracing makes and drops many small objects: collect garbage as the
# binaries do (cli.quiet_garbage_collector).
cli.quiet_garbage_collector()

# XLA's CPU backend maps each executable's code into memory; one process
# running the whole suite would keep thousands of them alive and run into the
# kernel's limit on memory mappings (vm.max_map_count, 65,530), where
# compiling segfaults. Past this many mappings, the compiled programs are
# dropped after a test module (and compiled again, or read back from the
# persistent cache, when a later module needs them).
_MAX_MAPPINGS = 30_000


def _mappings() -> int:
  try:
    with open("/proc/self/maps", "rb") as f:
      return sum(1 for _ in f)
  except OSError:  # not Linux: drop them after every module
    return _MAX_MAPPINGS


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops every compiled program after a test module once the process
  holds too many memory mappings (see _MAX_MAPPINGS)."""
  yield
  if _mappings() >= _MAX_MAPPINGS:
    jax.clear_caches()
    gc.collect()


# A model's logits, compiled whole: a test that calls a model once compiles one
# program instead of one per operation (an eager call compiles each of its
# hundreds of operations on first sight).
forward = nnx.jit(lambda model, *args: model(*args))


def copy_workdir(src: str, dst) -> str:
  """A private copy of a shared workdir, for a test that writes into it."""
  shutil.copytree(src, dst)
  return str(dst)


def files_config(pattern: str, **data):
  """The tiny config on the local files ``pattern`` (all of them, 30% held
  out, a 300-entry tokenizer), with ``config.data`` fields overridden."""
  config = stdlib.get_config("tiny")
  config.data.source = "files"
  config.data.files_glob = pattern
  config.data.max_files = 0
  config.data.validation_permille = 300
  config.data.vocab_size = 300
  for key, value in data.items():
    setattr(config.data, key, value)
  return config


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


def transformers_greedy(folder: str, prompt: str, new_tokens: int):
  """The README's transformers recipe on an exported folder: EOS, then the
  prompt's tokens (as distill.generate encodes a prompt), continued
  greedily. Returns (the prompt's ids, the new ids, the HF tokenizer)."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  model = transformers.Gemma3ForCausalLM.from_pretrained(folder).eval()
  ids = [tokenizer.eos_token_id] + tokenizer(prompt, add_special_tokens=False)[
      "input_ids"
  ]
  with torch.no_grad():
    new = model.generate(
        torch.tensor([ids]),
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
    )[0, len(ids) :].tolist()
  return ids, new, tokenizer


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


# ----------------------------------------------------------------------------
# Parallel workers (pytest-xdist; pyproject's addopts ask for them)

# Modules in the order they are handed to the workers: the longest first, so
# that the workers finish together (xdist gives a worker the next module as it
# runs out of tests: with every module ranked by its time, the last to finish
# is a short one). Seconds: the fast suite's time in each module, cold
# compilation cache, two workers on the 2-core development machine. A module
# not listed goes last.
LONGEST_FIRST = (
    "test_main_job.py",  # slow: the tiny main job, whole and interrupted
    "test_distributed.py",  # slow
    "test_faults.py",  # slow
    "test_run.py",  # 73: the whole tiny main job
    "test_on_policy.py",  # 50
    "test_speculative.py",  # 37
    "test_generate.py",  # 35
    "test_sharding.py",  # 33
    "test_plan.py",  # 29
    "test_cross_tokenizer.py",  # 28: three tiny students, two tokenizers
    "test_compiled_decoding.py",  # 27
    "test_stack.py",  # 18
    "test_quantize.py",  # 17
    "test_cache.py",  # 16
    "test_attention_kernels.py",  # 14
    "test_trainer.py",  # 14
    "test_teacher_hf.py",  # 13
    "test_moe.py",  # 13
    "test_teacher_train.py",  # 12
    "test_splash_attention.py",  # 12
    "test_cache_format.py",  # 11
    "test_student_hf.py",  # 10
    "test_teacher_model.py",  # 10
    "test_losses.py",  # 9
    "test_errors.py",  # 7
    "test_generation_quality.py",  # 7
    "test_data.py",  # 6
    "test_layers.py",  # 6
    "test_student_model.py",  # 6
    "test_distill_train.py",  # 5
    "test_provenance.py",  # 4
    "test_topk_tail.py",  # 4
    "test_core.py",  # 4
    "test_metrics.py",  # 4
    "test_prepare_shards.py",  # 3
    "test_plan_check.py",  # 3
    "test_report_plots.py",  # 3
    "test_mixed_precision.py",  # 3
    "test_target_figures.py",  # 2
    "test_stop.py",  # 2
    "test_benchmark.py",  # 1
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_collection_finish(session):
  """What the test modules' imports made (torch, transformers, scipy) is set
  aside from garbage collection too, as the conftest's imports were."""
  del session
  gc.freeze()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
  """Everything is set aside before pytest's own clean-up collects garbage
  five times over (to report finalisers that raised): in a worker that
  holds thousands of compiled programs each collection took a second, and
  the suite's figure waits for the last worker to come down (the fast
  suite's end, from its last test: 10 s -> 4 s)."""
  del session
  gc.freeze()


def pytest_xdist_auto_num_workers(config):
  """``-n auto``: a worker per core, but no more than one per 4 GiB of
  memory (a worker holds up to 3 GiB: compiled programs, and 8 simulated
  devices' arrays)."""
  del config
  cores = len(os.sched_getaffinity(0))
  try:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError):
    return cores
  return max(1, min(cores, memory // (4 << 30)))
