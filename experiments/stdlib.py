"""The embedded default: distil on the Python standard library's source code.

Main job (every stage, in order):

    python -m experiments.run --config=experiments/stdlib.py --workdir=/tmp/kd

Variants (``experiments/stdlib.py:VARIANT``):
  default  sized for a 2-core CPU: a 17.4M-parameter MoE teacher (6.8M
           active) pretrained for 110 steps of 32 x 128 tokens; seven 2.48M
           Gemma-3-style students (ce, sampled, topk_ghost, topk_sparse,
           topk_tail, online, and sampled@q=int8, quantisation-aware) of 56
           steps each on the same 1,792 cached rows, then two 28-step
           continuations of the sampled student: on_policy@from=sampled (on
           its own continuations, scored by the teacher) and its control
           sampled@from=sampled (more of the cached target); evaluate adds
           an int8 copy of the best.
  tiny     every stage of a toy run: 3 min 40 s on a 2-core CPU from nothing,
           mostly compiling (2 min 1 s with the compilation cache warm); the
           fast test suite runs it end to end.
  sweep    the default's teacher and cache, and 18 students: CE, online,
           and sampled (N = 8, 16, 32, 64), top-k ghost and sparse (k = 8,
           16, 32, 64) and top-k with a sampled tail (M = 8, 16, 32, 64
           tail draws after a 32-id head), each read from the one cache;
           the report plots validation gain over CE against cache bytes per
           token. In the default's workdir it trains only the 12 new runs.
  gpu      sized for one H100 in about ten minutes: a 478M-parameter MoE
           teacher (82M active: 12 layers, d_model 768, top-2 of 16 experts of
           1024) pretrained for 400 steps of 32 x 512 tokens, and 49.8M
           Gemma-3-style students (12 layers, d_model 512, 8 query / 2 kv
           heads of 64, window 256) of 160 steps each; bfloat16 compute with
           float32 master weights and optimizer state, fused attention and
           the blocked MoE kernel (the accelerator defaults). Not run here:
           the development machine has no GPU.
  long     long-context distillation on the CPU, rows of 8,192 tokens of
           whole packages (``data.documents=package``: each top-level
           folder's files joined, so names defined early are used
           thousands of tokens later): a 3-layer MoE teacher with global
           attention, trained 150 steps on rows of 1,024 tokens and 30 on
           the long rows, then four students of the default's shape (window
           256), 24 steps of one row each: ce and sampled on the long rows,
           online on rows of 1,024, and that student continued for 8 steps
           on the long rows from the sampled target with its global
           layers' RoPE scaled 8x; the report adds
           the validation loss by position in the document and decode
           speed after a 4,096-token prompt.
  cross_tokenizer
           distillation across tokenizers: the default's teacher and cache
           (8,192-entry tokenizer); students with a 4,096-entry tokenizer
           of their own, trained on the same split, with CE on their own
           tokens, with ALM (the teacher's likelihood of each chunk of text
           both tokenizations end at) and with the vocabulary mapping plus
           ULD (the teacher's top-k over the tokens both spell alike),
           beside the same-tokenizer CE and sampled students and the two
           cross-tokenizer losses on the teacher's tokenizer; the report
           compares them in bits per byte on the whole validation text.

Measured on the development machine (2 CPU cores, no accelerator): the
default took 17 min 14 s from an empty workdir (nine students: 620 s) and
gave validation losses teacher 5.369, CE baseline 6.025, online 5.771
(+0.254 over CE), topk_tail 5.777 (+0.248), sampled 5.784 (+0.241),
topk_ghost 6.487, topk_sparse 6.583, sampled@q=int8 5.784, and the two
continuations on_policy@from=sampled 5.625 and sampled@from=sampled 5.598
nats/token; the README has the full tables.
"""

import ml_collections

from data import pipeline
from distill.core import configs
from distill.core.errors import ConfigError
from student.config import StudentConfig
from teacher.config import TeacherConfig

VARIANTS = ("default", "tiny", "gpu", "sweep", "long", "cross_tokenizer")


