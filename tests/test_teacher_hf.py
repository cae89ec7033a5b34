"""Hugging Face import: logits parity with transformers (torch, float32, CPU)."""

import json
import os
import subprocess
import sys
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer, models  # noqa: E402

from flax import nnx  # noqa: E402

from distill.core import checkpoint, sharding  # noqa: E402
from teacher import hf, load_teacher  # noqa: E402
from conftest import forward  # noqa: E402

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    attn_implementation="eager",
)

# Tiny random configs: GQA, an odd number of experts, top-k > 1, and each
# family's own options.
FAMILIES = {
    "mixtral": (
        transformers.MixtralConfig,
        transformers.MixtralForCausalLM,
        dict(
            intermediate_size=24,
            num_local_experts=5,
            num_experts_per_tok=2,
            sliding_window=4,
            rope_theta=5000.0,
        ),
    ),
    "qwen2_moe": (
        transformers.Qwen2MoeConfig,
        transformers.Qwen2MoeForCausalLM,
        dict(
            intermediate_size=28,
            moe_intermediate_size=12,
            shared_expert_intermediate_size=20,
            num_experts=5,
            num_experts_per_tok=3,
            norm_topk_prob=False,
            mlp_only_layers=[1],
            qkv_bias=True,
        ),
    ),
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        transformers.Qwen3MoeForCausalLM,
        dict(
            intermediate_size=28,
            moe_intermediate_size=12,
            num_experts=5,
            num_experts_per_tok=2,
            head_dim=8,
            norm_topk_prob=True,
            decoder_sparse_step=2,
            num_hidden_layers=3,
        ),
    ),
    "olmoe": (
        transformers.OlmoeConfig,
        transformers.OlmoeForCausalLM,
        dict(
            intermediate_size=12,
            num_experts=5,
            num_experts_per_tok=3,
            norm_topk_prob=False,
            clip_qkv=1.5,
            tie_word_embeddings=True,
            eos_token_id=2,
        ),
    ),
}


def _write_tokenizer(path, vocab=VOCAB):
  words = {f"w{i}": i for i in range(vocab - 1)}
  words["[UNK]"] = vocab - 1
  Tokenizer(models.WordLevel(words, unk_token="[UNK]")).save(path)


def _hf_model(family, seed=0, **overrides):
  config_cls, model_cls, extra = FAMILIES[family]
  torch.manual_seed(seed)
  model = model_cls(config_cls(**{**COMMON, **extra, **overrides})).eval()
  with torch.no_grad():  # larger, non-trivial weights: decisive routing
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.uniform_(0.5, 1.5)
      elif name.endswith("bias"):
        p.normal_(0.0, 0.3)
      else:
        p.normal_(0.0, 0.5 if "mlp.gate." in name else 0.25)
  return model


def _save(model, directory, **kwargs):
  model.save_pretrained(directory, **kwargs)
  _write_tokenizer(os.path.join(directory, "tokenizer.json"))
  return str(directory)


def _assert_parity(hf_model, teacher_dir, seq_len=11):
  tokens = np.random.RandomState(1).randint(0, VOCAB, (3, seq_len))
  with torch.no_grad():
    want = hf_model(torch.tensor(tokens)).logits.numpy()
  model = load_teacher(teacher_dir)
  got = np.asarray(forward(model, jnp.asarray(tokens, jnp.int32)))
  assert got.dtype == np.float32 and got.shape == want.shape
  assert np.abs(want).max() > 1.0  # not a trivially small comparison
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(family, tmp_path):
  hf_model = _hf_model(family)
  # Qwen3: transformers' own fused expert layout; others: the legacy per-expert
  # names real checkpoints use.
  src = _save(
      hf_model, tmp_path / "hf", save_original_format=family != "qwen3_moe"
  )
  teacher_dir = hf.import_hf(src, str(tmp_path / "work"))
  payload = checkpoint.read_config(teacher_dir, kind="teacher")
  assert payload["family"] == family and payload["source"] == src
  assert payload["model"]["num_experts"] == 5
  expected_total = sum(p.numel() for p in hf_model.parameters())
  assert payload["param_counts"]["total"] == expected_total
  with (
      open(tmp_path / "work" / "tokenizer.json") as a,
      open(os.path.join(src, "tokenizer.json")) as b,
  ):
    assert a.read() == b.read()
  _assert_parity(hf_model, teacher_dir)


