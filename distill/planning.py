"""Every stage's compiled programs, built abstractly on a mesh: what they need.

``programs(config, mesh)`` returns, without allocating a parameter, the jitted
functions the stages run (the same objects: ``loop.train_step_fn``,
``cache_logits.make_target_fn``, ``validation.scores``,
``generate.decode``) with abstract arguments placed on ``mesh`` by the
sharding rules; ``measure`` compiles one and reads XLA's memory and cost
analyses. The mesh may be made of devices this host does not have (a TPU
slice's, from ``jax.experimental.topologies``): the code branches on the
mesh's platform (``sharding.platform``), so the plan is the program that
runs there.

FLOPs are counted twice. ``xla_flops`` is XLA's own count per device, which
counts a loop body once (a scanned stack of layers is one layer) and a
custom call (a Pallas kernel) not at all. ``flops`` is this module's count
of the matrix products in the traced program: a ``scan`` counts its body
``length`` times, a ``shard_map`` body once per device, and the total is
divided over the mesh; a splash attention kernel (a Pallas call) counts
the blocks its block mask visits, another Pallas kernel the FLOPs its cost
estimate declares (megablox's grouped matmuls: 2 x rows x K x N, as
``ragged_dot`` here), or none. Elementwise work is left out of
``flops``: next to the matmuls of a Transformer it is small.

Model FLOPs, what the step must compute at the least: ``6 x N x tokens``
for a training step (``2 x`` for a forward pass), N the parameters a token
multiplies by (the active ones; an untied input embedding is a lookup, not
a product), plus attention's ``QK^T`` and ``PV``: ``4 x heads x head_dim``
per (query, key it sees) per layer forward, three times that for training,
a query seeing ``min(position + 1, window)`` keys (whole rows as one
document).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core as jex_core

from data import student_vocab
from data import tokenizer as tok
from distill import features, on_policy
from distill import train as distill_train
from distill.core import configs, sharding
from distill.decoding import generate as gen
from distill.evals import validation
from distill.nn import attention
from distill.objective import loss_fn_for
from distill.runs import RunKind, run_kind
from distill.training import loop as trainer
from student import quantize
from student.model import Student
from teacher import cache_logits
from teacher import config as teacher_config
from teacher import hf_config
from teacher import train as teacher_train
from teacher.model import Teacher

# ----------------------------------------------------------------------------
# Model FLOPs


def attention_flops(
    kinds, window: int | None, batch: int, seq: int, heads: int, head_dim: int
) -> float:
  """QK^T and PV FLOPs of one forward pass over ``batch`` rows of ``seq``
  tokens (see the module docstring)."""
  total = 0.0
  keys = np.arange(1, seq + 1, dtype=np.float64)
  for kind in kinds:
    seen = (
        keys
        if kind != attention.AttentionKind.LOCAL
        else keys.clip(None, window)
    )
    total += 4 * head_dim * heads * batch * float(seen.sum())
  return total


def _matmul_params(model) -> int:
  """Parameters a token is multiplied by: the active ones, less an untied
  input embedding (a lookup)."""
  counts = model.param_counts()
  cfg = model.config
  tied = getattr(cfg, "tie_embeddings", True)
  return counts["active"] - (0 if tied else cfg.vocab_size * cfg.d_model)


def _attention_shape(model) -> tuple[tuple[str, ...], int | None, int, int]:
  cfg = model.config
  if isinstance(cfg, teacher_config.TeacherConfig):
    local = attention.AttentionKind.LOCAL if cfg.sliding_window else "global"
    return (
        (local,) * cfg.num_layers,
        cfg.sliding_window,
        cfg.num_heads,
        cfg.head_dim,
    )
  return tuple(cfg.layer_kinds), cfg.window, cfg.num_heads, cfg.head_dim


def forward_flops(model, batch: int, seq: int) -> float:
  """Model FLOPs of a forward pass over ``batch`` rows of ``seq`` tokens."""
  kinds, window, heads, head_dim = _attention_shape(model)
  return 2 * _matmul_params(model) * batch * seq + attention_flops(
      kinds, window, batch, seq, heads, head_dim
  )


def decode_flops(model, batch: int, context: int) -> float:
  """Model FLOPs of one decode step: each row's new token against a full
  cache of ``context`` positions (a local layer sees its window)."""
  kinds, window, heads, head_dim = _attention_shape(model)
  seen = sum(
      min(context, window) if k == attention.AttentionKind.LOCAL else context
      for k in kinds
  )
  return 2 * _matmul_params(model) * batch + 4 * heads * head_dim * batch * seen


# ----------------------------------------------------------------------------
# Counting a traced program's matmuls


#: Matmuls per visited (block_q x block_kv) block of splash attention's
#: kernels: forward QK^T and PV; the dq kernel recomputes QK^T, then dP and
#: dQ; the dkv kernel recomputes QK^T, then dP, dV and dK, and with the
#: fused backward (one kernel, dq's partials among its outputs) dQ too.
SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}
_SPLASH_BLOCKS = {
    "fwd": ("block_q", "block_kv"),
    "dq": ("block_q_dq", "block_kv_dq"),
    "dkv": ("block_q_dkv", "block_kv_dkv"),
}


def _splash_flops(eqn, values) -> float | None:
  """FLOPs of a splash attention kernel call: 2 x (its matmuls) x bq x bkv
  x head_dim per block its block mask visits (the mask's nonzero entries,
  for every row and head). None when its mask is not known here."""
  name = eqn.params.get("name") or ""
  phase = next((p for p in SPLASH_MATMULS if f"_{p}_" in name), None)
  block_mask = values[1] if len(values) > 1 else None
  if phase is None or block_mask is None:
    return None
  sizes = json.loads(
      dict(eqn.params["metadata"] or {}).get("xprof_metadata", "{}")
  )
  bq, bkv = (sizes[k] for k in _SPLASH_BLOCKS[phase])
  # The grid: (rows, when vmapped), then heads and the query and key blocks
  # in the kernel's order; q [(rows,) heads, T, head_dim] is the float
  # operand of the grid's rank with the most heads.
  grid = eqn.params["grid_mapping"].grid
  rows = math.prod(grid[:-3])
  q = max(
      (
          v.aval.shape
          for v in eqn.invars
          if len(v.aval.shape) == len(grid)
          and jnp.issubdtype(v.aval.dtype, jnp.floating)
      ),
      key=lambda shape: shape[-3],
  )
  heads, head_dim = q[-3], q[-1]
  visited = np.count_nonzero(np.asarray(block_mask))
  visited *= heads // np.shape(block_mask)[0]  # heads that share a mask
  matmuls = SPLASH_MATMULS[phase]
  if phase == "dkv" and any(len(v.aval.shape) > len(q) for v in eqn.outvars):
    matmuls += 1  # the fused backward: its dq partials, one per key block
  return 2.0 * matmuls * bq * bkv * head_dim * visited * rows


def _sub_jaxprs(params: dict[str, Any]):
  for value in params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, (jex_core.ClosedJaxpr, jex_core.Jaxpr)):
        yield v


#: Call-like primitives: their sub-jaxpr takes the eqn's operands in order.
_CALLS = {
    "jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr", "remat": "jaxpr", "remat2": "jaxpr",
    "checkpoint": "jaxpr", "shard_map": "jaxpr",
}  # fmt: skip


def matmul_flops(jaxpr, while_trips: int = 1) -> float:
  """FLOPs of the matrix products in ``jaxpr`` (a Jaxpr or ClosedJaxpr),
  a ``scan`` counted as many times as it runs and a ``while`` loop (whose
  trip count is a runtime value) ``while_trips`` times; a splash attention
  kernel by its block mask, a constant of the program followed into and
  out of the calls that pass it on; another Pallas kernel by its declared
  cost estimate."""
  return _count(jaxpr, while_trips, ())[0]


def _count(jaxpr, while_trips: int, values) -> tuple[float, list]:
  """(FLOPs, the known values of its outputs) of ``jaxpr`` whose inputs
  have the known ``values`` (None: unknown)."""
  env = {}
  if hasattr(jaxpr, "consts"):
    env.update(zip(jaxpr.jaxpr.constvars, jaxpr.consts))
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  env.update((v, x) for v, x in zip(jaxpr.invars, values) if x is not None)

  def known(var):
    if isinstance(var, jex_core.Literal):
      return var.val
    return env.get(var)

  def count(sub, ins=()):
    return _count(sub, while_trips, ins)[0]

  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    ins = [known(v) for v in eqn.invars]
    if name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      out = math.prod(eqn.outvars[0].aval.shape)
      total += 2.0 * out * math.prod(lhs[i] for i in contract)
    elif name in ("ragged_dot", "ragged_dot_general"):
      # Each row meets the one group it belongs to: [M, K] x [G, K, N].
      m, k = eqn.invars[0].aval.shape[-2:]
      n = eqn.outvars[0].aval.shape[-1]
      total += 2.0 * m * k * n
    elif name in _CALLS and _CALLS[name] in eqn.params:
      copies = 1
      if name == "shard_map":  # its body is one device's share
        mesh = eqn.params["mesh"]
        manual = eqn.params.get("manual_axes") or mesh.axis_names
        copies = math.prod(mesh.shape[a] for a in manual)
      flops, outs = _count(eqn.params[_CALLS[name]], while_trips, ins)
      total += copies * flops
      env.update((v, x) for v, x in zip(eqn.outvars, outs) if x is not None)
    elif name == "scan":
      consts = ins[: eqn.params["num_consts"]]
      total += eqn.params["length"] * count(eqn.params["jaxpr"], consts)
    elif name == "while":
      skip = eqn.params["cond_nconsts"]
      consts = ins[skip : skip + eqn.params["body_nconsts"]]
      total += while_trips * count(eqn.params["body_jaxpr"], consts)
    elif name == "cond":
      total += max(count(b, ins[1:]) for b in eqn.params["branches"])
    elif name == "pallas_call":
      kernel = _splash_flops(eqn, ins)
      if kernel is None:  # what the kernel declares (megablox's gmm, tgmm)
        estimate = eqn.params.get("cost_estimate")
        kernel = float(getattr(estimate, "flops", 0) or 0)
      total += kernel
    else:
      total += sum(count(j) for j in _sub_jaxprs(eqn.params))
  return total, [known(v) for v in jaxpr.outvars]


# ----------------------------------------------------------------------------
# Abstract arguments on a mesh


def on_mesh(make: Callable[[], Any], mesh) -> Any:
  """``make()``'s modules (a module, an optimizer, a tuple of them) built
  abstractly, every variable a ``ShapeDtypeStruct`` placed on ``mesh`` by
  the rules: what ``sharding.place`` would make, without the memory."""
  tree = nnx.eval_shape(make)
  graphdef, state = nnx.split(tree)
  return nnx.merge(graphdef, sharding.abstract_state(state, mesh))


def _cross_tokenizer_shapes(rows, seq_len, kind: RunKind, cache_cfg):
  """What ``data.align.CrossTokenizerRows`` adds to a cross-tokenizer run's
  batch (the student's rows taken as long as the teacher's)."""
  length = (rows, seq_len)
  out: dict[str, tuple[tuple[int, ...], Any]] = {}
  if kind.mode == "online":
    out.update(
        {
            f"teacher_{name}": ((rows, seq_len + 1), jnp.int32)
            for name in ("tokens", "segment_ids", "positions")
        }
    )
  if kind.loss == "alm":
    out.update(chunk=(length, jnp.int32), chunk_valid=(length, jnp.bool_))
    if kind.mode == "online":
      out["teacher_chunk"] = (length, jnp.int32)
    else:
      out["chunk_log_probs"] = (length, jnp.float32)
    return out
  out["aligned"] = (length, jnp.bool_)
  if kind.mode == "online":
    out.update(
        teacher_position=(length, jnp.int32),
        piece_depth=(length, jnp.int32),
        piece_prefix=(length + (8,), jnp.int32),
    )
    return out
  if kind.target == "sample":
    n = kind.n or cache_cfg.num_samples
    return dict(
        out,
        ids=(length + (n,), jnp.int32),
        counts=(length + (n,), jnp.float32),
        unmapped_probs=(length + (n,), jnp.float32),
    )
  k = kind.k or cache_cfg.k
  out.update(
      ids=(length + (k,), jnp.int32),
      log_probs=(length + (k,), jnp.float32),
      unmapped_probs=(length + (k,), jnp.float32),
  )
  return out


def _cross_tokenizer_settings(config, kind: RunKind, t_vocab, s_vocab):
  """``loss_fn_for``'s cross-tokenizer keywords for a plan: the shapes of
  the real ones (which ids map is the data's: half the student's ids are
  taken as unmapped, so the ULD term is in the program)."""
  if not kind.cross_tokenizer:
    return {}
  out = {"cross_cfg": dict(config.distill.cross_tokenizer)}
  if kind.loss == "vocab_uld":
    pieces = np.full((t_vocab, 8), -1, np.int32)
    pieces[:, 0] = np.arange(t_vocab) % s_vocab
    out["pieces"] = pieces
    out["unmapped_ids"] = np.arange(s_vocab) >= s_vocab // 2
  return out


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


def batch_shapes(
    rows: int,
    seq_len: int,
    kind: RunKind | None,
    cache_cfg,
    mesh,
) -> dict[str, jax.ShapeDtypeStruct]:
  """The abstract training batch of a run of ``kind`` (None: plain rows),
  rows split over the mesh as ``sharding.put_batch`` puts them."""
  shapes: dict[str, tuple[tuple[int, ...], Any]] = {
      name: ((rows, seq_len + 1), jnp.int32)
      for name in ("tokens", "segment_ids", "positions")
  }
  target = kind.target if kind is not None and kind.reads_cache else None
  length = (rows, seq_len)
  if target is not None:
    shapes["row"] = ((rows,), jnp.int32)
  if kind is not None and kind.cross_tokenizer:
    shapes.update(_cross_tokenizer_shapes(rows, seq_len, kind, cache_cfg))
  elif target == "topk":
    k = kind.k or cache_cfg.k
    shapes.update(
        ids=(length + (k,), jnp.int32),
        log_probs=(length + (k,), jnp.float32),
        tail=(length, jnp.float32),
    )
  elif target == "topk_tail":
    k, m = cache_cfg.tail_k, kind.m or cache_cfg.tail_samples
    shapes.update(
        ids=(length + (k,), jnp.int32),
        log_probs=(length + (k,), jnp.float32),
        tail=(length, jnp.float32),
        tail_ids=(length + (m,), jnp.int32),
        tail_counts=(length + (m,), jnp.int32),
    )
  elif target == "sample":
    n = kind.n or cache_cfg.num_samples
    shapes.update(
        ids=(length + (n,), jnp.int32), counts=(length + (n,), jnp.int32)
    )
  return {
      name: jax.ShapeDtypeStruct(
          shape, dtype, sharding=sharding.batch_sharding(mesh, shape)
      )
      for name, (shape, dtype) in shapes.items()
  }


def _generated_batch(rows: int, seq_len: int, mesh) -> dict[str, Any]:
  """An on-policy step's batch (``on_policy.make_batch``'s structure)."""
  out = batch_shapes(rows, seq_len, None, None, mesh)
  shape = (rows, seq_len)
  out[on_policy.MASK] = jax.ShapeDtypeStruct(
      shape, jnp.bool_, sharding=sharding.batch_sharding(mesh, shape)
  )
  return out


def _replicated(shape, dtype, mesh) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(
      shape, dtype, sharding=jax.sharding.NamedSharding(mesh, jax.P())
  )


# ----------------------------------------------------------------------------
# The programs


@dataclasses.dataclass
class Program:
  """One compiled function of a stage with abstract arguments.

  ``fn.trace(*args, **kwargs)`` traces it; ``model_flops`` is the work the
  program must do at the least (module docstring), over the whole mesh;
  ``state_bytes`` the parameters and optimizer state it holds between calls,
  over the whole mesh.
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

  def trace(self):
    return self.fn.trace(*self.args, **self.kwargs)


