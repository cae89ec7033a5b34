"""Teacher model: preset parameter counts (free, via eval_shape), shapes, masking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import forward
from distill import planning
from distill.core import checkpoint
from distill.core.errors import ConfigError
from experiments import hf_moe, stdlib
from teacher import config as config_lib
from teacher import hf
from teacher.model import Teacher, abstract_teacher, load_teacher

# The published config.json of each real checkpoint (the fields that matter),
# and the published parameter counts in billions (total, active).
REAL = {
    "mixtral_8x7b": (
        {
            "model_type": "mixtral",
            "vocab_size": 32000,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1e6,
            "sliding_window": None,
            "router_aux_loss_coef": 0.02,
            "tie_word_embeddings": False,
        },
        (46.7, 12.9),
    ),
    "qwen3_30b_a3b": (
        {
            "model_type": "qwen3_moe",
            "vocab_size": 151936,
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "moe_intermediate_size": 768,
            "num_hidden_layers": 48,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "rms_norm_eps": 1e-6,
            "rope_theta": 1e6,
            "use_sliding_window": False,
            "router_aux_loss_coef": 0.001,
            "tie_word_embeddings": False,
        },
        (30.5, 3.3),
    ),
    "qwen3_235b_a22b": (
        {
            "model_type": "qwen3_moe",
            "vocab_size": 151936,
            "hidden_size": 4096,
            "intermediate_size": 12288,
            "moe_intermediate_size": 1536,
            "num_hidden_layers": 94,
            "num_attention_heads": 64,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "rms_norm_eps": 1e-6,
            "rope_theta": 1e6,
            "use_sliding_window": False,
            "router_aux_loss_coef": 0.001,
            "tie_word_embeddings": False,
        },
        (235.1, 22.2),
    ),
    "olmoe_1b_7b": (
        {
            "model_type": "olmoe",
            "vocab_size": 50304,
            "hidden_size": 2048,
            "intermediate_size": 1024,
            "num_hidden_layers": 16,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "num_experts": 64,
            "num_experts_per_tok": 8,
            "norm_topk_prob": False,
            "clip_qkv": None,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "router_aux_loss_coef": 0.01,
            "tie_word_embeddings": False,
        },
        (6.9, 1.3),
    ),
}


@pytest.mark.parametrize(
    "name",
    [
        # transformers takes ~40 s to build its 94 x 128 experts, even on meta
        pytest.param(n, marks=pytest.mark.slow) if n == "qwen3_235b_a22b" else n
        for n in sorted(REAL)
    ],
)
def test_real_presets_match_published_and_transformers_counts(name):
  hf_config, (total_b, active_b) = REAL[name]
  preset = config_lib.get_preset(name)
  # The importer maps the published config.json onto exactly this preset.
  assert hf.teacher_config_from_hf(hf_config) == preset
  counts = abstract_teacher(preset).param_counts()  # eval_shape: no allocation
  assert counts == config_lib.param_counts(preset)
  # Published figures are rounded to 0.1B; 2% covers that rounding.
  assert counts["total"] / 1e9 == pytest.approx(total_b, rel=0.02)
  assert counts["active"] / 1e9 == pytest.approx(active_b, rel=0.02)

  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cls = {
      "mixtral": transformers.MixtralForCausalLM,
      "qwen3_moe": transformers.Qwen3MoeForCausalLM,
      "olmoe": transformers.OlmoeForCausalLM,
  }[preset.family]
  config = transformers.AutoConfig.for_model(**hf_config)
  with torch.device("meta"):
    model = cls(config)
  assert counts["total"] == sum(p.numel() for p in model.parameters())


def test_demo_preset_is_a_small_moe():
  counts = abstract_teacher(config_lib.get_preset("demo")).param_counts()
  assert 15e6 <= counts["total"] <= 20e6
  assert 5e6 <= counts["active"] <= 7e6


def test_presets_and_overrides_are_checked():
  with pytest.raises(ValueError, match="unknown teacher preset"):
    config_lib.get_preset("huge")
  with pytest.raises(ValueError, match="no field"):
    config_lib.get_preset("tiny", num_expert=3)
  with pytest.raises(ValueError, match="top_k=6 exceeds num_experts=5"):
    config_lib.get_preset("tiny", top_k=6)
  with pytest.raises(ValueError, match="qk_norm"):
    config_lib.get_preset("tiny", qk_norm="rms")


def _tiny(**overrides):
  return Teacher(config_lib.get_preset("tiny", **overrides), nnx.Rngs(0))


@nnx.jit
def _hidden(model, tokens, segment_ids, positions):
  return model.hidden(tokens, segment_ids, positions)


def test_forward_shapes_and_aux():
  model = _tiny(
      dense_layers=(0,), dense_d_ff=20, shared_expert_d_ff=12, num_layers=3
  )
  c = model.config
  tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, c.vocab_size)
  hidden, aux = nnx.jit(lambda m, t: m.hidden(t))(model, tokens)
  assert hidden.shape == (2, 6, c.d_model)
  assert aux["expert_load"].shape == (2, c.num_experts)  # two MoE layers
  np.testing.assert_allclose(aux["expert_load"].sum(-1), 2 * 6 * c.top_k)
  for key in ("load_balancing_loss", "z_loss", "dropped_fraction"):
    assert aux[key].shape == () and np.isfinite(aux[key])
  logits = nnx.jit(lambda m, t: m(t))(model, tokens)
  assert logits.shape == (2, 6, c.vocab_size) and logits.dtype == jnp.float32
  np.testing.assert_allclose(
      logits, model.logits_from_hidden(hidden), atol=1e-5
  )
  counts = model.param_counts()
  assert counts["total"] == config_lib.param_counts(c)["total"]
  assert counts["active"] < counts["total"]


@pytest.mark.parametrize("window", [None, 3])
def test_packed_documents_do_not_see_each_other(window):
  model = _tiny(sliding_window=window, tie_embeddings=False)
  v = model.config.vocab_size
  rng = np.random.RandomState(0)
  a, b, b2 = rng.randint(0, v, 5), rng.randint(0, v, 4), rng.randint(0, v, 4)
  row = lambda second: jnp.asarray(np.concatenate([a, second])[None], jnp.int32)
  segments = jnp.asarray([[1] * 5 + [2] * 4], jnp.int32)
  positions = jnp.asarray([list(range(5)) + list(range(4))], jnp.int32)
  h1, _ = _hidden(model, row(b), segments, positions)
  h2, _ = _hidden(model, row(b2), segments, positions)
  # Document A is unaffected by what follows it in the row ...
  np.testing.assert_allclose(h1[:, :5], h2[:, :5], atol=1e-5)
  # ... and document B computes as if it were alone.
  alone, _ = _hidden(
      model,
      jnp.asarray(b[None], jnp.int32),
      jnp.ones((1, 4), jnp.int32),
      positions[:, 5:],
  )
  np.testing.assert_allclose(h1[:, 5:], alone, atol=1e-5)
  assert not np.allclose(h1[:, 5:], h2[:, 5:], atol=1e-3)


def test_padding_is_left_out_of_router_statistics():
  model = _tiny()
  tokens = jnp.asarray(
      np.random.RandomState(1).randint(0, 128, (1, 7)), jnp.int32
  )
  padded = jnp.concatenate([tokens, jnp.zeros((1, 5), jnp.int32)], axis=1)
  segments = jnp.asarray([[1] * 7 + [0] * 5], jnp.int32)
  positions = jnp.asarray([list(range(7)) + [0] * 5], jnp.int32)
  h_pad, aux_pad = _hidden(model, padded, segments, positions)
  h, aux = _hidden(model, tokens, jnp.ones((1, 7), jnp.int32), positions[:, :7])
  np.testing.assert_allclose(h_pad[:, :7], h, atol=1e-5)
  for key in aux:
    np.testing.assert_allclose(aux_pad[key], aux[key], rtol=1e-5, atol=1e-7)


def test_a_loaded_teacher_runs_as_the_config_says(tmp_path):
  """The stages load a teacher folder with the runtime fields of
  ``config.teacher.model`` in place of the folder's: the same parameters and
  logits, scanned; an imported teacher's shapes cannot be set there."""
  model = _tiny()
  folder = str(tmp_path / "teacher")
  checkpoint.write_config(folder, "teacher", model.config, source="test")
  checkpoint.save_params(folder, model)
  config = stdlib.get_config("tiny")
  config.teacher.model.scan_layers = True
  config.teacher.model.remat = "full"
  runtime = config_lib.runtime_settings(config)
  assert runtime == {"scan_layers": True, "remat": "full"}
  plain, scanned = load_teacher(folder), load_teacher(folder, **runtime)
  assert not plain.config.scan_layers and scanned.config.scan_layers
  assert scanned.config.remat == "full"
  tokens = jnp.arange(24, dtype=jnp.int32).reshape(2, 12) % 50
  np.testing.assert_allclose(
      np.asarray(forward(scanned, tokens)),
      np.asarray(forward(plain, tokens)),
      atol=1e-5,
  )

  imported = hf_moe.get_config("default")
  imported.teacher.model.scan_layers = True
  assert config_lib.runtime_settings(imported) == {"scan_layers": True}
  assert planning.teacher_model_config(imported).scan_layers
  imported.teacher.model.num_layers = 2
  with pytest.raises(ConfigError, match="num_layers of an imported teacher"):
    config_lib.runtime_settings(imported)
