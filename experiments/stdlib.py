"""The embedded default: distil on the Python standard library's source code.

Main job (every stage, in order):

    python -m experiments.run --config=experiments/stdlib.py --workdir=/tmp/kd

Variants (``experiments/stdlib.py:VARIANT``):
  default  the demo sized for a 2-core CPU.
  tiny     every stage in seconds; the fast test suite runs it end to end.

Measured results are in the README's results table, with the command and the
machine they came from.
"""

import ml_collections


def get_config(arg=None):
  variant = arg or "default"
  if variant not in ("default", "tiny"):
    raise ValueError(f"Unknown variant {variant!r} of experiments/stdlib.py;"
                     " use 'default' or 'tiny'.")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.source = "stdlib"           # stdlib | files | tfds
  c.data.files_glob = ""             # source=files: e.g. "~/corpus/**/*.txt"
  c.data.tfds_name = ""              # source=tfds: e.g. "lm1b"
  c.data.text_key = "text"
  c.data.train_split = "train"
  c.data.validation_split = "validation"
  c.data.max_files = 0               # 0: every file of the corpus
  c.data.validation_permille = 25    # share of files held out, by path hash
  c.data.vocab_size = 8192           # 0: whatever an existing tokenizer has
  c.data.tokenizer_max_bytes = 0     # 0: train the tokenizer on all of train
  c.data.seq_len = 128
  c.data.batch_size = 32
  c.data.worker_count = 0            # grain multiprocess prefetch workers

  c.teacher = ml_collections.ConfigDict()
  c.teacher.preset = "demo"          # teacher/config.py presets
  c.teacher.model = ml_collections.ConfigDict(dict(
      d_model=256, num_layers=6, num_heads=4, num_kv_heads=2, head_dim=64,
      d_ff=384, num_experts=8, top_k=2))
  c.teacher.train = ml_collections.ConfigDict(dict(
      steps=300, learning_rate=3e-3, warmup_steps=30,
      end_learning_rate_fraction=0.1, weight_decay=0.01, b1=0.9, b2=0.95,
      grad_clip=1.0, log_every=10, eval_every=100, checkpoint_every=100,
      keep_checkpoints=2, eval_batches=8, loss_chunk=128))

  if variant == "tiny":
    c.teacher.preset = "tiny"
    c.teacher.model.update(dict(d_model=32, num_layers=2, num_heads=4,
                                num_kv_heads=2, head_dim=8, d_ff=48,
                                num_experts=5, top_k=2))
    c.teacher.train.update(dict(steps=8, warmup_steps=2, log_every=2,
                                eval_every=4, checkpoint_every=4,
                                eval_batches=2, loss_chunk=16))
    c.data.max_files = 40
    c.data.vocab_size = 512
    c.data.seq_len = 32
    c.data.batch_size = 4
  return c