def get_config(arg=None):
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ConfigError(
        f"Unknown variant {variant!r} of experiments/stdlib.py;"
        f" use one of {', '.join(VARIANTS)}."
    )
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.seed = 0
  # Every N training steps, compute the step twice and compare the results
  # bit for bit (a check for silent data corruption); 0: off.
  c.replay_check_every = 0

  # The device mesh every stage runs on (distill/core/sharding.py): axis
  # sizes, -1 = the devices left over. The default puts every device on
  # fsdp, so this config runs unchanged on 1 or N devices.
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, expert=1, tensor=1))

  c.data = ml_collections.ConfigDict()
  c.data.source = "stdlib"  # stdlib | files | jsonl | parquet | tfds
  # source=files|jsonl|parquet: e.g. "~/corpus/**/*.txt", "~/c4/*.jsonl.gz"
  c.data.files_glob = ""
  c.data.tfds_name = ""  # source=tfds: e.g. "lm1b"
  c.data.text_key = "text"  # the text's field (tfds, jsonl, parquet)
  # stdlib, files: "file" (a document each) or "package" (each top-level
  # folder's files joined into one long document, split by package).
  c.data.documents = "file"
  c.data.train_split = "train"
  c.data.validation_split = "validation"
  c.data.max_files = 0  # 0: every file of the corpus
  c.data.validation_permille = 50  # share of files held out, by path hash
  c.data.vocab_size = 8192  # 0: whatever an existing tokenizer has
  # The tokenizer trains on the train split's first this many bytes (0: all).
  c.data.tokenizer_max_bytes = 16 << 20
  # Worker processes tokenizing, per process (0: one per core).
  c.data.prepare_workers = 0
  # Train tokens to tokenize: -1 what the stages read x1.25, at least 2^27
  # (data/tokenize_split.py: token_budget); 0 all; N about N (whole shards).
  c.data.max_tokens = -1
  c.data.shard_tokens = 1 << 26  # a token shard is closed past this many
  c.data.seq_len = 128
  c.data.batch_size = 32
  c.data.worker_count = 0  # grain multiprocess prefetch workers
  # Batches made ahead of the step, in as many threads: enough to hide the
  # reading; more only takes cores from the step.
  c.data.read_ahead = pipeline.READ_AHEAD

  c.teacher = ml_collections.ConfigDict()
  c.teacher.preset = "demo"  # teacher/config.py presets
  # Every TeacherConfig field, None = the preset's; set only what differs.
  # dtype: compute (float32 here; bfloat16 on accelerators); param_dtype:
  # the master weights and AdamW's moments (float32 to train).
  c.teacher.model = configs.model_section(
      TeacherConfig, dtype="float32", param_dtype="float32"
  )
  c.teacher.train = ml_collections.ConfigDict(
      dict(
          steps=110,
          learning_rate=3e-3,
          warmup_steps=11,
          end_learning_rate_fraction=0.1,
          weight_decay=0.01,
          b1=0.9,
          b2=0.95,
          grad_clip=1.0,
          log_every=10,
          eval_every=55,
          checkpoint_every=55,
          keep_checkpoints=2,
          max_bad_steps=3,  # non-finite steps in a row before stopping
          eval_batches=8,
          loss_chunk=128,
          # The first short_steps steps on rows of short_seq_len tokens,
          # short_batch_size rows a batch (0: the tokens of a data batch),
          # then rows of data.seq_len: a long-context model's recipe.
          short_steps=0,
          short_seq_len=0,
          short_batch_size=0,
      )
  )

  c.cache = ml_collections.ConfigDict()
  # One teacher pass; "label" (4 bytes a position) serves students with
  # another tokenizer (the alm run).
  c.cache.methods = ("label", "sample", "topk", "topk_tail")
  c.cache.k = 64
  c.cache.num_samples = 64
  # topk_tail: the top tail_k ids exactly, plus tail_samples draws from the
  # teacher outside them (fewer bytes per token than the top-64 above).
  c.cache.tail_k = 32
  c.cache.tail_samples = 64
  c.cache.temperature = 1.0
  c.cache.stratified = False  # True: one uniform per 1/N stratum
  c.cache.max_rows = 0  # 0: every packed train row; set below
  c.cache.rows_per_shard = 1024
  c.cache.batch_size = 32  # rows per teacher forward pass, from each process
  c.cache.writer_threads = 2  # host threads encoding records
  # The output layer and the targets run over this many positions at a time
  # (0: whole rows): [rows, chunk, V] float32 logits at once, not [rows, T, V].
  c.cache.position_chunk = 512

  c.student = ml_collections.ConfigDict()
  c.student.preset = "demo"  # student/config.py presets
  # "teacher": the teacher's tokenizer; "N": its own byte-level BPE of N
  # entries trained on the corpus; or a tokenizer.json path to adopt
  # (data/student_vocab.py). Its own: CE and alm runs only.
  c.student.tokenizer = "teacher"
  c.student.model = configs.model_section(
      StudentConfig, window=64, dtype="float32", param_dtype="float32"
  )

  c.distill = ml_collections.ConfigDict()
  # Runs (distill/train.py RUN_KINDS): the headline student learns from the
  # sampled target; top-k variants and online KD are for comparison; ce is
  # the baseline trained on labels alone.
  c.distill.runs = (
      "ce",
      "sampled",
      "topk_ghost",
      "topk_sparse",
      "topk_tail",
      "online",
      "sampled@q=int8",  # quantisation-aware: int8 projections
      # Two continuations of the sampled student, the same steps each
      # (config.distill.continue_train): on its own continuations scored
      # by the teacher, and, as the control, more of the cached target.
      "on_policy@from=sampled",
      "sampled@from=sampled",
  )
  c.distill.alpha = 0.0  # weight of hard-label CE in the mix
  c.distill.alpha_end = 0.0
  c.distill.alpha_schedule = "constant"  # constant | linear | cosine
  c.distill.temperature = 1.0  # online runs; offline use the cache's
  c.distill.temperature_end = 1.0
  c.distill.temperature_schedule = "constant"
  # Cross-tokenizer runs: alm, alm_alpha * CE on the student's own tokens +
  # (1 - alm_alpha) * ALM (alm_tau divides the chunk log-likelihoods);
  # vocab, the KD mix above with uld_weight * ULD for the unmapped ids.
  c.distill.cross_tokenizer = ml_collections.ConfigDict(
      dict(alm_alpha=0.5, alm_tau=1.0, uld_weight=1.0)
  )
  c.distill.dense_kind = "forward"  # forward | reverse | jsd
  c.distill.jsd_beta = 0.5
  c.distill.loss_chunk = 128  # sequence chunk of the loss
  c.distill.same_rows_as_cache = True  # ce/online read only the cached rows
  # On-policy runs (distill/on_policy.py): each step, with probability lam,
  # the student continues the first prompt_len tokens of every row at
  # temperature and trains on the divergence to the teacher on what it
  # wrote (dense: full vocabulary; topk: the teacher's top-k and its tail);
  # the other steps train on the run's cached target.
  c.distill.on_policy = ml_collections.ConfigDict(
      dict(
          lam=1.0,
          prompt_len=32,
          temperature=1.0,
          divergence="forward",  # forward | reverse | jsd
          beta=0.5,  # jsd
          target="dense",  # dense | topk
          k=64,
      )
  )
  # Feature distillation (runs with feat=cosine|mse; distill/features.py):
  # (student block, teacher block) pairs, () = the middle and last of each.
  c.distill.features = ml_collections.ConfigDict(dict(pairs=(), weight=1.0))
  # A student folder every run starts from ("" = random parameters; the
  # flag --init_from overrides it); runs that name theirs with from=<run>
  # ignore it.
  c.distill.init_from = ""
  # What changes for a run that starts from another student (from=<run>
  # or init_from): its own, shorter schedule (other LoopConfig fields are
  # config.distill.train's).
  c.distill.continue_train = ml_collections.ConfigDict(
      dict(
          steps=28,
          learning_rate=1e-3,
          warmup_steps=3,
          eval_every=14,
          checkpoint_every=14,
      )
  )
  c.distill.eval_batches = 4  # training-time hook; 0: the whole split
  c.distill.train = ml_collections.ConfigDict(
      dict(
          steps=56,
          learning_rate=3e-3,
          warmup_steps=6,
          end_learning_rate_fraction=0.1,
          weight_decay=0.01,
          b1=0.9,
          b2=0.95,
          grad_clip=1.0,
          log_every=8,
          eval_every=28,
          checkpoint_every=28,
          keep_checkpoints=2,
          max_bad_steps=3,  # non-finite steps in a row before stopping
      )
  )
  # Cache the rows the students read (steps x batch), not the whole corpus.
  c.cache.max_rows = c.distill.train.steps * c.data.batch_size

  c.eval = ml_collections.ConfigDict()
  c.eval.batches = 12  # a fixed-seed sample of validation
  # batches (49k tokens); 0: the whole split
  c.eval.ece_bins = 15
  # Validation batches on which each cached method's target is compared with
  # the teacher's full distribution (entropy, coverage, KL); 0: none.
  c.eval.target_batches = 4
  # Post-training quantised variants of the best distilled student
  # (student/quantize.py schemes), scored beside it; () for none.
  c.eval.ptq = ("int8",)
  c.eval.speed = ml_collections.ConfigDict(
      dict(  # prefill/decode tokens/s
          prompt_len=64, new_tokens=64, batch_sizes=(1, 8), repeats=5
      )
  )
  c.eval.speculative = ml_collections.ConfigDict(
      dict(  # students draft
          gammas=(4,), prompts=2, prompt_len=32, new_tokens=48, repeats=3
      )
  )
  # Each model continues held-out prompts (greedy, and sampled at
  # temperature); the teacher scores what it wrote (mean log-likelihood per
  # token, distill/evals/generation.py). prompts=0: off.
  c.eval.continuations = ml_collections.ConfigDict(
      dict(prompts=16, prompt_len=32, new_tokens=64, temperature=1.0)
  )

  c.export = ml_collections.ConfigDict()
  c.export.formats = ("orbax", "hf")  # every student run, in each format
  c.export.dtype = "float32"  # or bfloat16 (halves the files)

  # Every key exists now: from here on a misspelt one fails (with a
  # suggestion), here and in files that build on this one.
  c.lock()

  if variant == "tiny":
    c.eval.batches = 4
    c.eval.target_batches = 1
    # Batch 1 only: each batch size compiles its own decoding programs.
    c.eval.speed.update(
        dict(prompt_len=8, new_tokens=4, batch_sizes=(1,), repeats=1)
    )
    c.eval.speculative.update(
        dict(gammas=(2,), prompts=1, prompt_len=8, new_tokens=8, repeats=1)
    )
    c.eval.continuations.update(dict(prompts=2, prompt_len=8, new_tokens=8))
    c.student.preset = "tiny"
    c.student.model = configs.model_section(
        StudentConfig, dtype="float32", param_dtype="float32"
    )
    c.distill.loss_chunk = 16
    c.distill.eval_batches = 2
    c.distill.on_policy.update(dict(prompt_len=8, k=8))
    c.distill.continue_train.update(
        dict(steps=4, warmup_steps=1, eval_every=4, checkpoint_every=4)
    )
    c.distill.train.update(
        dict(
            steps=8,
            warmup_steps=2,
            log_every=2,
            eval_every=8,
            checkpoint_every=8,
        )
    )
    c.cache.update(
        dict(
            k=8,
            num_samples=16,
            tail_k=4,
            tail_samples=8,
            max_rows=48,
            rows_per_shard=16,
            batch_size=4,
        )
    )
    c.teacher.preset = "tiny"
    c.teacher.train.update(
        dict(
            steps=8,
            warmup_steps=2,
            log_every=2,
            eval_every=8,
            checkpoint_every=8,
            eval_batches=2,
            loss_chunk=16,
        )
    )
    c.data.max_files = 40
    c.data.vocab_size = 512
    c.data.seq_len = 32
    c.data.batch_size = 4
  if variant == "gpu":
    _gpu(c)
  if variant == "sweep":
    c.distill.runs = sweep_runs()
  if variant == "long":
    _long(c)
  if variant == "cross_tokenizer":
    _cross_tokenizer(c)
  return c


