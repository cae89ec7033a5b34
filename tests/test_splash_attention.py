"""jax's splash attention TPU kernel, run on the CPU in Pallas interpret mode
against the XLA path (``attention_mask`` + ``attend``), forward and backward:
causal and windowed, packed documents with padding, grouped-query heads,
float32 and bfloat16; and on a mesh (``shard_map`` over rows and heads)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import planning
from distill.core import sharding
from distill.core.errors import ConfigError
from distill.nn import attention, kernels

B, T, N, K, H = 2, 384, 4, 2, 128
BLOCK = 128  # three query blocks: the masks skip some of them


def _qkv(dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (B, T, N, H), jnp.float32)
  k = jax.random.normal(keys[1], (B, T, K, H), jnp.float32)
  v = jax.random.normal(keys[2], (B, T, K, H), jnp.float32)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)


# Row 0: two documents and trailing padding; row 1: one document.
SEGMENTS = jnp.array([[1] * 150 + [2] * 210 + [0] * 24, [3] * T], jnp.int32)
REAL = np.asarray(SEGMENTS != 0)


def _xla(q, k, v, window, scale):
  index = attention.default_positions(q)
  mask = attention.attention_mask(
      SEGMENTS, SEGMENTS, index, index, window=window
  )
  return attention.attend(q, k, v, mask, scale=scale)


def _splash(q, k, v, window, scale, fused=None):
  return kernels.splash_attention(
      q, k, v, SEGMENTS, window=window, scale=scale, interpret=True,
      block=BLOCK, fused=fused,
  )  # fmt: skip


def _loss(fn, q, k, v):
  out = fn(q, k, v)
  real = jnp.asarray(REAL)[:, :, None, None]  # padding outputs feed no loss
  return jnp.sum(jnp.where(real, out.astype(jnp.float32), 0.0) ** 2), out


@pytest.mark.parametrize(
    "window,dtype,tol,fused",
    [
        (None, jnp.float32, 2e-4, True),
        (160, jnp.float32, 2e-4, True),
        (None, jnp.bfloat16, 5e-2, True),
        (160, jnp.bfloat16, 5e-2, True),
        (None, jnp.float32, 2e-4, False),  # the two backward kernels
        (160, jnp.bfloat16, 5e-2, False),
    ],
)
def test_splash_matches_the_xla_path_forward_and_backward(
    window, dtype, tol, fused
):
  q, k, v = _qkv(dtype)
  scale = H**-0.5
  grad = lambda fn: jax.jit(
      jax.grad(lambda *a: _loss(fn, *a), (0, 1, 2), has_aux=True)
  )
  fns = [
      lambda q, k, v: _xla(q, k, v, window, scale),
      lambda q, k, v: _splash(q, k, v, window, scale, fused),
  ]
  (g_xla, out_xla), (g_splash, out_splash) = (grad(f)(q, k, v) for f in fns)
  a = np.asarray(out_xla, np.float32)[REAL]
  b = np.asarray(out_splash, np.float32)[REAL]
  np.testing.assert_allclose(b, a, atol=tol, rtol=tol)
  for name, ga, gb in zip("qkv", g_xla, g_splash):
    ga, gb = np.asarray(ga, np.float32), np.asarray(gb, np.float32)
    scale_of = np.abs(ga).max()
    np.testing.assert_allclose(gb, ga, atol=tol * scale_of, err_msg=name)


def test_splash_keeps_documents_apart():
  q, k, v = _qkv(jnp.float32)
  run = jax.jit(lambda k: _splash(q, k, v, None, 0.1))
  noise = jax.random.normal(jax.random.key(9), (150, K, H))
  moved = jnp.abs(run(k.at[0, :150].add(noise)) - run(k)).max(axis=(-1, -2))
  assert float(moved[0, 150:360].max()) == 0.0
  assert float(moved[0, :150].max()) > 1e-3


def test_splash_on_a_mesh_splits_rows_and_heads():
  """Under shard_map over rows (fsdp) and heads (tensor): the same numbers."""
  q, k, v = _qkv(jnp.float32)
  mesh = sharding.make_mesh(
      sharding.MeshConfig(fsdp=2, tensor=2), devices=jax.devices()[:4]
  )
  want = jax.jit(lambda q, k, v: _splash(q, k, v, 160, 0.1))(q, k, v)
  with sharding.use(mesh):
    got = jax.jit(lambda q, k, v: _splash(q, k, v, 160, 0.1))(q, k, v)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_the_plan_counts_the_blocks_the_kernel_visits(fused):
  """Forward and backward FLOPs of splash read from its block mask: a
  window of one block visits two blocks per query block (one for the
  first), causal the lower triangle."""
  q, k, v = _qkv(jnp.float32)
  blocks = T // BLOCK
  per_block = BLOCK * BLOCK * H * B * N * 2  # one matmul over a block
  for window, visited in (
      (BLOCK, 2 * blocks - 1),
      (None, blocks * (blocks + 1) // 2),
  ):
    step = jax.jit(
        jax.grad(
            lambda q, k, v: _loss(
                lambda *a: _splash(*a, window, 0.1, fused), q, k, v
            ),
            (0, 1, 2),
            has_aux=True,
        )
    )
    jaxpr = step.trace(q, k, v).jaxpr
    # Forward 2 matmuls; the fused backward 5 per visited block, the dq
    # kernel 3 and the dk/dv kernel 4 (and the backward's sum of dO x O
    # outside the kernel, 0.05% more).
    backward = 5 if fused else 3 + 4
    assert planning.matmul_flops(jaxpr) == pytest.approx(
        (2 + backward) * per_block * visited, rel=1e-3
    )


def test_long_rows_take_the_backward_whose_memory_is_linear():
  """The fused backward's dq partials grow with the key blocks: rows of
  more than 16 key blocks take the two kernels."""
  assert kernels.splash_fused_backward(2048, 512)
  assert kernels.splash_fused_backward(8192, 512)  # 16 key blocks
  assert not kernels.splash_fused_backward(8192, 128)
  assert not kernels.splash_fused_backward(131072, 512)


def test_splash_blocks_follow_the_row_and_the_window():
  assert kernels.splash_block(8192, None) == 512
  assert kernels.splash_block(8192, 512) == 128  # a quarter of the window
  assert kernels.splash_block(8192, 4096) == 512
  assert kernels.splash_block(384, None) == 128
  assert kernels.splash_block(500, None) is None


def test_auto_picks_splash_only_on_a_tpu(monkeypatch):
  assert kernels.resolve_impl("auto", jnp.bfloat16, 128, 512) == "xla"
  with pytest.raises(ConfigError, match="needs a TPU"):
    kernels.resolve_impl("splash", jnp.bfloat16, 128, 512)
  monkeypatch.setattr(sharding, "platform", lambda: "tpu")
  assert kernels.resolve_impl("auto", jnp.bfloat16, 128, 512) == "splash"
  assert kernels.resolve_impl("auto", jnp.float32, 256, 2048) == "splash"
  assert kernels.resolve_impl("auto", jnp.bfloat16, 64, 512) == "xla"
  assert kernels.resolve_impl("auto", jnp.bfloat16, 128, 500) == "xla"
  with pytest.raises(ConfigError, match="multiple of 128 tokens"):
    kernels.resolve_impl("splash", jnp.bfloat16, 128, 500)
