"""Sparse mixture-of-experts FFN: softmax router, top-k, dropless dispatch.

Per token x [D]: router logits (float32) -> softmax over the E experts -> the
top_k experts and their probabilities (optionally renormalised to sum to 1) ->
y = sum_j w_j * down_e(silu(gate_e(x)) * up_e(x)), plus an optional shared
expert scaled by sigmoid(x . w_shared_gate) (Qwen2-MoE).

Dispatch (dropless, the default): the N tokens of a batch are flattened, their
N * k (token, slot) assignments sorted by expert (stable, so within an expert
earlier tokens come first), the three expert matmuls run as one grouped matmul
per weight over the sorted rows, and the rows are unsorted and combined with
their router weights. The grouped matmul (``IMPLS``) is `jax.lax.ragged_dot`
("ragged"), `tokamax.ragged_dot` ("tokamax": its GPU kernels, an optional
dependency), megablox's ``gmm`` ("megablox": jax's Pallas TPU kernel, run
by the Pallas interpreter off TPUs, for its numerics), or the "blocked"
form, which pads every group to a multiple of a row block and runs a
batched matmul against each block's expert weights (on
the CPU, XLA lowers ragged_dot to a dense matmul over a [E, M, D] masked copy
of the rows, E times the work; on an H100 blocked measured 3.4x faster than
ragged_dot). All compute the same function; "auto" picks per backend. On a
device mesh the dispatch runs expert parallel (``expert_parallel``: each
device its own experts, the routed tokens all-gathered along the ``expert``
axis).

With a capacity factor cf, each expert takes at most
C = ceil(cf * N * k / E) assignments (earliest tokens first in the flattened
[B, T] order); the rest are dropped (weight 0; the residual stream carries the
token on) and the dropped fraction is reported. Capacity dispatch writes rows
into a static [E, C, D] buffer and uses a batched matmul.

Aux statistics are over real tokens only (mask False / segment id 0 = padding):
  load_balancing_loss = E * sum_e f_e * P_e, where f_e is the fraction of the
    real (token, slot) assignments routed to e (sums to 1 over e) and P_e the
    mean router probability of e. Perfect balance (f_e = P_e = 1 / E, e.g. a
    uniform router) gives 1.0; full collapse onto one expert gives E. (1.0 is
    the minimum when f = P, Switch's argument; with hard top-k counts an odd
    routing can dip slightly below it, e.g. ties sent to one expert.)
    transformers' `load_balancing_loss_func` divides the counts by tokens, not
    assignments, so its value is top_k times this one.
  z_loss = mean over tokens of logsumexp(router logits)^2 (ST-MoE).
  expert_load [E] = routed assignments per expert (before capacity drops).
  dropped_fraction = dropped real assignments / real assignments.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox_ops
from jax.sharding import PartitionSpec

from distill.core import sharding
from distill.core.errors import ConfigError
from distill.nn import layers

Array = jax.Array


def expert_capacity(
    capacity_factor: float, num_tokens: int, top_k: int, num_experts: int
) -> int:
  """Per-expert capacity ceil(cf * tokens * k / E), at least 1."""
  return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def route(
    logits: Array, top_k: int, norm_topk_prob: bool
) -> tuple[Array, Array, Array]:
  """Softmax-then-top-k routing.

  Args:
    logits: [N, E] router logits (float32).
  Returns:
    probs [N, E], weights [N, k] (float32), experts [N, k] int32.
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, experts = jax.lax.top_k(probs, top_k)
  if norm_topk_prob:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return probs, weights, experts.astype(jnp.int32)


def router_stats(
    logits: Array, probs: Array, experts: Array, valid: Array
) -> dict[str, Array]:
  """Load-balancing loss, z-loss and expert load over the valid tokens.

  Args:
    logits, probs: [N, E]; experts: [N, k] int32; valid: [N] bool.
  """
  num_experts = probs.shape[-1]
  top_k = experts.shape[-1]
  v = valid.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(v), 1.0)
  load = (
      jnp.zeros((num_experts,), jnp.float32)
      .at[experts.reshape(-1)]
      .add(jnp.repeat(v, top_k))
  )
  f = load / (n * top_k)
  p = jnp.sum(probs * v[:, None], axis=0) / n
  z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return {
      "load_balancing_loss": num_experts * jnp.sum(f * p),
      "z_loss": jnp.sum(v * z * z) / n,
      "expert_load": load,
  }


#: Grouped-matmul choices of the dropless path; "auto" picks per backend.
IMPLS = ("auto", "ragged", "tokamax", "megablox", "blocked")


