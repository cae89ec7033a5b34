"""MoE layer: dispatch against a dense loop, capacity, aux losses, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from teacher import moe as moe_lib

E, K, D, F = 5, 2, 16, 24


def _layer(**kw):
  kw = {"norm_topk_prob": True, **kw}
  layer = moe_lib.MoE(D, F, E, K, rngs=nnx.Rngs(0), **kw)
  # Larger-than-default router weights: routing far from uniform.
  layer.router[...] = 3 * layer.router[...]
  return layer


@nnx.jit
def _apply(layer, x, mask=None):
  return layer(x, mask)


def _tokens(b=3, t=7, seed=1):
  return jax.random.normal(jax.random.key(seed), (b, t, D))


def _dense_reference(layer, x, keep=None):
  """Every token through each of its k experts, weighted: a loop over experts."""
  xf = np.asarray(x, np.float64).reshape(-1, D)
  logits = xf @ np.asarray(layer.router[...], np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  experts = np.argsort(-probs, axis=-1, kind="stable")[:, :K]
  weights = np.take_along_axis(probs, experts, -1)
  if layer.norm_topk_prob:
    weights /= weights.sum(-1, keepdims=True)
  if keep is not None:
    weights = weights * keep
  wg, wu, wd = (
      np.asarray(w[...], np.float64) for w in (layer.gate, layer.up, layer.down)
  )
  y = np.zeros_like(xf)
  for e in range(E):
    h = xf @ wg[e]
    out = (h / (1 + np.exp(-h))) * (xf @ wu[e]) @ wd[e]
    w_e = np.sum(np.where(experts == e, weights, 0.0), axis=-1)
    y += w_e[:, None] * out
  return y.reshape(x.shape), experts


@pytest.mark.parametrize("impl", ["ragged", "tokamax", "megablox", "blocked"])
@pytest.mark.parametrize("norm", [True, False])
def test_dropless_matches_dense_loop(impl, norm):
  layer = _layer(impl=impl, norm_topk_prob=norm)
  x = _tokens()
  y, aux = _apply(layer, x)
  ref, _ = _dense_reference(layer, x)
  np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)
  assert float(aux["dropped_fraction"]) == 0.0


def test_blocked_with_many_blocks_matches_ragged():
  # 2 * 150 * 2 = 600 assignments over 5 experts: several blocks per expert.
  x = _tokens(b=2, t=150, seed=3)
  y_ragged, _ = _apply(_layer(impl="ragged"), x)
  y_blocked, _ = _apply(_layer(impl="blocked"), x)
  np.testing.assert_allclose(y_blocked, y_ragged, atol=1e-5, rtol=1e-5)


def test_megablox_kernel_gradients_equal_ragged_dot():
  """megablox's Pallas kernel (interpreted on the CPU) against
  lax.ragged_dot: the grouped matmul with an empty group and rows past the
  groups (another shard's experts), then the layer's gradients of every
  weight and of the tokens, with padding tokens; and bf16 compute."""
  rng = np.random.default_rng(0)
  lhs = jnp.asarray(rng.normal(size=(44, D)), jnp.float32)
  rhs = jnp.asarray(rng.normal(size=(4, D, F)), jnp.float32)
  sizes = jnp.asarray([10, 0, 17, 9], jnp.int32)  # 36 of the 44 rows
  inside = (jnp.arange(44) < 36)[:, None]

  def dot_loss(dot):
    def loss(lhs, rhs):
      return jnp.sum(jnp.sin(jnp.where(inside, dot(lhs, rhs, sizes), 0.0)))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(lhs, rhs)

  (value, (g_lhs, g_rhs)), (want, (w_lhs, w_rhs)) = (
      dot_loss(moe_lib.megablox_dot),
      dot_loss(jax.lax.ragged_dot),
  )
  np.testing.assert_allclose(value, want, rtol=1e-6)
  np.testing.assert_allclose(g_lhs, w_lhs, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(g_rhs, w_rhs, atol=1e-5, rtol=1e-5)
  assert not np.asarray(g_lhs[36:]).any() and not np.asarray(g_rhs[1]).any()

  x = _tokens(b=2, t=11, seed=4)
  mask = jnp.arange(11)[None, :] < jnp.array([[11], [6]])

  def grads(impl, dtype=jnp.float32):
    layer = _layer(impl=impl, dtype=dtype)

    def loss_fn(layer, x):
      y, aux = layer(x, mask)
      return jnp.sum(jnp.sin(y.astype(jnp.float32))) + aux["z_loss"]

    return nnx.jit(nnx.value_and_grad(loss_fn, argnums=(0, 1)))(layer, x)

  (value, (g_layer, g_x)), (want, (w_layer, w_x)) = (
      grads("megablox"),
      grads("ragged"),
  )
  np.testing.assert_allclose(value, want, rtol=1e-6)
  np.testing.assert_allclose(g_x, w_x, atol=1e-5, rtol=1e-5)
  for (name, g), (_, w) in zip(
      nnx.to_flat_state(g_layer), nnx.to_flat_state(w_layer)
  ):
    np.testing.assert_allclose(
        g[...], w[...], atol=1e-5, rtol=1e-5, err_msg=name
    )
  low, _ = grads("megablox", jnp.bfloat16)
  np.testing.assert_allclose(low, want, rtol=0.02)


def test_large_capacity_drops_nothing_and_equals_dropless():
  x = _tokens()
  y_dropless, _ = _apply(_layer(), x)
  # cf = E / K gives capacity = N: an expert could take every token.
  y_cap, aux = _apply(_layer(capacity_factor=E / K), x)
  np.testing.assert_allclose(y_cap, y_dropless, atol=1e-5, rtol=1e-5)
  assert float(aux["dropped_fraction"]) == 0.0


def test_tiny_capacity_drops_latest_tokens_and_reports_fraction():
  x = _tokens(b=2, t=9)
  n = 18
  cf = 0.5
  layer = _layer(capacity_factor=cf)
  cap = moe_lib.expert_capacity(cf, n, K, E)
  assert cap == int(np.ceil(cf * n * K / E))
  y, aux = _apply(layer, x)
  _, experts = _dense_reference(layer, x)
  # Keep the first `cap` assignments of each expert in (token, slot) order.
  keep = np.zeros((n, K))
  seen = np.zeros(E, int)
  for i in range(n):
    for j in range(K):
      e = experts[i, j]
      if seen[e] < cap:
        keep[i, j] = 1
      seen[e] += 1
  expected_dropped = 1 - keep.sum() / (n * K)
  assert expected_dropped > 0.2
  np.testing.assert_allclose(
      aux["dropped_fraction"], expected_dropped, rtol=1e-6
  )
  ref, _ = _dense_reference(layer, x, keep=keep)
  np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(
      aux["expert_load"], np.bincount(experts.reshape(-1), minlength=E)
  )


def test_padding_takes_no_capacity_and_no_statistics():
  x = _tokens(b=2, t=9)
  mask = jnp.ones((2, 9), bool).at[0, :5].set(False)
  layer = _layer(capacity_factor=1.0)
  y, aux = _apply(layer, x, mask)
  # Same real tokens alone, with the same capacity: identical outputs for them.
  real = jnp.concatenate([x[0, 5:], x[1]])[None]
  layer_alone = _layer(capacity_factor=1.0)
  cap = moe_lib.expert_capacity(1.0, 18, K, E)
  xf = real.reshape(-1, D)
  logits = xf @ layer_alone.router[...]
  probs, w, ex = moe_lib.route(logits, K, True)
  y_alone, kept = jax.jit(moe_lib.dispatch, static_argnames="capacity")(
      xf, w, ex, layer.gate[...], layer.up[...], layer.down[...], capacity=cap
  )
  np.testing.assert_allclose(y[mask], y_alone, atol=1e-5, rtol=1e-5)
  stats = moe_lib.router_stats(logits, probs, ex, jnp.ones(13, bool))
  for key in ("load_balancing_loss", "z_loss", "expert_load"):
    np.testing.assert_allclose(aux[key], stats[key], rtol=1e-5)
  np.testing.assert_allclose(
      aux["dropped_fraction"], 1 - kept.sum() / kept.size, rtol=1e-6
  )


def test_load_balancing_loss_formula_on_hand_built_routing():
  logits = jnp.log(
      jnp.array(
          [
              [0.7, 0.2, 0.1],
              [0.6, 0.3, 0.1],
              [0.1, 0.3, 0.6],
              [0.2, 0.5, 0.3],
          ]
      )
  )
  probs, _, experts = moe_lib.route(logits, 1, False)
  np.testing.assert_array_equal(experts[:, 0], [0, 0, 2, 1])
  stats = moe_lib.router_stats(logits, probs, experts, jnp.ones(4, bool))
  f = np.array([2, 1, 1]) / 4
  p = np.array([1.6, 1.3, 1.1]) / 4
  np.testing.assert_allclose(
      stats["load_balancing_loss"], 3 * np.sum(f * p), rtol=1e-6
  )
  np.testing.assert_allclose(stats["z_loss"], 0.0, atol=1e-6)  # logsumexp = 0
  np.testing.assert_array_equal(stats["expert_load"], [2, 1, 1])
  # Padding rows are left out of every statistic.
  padded = jnp.concatenate([logits, jnp.log(jnp.array([[0.9, 0.05, 0.05]]))])
  p2, _, e2 = moe_lib.route(padded, 1, False)
  masked = moe_lib.router_stats(
      padded, p2, e2, jnp.array([1, 1, 1, 1, 0], bool)
  )
  for key in stats:
    np.testing.assert_allclose(masked[key], stats[key], rtol=1e-6, atol=1e-6)


def test_uniform_router_gives_the_balanced_value_and_collapse_gives_e():
  n, e = 40, 8
  zeros = jnp.zeros((n, e))
  probs, _, experts = moe_lib.route(zeros, 2, True)
  stats = moe_lib.router_stats(zeros, probs, experts, jnp.ones(n, bool))
  np.testing.assert_allclose(stats["load_balancing_loss"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(stats["z_loss"], np.log(e) ** 2, rtol=1e-6)
  # Confident but balanced routing (f = P = 1/E) also gives 1; any imbalance
  # raises it, up to E for a router collapsed onto one expert.
  balanced = 20.0 * jax.nn.one_hot(jnp.arange(n) % e, e)
  collapsed = 20.0 * jax.nn.one_hot(jnp.zeros(n, int), e)
  values = []
  for lg in (balanced, collapsed):
    p, _, ex = moe_lib.route(lg, 1, False)
    values.append(
        float(
            moe_lib.router_stats(lg, p, ex, jnp.ones(n, bool))[
                "load_balancing_loss"
            ]
        )
    )
  np.testing.assert_allclose(values, [1.0, e], rtol=1e-5)


def test_gradients_reach_router_and_every_expert():
  layer = _layer(shared_expert_d_ff=8)
  x = _tokens(b=2, t=20)

  def loss_fn(layer):
    y, aux = _apply(layer, x)
    return jnp.sum(y**2) + aux["load_balancing_loss"] + aux["z_loss"]

  grads = nnx.jit(nnx.grad(loss_fn))(layer)
  for name, g in nnx.to_flat_state(grads):
    g = np.asarray(g[...])
    assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0, name
  # Every expert that received a token has a gradient.
  used = np.abs(np.asarray(grads.down[...])).sum(axis=(1, 2)) > 0
  assert used.sum() >= E - 1


def test_shared_expert_adds_sigmoid_gated_mlp():
  layer = _layer(shared_expert_d_ff=8)
  x = _tokens()
  y, _ = _apply(layer, x)
  ref, _ = _dense_reference(layer, x)
  xf = np.asarray(x, np.float64)
  mlp = layer.shared_expert
  h = xf @ np.asarray(mlp.gate_proj.kernel[...], np.float64)
  s = (
      (h / (1 + np.exp(-h)))
      * (xf @ np.asarray(mlp.up_proj.kernel[...]))
      @ np.asarray(mlp.down_proj.kernel[...])
  )
  g = 1 / (1 + np.exp(-(xf @ np.asarray(layer.shared_expert_gate.kernel[...]))))
  np.testing.assert_allclose(y, ref + g * s, atol=1e-5, rtol=1e-5)


def test_jit_and_bfloat16_compute():
  layer = _layer(dtype=jnp.bfloat16)
  x = _tokens()
  y, aux = _apply(layer, x)
  assert y.dtype == x.dtype and aux["expert_load"].shape == (E,)
  ref, _ = _dense_reference(layer, x)
  np.testing.assert_allclose(y, ref, atol=0.1, rtol=0.05)