def array_bytes(tree, *, per_device: bool = False) -> int:
  """Bytes of every abstract array in ``tree`` (modules in it count their
  state): whole, or with ``per_device`` one device's share by each array's
  sharding."""
  leaves = jax.tree.leaves(
      jax.tree.map(
          lambda x: nnx.state(x) if isinstance(x, nnx.Module) else x,
          tree,
          is_leaf=lambda x: isinstance(x, nnx.Module),
      )
  )
  total = 0
  for x in leaves:
    shape = x.shape
    if per_device and x.sharding is not None:
      shape = x.sharding.shard_shape(x.shape)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      itemsize = 8  # threefry: two uint32
    else:
      itemsize = jnp.dtype(x.dtype).itemsize
    total += math.prod(shape) * itemsize
  return total


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
  step_arg = _replicated((), jnp.int32, mesh)
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
    b = rows or config.data.batch_size
    out.append(
        _train_program(
            "teacher step",
            "teacher",
            make_teacher,
            loss,
            teacher_train.loop_config(config),
            batch_shapes(b, seq, None, None, mesh),
            mesh,
            model_flops_of=lambda m, b, t: 3 * forward_flops(m, b, t),
            rows_knob="data.batch_size",
        )
    )
  c = config.cache
  teacher = on_mesh(make_teacher, mesh)
  target_fn = cache_logits.make_target_fn(
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


def processes(mesh) -> int:
  """How many processes (hosts) hold the mesh's devices."""
  return len({d.process_index for d in mesh.devices.flat})


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
  teacher = None
  out = []
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
    if kind.needs_teacher and teacher is None:
      teacher = on_mesh(lambda: Teacher(t_cfg, rngs=nnx.Rngs(0)), mesh)
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
        **_cross_tokenizer_settings(config, kind, t_cfg.vocab_size, s_vocab),
    )
    frozen = (teacher,) if kind.needs_teacher else ()

    def flops_of(m, b, t, frozen=frozen):
      return 3 * forward_flops(m, b, t) + sum(
          forward_flops(f, b, t) for f in frozen
      )

    batch = (
        _generated_batch(b, seq, mesh)
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
    out.append(program)
    if policy is not None and policy.lam > 0:
      out.append(
          _generation_program(program.args[0], policy, b, seq, mesh, run)
      )
  student = on_mesh(make_student, mesh)
  if teacher is None:
    teacher = on_mesh(lambda: Teacher(t_cfg, rngs=nnx.Rngs(0)), mesh)
  out.append(_validation_program(config, student, teacher, b, mesh))
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
          _replicated((), jnp.float32, mesh),
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


# ----------------------------------------------------------------------------
# Compiling and measuring


@dataclasses.dataclass
class Measure:
  """Per device, in bytes and FLOPs, of one compiled program."""

  name: str
  arguments: int
  outputs: int
  temporaries: int
  aliased: int
  code: int
  flops: float
  xla_flops: float
  model_flops: float
  estimated_s: float | None
  compile_s: float
  rows: int
  tokens: int
  #: Why the compiler refused the program (it checks the device's memory
  #: itself on TPUs), if it did; the bytes are then its own figure for the
  #: temporaries and the arguments' shares.
  refused: str | None = None

  @property
  def peak(self) -> int:
    """Bytes the program needs on a device while it runs."""
    return (
        self.arguments
        + self.outputs
        - self.aliased
        + self.temporaries
        + self.code
    )

  def as_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "peak": self.peak}