def _cross_tokenizer(c) -> None:
  """The default's teacher and cache; students that speak a 4,096-entry
  tokenizer of their own against the same-tokenizer pair (see the module
  docstring)."""
  c.student.tokenizer = "4096"  # a byte-level BPE trained on the same split
  c.distill.runs = (
      # The same-tokenizer pair, on the teacher's 8,192 tokens.
      "ce@tok=teacher",
      "sampled@tok=teacher",
      # On the student's own 4,096 tokens, the same steps and bytes.
      "ce",
      "alm",
      "vocab",
      # The cross-tokenizer losses with the teacher's tokenizer: their step
      # time against sampled's on the same student.
      "alm@tok=teacher",
      "vocab@tok=teacher",
  )
  c.eval.batches = 0  # the whole validation text, for every tokenizer


def sweep_runs(sizes=(8, 16, 32)) -> tuple[str, ...]:
  """The quality-per-byte sweep: every cached target read at smaller sizes
  (the cache is made once, at the largest), against CE and online KD."""
  runs = ["ce", "online"]
  for preset, key in (
      ("sampled", "n"),
      ("topk_ghost", "k"),
      ("topk_sparse", "k"),
      ("topk_tail", "m"),
  ):
    runs += [f"{preset}@{key}={size}" for size in sizes] + [preset]
  return tuple(runs)