def _block_rows(num_rows: int, num_experts: int) -> int:
  """Row block of the blocked grouped matmul: padding stays under ~25%."""
  target = max(1, num_rows // (4 * num_experts))
  return int(min(512, max(8, 1 << (target.bit_length() - 1))))


def _experts_ragged(
    xs, group_sizes, w_gate, w_up, w_down, dot=jax.lax.ragged_dot
):
  """Gated experts on expert-sorted rows xs [M, D] with a grouped matmul
  ``dot(lhs [M, K], rhs [E, K, N], group_sizes [E]) -> [M, N]``."""
  h = jax.nn.silu(dot(xs, w_gate, group_sizes))
  h = h * dot(xs, w_up, group_sizes)
  return dot(h, w_down, group_sizes)


def _tokamax_ragged_dot():
  """tokamax.ragged_dot (its GPU kernels; XLA elsewhere), an optional
  dependency: the cuda and test extras install it."""
  try:
    import tokamax  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ConfigError(
        "moe_impl='tokamax' needs the tokamax package: pip install -e"
        " '.[cuda]' (or pip install tokamax)"
    ) from None
  # tokamax reads its absl flags and, when nobody has parsed flags (a
  # library caller, a test runner), parses sys.argv itself, which fails on
  # any other program's arguments: take the defaults instead.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return tokamax.ragged_dot


def _tile(size: int) -> int:
  """A megablox tile of a dimension: 128 (a TPU lane's width) where it
  divides the dimension, else the whole dimension in one tile (what a TPU's
  block shapes allow)."""
  return 128 if size % 128 == 0 else size


def _megablox_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
  """The tiles of each of megablox's calls, by its own (m, k, n): the
  backward's calls contract other dimensions than the forward's."""
  return _tile(m), _tile(k), _tile(n)


def megablox_dot(lhs, rhs, group_sizes):
  """``lax.ragged_dot``'s grouped matmul by megablox's ``gmm`` (its Pallas
  TPU kernel, with its own backward: ``gmm`` for the rows, ``tgmm`` for the
  weights), in the Pallas interpreter where the mesh's devices are not
  TPUs. Rows past the groups are not defined (``dispatch`` zeroes them);
  their gradients are 0 (the kernel's backward leaves them unwritten: the
  select before it drops them)."""
  m = lhs.shape[0]
  # The rows padded (past the groups) to whole row tiles: a multiple of 128,
  # or under 128 rows a multiple of 8 (a TPU sublane) in one tile.
  rows = -(-m // 128) * 128 if m >= 128 else -(-m // 8) * 8
  in_groups = jnp.arange(rows) < jnp.sum(group_sizes)
  lhs = jnp.pad(lhs, ((0, rows - m), (0, 0)))
  lhs = jnp.where(in_groups[:, None], lhs, jnp.zeros((), lhs.dtype))
  out = megablox_ops.gmm(
      lhs,
      rhs,
      group_sizes,
      jnp.result_type(lhs, rhs),
      _megablox_tiling,
      None,
      None,
      False,
      sharding.platform() != "tpu",
  )
  return out[:m]


def _experts_blocked(xs, sorted_experts, group_sizes, w_gate, w_up, w_down):
  """Same as _experts_ragged, by padding each group to whole row blocks.

  Rows whose expert is ``E`` (another shard's, sorted last) are not computed
  and come out 0.
  """
  m, d = xs.shape
  e = w_gate.shape[0]
  b = _block_rows(m, e)
  num_blocks = -(-(m + e * (b - 1)) // b)
  padded = -(-group_sizes // b) * b
  padded_end = jnp.cumsum(padded)
  padded_start = padded_end - padded
  start = jnp.cumsum(group_sizes) - group_sizes
  mine = sorted_experts < e
  se = jnp.minimum(sorted_experts, e - 1)
  rank = jnp.arange(m, dtype=jnp.int32) - start[se]
  # Rows of other shards go past the end: dropped on write, 0 on read.
  dest = jnp.where(mine, padded_start[se] + rank, num_blocks * b)  # [M]
  xp = (
      jnp.zeros((num_blocks * b, d), xs.dtype)
      .at[dest]
      .set(xs, mode="drop")
      .reshape(num_blocks, b, d)
  )
  block_expert = jnp.searchsorted(
      padded_end, jnp.arange(num_blocks, dtype=jnp.int32) * b, side="right"
  )
  block_expert = jnp.minimum(block_expert, e - 1)  # [NB]
  h = jax.nn.silu(jnp.einsum("nbd,ndf->nbf", xp, w_gate[block_expert]))
  h = h * jnp.einsum("nbd,ndf->nbf", xp, w_up[block_expert])
  y = jnp.einsum("nbf,nfd->nbd", h, w_down[block_expert])
  return y.reshape(num_blocks * b, d).at[dest].get(mode="fill", fill_value=0)


def dispatch(
    x: Array,
    weights: Array,
    experts: Array,
    w_gate: Array,
    w_up: Array,
    w_down: Array,
    *,
    valid: Array | None = None,
    capacity: int | None = None,
    impl: str = "ragged",
    first_expert: Array | int = 0,
    out_dtype=None,
) -> tuple[Array, Array]:
  """Runs every token through its experts and combines the outputs.

  With expert parallelism the weights are one shard's experts ``first_expert
  ... first_expert + E - 1``: assignments to other experts contribute 0 here
  (they are sorted last and not computed) and count as kept.

  Args:
    x: [N, D] tokens.
    weights: [N, k] router weights; experts: [N, k] int32 expert ids.
    w_gate, w_up: [E, D, F]; w_down: [E, F, D].
    valid: [N] bool, False for padding (only used with a capacity: padding
      takes no capacity and its outputs are zero).
    capacity: None = dropless; else rows per expert, overflow dropped.
    impl: the dropless path's grouped matmul: "ragged" (lax.ragged_dot),
      "tokamax" (tokamax.ragged_dot), "megablox" (``megablox_dot``) or
      "blocked" (batched matmuls over groups padded to row blocks).
  Returns:
    y [N, D] in ``out_dtype`` (default x.dtype), kept [N, k] bool (False =
    dropped assignment).
  """
  n, d = x.shape
  k = experts.shape[-1]
  e = w_gate.shape[0]
  flat = experts.reshape(-1) - first_expert  # [M]
  mine = (flat >= 0) & (flat < e)
  flat = jnp.where(mine, flat, e)  # other shards' experts last
  if capacity is not None and valid is not None:
    flat = jnp.where(jnp.repeat(valid, k), flat, e)  # padding last
  order = jnp.argsort(flat, stable=True)
  sorted_experts = flat[order]
  xs = x[order // k]  # [M, D]
  group_sizes = jnp.bincount(flat, length=e + 1).astype(jnp.int32)
  if capacity is None:
    gs = group_sizes[:e]
    if impl in ("ragged", "tokamax", "megablox"):
      dot = {
          "ragged": lambda: jax.lax.ragged_dot,
          "tokamax": _tokamax_ragged_dot,
          "megablox": lambda: megablox_dot,
      }[impl]()
      ys = _experts_ragged(xs, gs, w_gate, w_up, w_down, dot)
      # Rows past the groups (other shards' experts) are not defined: 0.
      ys = jnp.where((sorted_experts < e)[:, None], ys, 0)
    elif impl == "blocked":
      ys = _experts_blocked(xs, sorted_experts, gs, w_gate, w_up, w_down)
    else:
      raise ValueError(f"unknown MoE impl {impl!r}; use one of {IMPLS[1:]}")
    kept_sorted = jnp.ones_like(flat, dtype=bool)
  else:
    start = jnp.cumsum(group_sizes) - group_sizes
    rank = jnp.arange(n * k, dtype=jnp.int32) - start[sorted_experts]
    kept_sorted = (rank < capacity) & (sorted_experts < e)
    slot = jnp.where(
        kept_sorted, sorted_experts * capacity + rank, e * capacity
    )
    buf = jnp.zeros((e * capacity + 1, d), x.dtype).at[slot].set(xs)
    buf = buf[:-1].reshape(e, capacity, d)
    h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", buf, w_gate))
    h = h * jnp.einsum("ecd,edf->ecf", buf, w_up)
    y = jnp.einsum("ecf,efd->ecd", h, w_down).reshape(e * capacity, d)
    ys = jnp.where(
        kept_sorted[:, None], y[jnp.minimum(slot, e * capacity - 1)], 0
    )
  inverse = (
      jnp.zeros_like(order)
      .at[order]
      .set(jnp.arange(n * k, dtype=order.dtype), unique_indices=True)
  )
  y = ys[inverse].reshape(n, k, d).astype(jnp.float32)
  kept = kept_sorted[inverse].reshape(n, k)
  w = jnp.where(kept & mine.reshape(n, k), weights, 0.0).astype(jnp.float32)
  kept = kept | ~mine.reshape(n, k)
  y = jnp.einsum("nkd,nk->nd", y, w)
  return y.astype(x.dtype if out_dtype is None else out_dtype), kept


def expert_parallel(
    x: Array,
    weights: Array,
    experts: Array,
    w_gate: Array,
    w_up: Array,
    w_down: Array,
    *,
    valid: Array,
    capacity: int | None,
    impl: str,
) -> tuple[Array, Array]:
  """``dispatch`` on the active mesh (``distill.core.sharding.use``).

  Expert parallelism by an all-gather of the routed tokens: inside a
  ``shard_map`` each device holds E / expert of the experts (and F / tensor of
  their hidden units); the tokens of the devices along the ``expert`` axis
  are all-gathered, each device runs them through its own experts (dropless:
  assignments to other experts are skipped), and the partial outputs are
  summed back onto the tokens' devices (``psum_scatter`` over ``expert``,
  ``psum`` over ``tensor``). An all-gather rather than an all-to-all because a
  dropless dispatch does not know in advance how many tokens each expert
  gets: the all-to-all would need a static per-expert buffer (a capacity,
  which drops tokens) or a ragged all-to-all the CPU backend lacks; the gather
  keeps every shape static and the result exact. Each device dispatches its
  own tokens locally (its sort spans only its rows), so data parallel meshes
  never sort the global batch.

  With a capacity factor the tokens are gathered whole first, so that which
  assignments overflow is decided over the whole batch exactly as on one
  device. An expert count the ``expert`` axis does not divide is padded with
  experts no token is routed to. Outside a mesh this is ``dispatch``.
  """
  run = functools.partial(dispatch, capacity=capacity, impl=impl)
  mesh = sharding.current()
  if mesh is None:
    return run(x, weights, experts, w_gate, w_up, w_down, valid=valid)
  e = w_gate.shape[0]
  ep = mesh.shape["expert"]
  if e % ep:  # Padding experts: never routed to, so they compute nothing.
    pad = ((0, ep - e % ep), (0, 0), (0, 0))
    w_gate, w_up, w_down = (jnp.pad(w, pad) for w in (w_gate, w_up, w_down))
  in_spec = sharding.spec(("experts", None, "mlp"), w_gate.shape, mesh)
  out_spec = sharding.spec(("experts", "mlp", None), w_down.shape, mesh)
  e_axes = sharding.axes_of(in_spec[0])
  f_axes = sharding.axes_of(in_spec[2])
  if capacity is None:
    tok = sharding.spec(("batch", None), x.shape, mesh)
  else:
    tok = PartitionSpec(None, None)
  tok_axes = sharding.axes_of(tok[0])
  gather = tuple(a for a in e_axes if a in tok_axes)
  e_local = w_gate.shape[0] // math.prod(mesh.shape[a] for a in e_axes)
  vec = PartitionSpec(tok[0])

  def local(x, weights, experts, valid, w_gate, w_up, w_down):
    if gather:
      x, weights, experts, valid = (
          jax.lax.all_gather(a, gather, axis=0, tiled=True)
          for a in (x, weights, experts, valid)
      )
    first = 0
    if e_axes:
      first = jax.lax.axis_index(e_axes) * e_local
    y, kept = run(
        x,
        weights,
        experts,
        w_gate,
        w_up,
        w_down,
        valid=valid,
        first_expert=first,
        out_dtype=jnp.float32,  # partial sums added in float32
    )
    if f_axes:
      y = jax.lax.psum(y, f_axes)
    if gather:
      y = jax.lax.psum_scatter(y, gather, scatter_dimension=0, tiled=True)
      kept = jnp.ones(y.shape[:1] + kept.shape[1:], bool)  # dropless
    elif e_axes:
      y = jax.lax.psum(y, e_axes)
      kept = jax.lax.pmin(kept.astype(jnp.int32), e_axes).astype(bool)
    return y.astype(x.dtype), kept

  y, kept = jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(tok, tok, tok, vec, in_spec, in_spec, out_spec),
      out_specs=(tok, tok),
      check_vma=False,
  )(x, weights, experts, valid, w_gate, w_up, w_down)
  return y, kept


class MoE(nnx.Module):
  """MoE FFN: [B, T, D] -> ([B, T, D], aux dict). See the module docstring."""

  def __init__(
      self,
      d_model: int,
      d_ff: int,
      num_experts: int,
      top_k: int,
      *,
      rngs: nnx.Rngs,
      norm_topk_prob: bool = True,
      shared_expert_d_ff: int = 0,
      capacity_factor: float | None = None,
      impl: str = "auto",
      dtype=jnp.float32,
      param_dtype=jnp.float32,
  ):
    if impl not in IMPLS:
      raise ValueError(f"unknown MoE impl {impl!r}; use one of {IMPLS}")
    self.num_experts, self.top_k = num_experts, top_k
    self.norm_topk_prob = norm_topk_prob
    self.capacity_factor = capacity_factor
    self.impl = impl
    self.dtype = jnp.dtype(dtype)
    param_dtype = jnp.dtype(param_dtype)
    e, d, f = num_experts, d_model, d_ff
    # Fan-in scaling as in distill.nn.layers.Einsum; axis 0 of experts is a batch.
    init = nnx.initializers.variance_scaling(
        1.0,
        "fan_in",
        "truncated_normal",
        in_axis=-2,
        out_axis=-1,
        batch_axis=(0,),
    )
    self.router = layers.param(
        nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")(
            rngs.params(), (d, e), param_dtype
        ),
        "embed",
        None,
    )
    expert_in, expert_out = ("experts", "embed", "mlp"), (
        "experts",
        "mlp",
        "embed",
    )
    self.gate = layers.param(
        init(rngs.params(), (e, d, f), param_dtype), *expert_in
    )
    self.up = layers.param(
        init(rngs.params(), (e, d, f), param_dtype), *expert_in
    )
    self.down = layers.param(
        init(rngs.params(), (e, f, d), param_dtype), *expert_out
    )
    if shared_expert_d_ff:
      self.shared_expert = layers.MLP(
          d, shared_expert_d_ff, rngs=rngs, dtype=dtype, param_dtype=param_dtype
      )
      self.shared_expert_gate = layers.Einsum(
          "...D,DO->...O",
          (d, 1),
          in_axes=(0,),
          axes=("embed", None),
          rngs=rngs,
          dtype=dtype,
          param_dtype=param_dtype,
      )
    else:
      self.shared_expert = self.shared_expert_gate = None

  def resolved_impl(self) -> str:
    """The grouped matmul this layer runs: ``impl``, or auto's choice."""
    if self.impl != "auto":
      return self.impl
    # Chosen by measurement, experts' fwd+bwd of 16k tokens, top-2 of 16,
    # D=768, F=1024: on one H100 "blocked" 4.8 ms, "ragged" 16.3 ms; on the
    # CPU, XLA lowers ragged_dot to a dense masked matmul (E times the
    # work). On TPUs, by the compiled program (not timed: no TPU here): a
    # Qwen3-30B-A3B layer's fwd+bwd of 8,192 tokens on one v5p chip needs
    # 0.36 GiB of temporaries and 1.87 TFLOPs by XLA's count with megablox,
    # 1.31 GiB and 80.5 TFLOPs (every expert's) with ragged_dot
    # (experiments/plan_moe.py).
    return "megablox" if sharding.platform() == "tpu" else "blocked"

  def __call__(
      self, x: Array, mask: Array | None = None
  ) -> tuple[Array, dict[str, Array]]:
    """x: [B, T, D]; mask: [B, T] bool, False = padding (None = all real).

    Returns y [B, T, D] and aux: load_balancing_loss, z_loss (scalars),
    expert_load [E], dropped_fraction (scalar).
    """
    b, t, d = x.shape
    n = b * t
    xf = x.reshape(n, d).astype(self.dtype)
    valid = (
        jnp.ones((n,), bool) if mask is None else mask.reshape(n).astype(bool)
    )
    logits = xf.astype(jnp.float32) @ self.router[...].astype(jnp.float32)
    probs, weights, experts = route(logits, self.top_k, self.norm_topk_prob)
    capacity = None
    if self.capacity_factor is not None:
      capacity = expert_capacity(
          self.capacity_factor, n, self.top_k, self.num_experts
      )
    wg, wu, wd = (
        w[...].astype(self.dtype) for w in (self.gate, self.up, self.down)
    )
    y, kept = expert_parallel(
        xf,
        weights,
        experts,
        wg,
        wu,
        wd,
        valid=valid,
        capacity=capacity,
        impl=self.resolved_impl(),
    )
    if self.shared_expert is not None:
      y = y + jax.nn.sigmoid(self.shared_expert_gate(xf)) * self.shared_expert(
          xf
      )
    aux = router_stats(logits, probs, experts, valid)
    real = jnp.repeat(valid, self.top_k).reshape(n, self.top_k)
    aux["dropped_fraction"] = (
        jnp.sum(real & ~kept) / jnp.maximum(jnp.sum(real), 1)
    ).astype(jnp.float32)
    return y.reshape(b, t, d).astype(x.dtype), aux