#: What the TPU compiler says when a program's buffers exceed the chip, in
#: either of its two messages: "... required for HLO temporaries (16.49G)
#: exceeds available HBM ..." or "CompileTimeHbmOom ... Program hbm
#: requirement 14.78G: ..." (temporaries, scoped memory and overlays).
_OUT_OF_MEMORY = re.compile(
    r"(?:HLO temporaries \(|Program hbm requirement )([0-9.]+)([KMGT])"
)


def measure(program: Program, mesh) -> Measure:
  """Compiles ``program`` for ``mesh``'s devices and reads its analyses.

  A program the compiler refuses for want of memory (the TPU compiler
  checks the chip's HBM itself) is measured from its message: its
  temporaries, and the arguments' shares of one device.
  """
  start = time.perf_counter()
  with sharding.use(mesh):
    traced = program.trace()
    try:
      compiled = traced.lower().compile()
      refused = None
    except jax.errors.JaxRuntimeError as e:
      found = _OUT_OF_MEMORY.search(str(e))
      if "RESOURCE_EXHAUSTED" not in str(e) or found is None:
        raise
      compiled, refused = None, str(e).strip().splitlines()[0]
  seconds = time.perf_counter() - start
  # An nnx.jit's Traced wraps jax's.
  jaxpr = getattr(traced, "traced", traced).jaxpr
  counted = matmul_flops(jaxpr, program.while_trips) / mesh.size
  common = dict(
      name=program.name,
      flops=counted,
      model_flops=program.model_flops / mesh.size,
      compile_s=seconds,
      rows=program.rows,
      tokens=program.tokens,
  )
  if compiled is None:
    scale = 1024 ** ("KMGT".index(found.group(2)) + 1)
    return Measure(
        arguments=array_bytes(program.args, per_device=True),
        outputs=0,
        temporaries=int(float(found.group(1)) * scale),
        aliased=0,
        code=0,
        xla_flops=float("nan"),
        estimated_s=None,
        refused=refused,
        **common,
    )
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  estimated = cost.get("optimal_seconds")
  return Measure(
      arguments=int(memory.argument_size_in_bytes),
      outputs=int(memory.output_size_in_bytes),
      temporaries=int(memory.temp_size_in_bytes),
      aliased=int(memory.alias_size_in_bytes),
      code=int(memory.generated_code_size_in_bytes),
      xla_flops=float(cost.get("flops", float("nan"))),
      estimated_s=float(estimated) if estimated and estimated > 0 else None,
      **common,
  )