def _long(c) -> None:
  """Long-context distillation on the CPU: rows of 8,192 tokens of whole
  packages (see the module docstring)."""
  c.data.documents = "package"  # names defined early, used far later
  c.data.seq_len = 8192
  c.data.batch_size = 1  # 8,192 tokens a step: steps, not tokens, are short
  c.teacher.model = configs.model_section(
      TeacherConfig,
      d_model=128,
      num_layers=3,
      num_heads=4,
      num_kv_heads=2,
      head_dim=32,
      d_ff=256,
      num_experts=8,
      top_k=2,
      dtype="float32",
      param_dtype="float32",
  )
  # Most steps on 4 rows of 1,024 tokens (1.5 s a step here against 4.2 s
  # for one long row), the last 30 on the long rows, where it learns to
  # read far back.
  c.teacher.train.update(
      dict(
          steps=180,
          short_steps=150,
          short_seq_len=1024,
          short_batch_size=4,
          learning_rate=1e-2,
          warmup_steps=10,
          log_every=25,
          eval_every=180,
          checkpoint_every=50,
          eval_batches=2,
          loss_chunk=512,
      )
  )
  c.student.model = configs.model_section(
      StudentConfig, window=256, dtype="float32", param_dtype="float32"
  )
  c.distill.runs = (
      "ce",
      "sampled",
      # Short rows first, then a continuation on the long rows with the
      # global layers' RoPE scaled 8x (Gemma 3's recipe).
      "online@seq=1024",
      "sampled@from=online_seq1024,rope=8",
  )
  c.distill.loss_chunk = 512
  c.distill.eval_batches = 1
  c.distill.train.update(
      dict(steps=24, warmup_steps=3, log_every=8, eval_every=24,
           checkpoint_every=12)
  )  # fmt: skip
  c.distill.continue_train.update(
      dict(steps=8, warmup_steps=1, eval_every=8, checkpoint_every=8)
  )
  c.cache.update(
      dict(
          max_rows=c.distill.train.steps * c.data.batch_size,
          batch_size=2,
          rows_per_shard=32,
      )
  )
  c.eval.batches = 0  # the whole validation split
  c.eval.target_batches = 1
  c.eval.ptq = ()
  c.eval.speed.update(
      dict(prompt_len=4096, new_tokens=32, batch_sizes=(1,), repeats=2)
  )
  c.eval.speculative.update(dict(gammas=()))
  c.eval.continuations.update(dict(prompts=0))


