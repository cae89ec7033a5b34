"""Scanned and rematerialised block stacks compute what the plain loop does."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distill.core.errors import ConfigError
from distill.nn import stack
from student.config import PRESETS, StudentConfig
from student.model import Student
from teacher import config as teacher_config
from teacher.model import Teacher

SEGMENTS = jnp.array([[1] * 20 + [2] * 12, [1] * 30 + [0] * 2], jnp.int32)


def _loss_and_grads(model, vocab):
  tokens = jax.random.randint(jax.random.key(0), (2, 32), 0, vocab)

  def loss(m):
    hidden, aux = m.hidden(tokens, SEGMENTS)
    logits = m.logits_from_hidden(hidden)
    extra = aux.get("load_balancing_loss", 0.0)
    return jnp.mean(jax.nn.logsumexp(logits, -1)) + extra, aux

  (value, aux), grads = nnx.value_and_grad(loss, has_aux=True)(model)
  return value, aux, nnx.to_pure_dict(grads)


def _assert_same(a, b, atol):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) and la
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol)


# Scanning is checked in the fast suite; the remat policies in the slow one.
MODES = [
    (True, "none"),
    pytest.param(True, "full", marks=pytest.mark.slow),
    pytest.param(False, "dots", marks=pytest.mark.slow),
    pytest.param(True, "dots", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("scan,remat", MODES)
@pytest.mark.parametrize("num_layers", [5, 8])
def test_student_stack_modes_match_the_loop(scan, remat, num_layers):
  # Pattern (local, local, global): period 3, so 5 and 8 layers leave
  # leftover blocks after the scanned periods.
  base = dataclasses.replace(
      PRESETS["tiny"],
      num_layers=num_layers,
      layer_pattern=("local", "local", "global"),
  )
  want = _loss_and_grads(Student(base, nnx.Rngs(0)), base.vocab_size)
  config = dataclasses.replace(base, scan_layers=scan, remat=remat)
  got = _loss_and_grads(Student(config, nnx.Rngs(0)), base.vocab_size)
  _assert_same(got, want, atol=2e-6)


@pytest.mark.parametrize("scan,remat", MODES)
def test_teacher_stack_with_a_dense_first_layer_matches_the_loop(scan, remat):
  base = teacher_config.get_preset(
      "tiny", num_layers=5, dense_layers=(0,), dense_d_ff=32
  )
  want = _loss_and_grads(Teacher(base, nnx.Rngs(0)), base.vocab_size)
  config = dataclasses.replace(base, scan_layers=scan, remat=remat)
  got = _loss_and_grads(Teacher(config, nnx.Rngs(0)), base.vocab_size)
  _assert_same(got, want, atol=2e-6)
  assert got[1]["expert_load"].shape == (4, base.num_experts)


def test_period_and_pieces():
  assert stack.period("aabaab") == 3
  assert stack.period("aaaa") == 1
  assert stack.period("abc") == 3
  # A dense layer first, then four identical MoE layers: no period, so the
  # identical run is scanned on its own.
  assert stack._groups("dmmmm") == [(0, 1, 1), (1, 1, 4)]
  # Two whole periods of (l, l, g) scanned, the leftover (l, l) as a run.
  assert stack._groups("llgllgll") == [(0, 3, 2), (6, 1, 2)]


def test_scanning_traces_one_period():
  """The scanned stack's jaxpr holds one period of blocks, not every block."""
  count = {}
  for scan in (False, True):
    config = dataclasses.replace(
        PRESETS["tiny"], num_layers=12, layer_pattern=("global",)
    )
    config = dataclasses.replace(config, scan_layers=scan)
    model = Student(config, nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = jnp.zeros((1, 8), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens))(state)
    count[scan] = str(jaxpr).count("rsqrt")  # RMSNorms traced
  assert count[True] * 6 < count[False]


def test_bad_remat_is_a_config_error():
  with pytest.raises(ConfigError, match="unknown remat 'some'"):
    StudentConfig(remat="some")
  with pytest.raises(ConfigError, match="unknown attention_impl"):
    teacher_config.get_preset("tiny", attention_impl="flash")
