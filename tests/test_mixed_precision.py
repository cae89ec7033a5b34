"""bfloat16 compute with float32 master weights, optimizer state and losses."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from distill import train as distill_train
from distill.training import loop as trainer
from experiments import stdlib
from student.config import PRESETS
from student.model import Student
from teacher import config as teacher_config
from teacher import train as teacher_train
from teacher.model import Teacher


def _models(name):
  if name == "student":
    base = PRESETS["tiny"]
    make = Student
  else:
    base = teacher_config.get_preset("tiny")
    make = Teacher
  f32 = make(base, nnx.Rngs(0))
  bf16 = make(dataclasses.replace(base, dtype="bfloat16"), nnx.Rngs(0))
  return f32, bf16, base.vocab_size


def _ce(model, tokens):
  logits = model(tokens[:, :-1])
  return (
      jnp.mean(
          optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
      ),
      logits,
  )


@pytest.mark.parametrize(
    "name", ["student", pytest.param("teacher", marks=pytest.mark.slow)]
)
def test_bf16_compute_keeps_float32_weights_state_and_losses(name):
  f32, bf16, vocab = _models(name)
  # The same float32 parameters: only the compute dtype differs.
  for a, b in zip(
      jax.tree.leaves(nnx.state(f32)), jax.tree.leaves(nnx.state(bf16))
  ):
    assert b.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  tokens = jax.random.randint(jax.random.key(1), (4, 33), 0, vocab)
  loss32, _ = nnx.jit(_ce)(f32, tokens)
  loss16, logits = nnx.jit(_ce)(bf16, tokens)
  assert logits.dtype == jnp.float32 and loss16.dtype == jnp.float32
  assert abs(float(loss16) - float(loss32)) < 0.02

  cfg = trainer.LoopConfig(steps=30, learning_rate=1e-2, warmup_steps=2)
  optimizer = nnx.Optimizer(bf16, trainer.make_optimizer(cfg), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: _ce(m, tokens)[0])(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(bf16, optimizer)) for _ in range(30)]
  assert all(np.isfinite(losses))
  assert losses[-1] < losses[0] - 1.0  # it learns (memorises the batch)
  for leaf in jax.tree.leaves(nnx.state(optimizer)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32  # AdamW moments stay float32
  for leaf in jax.tree.leaves(nnx.state(bf16, nnx.Param)):
    assert leaf.dtype == jnp.float32


def test_gpu_variant_is_sized_and_typed_for_an_accelerator():
  config = stdlib.get_config("gpu")
  teacher = teacher_train.model_config(config, 8192)
  student = distill_train.model_config(config, 8192)
  assert teacher_config.param_counts(teacher) == {
      "total": 478_317_312,
      "active": 81_955_584,
  }
  assert Student.abstract(student).param_counts()["total"] == 49_833_984
  for model in (teacher, student):
    assert (model.dtype, model.param_dtype) == ("bfloat16", "float32")
  assert config.data.seq_len >= 512
  default = stdlib.get_config()
  assert teacher_train.model_config(default, 8192).dtype == "float32"
