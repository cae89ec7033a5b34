"""Tests for distill/losses/ against float64 numpy references and each other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import losses, planning

B, T, V = 2, 5, 11


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_kl(p, log_p, log_q):
  return np.where(p > 0, p * (np.where(p > 0, log_p, 0) - log_q), 0).sum(-1)


def np_masked_mean(x, mask):
  return (x * mask).sum() / mask.sum()


@pytest.fixture
def data():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(B, T, V)).astype(np.float32) * 2
  teacher = rng.normal(size=(B, T, V)).astype(np.float32) * 3
  mask = (rng.random((B, T)) < 0.7).astype(np.float32)
  mask[0, 0] = 1
  return rng, logits, teacher, mask


def topk(teacher, k, temperature):
  lp = np_log_softmax(teacher / temperature)
  ids = np.argsort(-lp, -1)[..., :k]
  vals = np.take_along_axis(lp, ids, -1)
  return ids.astype(np.int32), vals, 1 - np.exp(vals).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_sparse_and_ghost_match_numpy(data, temperature):
  rng, logits, teacher, mask = data
  ids, vals, tail = topk(teacher, 4, temperature)
  vals[0, 1, 3] = -np.inf  # one padded id
  log_q = np_log_softmax(logits / temperature)
  lq = np.take_along_axis(log_q, ids, -1)
  # Renormalised top-k.
  p = np.exp(vals) / np.exp(vals).sum(-1, keepdims=True)
  want = np_masked_mean(np_kl(p, np.log(np.maximum(p, 1e-300)), lq), mask)
  got = losses.sparse_kl(
      logits, ids, vals.astype(np.float32), mask, temperature
  )
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Ghost: k+1 classes, tail on both sides.
  p = np.exp(vals)
  q_rest = 1 - np.where(np.isfinite(vals), np.exp(lq), 0).sum(-1)
  per = np_kl(p, vals, lq) + tail * (np.log(tail) - np.log(q_rest))
  got = losses.ghost_kl(
      logits,
      ids,
      vals.astype(np.float32),
      tail.astype(np.float32),
      mask,
      temperature,
  )
  np.testing.assert_allclose(
      got, np_masked_mean(per, mask), rtol=1e-5, atol=1e-6
  )


def test_sampled_and_ce_match_numpy(data):
  rng, logits, teacher, mask = data
  ids = np.stack(
      [[rng.permutation(V)[:6] for _ in range(T)] for _ in range(B)]
  ).astype(np.int32)
  counts = rng.integers(0, 5, size=(B, T, 6)).astype(np.int32)
  counts[..., 0] += 1
  p_hat = counts / counts.sum(-1, keepdims=True)
  lq = np.take_along_axis(np_log_softmax(logits / 2.0), ids, -1)
  ce = -(p_hat * lq).sum(-1)
  np.testing.assert_allclose(
      losses.sampled_kl(logits, ids, counts, mask, 2.0),
      np_masked_mean(ce, mask),
      rtol=1e-5,
  )
  ent = np.where(p_hat > 0, p_hat * np.log(np.maximum(p_hat, 1e-300)), 0).sum(
      -1
  )
  np.testing.assert_allclose(
      losses.sampled_kl(logits, ids, counts, mask, 2.0, include_entropy=True),
      np_masked_mean(ce + ent, mask),
      rtol=1e-5,
  )
  labels = rng.integers(0, V, size=(B, T))
  want = -np.take_along_axis(np_log_softmax(logits), labels[..., None], -1)[
      ..., 0
  ]
  np.testing.assert_allclose(
      losses.cross_entropy(logits, labels, mask),
      np_masked_mean(want, mask),
      rtol=1e-5,
  )


@pytest.mark.parametrize(
    "kind,beta",
    [
        ("forward", 0.5),
        ("reverse", 0.5),
        ("jsd", 0.3),
        ("jsd", 0.5),
        ("jsd", 0.9),
    ],
)
def test_dense_matches_numpy(data, kind, beta):
  rng, logits, teacher, mask = data
  log_p, log_q = np_log_softmax(teacher / 1.5), np_log_softmax(logits / 1.5)
  p, q = np.exp(log_p), np.exp(log_q)
  if kind == "forward":
    want = np_kl(p, log_p, log_q)
  elif kind == "reverse":
    want = np_kl(q, log_q, log_p)
  else:
    log_m = np.log(beta * p + (1 - beta) * q)
    want = (
        beta * np_kl(p, log_p, log_m) + (1 - beta) * np_kl(q, log_q, log_m)
    ) / (beta * (1 - beta))
  got = losses.dense_kd(logits, teacher, mask, 1.5, kind, beta)
  np.testing.assert_allclose(
      got, np_masked_mean(want, mask), rtol=1e-4, atol=1e-6
  )


def test_jsd_limits_are_forward_and_reverse(data):
  _, logits, teacher, mask = data
  fwd = losses.dense_kd(logits, teacher, mask, 1.0, "forward")
  rev = losses.dense_kd(logits, teacher, mask, 1.0, "reverse")
  assert (
      abs(fwd - rev) > 0.1
  )  # the two limits differ, so the checks below mean something
  np.testing.assert_allclose(
      losses.dense_kd(logits, teacher, mask, 1.0, "jsd", 0.0), fwd
  )
  np.testing.assert_allclose(
      losses.dense_kd(logits, teacher, mask, 1.0, "jsd", 1.0), rev
  )
  # Convergence to the limits is slow (about beta log beta) where p/q is extreme, so
  # check that the error shrinks monotonically and ends within 2% at beta = 1e-4.
  betas = (0.1, 0.01, 1e-3, 1e-4)
  err_fwd = [
      abs(float(losses.dense_kd(logits, teacher, mask, 1.0, "jsd", b) - fwd))
      for b in betas
  ]
  err_rev = [
      abs(
          float(losses.dense_kd(logits, teacher, mask, 1.0, "jsd", 1 - b) - rev)
      )
      for b in betas
  ]
  for err, limit in ((err_fwd, fwd), (err_rev, rev)):
    assert all(a > b for a, b in zip(err, err[1:])), err
    assert err[-1] < 0.02 * limit


def test_sparse_and_ghost_with_all_ids_equal_dense_forward(data):
  _, logits, teacher, mask = data
  ids, vals, _ = topk(teacher, V, 2.0)
  tail = np.zeros((B, T), np.float32)
  dense = losses.dense_kd(logits, teacher, mask, 2.0, "forward")
  vals = vals.astype(np.float32)
  np.testing.assert_allclose(
      losses.sparse_kl(logits, ids, vals, mask, 2.0), dense, rtol=1e-5
  )
  np.testing.assert_allclose(
      losses.ghost_kl(logits, ids, vals, tail, mask, 2.0), dense, rtol=1e-5
  )
  g_dense = jax.grad(losses.dense_kd)(logits, teacher, mask, 2.0, "forward")
  g_ghost = jax.grad(losses.ghost_kl)(logits, ids, vals, tail, mask, 2.0)
  np.testing.assert_allclose(g_ghost, g_dense, atol=1e-6)


def test_sampled_gradient_is_unbiased_for_dense_forward_kl():
  """Mean over S independent N-draw samples of the sampled_kl gradient vs the dense one.

  Per logit, grad = (q_i - p_hat_i) / T, and p_hat_i averaged over S samples is a
  mean of N*S Bernoulli(p_i) draws: std sqrt(p_i (1 - p_i) / (N S)). With every
  p_i >= 1e-3, N*S*p_i >= 64, so the normal approximation holds and a |z| < 5
  bound on each of the P*V = 80 coordinates fails with probability < 1e-4
  (union bound) for a correct estimator; the seed is fixed, so it is deterministic.
  The renormalised top-4 gradient, a biased target, must fail the same bound.
  """
  rng = np.random.default_rng(1)
  P, Vs, N, S, temp = 4, 20, 16, 4000, 2.0
  teacher = rng.normal(size=(1, P, Vs)) * 2.0
  logits = rng.normal(size=(1, P, Vs)).astype(np.float32)
  p = np.exp(np_log_softmax(teacher / temp))
  assert p.min() > 1e-3
  counts = rng.multinomial(N, p[0], size=(S, P))  # [S, P, V]
  ids = np.argsort(
      -counts, -1, kind="stable"
  )  # unique ids; zero counts are padding
  counts = np.take_along_axis(counts, ids, -1)
  mask = np.ones((1, P), np.float32)
  per_sample = jax.vmap(
      jax.grad(lambda lg, i, c: losses.sampled_kl(lg, i, c, mask, temp)),
      (None, 0, 0),
  )
  mean_grad = np.asarray(
      per_sample(logits, ids[:, None].astype(np.int32), counts[:, None])
  ).mean(0)
  dense_grad = np.asarray(
      jax.grad(losses.dense_kd)(logits, teacher.astype(np.float32), mask, temp)
  )
  std = (
      np.sqrt(p * (1 - p) / (N * S)) / temp / P
  )  # the loss is a mean over P positions
  z = (mean_grad - dense_grad) / std
  assert np.abs(z).max() < 5, np.abs(z).max()
  ids4, vals4, _ = topk(teacher, 4, temp)
  sparse_grad = np.asarray(
      jax.grad(losses.sparse_kl)(
          logits, ids4, vals4.astype(np.float32), mask, temp
      )
  )
  assert np.abs((sparse_grad - dense_grad) / std).max() > 20


def _head(rng, D=8):
  w = jnp.asarray(rng.normal(size=(D, V)).astype(np.float32))
  return w, lambda w: (lambda h: jnp.einsum("BCD,DV->BCV", h, w))


@pytest.mark.parametrize("length,chunk", [(10, 4), (8, 4), (7, 16)])
def test_chunked_equals_unchunked(length, chunk):
  rng = np.random.default_rng(2)
  w, head = _head(rng)
  hidden = jnp.asarray(rng.normal(size=(B, length, 8)).astype(np.float32))
  ids = rng.integers(0, V, size=(B, length, 3)).astype(np.int32)
  vals = np.sort(
      np.log(rng.dirichlet(np.ones(4), size=(B, length))[..., :3]), -1
  )[..., ::-1].astype(np.float32)
  tail = (1 - np.exp(vals).sum(-1)).astype(np.float32)
  ids = np.stack(
      [[rng.permutation(V)[:3] for _ in range(length)] for _ in range(B)]
  ).astype(np.int32)
  mask = (rng.random((B, length)) < 0.8).astype(np.float32)
  targets = {"ids": ids, "log_probs": vals, "tail": tail}

  def per_token(lg, t):
    return losses.ghost_kl_per_token(
        lg, t["ids"], t["log_probs"], t["tail"], 1.5
    )

  def chunked(hidden, w):
    return losses.chunked_loss(hidden, head(w), per_token, targets, mask, chunk)

  def full(hidden, w):
    return losses.masked_mean(per_token(head(w)(hidden), targets), mask)

  (v1, g1), (v2, g2) = [  # jitted: op by op, the scan dispatches slowly
      jax.jit(jax.value_and_grad(f, (0, 1)))(hidden, w) for f in (chunked, full)
  ]
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  for a, b in zip(g1, g2):
    assert np.abs(np.asarray(b)).max() > 0
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_chunked_gradient_computes_each_chunks_logits_once():
  """Differentiated, the loss does three products with the head per token
  (the logits, the hidden states' gradient, the head's), none twice: the
  forward pass makes the gradient, the backward pass only scales it. The
  frozen teacher a loss closes over is not differentiated: its logits are
  one product more, in the forward pass only."""
  rng = np.random.default_rng(4)
  w, head = _head(rng)
  t_w = jnp.asarray(rng.normal(size=(8, V)).astype(np.float32))
  hidden = jnp.asarray(rng.normal(size=(B, 10, 8)).astype(np.float32))
  labels = rng.integers(0, V, size=(B, 10)).astype(np.int32)
  mask = np.ones((B, 10), np.float32)

  def per_token(lg, t):
    t_logits = jnp.einsum("BCD,DV->BCV", t["teacher_hidden"], t_w)
    return losses.dense_kd_per_token(lg, t_logits, 1.0, "forward", 0.5)

  def loss(hidden, w):
    targets = {"labels": labels, "teacher_hidden": hidden * 2.0}
    targets = jax.lax.stop_gradient(targets)
    return losses.chunked_loss(hidden, head(w), per_token, targets, mask, 4)

  one = 2 * B * 12 * 8 * V  # a product with a head over the padded row
  forward = planning.matmul_flops(jax.make_jaxpr(loss)(hidden, w))
  both = planning.matmul_flops(
      jax.make_jaxpr(jax.value_and_grad(loss, (0, 1)))(hidden, w)
  )
  assert forward == 2 * one  # the student's logits and the teacher's
  assert both == 4 * one  # ... and the two gradients, nothing recomputed


def test_gradients_finite_under_extreme_inputs():
  rng = np.random.default_rng(3)
  logits = jnp.asarray(
      rng.choice([-1e4, 1e4], size=(B, T, V)).astype(np.float32)
  )
  teacher = rng.choice([-1e4, 0.0, 1e4], size=(B, T, V)).astype(np.float32)
  teacher[..., :3] = -np.inf  # teacher probabilities of exactly 0
  mask = np.ones((B, T), np.float32)
  mask[1, 2] = 0
  ids, vals, tail = topk(np.where(np.isfinite(teacher), teacher, -1e30), 5, 1.0)
  vals = vals.astype(np.float32)
  vals[..., 3:] = -np.inf  # padded ids
  vals[1, 2, :] = -np.inf  # an all-padding (masked) row
  stored = np.zeros((B, T, V), bool)
  np.put_along_axis(stored, ids[..., :3], True, -1)
  all_ids, all_vals, _ = topk(
      np.where(np.isfinite(teacher), teacher, -1e30), V, 1.0
  )
  counts = np.zeros((B, T, 4), np.int32)
  counts[..., 0] = 64
  counts[1, 2] = 0  # a masked row without draws
  zero_tail = np.zeros((B, T), np.float32)
  fns = {
      "sparse": lambda lg: losses.sparse_kl(lg, ids, vals, mask, 1.0),
      "ghost": lambda lg: losses.ghost_kl(
          lg, ids, vals, tail.astype(np.float32), mask, 1.0
      ),
      # The student puts all its mass (to float32 precision) on the stored ids while
      # the teacher's tail is 0.1: a naive log1p(-sum q) ghost would give -inf.
      "ghost_student_in_topk": lambda lg: losses.ghost_kl(
          jnp.where(stored, 1e4, -1e4) + 1e-6 * lg,
          ids,
          vals,
          zero_tail + 0.1,
          mask,
          1.0,
      ),
      "ghost_tail0": lambda lg: losses.ghost_kl(
          lg, ids, vals, zero_tail, mask, 1.0
      ),
      "ghost_all_ids": lambda lg: losses.ghost_kl(
          lg, all_ids, all_vals.astype(np.float32), zero_tail + 1e-3, mask, 1.0
      ),
      "sampled": lambda lg: losses.sampled_kl(
          lg, ids[..., :4], counts, mask, 1.0, include_entropy=True
      ),
      "ce": lambda lg: losses.cross_entropy(lg, ids[..., 0], mask),
      **{
          f"dense_{k}_{b}": (
              lambda lg, k=k, b=b: losses.dense_kd(lg, teacher, mask, 1.0, k, b)
          )
          for k, b in [
              ("forward", 0.5),
              ("reverse", 0.5),
              ("jsd", 0.5),
              ("jsd", 0.0),
              ("jsd", 1.0),
          ]
      },
  }
  for name, fn in fns.items():
    for temp_scale in (1.0, 0.5):
      value, grad = jax.value_and_grad(lambda lg: fn(lg * temp_scale))(logits)
      assert np.isfinite(value), name
      assert np.all(np.isfinite(np.asarray(grad))), name


def test_mask_excludes_positions(data):
  rng, logits, teacher, mask = data
  garbage = np.where(
      mask[..., None] > 0, logits, rng.normal(size=logits.shape) * 1e3
  ).astype(np.float32)
  for fn in (
      lambda lg: losses.dense_kd(lg, teacher, mask, 2.0, "reverse"),
      lambda lg: losses.cross_entropy(lg, np.zeros((B, T), np.int32), mask),
  ):
    np.testing.assert_allclose(fn(garbage), fn(logits), rtol=1e-6)
    grad = np.asarray(jax.grad(fn)(logits))
    assert np.all(grad[mask == 0] == 0) and np.any(grad[mask > 0] != 0)
  per = losses.dense_kd_per_token(logits, teacher, 2.0)
  np.testing.assert_allclose(
      losses.dense_kd(logits, teacher, mask, 2.0),
      (per * mask).sum() / mask.sum(),
      rtol=1e-6,
  )


def test_mixing_and_t_squared_scale():
  assert float(
      losses.mix_losses(2.0, 3.0, alpha=0.25, temperature=2.0)
  ) == pytest.approx(0.25 * 2 + 0.75 * 4 * 3)
  # Hinton: T^2 * grad KL(p_T || q_T) -> (z_s - z_t) / V for large T and zero-mean logits,
  # independent of T. Without the T^2 factor (or with T) this limit would not hold.
  rng = np.random.default_rng(4)
  zs, zt = rng.normal(size=(2, 1, 1, V)).astype(np.float32)
  zs, zt = zs - zs.mean(), zt - zt.mean()
  mask = np.ones((1, 1), np.float32)
  for temp in (50.0, 200.0):
    grad = jax.grad(
        lambda lg: losses.mix_losses(
            0.0, losses.dense_kd(lg, zt, mask, temp), 0.0, temp
        )
    )(zs)
    np.testing.assert_allclose(
        grad, (zs - zt) / V, atol=0.02 * np.abs(zs - zt).max() / V
    )


def test_schedules_hit_endpoints():
  for kind in ("linear", "cosine"):
    fn = jax.jit(losses.schedule(kind, 1.0, 0.2, 100))
    assert float(fn(0)) == pytest.approx(1.0) and float(
        fn(100)
    ) == pytest.approx(0.2)
    assert float(fn(500)) == pytest.approx(0.2) and float(
        fn(50)
    ) == pytest.approx(0.6)
  cos = losses.schedule("cosine", 1.0, 0.0, 100)
  assert float(cos(25)) == pytest.approx(0.5 * (1 + np.cos(np.pi / 4)))
  assert float(losses.schedule("constant", 0.7)(10**6)) == pytest.approx(0.7)
  with pytest.raises(ValueError, match="schedule kind"):
    losses.schedule("step", 1.0, 0.0, 10)


def compiled_temp_bytes(
    chunk_size, batch=1, length=2048, width=256, vocab=262_144, draws=64
):
  """Temp bytes XLA plans for loss + grads (w.r.t. hidden and head) of sampled_kl."""

  def loss(hidden, w, ids, counts, mask):
    logits_fn = lambda h: jnp.einsum("BCD,DV->BCV", h, w)
    per_token = lambda lg, t: losses.sampled_kl_per_token(lg, t[0], t[1])
    if chunk_size is None:
      return losses.masked_mean(
          per_token(logits_fn(hidden), (ids, counts)), mask
      )
    return losses.chunked_loss(
        hidden, logits_fn, per_token, (ids, counts), mask, chunk_size
    )

  shapes = [
      ((batch, length, width), jnp.float32),
      ((width, vocab), jnp.float32),
      ((batch, length, draws), jnp.int32),
      ((batch, length, draws), jnp.int32),
      ((batch, length), jnp.float32),
  ]
  args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
  compiled = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_memory_is_far_below_unchunked():
  full = compiled_temp_bytes(None)
  chunked = compiled_temp_bytes(128)
  logits_bytes = 2048 * 262_144 * 4
  print(
      f"temp bytes at V=262144, B=1, T=2048, D=256: unchunked {full / 2**20:.0f} MiB, "
      f"chunk 128 {chunked / 2**20:.0f} MiB"
  )
  assert (
      full >= logits_bytes
  )  # the unchunked program holds full [B, T, V] logits
  assert chunked < 0.1 * full
