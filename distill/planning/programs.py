"""The stages' programs, built abstractly from a config on a mesh.

Each ``Program`` is a jitted function a stage runs (the same object:
``loop.train_step_fn``, ``targets.make_target_fn``,
``validation.scores``, ``generate.decode``) with its abstract arguments,
the rows it takes and the model FLOPs it must do at the least.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from data import pipeline, student_vocab
from data import tokenizer as tok
from distill import features
from distill import train as distill_train
from distill.core import configs, sharding
from distill.decoding import generate as gen
from distill.evals import validation
from distill.objective import loss_fn_for
from distill.planning.arguments import (
    array_bytes,
    batch_shapes,
    cross_tokenizer_settings,
    generated_batch,
    on_mesh,
    processes,
    replicated,
)
from distill.planning.flops import decode_flops, forward_flops
from distill.runs import RunKind, run_kind
from distill.training import loop as trainer
from student import quantize
from student.model import Student
from teacher import targets as teacher_targets
from teacher import config as teacher_config
from teacher import hf_config
from teacher import train as teacher_train
from teacher.model import Teacher


@dataclasses.dataclass
class Program:
  """One compiled function of a stage with abstract arguments.

  ``fn.trace(*args, **kwargs)`` traces it; ``model_flops`` is the work the
  program must do at the least (``planning.flops``), over the whole mesh;
  ``state_bytes`` the parameters and optimizer state it holds between calls,
  over the whole mesh; ``held`` the bytes per device the stage keeps on the
  devices while the program runs (its own arguments and whatever else the
  stage has loaded, such as a teacher an offline run validates against),
  0 where that is the program's arguments alone.
  """

  name: str
  stage: str
  fn: Any
  args: tuple
  kwargs: dict[str, Any]
  rows: int
  tokens: int
  model_flops: float
  state_bytes: int
  rows_knob: str  # the config key that sets ``rows``
  while_trips: int = 1  # how often its while loop runs (a decode loop)
  held: int = 0

  def trace(self):
    return self.fn.trace(*self.args, **self.kwargs)


def student_vocab_size(config, kind: RunKind, vocab: int) -> int:
  """The vocabulary of a run's student: the plan's, or the size of the
  student's own tokenizer (``config.student.tokenizer``: N, or a
  tokenizer.json read for its size)."""
  if not student_vocab.own(config, kind.tok):
    return vocab
  size = student_vocab.trained_size(config)
  if size:
    return size
  return tok.load_tokenizer(student_vocab.source_path(config)).get_vocab_size()


def teacher_model_config(config, vocab: int | None = None):
  """The teacher the config runs, from its shapes alone.

  A trained teacher: ``config.teacher.preset`` and ``.model``. An imported one
  (the config has ``teacher.hf_dir``): the config.json in that folder when it
  is given, else the preset (the published shapes, no checkpoint needed),
  stored in the checkpoint's dtype (bfloat16 when no folder says) unless
  ``teacher.param_dtype`` says otherwise, as the import stores it, and run
  as ``teacher.model`` says (``teacher.config.runtime_settings``), as the
  stages load it.
  """
  t = config.teacher
  if "hf_dir" not in t:
    if vocab is None:
      vocab = teacher_config.get_preset(t.preset).vocab_size
    return teacher_train.model_config(config, vocab)
  if t.hf_dir:
    published = hf_config.read_hf_config(t.hf_dir)
    stored = published.get("torch_dtype") or published.get("dtype")
    base = hf_config.teacher_config_from_hf(published)
  else:
    stored, base = None, teacher_config.get_preset(t.preset)
  param_dtype = t.get("param_dtype") or stored or "bfloat16"
  dtype = t.get("dtype") or (
      "float32" if param_dtype == "float32" else "bfloat16"
  )
  return dataclasses.replace(
      base,
      param_dtype=param_dtype,
      dtype=dtype,
      **teacher_config.runtime_settings(config),
  )


def vocab_size(config) -> int:
  """The vocabulary the plan uses: ``config.data.vocab_size``, or (0: the
  imported teacher's tokenizer) the teacher's."""
  if config.data.vocab_size:
    return int(config.data.vocab_size)
  return teacher_model_config(config).vocab_size


def _train_program(
    name, stage, make_model, loss_fn, loop_cfg, batch, mesh, *, frozen=(),
    extras=None, model_flops_of, rows_knob,
) -> Program:  # fmt: skip
  """A training step as ``loop.train`` compiles it: the model and its
  optimizer placed by the rules, ``frozen`` modules beside them."""

  def make():
    model = make_model()
    trainable = model if extras is None else trainer.WithExtras(model, extras())
    optimizer = nnx.Optimizer(
        trainable, trainer.make_optimizer(loop_cfg), wrt=nnx.Param
    )
    return model, trainable, optimizer

  model, trainable, optimizer = on_mesh(make, mesh)
  placement = (
      sharding.state_shardings(nnx.state(trainable, nnx.Param), mesh),
      sharding.state_shardings(nnx.state(optimizer), mesh),
  )
  step = trainer.train_step_fn(loss_fn, extras is not None, placement)
  rows, width = batch["tokens"].shape
  step_arg = replicated((), jnp.int32, mesh)
  return Program(
      name=name,
      stage=stage,
      fn=step,
      args=(trainable, optimizer, batch, step_arg, tuple(frozen)),
      kwargs={},
      rows=rows,
      tokens=rows * (width - 1),
      model_flops=model_flops_of(model, rows, width - 1),
      state_bytes=array_bytes(trainable) + array_bytes(optimizer),
      rows_knob=rows_knob,
  )


def teacher_programs(config, mesh, vocab: int, rows: int | None = None):
  """The teacher's pretraining step (a config that imports its teacher has
  none) and the cache pass."""
  cfg = teacher_model_config(config, vocab)
  seq = config.data.seq_len
  make_teacher = lambda: Teacher(cfg, rngs=nnx.Rngs(0))
  out = []
  if "hf_dir" not in config.teacher:  # an imported teacher is not trained
    loss = teacher_train.loss_fn_for(cfg, config.teacher.train.loss_chunk)
    phases = pipeline.row_phases(config)
    if rows:  # a search over the long rows' batch
      phases = [(0, seq, rows)]
    for i, (_, length, b) in enumerate(reversed(phases)):
      out.append(
          _train_program(
              "teacher step" + (", short rows" if i else ""),
              "teacher",
              make_teacher,
              loss,
              teacher_train.loop_config(config),
              batch_shapes(b, length, None, None, mesh),
              mesh,
              model_flops_of=lambda m, b, t: 3 * forward_flops(m, b, t),
              rows_knob=(
                  "teacher.train.short_batch_size" if i else "data.batch_size"
              ),
          )
      )
  c = config.cache
  teacher = on_mesh(make_teacher, mesh)
  target_fn = teacher_targets.make_target_fn(
      tuple(c.methods), c.k, c.num_samples, c.temperature, c.stratified,
      c.tail_k, c.tail_samples, c.get("position_chunk", 0),
  )  # fmt: skip
  b = rows or c.batch_size * processes(mesh)
  plain = batch_shapes(b, seq, None, None, mesh)
  cut = {k: jax.ShapeDtypeStruct((b, seq), v.dtype, sharding=v.sharding)
         for k, v in plain.items()}  # fmt: skip
  out.append(
      Program(
          name="cache pass",
          stage="cache",
          fn=target_fn,
          args=(
              teacher,
              cut["tokens"],
              cut["segment_ids"],
              cut["positions"],
              jax.eval_shape(lambda: jax.random.key(0)),
              jax.ShapeDtypeStruct(
                  (b,), jnp.int32, sharding=sharding.batch_sharding(mesh, (b,))
              ),
              cut["tokens"],  # the labels: their shape is what counts
          ),
          kwargs={},
          rows=b,
          tokens=b * seq,
          model_flops=forward_flops(teacher, b, seq),
          state_bytes=array_bytes(teacher),
          rows_knob="cache.batch_size (per process)",
      )
  )
  return out


def student_programs(
    config, mesh, vocab: int, runs=None, rows: int | None = None
) -> list[Program]:
  """Each run's training step (online and on-policy runs with the teacher
  resident; an on-policy run also its generation) and the validation pass."""
  s_cfg = distill_train.model_config(config, vocab)
  t_cfg = teacher_model_config(config, vocab)
  d, seq = config.distill, config.data.seq_len
  b = rows or config.data.batch_size
  make_student = lambda: Student(s_cfg, rngs=nnx.Rngs(0))
  # Every run loads the teacher (its validation scores the student against
  # it) and keeps it on the devices: an offline run's step runs beside it.
  teacher = on_mesh(lambda: Teacher(t_cfg, rngs=nnx.Rngs(0)), mesh)
  beside = array_bytes(teacher, per_device=True)
  out, held = [], 0
  for run in runs or d.runs:
    kind = run_kind(run)
    s_vocab = student_vocab_size(config, kind, vocab)
    make_model = make_student
    if s_vocab != vocab:  # a student with its own tokenizer
      make_model = lambda v=s_vocab: Student(
          distill_train.model_config(config, v), rngs=nnx.Rngs(0)
      )
    if kind.q is not None:  # trained through fake quantisation
      make_model = lambda q=kind.q, make=make_model: quantize.quantize(
          make(), q, qat=True
      )
    policy = None
    if kind.mode == "on_policy":
      policy = distill_train.on_policy_config(config, kind)
    pairs, extras = (), None
    if kind.feat is not None:
      f_cfg = configs.from_section(
          features.FeatureConfig, d.features, where="config.distill.features"
      )
      pairs = features.resolve_pairs(
          f_cfg.pairs, s_cfg.num_layers, t_cfg.num_layers
      )
      extras = lambda pairs=pairs: features.Projections(
          len(pairs), s_cfg.d_model, t_cfg.d_model
      )
    loss = loss_fn_for(
        kind,
        d,
        config.cache.temperature,
        topk_k=config.cache.k,
        on_policy_cfg=policy,
        feature_pairs=pairs,
        feature_weight=1.0,
        **cross_tokenizer_settings(config, kind, t_cfg.vocab_size, s_vocab),
    )
    frozen = (teacher,) if kind.needs_teacher else ()

    def flops_of(m, b, t, frozen=frozen):
      return 3 * forward_flops(m, b, t) + sum(
          forward_flops(f, b, t) for f in frozen
      )

    batch = (
        generated_batch(b, seq, mesh)
        if policy is not None and policy.lam > 0
        else batch_shapes(b, seq, kind, config.cache, mesh)
    )
    program = _train_program(
        f"student {run}",
        "distill",
        make_model,
        loss,
        distill_train.loop_config(config),
        batch,
        mesh,
        frozen=frozen,
        extras=extras,
        model_flops_of=flops_of,
        rows_knob="data.batch_size",
    )
    program.state_bytes += sum(array_bytes(f) for f in frozen)
    program.held = array_bytes(program.args, per_device=True) + (
        0 if frozen else beside
    )
    held = max(held, program.held)
    out.append(program)
    if policy is not None and policy.lam > 0:
      out.append(
          _generation_program(program.args[0], policy, b, seq, mesh, run)
      )
      out[-1].held = program.held
  student = on_mesh(make_student, mesh)
  out.append(_validation_program(config, student, teacher, b, mesh))
  out[-1].held = held  # it runs inside a run's loop, beside its state
  return out


def _generation_program(student, policy, rows, seq, mesh, run) -> Program:
  """An on-policy step's generation: the student continues each row's
  prompt to the row's length (``generate.continuations``)."""
  graphdef, state = nnx.split(student)
  new = seq + 1 - policy.prompt_len
  prompts = jax.ShapeDtypeStruct(
      (rows, policy.prompt_len),
      jnp.int32,
      sharding=sharding.batch_sharding(mesh, (rows, policy.prompt_len)),
  )
  return Program(
      name=f"generate {run}",
      stage="distill",
      fn=gen.continue_fn(graphdef),
      args=(
          state,
          prompts,
          jax.eval_shape(lambda: jax.random.key(0)),
          replicated((), jnp.float32, mesh),
      ),
      kwargs=dict(new_tokens=new, greedy=policy.temperature <= 0),
      while_trips=new - 1,
      rows=rows,
      tokens=rows * new,
      model_flops=forward_flops(student, rows, seq),
      state_bytes=array_bytes(state),
      rows_knob="data.batch_size",
  )


