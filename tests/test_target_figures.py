"""The figures that explain what each cached target keeps of the teacher."""

import jax
import jax.numpy as jnp
import numpy as np

from data import sparse_targets
from distill.evals import targets

V = 30


def _log_p(seed=0, positions=64):
  logits = 2.0 * jax.random.normal(jax.random.key(seed), (1, positions, V))
  return jax.nn.log_softmax(logits)


def _figures(log_p, mask=None, **sizes):
  mask = jnp.ones(log_p.shape[:2], bool) if mask is None else mask
  settings = dict(methods=("sample", "topk", "topk_tail"), k=4, n=16)
  settings.update(tail_k=4, m=16)
  settings.update(sizes)
  return targets.means(
      targets.target_sums(jax.random.key(3), log_p, mask, **settings)
  )


def test_figures_against_a_numpy_reference():
  log_p = _log_p()
  got = _figures(log_p)
  lp = np.asarray(log_p[0], np.float64)
  p = np.exp(lp)
  np.testing.assert_allclose(
      got["teacher_entropy"], -(p * lp).sum(-1).mean(), rtol=1e-5
  )
  top = np.sort(p, -1)[:, ::-1][:, :4].sum(-1)
  np.testing.assert_allclose(got["topk_coverage"], top.mean(), rtol=1e-5)
  np.testing.assert_allclose(got["topk_kl"], -np.log(top).mean(), rtol=1e-4)
  np.testing.assert_allclose(got["topk_missing"], 1 - top.mean(), atol=1e-6)
  # The sample's figures from the very draws target_sums makes.
  ids, counts = sparse_targets.sample_targets(jax.random.key(3), log_p, 16)
  ids, counts = np.asarray(ids[0]), np.asarray(counts[0])
  t = counts / 16
  drawn_p = np.take_along_axis(p, ids, -1)
  kl = np.where(t > 0, t * np.log(np.where(t > 0, t, 1) / drawn_p), 0).sum(-1)
  np.testing.assert_allclose(got["sample_kl"], kl.mean(), rtol=1e-4)
  np.testing.assert_allclose(
      got["sample_unique"], (counts > 0).sum(-1).mean(), rtol=1e-6
  )
  missing = 1 - np.where(counts > 0, drawn_p, 0).sum(-1)
  np.testing.assert_allclose(got["sample_missing"], missing.mean(), atol=1e-5)
  # The tail's draws cover part of the tail; the head is exact.
  assert 0 < got["topk_tail_missing"] < got["topk_missing"]


def test_more_draws_bring_targets_closer_and_padding_is_left_out():
  log_p = _log_p(1)
  few, many = _figures(log_p, n=4, m=4), _figures(log_p, n=200, m=200)
  for method in ("sample", "topk_tail"):
    assert many[f"{method}_kl"] < few[f"{method}_kl"]
    assert many[f"{method}_missing"] < few[f"{method}_missing"]
  # At the same number of draws, the exact head leaves less out.
  assert few["topk_tail_missing"] < few["sample_missing"]
  half = jnp.arange(64)[None] < 32
  masked = _figures(log_p, mask=half)
  first = _figures(log_p[:, :32])
  np.testing.assert_allclose(
      masked["teacher_entropy"], first["teacher_entropy"], rtol=1e-6
  )
