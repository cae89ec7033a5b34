"""The whole-sequence attention entry point and its kernels.

On the CPU the cuDNN kernel cannot run, so its call is checked by running the
very same ``jax.nn.dot_product_attention`` call through jax's own XLA
reference (``fused_attention(implementation="xla")``) against the project's
``attend``, forward and backward, in float32 and bfloat16. The blockwise
(flash-style) path of long rows is checked against ``attend`` the same way,
and its cost (read from the compiled program) against the row length.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill.core.errors import ConfigError
from distill import planning
from distill.nn import attention, blockwise, kernels

B, T, N, K, H = 2, 24, 4, 2, 16


def _qkv(dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (B, T, N, H), jnp.float32)
  k = jax.random.normal(keys[1], (B, T, K, H), jnp.float32)
  v = jax.random.normal(keys[2], (B, T, K, H), jnp.float32)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)


# Two documents and trailing padding in row 0, one document in row 1.
SEGMENTS = jnp.array([[1] * 9 + [2] * 11 + [0] * 4, [3] * T], jnp.int32)


def _reference(q, k, v, segment_ids, window, scale):
  index = attention.default_positions(q)
  mask = attention.attention_mask(
      segment_ids, segment_ids, index, index, window=window
  )
  return attention.attend(q, k, v, mask, scale=scale)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize(
    "dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)]
)
def test_fused_call_matches_attend_forward_and_backward(window, dtype, tol):
  q, k, v = _qkv(dtype)
  scale = H**-0.5

  def loss(fn, q, k, v):
    out = fn(q, k, v)
    # Padding rows' outputs are not used by any loss; compare real tokens.
    real = (SEGMENTS != 0)[:, :, None, None]
    return jnp.sum(jnp.where(real, out.astype(jnp.float32), 0.0) ** 2), out

  ours = lambda q, k, v: _reference(q, k, v, SEGMENTS, window, scale)
  fused = lambda q, k, v: kernels.fused_attention(
      q, k, v, SEGMENTS, window=window, scale=scale, implementation="xla"
  )
  grad = lambda fn: jax.grad(lambda *a: loss(fn, *a), (0, 1, 2), has_aux=True)
  (g_ours, out_ours), (g_fused, out_fused) = (
      grad(ours)(q, k, v),
      grad(fused)(q, k, v),
  )
  real = np.asarray(SEGMENTS != 0)
  a = np.asarray(out_ours, np.float32)[real]
  b = np.asarray(out_fused, np.float32)[real]
  np.testing.assert_allclose(b, a, atol=tol, rtol=tol)
  for ga, gb in zip(g_ours, g_fused):
    np.testing.assert_allclose(
        np.asarray(gb, np.float32), np.asarray(ga, np.float32), atol=tol * 4
    )


def test_fused_call_keeps_documents_apart():
  """Changing document 1's keys moves nothing in document 2 (packed rows)."""
  q, k, v = _qkv(jnp.float32)
  run = lambda k: kernels.fused_attention(
      q, k, v, SEGMENTS, window=None, scale=0.25, implementation="xla"
  )
  noise = jax.random.normal(jax.random.key(9), (9, K, H))
  moved = jnp.abs(run(k.at[0, :9].add(noise)) - run(k)).max(axis=(-1, -2))
  assert float(moved[0, 9:20].max()) == 0.0
  assert float(moved[0, :9].max()) > 1e-3  # and the change is visible


