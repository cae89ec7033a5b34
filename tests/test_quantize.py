"""Quantised students (Qwix): PTQ schemes, decoding, folders, export, QAT."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from distill import speculative
from distill.core import checkpoint, layout
from distill.core.errors import ConfigError
from distill.decoding import generate as gen
from student import export, load_student, quantize
from distill import generate as text_generate
from student.config import PRESETS
from student.model import Student
from teacher import config as teacher_config
from teacher.model import Teacher

TOKENS = jax.random.randint(jax.random.key(1), (2, 16), 0, 256, jnp.int32)

# Forward passes compiled whole: one program per model structure, rather than
# one per operation of an eager call.
_forward = nnx.jit(lambda model, tokens: model(tokens))
_decode = nnx.jit(lambda model, *args: model.decode(*args))


@pytest.fixture(scope="module")
def student():
  return Student(PRESETS["tiny"], nnx.Rngs(0))


def test_ptq_stores_codes_and_stays_close(student, tmp_path):
  want = _forward(student, TOKENS)
  spread = float(jnp.std(want))
  errors, sizes = {}, {}
  for scheme in ("int8", "fp8", "int4"):
    q = quantize.quantize(student, scheme)
    dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(q, nnx.Param))}
    assert jnp.dtype(quantize.SCHEMES[scheme][0]) in dtypes  # codes stored
    got = _forward(q, TOKENS)
    assert got.dtype == jnp.float32
    errors[scheme] = float(jnp.abs(got - want).max()) / spread
    sizes[scheme] = quantize.weight_bytes(q)
  float_bytes = quantize.weight_bytes(student)
  assert errors["int8"] < 0.2 and errors["int8"] < errors["fp8"]
  assert errors["fp8"] < errors["int4"]
  assert sizes["int8"] < 0.3 * float_bytes  # 1 byte a weight + scales
  assert sizes["int4"] < sizes["int8"]
  # The float student is untouched.
  np.testing.assert_array_equal(_forward(student, TOKENS), want)


def test_quantised_decode_matches_its_own_forward(student):
  q = quantize.quantize(student, "int8")
  full = _forward(q, TOKENS)
  cache = q.init_cache(2, 32)
  positions = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16))
  prefix, cache = _decode(q, TOKENS[:, :10], cache, positions[:, :10])
  step, _ = _decode(q, TOKENS[:, 10:], cache, positions[:, 10:])
  np.testing.assert_allclose(prefix, full[:, :10], atol=1e-4)
  np.testing.assert_allclose(step, full[:, 10:], atol=1e-4)
  assert len(gen.generate(q, [[1, 2, 3]], 6)[0]) == 6


def test_folder_round_trip_and_hf_refusal(student, tmp_path):
  workdir = str(tmp_path)
  run_dir = layout.student_dir(workdir, "r")
  checkpoint.write_config(run_dir, "student", student.config)
  checkpoint.save_params(run_dir, student, step=4)
  folder = export.export(workdir, "r", "orbax", quantization="int8")
  assert folder.endswith(os.path.join("export", "r-int8"))
  loaded = load_student(folder)
  assert loaded.quantization == "int8"
  want = _forward(quantize.quantize(student, "int8"), TOKENS)
  np.testing.assert_array_equal(_forward(loaded, TOKENS), want)
  with pytest.raises(export.ExportError, match="orbax folder only"):
    export.export(workdir, "r", "hf", quantization="int8")
  with pytest.raises(export.ExportError, match="unknown quantization"):
    export.export(workdir, "r", "orbax", quantization="int3")


def test_quantised_drafter_keeps_speculative_decoding_exact(student):
  teacher = Teacher(
      teacher_config.get_preset("tiny", vocab_size=256), nnx.Rngs(2)
  )
  drafter = quantize.quantize(student, "int8")
  got = speculative.speculative_generate(teacher, drafter, [1, 2, 3], 12)
  want = gen.generate(teacher, [[1, 2, 3]], 12)[0]
  assert got.tokens == want


def test_qat_trains_through_fake_quantisation(student):
  qat = quantize.quantize(student, "int4", qat=True)
  # Float weights are kept and trained; the forward sees them quantised, as
  # the served (PTQ, embedding left float) model will.
  for leaf in jax.tree.leaves(nnx.state(qat, nnx.Param)):
    assert leaf.dtype == jnp.float32
  ptq = quantize.quantize(student, "int4", embedding=False)
  assert ptq.quantization == "int4_projections"
  np.testing.assert_allclose(
      _forward(qat, TOKENS), _forward(ptq, TOKENS), atol=1e-5
  )
  assert (
      float(jnp.abs(_forward(qat, TOKENS) - _forward(student, TOKENS)).max())
      > 0.1
  )
  with pytest.raises(ConfigError, match="cannot quantise the embedding"):
    quantize.quantize(student, "int8", qat=True, embedding=True)

  optimizer = nnx.Optimizer(qat, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    def loss(m):
      hidden, _ = m.hidden(TOKENS[:, :-1])
      logits = m.logits_from_hidden(hidden)
      return jnp.mean(
          optax.softmax_cross_entropy_with_integer_labels(logits, TOKENS[:, 1:])
      )

    value, grads = nnx.value_and_grad(loss)(model)
    optimizer.update(model, grads)
    return value

  losses = [float(step(qat, optimizer)) for _ in range(20)]
  assert losses[-1] < losses[0] - 1.0


def test_generate_binary_reads_a_quantised_export(student, tmp_path):
  """``distill.generate --model_dir`` on a quantised export streams text."""
  workdir = str(tmp_path)
  run_dir = layout.student_dir(workdir, "r")
  checkpoint.write_config(run_dir, "student", student.config)
  checkpoint.save_params(run_dir, student, step=1)
  folder = export.export(workdir, "r", "orbax", quantization="int8")
  with pytest.raises(text_generate.GenerateError, match="leave out --run"):
    text_generate.model_dir(workdir, "r", False, folder)
  assert text_generate.model_dir(workdir, None, False, folder) == folder
  with pytest.raises(text_generate.GenerateError, match="holds no config"):
    text_generate.model_dir(workdir, None, False, str(tmp_path / "nothing"))