def _validation_program(config, student, teacher, rows, mesh) -> Program:
  """The validation pass's scores of the student against the teacher's
  hidden states (``validation.scores``; the teacher's own forward pass is
  the cache pass's)."""
  seq = config.data.seq_len
  batch = batch_shapes(rows, seq, None, None, mesh)
  hidden = jax.ShapeDtypeStruct(
      (rows, seq, teacher.config.d_model),
      jnp.dtype(teacher.config.dtype),
      sharding=sharding.batch_sharding(mesh, (rows, seq, 1)),
  )
  head = 2 * teacher.config.vocab_size * teacher.config.d_model * rows * seq
  return Program(
      name="validation",
      stage="distill",
      fn=validation.scores,
      args=(student, teacher, batch, hidden, None),
      kwargs=dict(chunk_size=config.distill.loss_chunk, num_bins=15),
      rows=rows,
      tokens=rows * seq,
      model_flops=forward_flops(student, rows, seq) + head,
      state_bytes=array_bytes(student) + array_bytes(teacher),
      rows_knob="data.batch_size",
  )


def decode_programs(config, mesh, vocab: int, batches=(1, 8)) -> list[Program]:
  """One decode step of the student at the configured context
  (``config.data.seq_len``), a full KV cache, per batch size."""
  s_cfg = distill_train.model_config(config, vocab)
  student = on_mesh(lambda: Student(s_cfg, rngs=nnx.Rngs(0)), mesh)
  graphdef, state = nnx.split(student)
  context = config.data.seq_len
  # Rows split as far as they go (one row: on every device), said once in
  # the table rather than warned about as a training batch would be.
  rows = lambda shape: sharding.named(
      ("batch",) + (None,) * (len(shape) - 1), shape, mesh
  )
  out = []
  for b in batches:
    cache = jax.eval_shape(lambda b=b: student.init_cache(b, context))
    cache = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=rows(x.shape)
        ),
        cache,
    )
    column = jax.ShapeDtypeStruct((b, 1), jnp.int32, sharding=rows((b, 1)))
    out.append(
        Program(
            name=f"decode b{b}",
            stage="export",
            fn=gen.decode(graphdef),
            args=(state, column, cache, column),
            kwargs={},
            rows=b,
            tokens=b,
            model_flops=decode_flops(student, b, context),
            state_bytes=array_bytes(state),
            rows_knob="",
        )
    )
  return out


def programs(
    config, mesh, *, stages=None, runs=None, names=None
) -> list[Program]:
  """Every program of the config's stages, built abstractly on ``mesh``.

  ``stages``: only those of teacher, cache, distill, export (the decode
  steps); ``runs``: only those runs' steps; ``names``: only programs of
  these names.
  """
  vocab = vocab_size(config)
  wanted = lambda *these: not stages or bool(set(these) & set(stages))
  out = []
  with sharding.use(mesh):
    if wanted("teacher", "cache"):
      out += teacher_programs(config, mesh, vocab)
    if wanted("distill"):
      out += student_programs(config, mesh, vocab, runs)
    if wanted("export"):
      out += decode_programs(config, mesh, vocab)
  return [
      p for p in out
      if (not stages or p.stage in stages) and (not names or p.name in names)
  ]  # fmt: skip