def test_self_attention_on_cpu_is_the_xla_path_exactly():
  q, k, v = _qkv(jnp.float32)
  for window in (None, 7):
    for impl in ("auto", "xla"):
      got = attention.self_attention(
          q, k, v, SEGMENTS, window=window, scale=0.3, impl=impl
      )
      want = _reference(q, k, v, SEGMENTS, window, 0.3)
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_resolve_impl_per_backend_dtype_and_shape(monkeypatch):
  assert kernels.resolve_impl("auto", jnp.bfloat16, 64) == "xla"  # CPU
  with pytest.raises(ConfigError, match="needs a CUDA GPU"):
    kernels.resolve_impl("cudnn", jnp.bfloat16, 64)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert kernels.resolve_impl("auto", jnp.bfloat16, 64) == "cudnn"
  assert kernels.resolve_impl("auto", jnp.float16, 128) == "cudnn"
  assert kernels.resolve_impl("auto", jnp.float32, 64) == "xla"
  assert kernels.resolve_impl("auto", jnp.bfloat16, 12) == "xla"
  assert kernels.resolve_impl("xla", jnp.bfloat16, 64) == "xla"
  with pytest.raises(ConfigError, match="float32"):
    kernels.resolve_impl("cudnn", jnp.float32, 64)
  with pytest.raises(ConfigError, match="unknown attention_impl"):
    kernels.resolve_impl("flash", jnp.bfloat16, 64)


