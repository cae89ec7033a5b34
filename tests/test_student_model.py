"""The student: presets (for free, with eval_shape), layer pattern, forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distill.core import checkpoint
from student.config import PRESETS, StudentConfig, get_preset
from student.model import Student, abstract_student


def _hf_param_count(vocab_size=262_144, **kw):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config = transformers.Gemma3TextConfig(vocab_size=vocab_size, **kw)
  with torch.device("meta"):
    model = transformers.Gemma3ForCausalLM(config)
  return sum(p.numel() for p in model.parameters())  # tied head counted once


@pytest.mark.parametrize(
    "name,hf_kw,published",
    [
        (
            "gemma3_270m",
            dict(
                hidden_size=640,
                num_hidden_layers=18,
                num_attention_heads=4,
                num_key_value_heads=1,
                head_dim=256,
                intermediate_size=2048,
            ),
            268e6,
        ),
        (
            "gemma3_1b",
            dict(
                hidden_size=1152,
                num_hidden_layers=26,
                num_attention_heads=4,
                num_key_value_heads=1,
                head_dim=256,
                intermediate_size=6912,
            ),
            1.0e9,
        ),
        (
            "gemma3_4b",
            dict(
                vocab_size=262_208,
                hidden_size=2560,
                num_hidden_layers=34,
                num_attention_heads=8,
                num_key_value_heads=4,
                head_dim=256,
                intermediate_size=10240,
            ),
            3.88e9,  # the language model of the 4.3B image-text checkpoint
        ),
    ],
)
def test_full_size_param_counts_match_transformers(name, hf_kw, published):
  model = abstract_student(get_preset(name))  # no allocation
  counts = model.param_counts()
  assert counts["active"] == counts["total"]
  assert counts["total"] == _hf_param_count(**hf_kw)
  assert counts["total"] == pytest.approx(published, rel=0.01)
  leaf = model.embed.embedding.get_value()
  assert isinstance(leaf, jax.ShapeDtypeStruct) and leaf.shape == (
      hf_kw.get("vocab_size", 262_144),
      hf_kw["hidden_size"],
  )


def test_full_size_pattern_is_five_local_one_global():
  kinds = get_preset("gemma3_270m").layer_kinds
  assert len(kinds) == 18
  assert [i for i, k in enumerate(kinds) if k == "global"] == [5, 11, 17]


def test_layer_pattern_tiles_and_reaches_the_blocks():
  config = get_preset(
      "tiny", num_layers=5, layer_pattern=("local", "local", "global")
  )
  assert config.layer_kinds == ("local", "local", "global", "local", "local")
  model = abstract_student(config)
  assert [b.kind for b in model.blocks] == list(config.layer_kinds)
  assert [b.attn.window for b in model.blocks] == [8, 8, None, 8, 8]
  assert [b.attn.rope_base for b in model.blocks][:3] == [1e4, 1e4, 1e6]


def test_unknown_kind_rejected():
  with pytest.raises(ValueError, match="unknown attention kind 'sliding'"):
    get_preset("tiny", layer_pattern=("sliding", "global"))
  with pytest.raises(ValueError, match="empty"):
    get_preset("tiny", layer_pattern=())
  with pytest.raises(ValueError, match="no field"):
    get_preset("tiny", num_layer=3)
  with pytest.raises(ValueError, match="unknown student preset"):
    get_preset("huge")


def test_presets_sizes():
  assert 2e6 <= abstract_student(PRESETS["demo"]).param_counts()["total"] <= 5e6
  assert PRESETS["demo"].vocab_size == 8192


def test_config_round_trips_through_json():
  config = get_preset("gemma3_1b", final_logit_softcap=30.0)
  again = checkpoint.config_from_dict(
      StudentConfig, checkpoint.config_to_dict(config)
  )
  assert again == config


@pytest.fixture(scope="module")
def tiny():
  return Student(get_preset("tiny"), nnx.Rngs(0))


_forward = nnx.jit(lambda model, *args: model(*args))


def test_tiny_forward_shapes_dtypes_and_hidden_path(tiny):
  model, config = tiny, tiny.config
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, config.vocab_size)
  logits = _forward(model, tokens)
  assert (
      logits.shape == (2, 12, config.vocab_size) and logits.dtype == jnp.float32
  )
  assert np.isfinite(np.asarray(logits)).all()
  hidden, aux = nnx.jit(lambda m, t: m.hidden(t))(model, tokens)
  assert hidden.shape == (2, 12, config.d_model) and aux == {}
  np.testing.assert_allclose(
      model.logits_from_hidden(hidden[:, 4:8]), logits[:, 4:8], atol=1e-6
  )


def test_packed_documents_match_separate_runs(tiny):
  model, config = tiny, tiny.config
  a = jax.random.randint(jax.random.key(1), (1, 5), 0, config.vocab_size)
  b = jax.random.randint(jax.random.key(2), (1, 7), 0, config.vocab_size)
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.array([[1] * 5 + [2] * 7])
  pos = jnp.array([list(range(5)) + list(range(7))])
  out = _forward(model, packed, seg, pos)
  np.testing.assert_allclose(out[:, :5], _forward(model, a), atol=1e-5)
  np.testing.assert_allclose(out[:, 5:], _forward(model, b), atol=1e-5)


def test_softcap_and_bfloat16_compute():
  config = get_preset("tiny", final_logit_softcap=2.0, dtype="bfloat16")
  model = Student(config, nnx.Rngs(0))
  logits = _forward(model, jnp.zeros((1, 4), jnp.int32))
  assert logits.dtype == jnp.float32 and float(jnp.abs(logits).max()) <= 2.0
  assert model.embed.embedding[...].dtype == jnp.float32
  hidden, _ = nnx.jit(lambda m, t: m.hidden(t))(
      model, jnp.zeros((1, 4), jnp.int32)
  )
  assert hidden.dtype == jnp.bfloat16


def test_params_train_with_grad(tiny):
  model, config = tiny, tiny.config
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, config.vocab_size)

  def loss_fn(m):
    logp = jax.nn.log_softmax(m(tokens[:, :-1]))
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

  grads = nnx.jit(nnx.grad(loss_fn))(model)
  norms = [float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads)]
  assert len(norms) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert all(n > 0 for n in norms)
