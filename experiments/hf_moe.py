r"""Distil a real Hugging Face MoE checkpoint into a Gemma-3-style student.

    python -m experiments.run --config=experiments/hf_moe.py \
        --config.teacher.hf_dir=/models/Qwen3-30B-A3B --workdir=/data/kd-qwen3

The teacher stage imports the checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE or
OLMoE; safetensors; see teacher/hf.py) before anything else, so the corpus is
tokenized with the teacher's own tokenizer; the student takes the teacher's
vocabulary (its padded embedding rows included) and is exported in the
Hugging Face Gemma 3 format. Then: cache (top-k and sampled targets in one
teacher pass) -> distil (the CE baseline, sampled KD, top-k + ghost tail) ->
evaluate -> export.

Variants (``experiments/hf_moe.py:VARIANT``):
  default  an accelerator configuration: a Gemma 3 270M-shaped student
           (18 layers, 5 local : 1 global, window 512) at 2,048 tokens per
           row, 64 rows per step, 20k steps (2.6B tokens), k = N = 64, on a
           TFDS corpus (``--config.data.tfds_name``, default ``c4``) or local
           files (``--config.data.source=files --config.data.files_glob=...``).
           Sized from the published shapes, not run here: this project's
           machines have no accelerator, so its time and result are not
           measured yet.
  cpu      the same pipeline at CPU scale on the embedded corpus (40 stdlib
           files, a 4-layer student, a few steps); the tests run it on a tiny
           random Qwen3-MoE checkpoint built with ``transformers``.

Before booking accelerators, plan it: ``python -m experiments.plan
--config=experiments/hf_moe.py --topology=v5p-64`` compiles every stage for
that slice on this host and says what fits (``--config.teacher.preset`` picks
the teacher's published shapes when there is no ``hf_dir``; see the README's
"Plan before you book").

Choose the student's size with single overrides, e.g.
``--config.student.preset=gemma3_1b`` or ``--config.student.model.num_layers=12``
(``student/config.py`` presets; the vocabulary always comes from the teacher).
"""

from distill.core import configs
from distill.core.errors import ConfigError
from experiments import stdlib
from student.config import StudentConfig
from teacher.config import TeacherConfig


def get_config(arg=None):
  variant = arg or "default"
  if variant not in ("default", "cpu"):
    raise ConfigError(
        f"Unknown variant {variant!r} of experiments/hf_moe.py;"
        " use 'default' or 'cpu'."
    )
  c = stdlib.get_config("tiny" if variant == "cpu" else "default")
  c.variant = variant
  with c.unlocked():  # The keys only this experiment has.
    c.teacher.hf_dir = ""  # required: the checkpoint folder
    c.teacher.param_dtype = ""  # "": the checkpoint's own dtype
    c.teacher.dtype = ""  # compute dtype; "": from the weights
  # How the imported teacher runs (its shapes and dtypes come from the
  # checkpoint): teacher.config.RUNTIME_FIELDS only. On accelerators its
  # layers are scanned: one compiled loop body for all of them (it only
  # runs forward, so nothing is saved per layer), and online KD with
  # Qwen3-30B-A3B at 8,192 tokens per v5e chip fits only so (planned).
  c.teacher.model = configs.model_section(
      TeacherConfig, scan_layers=variant == "default"
  )
  c.data.vocab_size = 0  # the teacher's tokenizer, whatever its size
  c.distill.runs = ("ce", "sampled", "topk_ghost")

  if variant == "default":
    c.data.source = "tfds"
    c.data.tfds_name = "c4"
    c.data.validation_split = "validation"
    c.data.seq_len = 2048
    c.data.batch_size = 64
    c.data.worker_count = 8
    c.cache.batch_size = 64
    c.cache.rows_per_shard = 4096
    c.cache.max_rows = 20_000 * 64  # every row the students read
    c.student.preset = "gemma3_270m"  # its published shape
    # The teacher a plan (experiments/plan.py) assumes when no hf_dir is
    # given: the published shapes, no checkpoint needed. An import reads
    # the checkpoint's own config.json instead.
    c.teacher.preset = "qwen3_30b_a3b"
    # bfloat16 compute, float32 master weights: the accelerator default.
    c.student.model = configs.model_section(
        StudentConfig, dtype="bfloat16", param_dtype="float32"
    )
    c.distill.loss_chunk = 256
    c.distill.eval_batches = 32
    c.distill.train.update(
        dict(
            steps=20_000,
            learning_rate=1e-3,
            warmup_steps=1000,
            log_every=50,
            eval_every=1000,
            checkpoint_every=1000,
            keep_checkpoints=3,
        )
    )
    c.eval.batches = 64
    c.export.dtype = "bfloat16"
  else:  # cpu
    c.student.model.update(dict(num_layers=4, window=16))
  return c