def _gpu(c) -> None:
  """One H100, about ten minutes end to end (see the module docstring)."""
  accelerator = dict(dtype="bfloat16", param_dtype="float32")
  c.data.seq_len = 512
  c.data.batch_size = 32  # 16k tokens a step
  c.teacher.model = configs.model_section(
      TeacherConfig,
      d_model=768,
      num_layers=12,
      num_heads=12,
      num_kv_heads=4,
      head_dim=64,
      d_ff=1024,
      num_experts=16,
      top_k=2,
      **accelerator,
  )
  c.teacher.train.update(
      dict(  # 6.6M tokens: 2.3 passes over the 2.8M-token train split
          steps=400,
          learning_rate=1.5e-3,
          warmup_steps=40,
          log_every=20,
          eval_every=200,
          checkpoint_every=200,
          loss_chunk=512,
      )
  )
  c.student.model = configs.model_section(
      StudentConfig,
      d_model=512,
      num_layers=12,
      num_heads=8,
      num_kv_heads=2,
      head_dim=64,
      d_ff=2048,
      window=256,
      **accelerator,
  )
  c.distill.loss_chunk = 512
  c.distill.on_policy.prompt_len = 128
  c.distill.continue_train.update(
      dict(steps=80, warmup_steps=8, eval_every=40, checkpoint_every=40)
  )
  c.distill.train.update(
      dict(  # 5,120 rows of 512: about one pass over the train split
          steps=160,
          learning_rate=1.5e-3,
          warmup_steps=16,
          log_every=20,
          eval_every=80,
          checkpoint_every=80,
      )
  )
  c.cache.max_rows = c.distill.train.steps * c.data.batch_size
  c.cache.batch_size = 64
  c.cache.rows_per_shard = 2048
  c.cache.writer_threads = 8
  c.eval.speed.update(dict(prompt_len=128, new_tokens=128))
  c.eval.speculative.update(dict(prompts=4, prompt_len=64, new_tokens=128))
  c.eval.ptq = ("int8", "fp8")  # fp8 matmuls on H100-class GPUs
