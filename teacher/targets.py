"""The teacher's k-sparse targets of a batch, made on the device.

``make_target_fn`` returns the jitted function the cache pass runs on each
batch: the teacher's forward pass, then per position the targets of every
method of ``config.cache.methods`` (top-k log-probs and tail mass, sampled
ids and counts, a top-k head with draws outside it, the labels'
log-probs), over ``config.cache.position_chunk`` positions at a time so
that no [rows, T, V] array of logits need be whole. A row's draws come from
a key of the seed and the row's index alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from data import sparse_targets
from distill.core import sharding


def _draws(key, length, *, methods, num_samples, tail_samples):
  """One row's uniforms, [1, length, n] per sampling method, drawn as one
  pass over the whole row draws them (``sparse_targets.sample_targets``)."""
  out = {}
  if "sample" in methods:
    out["sample"] = jax.random.uniform(key, (1, length, num_samples))
  if "topk_tail" in methods:
    out["topk_tail"] = jax.random.uniform(
        jax.random.fold_in(key, 1), (1, length, tail_samples)
    )
  return out


def _row_targets(
    logits, uniforms, *, methods, k, temperature, stratified, tail_k
):
  """The targets of one row's positions: logits [C, V] and their uniforms
  ([1, C, n] per method; the labels [1, C, 1] as "label") -> {name: [C,
  ...]}."""
  log_probs = jax.nn.log_softmax(
      logits[None].astype(jnp.float32) / temperature, axis=-1
  )
  out = {}
  if "label" in methods:  # at temperature 1: the same softmax when T = 1
    natural = (
        log_probs[0]
        if temperature == 1.0
        else jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    )
    labels = uniforms["label"][0]  # [C, 1]
    out["label_log_probs"] = jnp.take_along_axis(natural, labels, -1).T
  if "topk" in methods:
    out["topk_ids"], out["topk_log_probs"], out["topk_tail"] = (
        sparse_targets.topk_targets(log_probs, k)
    )
  if "sample" in methods:
    out["sample_ids"], out["sample_counts"] = sparse_targets.sample_targets_at(
        uniforms["sample"], log_probs, stratified
    )
  if "topk_tail" in methods:
    names = ("ids", "log_probs", "tail", "sample_ids", "sample_counts")
    made = sparse_targets.topk_tail_targets_at(
        uniforms["topk_tail"], log_probs, tail_k, stratified
    )
    out.update({f"tt_{n}": v for n, v in zip(names, made)})
  return {name: value[0] for name, value in out.items()}


def make_target_fn(
    methods,
    k: int,
    num_samples: int,
    temperature: float,
    stratified: bool,
    tail_k: int = 0,
    tail_samples: int = 0,
    position_chunk: int = 0,
):
  """Jitted ``(teacher, tokens, segment_ids, positions, base_key, row_ids,
  labels=None) -> targets``: the one teacher pass over a batch of rows [B,
  L] (``labels`` [B, L], the next tokens, for the ``label`` method).

  Row ``r`` draws its sample with ``fold_in(base_key, row_ids[r])`` (its
  index among the train rows) and, for ``topk_tail`` (a top-``tail_k`` head
  and ``tail_samples`` draws from the rest), its tail draws with that key
  folded with 1.

  The teacher's blocks run once over the whole rows; its output layer, the
  softmax and the targets then run over ``position_chunk`` positions at a
  time (0: the whole row), so no [B, L, V] array of logits is whole: at a
  real vocabulary (V = 151,936) one row of 8,192 positions is 5 GB of
  float32 logits. Each position's draws are the slice of its row's, so the
  targets do not depend on the chunk. On the CPU the targets are made a row
  at a time, where a row's [L, V] log-probs stay in cache (demo teacher,
  32 x 128 tokens, V = 8192, 2 cores: 0.22 s over the forward pass against
  0.38 s for the whole batch at once), elsewhere for the whole batch.
  """

  draws = functools.partial(
      _draws,
      methods=methods,
      num_samples=num_samples,
      tail_samples=tail_samples,
  )
  row_targets = functools.partial(
      _row_targets,
      methods=methods,
      k=k,
      temperature=temperature,
      stratified=stratified,
      tail_k=tail_k,
  )

  def local_targets(logits, uniforms):  # this device's rows, whole vocab
    one_row_at_a_time = sharding.platform() == "cpu"
    return jax.lax.map(
        lambda args: row_targets(*args),
        (logits, uniforms),
        batch_size=None if one_row_at_a_time else logits.shape[0],
    )

  def chunk_targets(teacher, hidden, uniforms):  # [B, C, D] -> targets
    logits = teacher.logits_from_hidden(hidden)
    mesh = sharding.current()
    if mesh is None:
      return local_targets(logits, uniforms)
    # Each device makes the targets of its own rows (the vocab, split over
    # ``tensor`` in the logits, gathered per row).
    rows_spec = sharding.spec(("batch",), logits.shape[:1], mesh)
    return jax.shard_map(
        local_targets,
        mesh=mesh,
        in_specs=(
            PartitionSpec(*rows_spec, None, None),
            PartitionSpec(*rows_spec, None, None, None),
        ),
        out_specs=PartitionSpec(*rows_spec),
        check_vma=False,
    )(logits, uniforms)

  # Read-only: no copy of the teacher comes out (graph_updates=False).
  @functools.partial(nnx.jit, graph_updates=False)
  def targets(
      teacher, tokens, segment_ids, positions, base_key, row_ids, labels=None
  ):
    hidden, _ = teacher.hidden(tokens, segment_ids, positions)
    length = tokens.shape[1]
    keys = jax.vmap(lambda row: jax.random.fold_in(base_key, row))(row_ids)
    uniforms = jax.vmap(lambda key: draws(key, length))(keys)
    if "label" in methods:  # split by position like the uniforms
      uniforms["label"] = labels[:, None, :, None]
    chunk = min(position_chunk or length, length)
    if chunk == length:
      return chunk_targets(teacher, hidden, uniforms)
    graphdef, state = nnx.split(teacher)
    return _by_position_chunks(
        lambda h, u: chunk_targets(nnx.merge(graphdef, state), h, u),
        hidden,
        uniforms,
        chunk,
    )

  return targets


def _by_position_chunks(fn, hidden, uniforms, chunk: int):
  """``fn(hidden [B, C, D], uniforms [B, ..., C, ...]) -> targets [B, C,
  ...]`` over ``chunk`` positions at a time (``lax.map``), joined back to
  [B, L, ...]: [B, L, ...] -> [chunks, B, C, ...], the last chunk padded;
  then back. uniforms' position axis is 2 (after the row and the draw)."""
  rows, length = hidden.shape[:2]
  count = -(-length // chunk)

  def split(x, axis):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, count * chunk - length)
    x = jnp.pad(x, pad)
    x = x.reshape(*x.shape[:axis], count, chunk, *x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)

  made = jax.lax.map(
      lambda args: fn(*args),
      (split(hidden, 1), jax.tree.map(lambda u: split(u, 2), uniforms)),
  )
  return jax.tree.map(
      lambda x: jnp.moveaxis(x, 0, 1).reshape(
          rows, count * chunk, *x.shape[3:]
      )[:, :length],
      made,
  )
