"""Abstract arguments on a mesh: modules, batches and their bytes.

What a stage's jitted function takes, as ``ShapeDtypeStruct``s placed on a
mesh by the sharding rules (``distill.core.sharding``): nothing allocated,
so the mesh's devices may be a TPU slice this host does not have.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distill import on_policy
from distill.core import sharding
from distill.runs import RunKind


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


def cross_tokenizer_settings(config, kind: RunKind, t_vocab, s_vocab):
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


def generated_batch(rows: int, seq_len: int, mesh) -> dict[str, Any]:
  """An on-policy step's batch (``on_policy.make_batch``'s structure)."""
  out = batch_shapes(rows, seq_len, None, None, mesh)
  shape = (rows, seq_len)
  out[on_policy.MASK] = jax.ShapeDtypeStruct(
      shape, jnp.bool_, sharding=sharding.batch_sharding(mesh, shape)
  )
  return out


def replicated(shape, dtype, mesh) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(
      shape, dtype, sharding=jax.sharding.NamedSharding(mesh, jax.P())
  )


def processes(mesh) -> int:
  """How many processes (hosts) hold the mesh's devices."""
  return len({d.process_index for d in mesh.devices.flat})


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