def test_auto_falls_back_to_xla_when_cudnn_refuses(monkeypatch):
  """A GPU whose cuDNN refuses the call (too old, unsupported shape) runs
  the XLA path under ``auto``; an explicit ``cudnn`` says why it failed."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")

  def refuse(*args, **kwargs):
    raise NotImplementedError("cuDNN 8.9 is too old for this")

  monkeypatch.setattr(kernels, "fused_attention", refuse)
  q, k, v = _qkv(jnp.bfloat16)
  got = attention.self_attention(
      q, k, v, SEGMENTS, window=5, scale=0.25, impl="auto"
  )
  want = _reference(q, k, v, SEGMENTS, 5, 0.25)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  with pytest.raises(NotImplementedError, match="too old"):
    attention.self_attention(
        q, k, v, SEGMENTS, window=5, scale=0.25, impl="cudnn"
    )


# The blockwise path: rows of 24 in tiles of 8 (three tiles: the band
# schedule, also for a global layer), 16 (a padded last tile), 4 (six tiles:
# zigzag for a global layer) and 5 (five tiles, zigzag pads a sixth); windows
# of one token, less than a tile, a tile, more than a tile, and none.
@pytest.mark.parametrize(
    "window,block",
    [(1, 8), (5, 8), (8, 8), (11, 8), (11, 16), (20, 4)]
    + [(None, 8), (None, 16), (None, 4), (None, 5)],
)
@pytest.mark.parametrize(
    "dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 3e-2)]
)
def test_flash_attention_matches_attend_forward_and_backward(
    window, block, dtype, tol
):
  q, k, v = _qkv(dtype, seed=1)
  scale = H**-0.5
  flash = lambda q, k, v: blockwise.flash_attention(
      q, k, v, SEGMENTS, window=window, scale=scale, block=block
  )
  dense = lambda q, k, v: _reference(q, k, v, SEGMENTS, window, scale)

  def with_grads(fn):
    loss = lambda *a: (jnp.sum(jnp.sin(fn(*a).astype(jnp.float32))), fn(*a))
    return jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True))(q, k, v)

  (g_flash, out_flash), (g_dense, out_dense) = with_grads(flash), with_grads(
      dense
  )
  f32 = lambda x: np.asarray(x, np.float32)
  np.testing.assert_allclose(f32(out_flash), f32(out_dense), atol=tol, rtol=tol)
  for a, b in zip(g_flash, g_dense):
    np.testing.assert_allclose(f32(a), f32(b), atol=tol * 4, rtol=tol)


def test_flash_schedules_visit_each_visible_pair_once():
  """Band and zigzag: every (query tile, key tile) pair the mask can leave
  visible is computed exactly once, no step writes a query tile twice, and a
  global layer's zigzag does the causal triangle (plus one padding tile)."""
  for count, window, block in [
      (7, None, 4),
      (6, None, 4),
      (9, 9, 4),
      (3, 1, 8),
  ]:
    q_tiles, k_tiles, tiles = blockwise.schedule(count, window, block)
    reach = tiles if window is None else -(-(window - 1) // block) + 1
    want = {
        (i, j) for i in range(tiles) for j in range(tiles) if 0 <= i - j < reach
    }
    pairs = [
        (i, j)
        for qs, ks in zip(q_tiles, k_tiles)
        for i, j in zip(qs, ks)
        if j >= 0
    ]
    assert sorted(pairs) == sorted(want)
    assert all(len(set(qs)) == len(qs) for qs in q_tiles)
  q_tiles, _, tiles = blockwise.schedule(64, None, 512)
  assert q_tiles.size == 64 * 65 // 2 and tiles == 64  # zigzag: the triangle
  assert blockwise.schedule(64, 1024, 512)[0].shape == (3, 64)  # band


def test_self_attention_takes_the_blockwise_path_beyond_one_tile():
  """Rows longer than ``blockwise.BLOCK`` run the blockwise path (same
  outputs as the dense one, windowed or not); shorter ones the dense path
  exactly (``test_self_attention_on_cpu_is_the_xla_path_exactly``)."""
  t = 2 * blockwise.BLOCK + 40
  q, k, v = (
      jax.random.normal(key, (1, t, heads, 8))
      for key, heads in zip(jax.random.split(jax.random.key(2), 3), (2, 1, 1))
  )
  segments = jnp.ones((1, t), jnp.int32).at[0, 700:].set(2)
  for window in (16, None):
    got = attention.self_attention(q, k, v, segments, window=window, scale=0.3)
    want = _reference(q, k, v, segments, window, 0.3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)


def _cost(length, window, dense=False, compile_=True):
  """Temporary bytes of one layer's forward and backward through
  ``self_attention`` (or the dense path), read from the compiled program
  (None without ``compile_``), and its matrix-product FLOPs per token (scan
  steps counted as they run)."""
  shape = lambda heads: jax.ShapeDtypeStruct(
      (1, length, heads, 32), jnp.float32
  )

  def loss(q, k, v, s):
    if dense:
      return jnp.sum(_reference(q, k, v, s, window, 0.2))
    return jnp.sum(
        attention.self_attention(q, k, v, s, window=window, scale=0.2)
    )

  grad = jax.grad(loss, (0, 1, 2))
  args = (
      shape(2),
      shape(1),
      shape(1),
      jax.ShapeDtypeStruct((1, length), jnp.int32),
  )
  flops = planning.matmul_flops(jax.make_jaxpr(grad)(*args)) / length
  if not compile_:
    return None, flops
  compiled = jax.jit(grad).trace(*args).lower().compile()
  return compiled.memory_analysis().temp_size_in_bytes, flops


def test_local_layer_cost_is_linear_in_the_row():
  """4x the row: within 1.3x of 4x the temporaries and the same FLOPs per
  token, where the dense path grows as the square."""
  short, long = _cost(2048, 128), _cost(8192, 128)
  assert long[0] <= short[0] * 4 * 1.3
  assert long[1] == pytest.approx(short[1], rel=0.1)
  dense = _cost(2048, 128, dense=True)
  assert dense[1] > 3 * short[1] and dense[0] > 3 * short[0]


def test_global_layer_memory_is_linear_and_work_half_the_square():
  """A global layer: temporaries linear in the row; its FLOPs grow as the
  square but, skipping the tiles above the diagonal, stay under 0.7x the
  dense path's at 16 tiles (which computes the whole square, forward and
  backward; the blockwise backward recomputes the scores, 7 products
  against 6, over 136 of 256 tile pairs)."""
  short, long = _cost(2048, None), _cost(8192, None)
  assert long[0] <= short[0] * 4 * 1.3
  assert long[1] == pytest.approx(short[1] * 4, rel=0.15)
  dense = _cost(8192, None, dense=True, compile_=False)[1]
  assert long[1] == pytest.approx(dense * 7 / 6 * 136 / 256, rel=0.02)
  assert long[1] < 0.7 * dense
