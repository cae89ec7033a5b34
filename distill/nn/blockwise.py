"""Blockwise (flash-style) attention of a whole sequence in plain JAX.

The XLA path of ``distill.nn.attention.self_attention`` for rows longer than
one tile: the row is cut into tiles of ``block`` queries and keys, and only
the (query tile, key tile) pairs the causal or window mask leaves visible are
computed, with an online softmax (a running maximum and sum per query), so
no [T, T] score matrix ever exists. The backward pass recomputes each
pair's scores from the saved log-sum-exp (``jax.custom_vjp``) instead of
storing probabilities. Work and memory therefore follow the mask:

  local layer (window W):  O(T x (W + block)) work, O(T x block) memory;
  global layer:            O(T^2 / 2) work,     O(T x block) memory.

The visible pairs are walked in *steps*; each step computes one pair per
*lane* for all lanes at once (one batched matmul), and no two lanes of a
step write the same query tile. Two schedules (``schedule``):

  band    lane i is query tile i, and step d pairs it with key tile i - d
          (d = 0 .. span, span = ceil((W - 1) / block)): C x (span + 1)
          pairs for C tiles (key tiles before the row are masked).
  zigzag  for a global layer: lane l owns query tiles l and C - 1 - l, whose
          l + 1 and C - l visible key tiles make C + 1 steps for every lane,
          so C (C + 1) / 2 pairs, the causal triangle and nothing more.

Either way the steps run in a ``lax.scan``, so one step's temporaries
([B, lanes, heads, block, block] scores) live at a time.

Masks are the ones ``attention_mask`` describes: causal, the window
``q - k < W``, and equal segment ids (0 = padding, which sees padding); the
tail that pads the row to whole tiles is in every real token's future.
Scores and the softmax are float32; the products take the inputs' dtype,
as ``attend`` does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

#: Largest query and key tile.
BLOCK = 512
#: Smallest tile a local layer's window picks (``block_for``).
MIN_BLOCK = 64
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def block_for(window: int | None) -> int:
  """The tile of a layer: ``BLOCK`` for a global one; for a local one the
  largest power of two at most half the window, within [MIN_BLOCK, BLOCK],
  so a query tile reads about ``window + block`` keys, not twice the
  window."""
  block = MIN_BLOCK
  limit = BLOCK if window is None else min(window // 2, BLOCK)
  while block * 2 <= limit:
    block *= 2
  return block


def schedule(
    count: int, window: int | None, block: int
) -> tuple[np.ndarray, np.ndarray, int]:
  """The (query tile, key tile) pairs of a row of ``count`` tiles, by step.

  -> (q_tiles [steps, lanes], k_tiles [steps, lanes], tiles): the cheaper of
  the band and zigzag schedules (module docstring). A band key tile < 0 is
  before the row (masked); zigzag pads an odd ``count`` with one tile of
  padding, so ``tiles`` is what the row is padded to.
  """
  span = count - 1
  if window is not None:
    span = min(span, -(-(window - 1) // block))
  even = count + count % 2
  if count * (span + 1) <= (even // 2) * (even + 1):
    q_tiles = np.tile(np.arange(count), (span + 1, 1))
    return q_tiles, q_tiles - np.arange(span + 1)[:, None], count
  lanes = np.arange(even // 2)
  step = np.arange(even + 1)[:, None]
  first = step <= lanes  # lane l's first query tile: key tiles 0 .. l
  q_tiles = np.where(first, lanes, even - 1 - lanes)
  k_tiles = np.where(first, step, step - lanes - 1)
  return q_tiles, k_tiles, even


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    window: int | None,
    scale: float,
    block: int | None = None,
) -> jax.Array:
  """Causal (optionally windowed) grouped-query attention, blockwise.

  Query head n reads key/value head ``n // G``; the mask is
  ``attention_mask``'s. Same values and gradients as ``attend`` within
  floating-point rounding.

  q [B, T, N, H], k/v [B, T, K, H], segment_ids [B, T] (0 = padding)
  -> [B, T, N, H] in v's dtype. ``block``: the tile (default ``block_for``).
  """
  if q.shape[2] % k.shape[2]:
    raise ValueError(
        f"{q.shape[2]} query heads do not group over {k.shape[2]} kv heads"
    )
  block = block_for(window) if block is None else block
  return _flash(q, k, v, segment_ids, window, float(scale), block)


class _Tiles:
  """A row cut into tiles, and what a step reads and writes of them.

  Arrays are [B, C, block, ...] (C tiles). ``band`` steps read lane i's
  own query tile and key tile i - d (the row shifted by d tiles, d the
  step); zigzag steps gather both by index.
  """

  def __init__(self, length: int, window: int | None, block: int):
    count = -(-length // block)
    self.q_tiles, self.k_tiles, self.count = schedule(count, window, block)
    self.band = self.q_tiles.shape[1] == self.count and np.array_equal(
        self.q_tiles[0], np.arange(self.count)
    )
    self.length, self.window, self.block = length, window, block

  def cut(self, x: jax.Array) -> jax.Array:
    """[B, T, ...] -> [B, C, block, ...], the tail padded with zeros."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, self.count * self.block - self.length)
    x = jnp.pad(x, pad)
    return x.reshape(x.shape[0], self.count, self.block, *x.shape[2:])

  def join(self, x: jax.Array) -> jax.Array:
    """[B, C, block, ...] -> [B, T, ...]."""
    x = x.reshape(x.shape[0], self.count * self.block, *x.shape[3:])
    return x[:, : self.length]

  def read_q(self, x, q_tiles):
    return x if self.band else jnp.take(x, q_tiles, axis=1)

  def read_k(self, x, k_tiles, shift):
    """Each lane's key tile: tile i - shift (band; zeros before the row)
    or ``k_tiles`` (zigzag)."""
    if not self.band:
      return jnp.take(x, k_tiles, axis=1)
    span = len(self.q_tiles) - 1
    pad = [(0, 0)] * x.ndim
    pad[1] = (span, 0)
    return jax.lax.dynamic_slice_in_dim(
        jnp.pad(x, pad), span - shift, self.count, axis=1
    )

  def write_q(self, x, q_tiles, new):
    return new if self.band else x.at[:, q_tiles].set(new)

  def add_q(self, x, q_tiles, new):
    return x + new if self.band else x.at[:, q_tiles].add(new)

  def add_k(self, x, k_tiles, shift, new):
    """Adds each lane's key-tile gradient where ``read_k`` read the tile."""
    if not self.band:
      return x.at[:, k_tiles].add(new)
    span = len(self.q_tiles) - 1
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, span)
    return x + jax.lax.dynamic_slice_in_dim(
        jnp.pad(new, pad), shift, self.count, axis=1
    )

  def mask(self, q_tiles, k_tiles, q_seg, k_seg):
    """[B, L, Q, S] bool: which keys of each lane's key tile its queries
    see (causal, window, same segment, not before the row)."""
    q_index = q_tiles[:, None] * self.block + jnp.arange(self.block)
    kv_index = k_tiles[:, None] * self.block + jnp.arange(self.block)
    distance = q_index[:, :, None] - kv_index[:, None, :]  # [L, Q, S]
    visible = (distance >= 0) & (kv_index[:, None, :] >= 0)
    if self.window is not None:
      visible &= distance < self.window
    return visible & (q_seg[..., :, None] == k_seg[..., None, :])

  def steps(self, body, carry):
    """Runs ``body(carry, q_tiles, k_tiles, shift)`` over the schedule's
    steps in a scan (one step's temporaries live at a time)."""
    xs = (
        jnp.asarray(self.q_tiles),
        jnp.asarray(self.k_tiles),
        jnp.arange(len(self.q_tiles)),
    )
    scan_body = lambda c, x: (body(c, *x), None)
    return jax.lax.scan(scan_body, carry, xs)[0]