def test_sharded_checkpoint_imports(tmp_path):
  hf_model = _hf_model("mixtral", seed=3)
  src = _save(hf_model, tmp_path / "hf", max_shard_size="20KB")
  assert os.path.isfile(os.path.join(src, "model.safetensors.index.json"))
  assert len([f for f in os.listdir(src) if f.endswith(".safetensors")]) > 2
  _assert_parity(hf_model, hf.import_hf(src, str(tmp_path / "work")))


def test_binary_imports_skips_a_rerun_and_guards_the_tokenizer(tmp_path):
  hf_model = _hf_model("olmoe", seed=4)
  src = _save(hf_model, tmp_path / "hf")
  work = tmp_path / "work"
  cmd = [
      sys.executable,
      "-m",
      "teacher.import_hf",
      f"--hf_dir={src}",
      f"--workdir={work}",
  ]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
  assert done.returncode == 0, done.stderr
  _assert_parity(hf_model, str(work / "teacher"))
  assert not [f for f in os.listdir(work) if f.startswith(".teacher.tmp")]
  # A second run of the same import is skipped, not redone.
  stamp = os.path.getmtime(work / "teacher" / "config.json")
  hf.import_hf(src, str(work))
  assert os.path.getmtime(work / "teacher" / "config.json") == stamp
  # A workdir prepared with another tokenizer is refused, not overwritten.
  _write_tokenizer(str(work / "tokenizer.json"), vocab=VOCAB - 1)
  done = subprocess.run(
      cmd + ["--overwrite"], capture_output=True, text=True, env=env, cwd=root
  )
  assert done.returncode == 1
  assert "differs" in done.stderr and "Traceback" not in done.stderr


def test_pickle_weights_are_refused(tmp_path):
  hf_model = _hf_model("mixtral")
  src = tmp_path / "hf"
  hf_model.config.save_pretrained(src)
  torch.save(hf_model.state_dict(), src / "pytorch_model.bin")
  _write_tokenizer(str(src / "tokenizer.json"))
  with pytest.raises(hf.HFImportError, match="pickled weights.*safetensors"):
    hf.import_hf(str(src), str(tmp_path / "work"))
  assert not (tmp_path / "work" / "teacher").exists()


def test_unknown_architecture_is_refused(tmp_path):
  src = tmp_path / "hf"
  src.mkdir()
  (src / "config.json").write_text(
      json.dumps(
          {
              "model_type": "llama",
              "architectures": ["LlamaForCausalLM"],
              "auto_map": {"AutoModelForCausalLM": "modeling_evil.Model"},
          }
      )
  )
  _write_tokenizer(str(src / "tokenizer.json"))
  with pytest.raises(
      hf.HFImportError, match="model_type 'llama' is not supported"
  ):
    hf.import_hf(str(src), str(tmp_path / "work"))


def test_unsupported_options_are_refused_clearly():
  base = {"model_type": "qwen2_moe", "vocab_size": 64, "num_hidden_layers": 4}
  with pytest.raises(hf.HFImportError, match="sliding window on some layers"):
    hf.teacher_config_from_hf(
        {**base, "use_sliding_window": True, "max_window_layers": 2}
    )
  with pytest.raises(hf.HFImportError, match="RoPE type 'yarn'"):
    hf.teacher_config_from_hf({**base, "rope_scaling": {"type": "yarn"}})
  with pytest.raises(hf.HFImportError, match="o_proj"):
    hf.teacher_config_from_hf(
        {**base, "model_type": "olmoe", "attention_bias": True}
    )
  with pytest.raises(hf.HFImportError, match="hidden_act"):
    hf.teacher_config_from_hf({**base, "hidden_act": "gelu"})


