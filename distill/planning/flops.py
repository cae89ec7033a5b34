"""FLOPs: what a model must compute, and what a traced program does.

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

import json
import math
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from distill.nn import attention
from teacher import config as teacher_config


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
      # jax 0.11's scan names no consts (its body closes over them).
      consts = ins[: eqn.params.get("num_consts", 0)]
      total += eqn.params["length"] * count(eqn.params["jaxpr"], consts)
    elif name == "while":
      skip = eqn.params.get("cond_nconsts", 0)
      consts = ins[skip : skip + eqn.params.get("body_nconsts", 0)]
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
