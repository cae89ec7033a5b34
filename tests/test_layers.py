"""Properties of the shared layers: masks, GQA, RoPE, RMSNorm, MLP, embeddings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distill.nn import attention, layers

B, T, D, N, K, H = 2, 12, 16, 4, 2, 6


def _x(seed=0, shape=(B, T, D)):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _attn(**kw):
  args = dict(
      d_model=D, num_heads=N, num_kv_heads=K, head_dim=H, rngs=nnx.Rngs(0)
  )
  args.update(kw)
  return attention.Attention(**args)


# ----------------------------------------------------------------------------
# Masks


def test_mask_causal_segment_window_exact():
  seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 0]])
  idx = attention.default_positions(seg)
  mask = np.asarray(attention.attention_mask(seg, seg, idx, idx, window=3))[0]
  s = np.asarray(seg)[0]
  for q in range(8):
    for k in range(8):
      want = k <= q and s[q] == s[k] and q - k < 3
      assert mask[q, k] == want, (q, k)
  assert mask.any(axis=-1).all()  # padding still sees itself: no empty row


def _perturbation_reach(attn, x, seg, changed):
  """Which outputs move when inputs at positions ``changed`` change."""
  y0 = attn(x, seg)
  x1 = x.at[:, changed].add(10.0)
  y1 = attn(x1, seg)
  return np.asarray(jnp.abs(y1 - y0).max(axis=-1) > 1e-5)  # [B, T]


def test_attention_never_sees_future():
  attn = _attn(kind="global")
  x = _x()
  moved = _perturbation_reach(attn, x, None, [7])
  assert not moved[:, :7].any()
  assert moved[:, 7:].all()  # and the feature is not trivially off


def test_attention_never_sees_another_document():
  attn = _attn(kind="global")
  seg = jnp.array([[1] * 5 + [2] * 7] * B)
  pos = jnp.array([list(range(5)) + list(range(7))] * B)
  x = _x()
  y0 = attn(x, seg, pos)
  y1 = attn(x.at[:, :5].add(10.0), seg, pos)
  moved = np.asarray(jnp.abs(y1 - y0).max(axis=-1) > 1e-5)
  assert moved[:, :5].all() and not moved[:, 5:].any()
  # The second document alone gives the same outputs as packed.
  alone = attn(x[:, 5:], None, None)
  np.testing.assert_allclose(y0[:, 5:], alone, atol=1e-5)


def test_local_attention_window():
  window = 4
  attn = _attn(kind="local", window=window)
  x = _x()
  moved = _perturbation_reach(attn, x, None, [3])
  # Position 3 is visible from 3..3+window-1 and nowhere else.
  assert moved[:, 3 : 3 + window].all()
  assert not moved[:, :3].any() and not moved[:, 3 + window :].any()


def test_unknown_kind_and_bad_settings_rejected():
  with pytest.raises(ValueError, match="unknown attention kind 'sliding'"):
    _attn(kind="sliding", window=4)
  with pytest.raises(ValueError, match="window"):
    _attn(kind="local")
  with pytest.raises(ValueError, match="qk_norm"):
    _attn(qk_norm="rms")
  with pytest.raises(ValueError, match="multiple"):
    _attn(num_heads=3)


# ----------------------------------------------------------------------------
# GQA, QK-norm, shapes


def test_param_shapes_are_named_axes():
  attn = _attn(qkv_bias=True, qk_norm="head")
  assert attn.q_proj.kernel.shape == (D, N, H)
  assert attn.k_proj.kernel.shape == (D, K, H)
  assert attn.v_proj.kernel.shape == (D, K, H)
  assert attn.o_proj.kernel.shape == (N, H, D)
  assert attn.q_proj.bias.shape == (N, H) and attn.k_proj.bias.shape == (K, H)
  assert attn.o_proj.bias is None
  assert attn.q_norm.scale.shape == (H,)
  full = _attn(qk_norm="full")
  assert full.q_norm.scale.shape == (N * H,) and full.k_norm.scale.shape == (
      K * H,
  )


@pytest.mark.parametrize(
    "extra",
    [
        dict(),
        dict(qkv_bias=True),
        dict(qk_norm="head"),
        dict(qk_norm="full", clip_qkv=0.5),
        dict(kind="local", window=3),
    ],
)
def test_gqa_equals_mha_with_repeated_kv(extra):
  gqa = _attn(**extra)
  mha = _attn(num_kv_heads=N, **extra)
  g = N // K
  rep = lambda a: jnp.repeat(
      a, g, axis=1
  )  # kv head k serves heads k*g..k*g+g-1
  mha.q_proj.kernel[...] = gqa.q_proj.kernel[...]
  mha.o_proj.kernel[...] = gqa.o_proj.kernel[...]
  mha.k_proj.kernel[...] = rep(gqa.k_proj.kernel[...])
  mha.v_proj.kernel[...] = rep(gqa.v_proj.kernel[...])
  if extra.get("qkv_bias"):
    for name in ("q_proj", "k_proj", "v_proj"):
      b = jax.random.normal(jax.random.key(3), getattr(gqa, name).bias.shape)
      getattr(gqa, name).bias[...] = b
      getattr(mha, name).bias[...] = (
          b if name == "q_proj" else jnp.repeat(b, g, 0)
      )
  if extra.get("qk_norm") == "head":
    w = jax.random.normal(jax.random.key(4), (H,))
    gqa.k_norm.scale[...] = w
    mha.k_norm.scale[...] = w
  if extra.get("qk_norm") == "full":
    # A full k-norm over [K*H] is only a repeated [N*H] norm when the RMS is
    # the same, which it is for repeated heads; the weights repeat per head.
    w = jax.random.normal(jax.random.key(4), (K, H))
    gqa.k_norm.scale[...] = w.reshape(-1)
    mha.k_norm.scale[...] = jnp.repeat(w, g, 0).reshape(-1)
  x = _x(1)
  np.testing.assert_allclose(gqa(x), mha(x), atol=1e-5)


def test_attention_dtype_bfloat16_compute():
  attn = _attn(dtype=jnp.bfloat16, qk_norm="head")
  y = attn(_x())
  assert y.dtype == jnp.bfloat16 and y.shape == (B, T, D)
  assert attn.q_proj.kernel.dtype == jnp.float32


# ----------------------------------------------------------------------------
# RoPE


def test_rope_rotate_half_matches_reference():
  x = _x(2, (1, 3, 2, 8))
  pos = jnp.array([[0, 5, 17]])
  out = np.asarray(attention.apply_rope(x, pos, base=100.0, scaling_factor=2.0))
  inv = 1.0 / (100.0 ** (np.arange(0, 8, 2) / 8)) / 2.0
  ang = np.asarray(pos)[0][:, None] * inv  # [T, 4]
  xs = np.asarray(x)[0]
  cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None]
  sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None]
  rotate_half = np.concatenate([-xs[..., 4:], xs[..., :4]], -1)
  np.testing.assert_allclose(out[0], xs * cos + rotate_half * sin, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
  q = _x(3, (1, 1, 1, 16))
  k = _x(4, (1, 1, 1, 16))

  def score(pq, pk, base=10_000.0, factor=1.0):
    rq = attention.apply_rope(
        q, jnp.array([[pq]]), base=base, scaling_factor=factor
    )
    rk = attention.apply_rope(
        k, jnp.array([[pk]]), base=base, scaling_factor=factor
    )
    return float(jnp.sum(rq * rk))

  for base, factor in [(10_000.0, 1.0), (1e6, 8.0)]:
    ref = score(7, 3, base, factor)
    for shift in (0, 1, 50, 1000):
      assert score(7 + shift, 3 + shift, base, factor) == pytest.approx(
          ref, abs=1e-4
      )
  assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)
  # Linear scaling is positions / factor.
  assert score(16, 8, factor=4.0) == pytest.approx(score(4, 2), abs=1e-4)


# ----------------------------------------------------------------------------
# RMSNorm, MLP, embeddings


@pytest.mark.parametrize("offset_one", [True, False])
def test_rmsnorm_against_numpy(offset_one):
  norm = layers.RMSNorm(10, eps=1e-5, offset_one=offset_one)
  init = np.asarray(norm.scale[...])
  assert (init == (0.0 if offset_one else 1.0)).all()
  w = np.random.default_rng(0).normal(size=10).astype(np.float32)
  norm.scale[...] = jnp.asarray(w)
  x = np.random.default_rng(1).normal(size=(3, 4, 10)).astype(np.float32) * 3
  ref = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5)
  ref = ref * ((1 + w) if offset_one else w)
  np.testing.assert_allclose(norm(jnp.asarray(x)), ref, rtol=1e-5, atol=1e-5)
  y16 = norm(jnp.asarray(x, jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(
      np.asarray(y16, np.float32), ref, rtol=2e-2, atol=5e-2
  )


@pytest.mark.parametrize(
    "act,fn",
    [
        ("silu", lambda a: a / (1 + np.exp(-a))),
        (
            "gelu_tanh",
            lambda a: 0.5
            * a
            * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3))),
        ),
    ],
)
def test_mlp_against_numpy(act, fn):
  mlp = layers.MLP(D, 24, activation=act, rngs=nnx.Rngs(0))
  x = np.asarray(_x(5))
  g, u, d = (
      np.asarray(p.kernel[...])
      for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
  )
  ref = (fn(x @ g) * (x @ u)) @ d
  np.testing.assert_allclose(mlp(jnp.asarray(x)), ref, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="unknown activation"):
    layers.MLP(D, 24, activation="relu", rngs=nnx.Rngs(0))


def test_embed_tied_and_untied():
  emb = layers.Embed(50, D, rngs=nnx.Rngs(0))
  tokens = jnp.array([[1, 2, 49]])
  h = emb(tokens)
  table = np.asarray(emb.embedding[...])
  np.testing.assert_array_equal(h[0], table[[1, 2, 49]])
  logits = emb.attend(h)
  assert logits.shape == (1, 3, 50) and logits.dtype == jnp.float32
  np.testing.assert_allclose(
      logits, np.asarray(h) @ table.T, rtol=1e-5, atol=1e-5
  )
  head = layers.Unembed(D, 50, rngs=nnx.Rngs(1))
  assert head.kernel.shape == (D, 50)
  np.testing.assert_allclose(
      head(h),
      np.asarray(h) @ np.asarray(head.kernel[...]),
      rtol=1e-5,
      atol=1e-5,
  )
  emb16 = layers.Embed(50, D, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
  assert emb16(tokens).dtype == jnp.bfloat16
  assert emb16.attend(emb16(tokens)).dtype == jnp.float32


def test_count_params_abstract():
  abstract = nnx.eval_shape(lambda: _attn(qkv_bias=True, qk_norm="head"))
  want = D * N * H + 2 * D * K * H + N * H * D + N * H + 2 * K * H + 2 * H
  assert layers.count_params(abstract) == want


def test_softcap():
  x = jnp.array([-100.0, 0.0, 3.0])
  assert layers.softcap(x, None) is x
  np.testing.assert_allclose(
      layers.softcap(x, 30.0), 30 * np.tanh(np.asarray(x) / 30)
  )