def test_config_and_weights_that_disagree_are_refused(tmp_path):
  src = _save(_hf_model("qwen3_moe"), tmp_path / "hf")
  with open(os.path.join(src, "config.json")) as f:
    cfg = json.load(f)
  cfg["decoder_sparse_step"] = 1  # claims layer 0 is MoE too: no such tensors
  with open(os.path.join(src, "config.json"), "w") as f:
    json.dump(cfg, f)
  with pytest.raises(hf.HFImportError, match="lacks 'model.layers.0.mlp.gate"):
    hf.import_hf(src, str(tmp_path / "work"))


def test_load_teacher_explains_a_bad_folder(tmp_path):
  with pytest.raises(
      checkpoint.ModelFolderError, match="config.json is missing"
  ):
    load_teacher(str(tmp_path))
  checkpoint.write_config(
      str(tmp_path),
      "student",
      hf.TeacherConfig(
          vocab_size=8,
          d_model=8,
          num_layers=1,
          num_heads=1,
          num_kv_heads=1,
          head_dim=8,
          d_ff=8,
          num_experts=2,
          top_k=1,
      ),
  )
  with pytest.raises(checkpoint.ModelFolderError, match="not a 'teacher'"):
    load_teacher(str(tmp_path))


def test_shard_import_streams_onto_an_8_device_mesh(tmp_path):
  """A sharded safetensors checkpoint onto expert=4 x tensor=2: every device
  holds only its part of each weight, the host stages one parameter at a
  time, and the logits on the mesh match transformers."""
  hf_model = _hf_model(
      "mixtral",
      seed=4,
      num_local_experts=4,
      hidden_size=64,
      intermediate_size=256,
  )
  src = _save(hf_model, tmp_path / "hf", max_shard_size="200KB")
  assert len([f for f in os.listdir(src) if f.endswith(".safetensors")]) > 2
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=1, expert=4, tensor=2))
  config = hf.teacher_config_from_hf(hf.read_hf_config(src))
  # Host staging: a parameter's host array must be gone once it is placed,
  # so at most one (plus the tensors being read) exists at any time.
  staged, alive_at_read = [], []
  read = hf._read_param  # pylint: disable=protected-access

  def tracked(*args):
    alive_at_read.append(sum(r() is not None for r in staged))
    host = read(*args)
    staged.append(weakref.ref(host))
    return host

  with pytest.MonkeyPatch.context() as patch, sharding.use(mesh):
    patch.setattr(hf, "_read_param", tracked)
    model = hf.load_hf_weights(src, config)
  assert len(staged) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert max(alive_at_read) == 0 and staged[-1]() is None

  P = jax.sharding.PartitionSpec
  gate = model.blocks[0].moe.gate[...]  # [E=4, D=64, F=256]
  assert gate.sharding.spec == P("expert", None, "tensor")
  assert {s.data.shape for s in gate.addressable_shards} == {(1, 64, 128)}
  table = model.embed.embedding[...]  # [V=96, D=64]
  assert table.sharding.spec == P("tensor", None)
  assert {s.data.shape for s in table.addressable_shards} == {(48, 64)}

  teacher_dir = hf.import_hf(src, str(tmp_path / "work"), mesh=mesh)
  tokens = np.random.RandomState(1).randint(0, VOCAB, (8, 11))
  with torch.no_grad():
    want = hf_model(torch.tensor(tokens)).logits.numpy()
  with sharding.use(mesh):
    loaded = load_teacher(teacher_dir)  # restored straight onto the mesh
    q = loaded.blocks[1].attn.q_proj.kernel[...]  # [D, N=4, H=16]
    assert q.sharding.spec == P(None, "tensor", None)
    got = np.asarray(
        nnx.jit(lambda m, t: m(t))(
            loaded,
            sharding.put_batch({"t": tokens.astype(np.int32)}, mesh)["t"],
        )
    )
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
