"""The teacher's log-likelihood of a model's own continuations."""

import jax
import numpy as np
import pytest
from flax import nnx

import teacher as teacher_lib
from conftest import forward
from distill.decoding import generate as gen
from distill.evals import generation
from student.config import get_preset
from student.model import Student

V = 40
PROMPTS = np.random.default_rng(0).integers(1, V, (3, 6)).astype(np.int32)


@pytest.fixture(scope="module")
def teacher():
  # One layer each: the figures do not depend on the depth, the compile
  # time does.
  return teacher_lib.Teacher(
      teacher_lib.get_preset("tiny", vocab_size=V, num_layers=1), nnx.Rngs(1)
  )


@pytest.fixture(scope="module")
def student():
  return Student(
      get_preset("tiny", vocab_size=V, num_layers=1, layer_pattern=("local",)),
      nnx.Rngs(5),
  )


def _log_softmax64(logits):
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _by_hand(teacher, prompts, continuation):
  tokens = np.concatenate([prompts, np.asarray(continuation)], axis=1)
  log_p = _log_softmax64(forward(teacher, tokens[:, :-1]))
  picked = np.take_along_axis(log_p, tokens[:, 1:, None], -1)[..., 0]
  return picked[:, prompts.shape[1] - 1 :]


def test_figures_equal_a_hand_computed_log_likelihood(teacher, student):
  key = jax.random.key(3)
  got = generation.teacher_log_likelihood(
      teacher, student, PROMPTS, 7, temperature=0.8, key=key
  )
  assert got["tokens"] == 3 * 7
  for name, temperature in (("greedy", 0.0), ("sampled", 0.8)):
    rows = gen.generate(student, PROMPTS, 7, temperature=temperature, key=key)
    want = _by_hand(teacher, PROMPTS, rows).mean()
    np.testing.assert_allclose(got[f"teacher_loglik_{name}"], want, rtol=1e-5)
  own = _by_hand(
      student, PROMPTS, gen.generate(student, PROMPTS, 7, temperature=0.8,
                                     key=key)
  )  # fmt: skip
  np.testing.assert_allclose(got["model_loglik_sampled"], own.mean(), rtol=1e-5)


def test_greedy_text_is_the_most_likely_token_at_every_step(teacher):
  # The teacher scoring its own greedy continuation: each token is its
  # argmax there, so the per-token figure is the maximum log-probability.
  rows = gen.generate(teacher, PROMPTS, 6)
  tokens = np.concatenate([PROMPTS, np.asarray(rows)], axis=1)
  scores = np.asarray(
      generation.continuation_log_probs(teacher, tokens, PROMPTS.shape[1])
  )
  best = _log_softmax64(forward(teacher, tokens[:, :-1])).max(-1)[:, 5:]
  np.testing.assert_allclose(scores, best, rtol=1e-5, atol=1e-6)
  got = generation.teacher_log_likelihood(teacher, teacher, PROMPTS, 6)
  np.testing.assert_allclose(got["teacher_loglik_greedy"], best.mean(), 1e-5)
  assert got["teacher_loglik_sampled"] < got["teacher_loglik_greedy"]


def test_sampled_figures_are_reproducible_per_key(teacher, student):
  a = generation.teacher_log_likelihood(
      teacher, student, PROMPTS, 8, key=jax.random.key(1)
  )
  b = generation.teacher_log_likelihood(
      teacher, student, PROMPTS, 8, key=jax.random.key(1)
  )
  c = generation.teacher_log_likelihood(
      teacher, student, PROMPTS, 8, key=jax.random.key(2)
  )
  assert a == b
  assert a["teacher_loglik_sampled"] != c["teacher_loglik_sampled"]
  assert a["teacher_loglik_greedy"] == c["teacher_loglik_greedy"]