def _scores(tiles, qb, kb, q_seg, k_seg, q_tiles, k_tiles, scale):
  """Scores [B, L, K, G, Q, S] in float32 and the mask [B, L, 1, 1, Q, S]."""
  s = jnp.einsum(
      "BLQKGH,BLSKH->BLKGQS", qb, kb, preferred_element_type=jnp.float32
  )
  mask = tiles.mask(q_tiles, k_tiles, q_seg, k_seg)[:, :, None, None]
  return s * scale, mask


def _forward(q, k, v, segment_ids, window, scale, block):
  """-> (out [B, T, N, H] in v's dtype, log-sum-exp [B, C, K, G, block])."""
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  tiles = _Tiles(t, window, block)
  groups = (kv_heads, n // kv_heads)
  qt = tiles.cut(q).reshape(b, tiles.count, block, *groups, h)
  kt, vt, seg = tiles.cut(k), tiles.cut(v), tiles.cut(segment_ids)
  stats = (b, tiles.count, *groups, block)  # one per query and head
  carry = (
      jnp.full(stats, _MASK_VALUE, jnp.float32),  # running maximum
      jnp.zeros(stats, jnp.float32),  # running sum
      jnp.zeros(qt.shape, jnp.float32),  # running numerator
  )

  def body(carry, q_tiles, k_tiles, shift):
    run_max, run_sum, acc = carry
    s, mask = _scores(
        tiles,
        tiles.read_q(qt, q_tiles),
        tiles.read_k(kt, k_tiles, shift),
        tiles.read_q(seg, q_tiles),
        tiles.read_k(seg, k_tiles, shift),
        q_tiles,
        k_tiles,
        scale,
    )
    old_max = tiles.read_q(run_max, q_tiles)
    new_max = jnp.maximum(old_max, jnp.max(jnp.where(mask, s, _MASK_VALUE), -1))
    p = jnp.where(mask, jnp.exp(s - new_max[..., None]), 0.0)
    fade = jnp.exp(old_max - new_max)  # [B, L, K, G, Q]
    new_sum = tiles.read_q(run_sum, q_tiles) * fade + jnp.sum(p, -1)
    pv = jnp.einsum(
        "BLKGQS,BLSKH->BLQKGH",
        p.astype(v.dtype),
        tiles.read_k(vt, k_tiles, shift),
        preferred_element_type=jnp.float32,
    )
    fade = jnp.moveaxis(fade, -1, 2)[..., None]  # [B, L, Q, K, G, 1]
    new_acc = tiles.read_q(acc, q_tiles) * fade + pv
    return (
        tiles.write_q(run_max, q_tiles, new_max),
        tiles.write_q(run_sum, q_tiles, new_sum),
        tiles.write_q(acc, q_tiles, new_acc),
    )

  run_max, run_sum, acc = tiles.steps(body, carry)
  run_sum = jnp.where(run_sum == 0, 1.0, run_sum)  # only rows nothing sees
  out = acc / jnp.moveaxis(run_sum, -1, 2)[..., None]
  out = tiles.join(out.reshape(b, tiles.count, block, n, h)).astype(v.dtype)
  return out, run_max + jnp.log(run_sum)


def _backward(window, scale, block, residuals, d_out):
  q, k, v, segment_ids, out, lse = residuals
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  tiles = _Tiles(t, window, block)
  groups = (kv_heads, n // kv_heads)
  as_groups = lambda x: x.reshape(b, tiles.count, block, *groups, h)
  qt, dot = as_groups(tiles.cut(q)), as_groups(tiles.cut(d_out))
  kt, vt, seg = tiles.cut(k), tiles.cut(v), tiles.cut(segment_ids)
  # delta = rowsum(dO * O): the softmax's backward term, [B, C, K, G, Q].
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)
  delta = tiles.cut(delta).reshape(b, tiles.count, block, *groups)
  delta = jnp.moveaxis(delta, 2, -1)
  carry = (
      jnp.zeros(qt.shape, jnp.float32),
      jnp.zeros(kt.shape, jnp.float32),
      jnp.zeros(vt.shape, jnp.float32),
  )

  def body(carry, q_tiles, k_tiles, shift):
    dq, dk, dv = carry
    q_lane, do_lane = tiles.read_q(qt, q_tiles), tiles.read_q(dot, q_tiles)
    k_lane = tiles.read_k(kt, k_tiles, shift)
    v_lane = tiles.read_k(vt, k_tiles, shift)
    s, mask = _scores(
        tiles,
        q_lane,
        k_lane,
        tiles.read_q(seg, q_tiles),
        tiles.read_k(seg, k_tiles, shift),
        q_tiles,
        k_tiles,
        scale,
    )
    lse_lane = tiles.read_q(lse, q_tiles)[..., None]
    p = jnp.where(mask, jnp.exp(s - lse_lane), 0.0)
    f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
    dv_lane = f32("BLKGQS,BLQKGH->BLSKH", p.astype(d_out.dtype), do_lane)
    dp = f32("BLQKGH,BLSKH->BLKGQS", do_lane, v_lane)
    ds = p * (dp - tiles.read_q(delta, q_tiles)[..., None]) * scale
    dq_lane = f32("BLKGQS,BLSKH->BLQKGH", ds.astype(k.dtype), k_lane)
    dk_lane = f32("BLKGQS,BLQKGH->BLSKH", ds.astype(q.dtype), q_lane)
    return (
        tiles.add_q(dq, q_tiles, dq_lane),
        tiles.add_k(dk, k_tiles, shift, dk_lane),
        tiles.add_k(dv, k_tiles, shift, dv_lane),
    )

  dq, dk, dv = tiles.steps(body, carry)
  dq = tiles.join(dq.reshape(b, tiles.count, block, n, h)).astype(q.dtype)
  return (
      dq,
      tiles.join(dk).astype(k.dtype),
      tiles.join(dv).astype(v.dtype),
      None,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, segment_ids, window, scale, block):
  return _forward(q, k, v, segment_ids, window, scale, block)[0]


def _flash_fwd(q, k, v, segment_ids, window, scale, block):
  out, lse = _forward(q, k, v, segment_ids, window, scale, block)
  return out, (q, k, v, segment_ids, out, lse)


_flash.defvjp(_flash_fwd, _backward)
