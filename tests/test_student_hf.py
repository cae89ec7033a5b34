"""Parity with transformers' Gemma 3 (torch, float32, CPU), export binary, refusals."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import transformers_greedy
from distill.core import checkpoint
from student import export, hf, load_student
from student.config import PRESETS, StudentConfig
from student.model import Student

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Local and global layers, a window shorter than the sequence, GQA, head_dim
# != d_model / num_heads, a query scalar != head_dim, linear RoPE scaling on
# global layers, distinct RoPE bases, logit soft-capping.
CONFIG = StudentConfig(
    vocab_size=96,
    d_model=24,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    d_ff=40,
    layer_pattern=("local", "global"),
    window=3,
    rope_local_base=50.0,
    rope_global_base=500.0,
    rope_global_scaling=2.0,
    query_pre_attn_scalar=12.0,
    rms_eps=1e-6,
    final_logit_softcap=5.0,
)
T = 10
TOKENS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, T))

_forward = nnx.jit(lambda model, tokens: model(tokens))


def _randomize_norms(model: Student, seed: int = 1) -> Student:
  """Non-trivial norm weights (they start at zero), so norms are tested."""
  flat = nnx.state(model, nnx.Param).flat_state()
  key = jax.random.key(seed)
  new = {}
  for i, (path, var) in enumerate(flat):
    if path[-1] == "scale":
      new[path] = 0.5 * jax.random.normal(
          jax.random.fold_in(key, i), var.get_value().shape
      )
  nnx.update(model, nnx.State.from_flat_path(new))
  return model


@pytest.fixture(scope="module")
def student():
  return _randomize_norms(Student(CONFIG, nnx.Rngs(0)))


def _hf_logits(model, tokens=TOKENS):
  model.eval()
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def _max_diff(a, b):
  return float(
      np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)))
  )


def test_export_loads_in_transformers_with_same_logits(tmp_path, student):
  folder = hf.save_hf(str(tmp_path / "hf"), student)
  model, info = transformers.Gemma3ForCausalLM.from_pretrained(
      folder, output_loading_info=True
  )
  assert not any(
      info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")
  ), info
  assert model.dtype == torch.float32
  assert model.config.layer_types == [
      "sliding_attention",
      "full_attention",
      "sliding_attention",
  ]
  assert model.config.rope_parameters["full_attention"]["factor"] == 2.0
  assert (
      model.lm_head.weight.data_ptr()
      == model.model.embed_tokens.weight.data_ptr()
  )
  diff = _max_diff(_forward(student, jnp.asarray(TOKENS)), _hf_logits(model))
  assert diff < 1e-4, diff


def test_long_rows_with_rope_scaling_round_trip_and_match_transformers(
    tmp_path, student
):
  """Past one attention tile (our blockwise path, local and global) and
  with the global layers' RoPE scaled x2: transformers' logits on the
  export equal ours, and the folder loads back with the same scaling and
  the same logits."""
  length = 2 * 512 + 77
  tokens = np.random.default_rng(1).integers(0, CONFIG.vocab_size, (1, length))
  folder = hf.save_hf(str(tmp_path / "hf"), student)
  ours = np.asarray(_forward(student, jnp.asarray(tokens)))
  model = transformers.Gemma3ForCausalLM.from_pretrained(
      folder, attn_implementation="eager"
  )
  diff = _max_diff(ours, _hf_logits(model, tokens))
  assert diff < 1e-4, diff
  back = hf.load_hf(folder)
  assert back.config.rope_global_scaling == 2.0
  assert back.config.rope_local_base == CONFIG.rope_local_base
  diff = _max_diff(_forward(back, jnp.asarray(tokens)), ours)
  assert diff < 1e-5, diff


def _random_hf_model(seed=0):
  config = transformers.Gemma3TextConfig(
      vocab_size=96,
      hidden_size=24,
      intermediate_size=40,
      num_hidden_layers=3,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=8,
      layer_types=["sliding_attention", "full_attention", "sliding_attention"],
      sliding_window=3,
      query_pre_attn_scalar=12,
      final_logit_softcapping=5.0,
      rope_parameters={
          "sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
          "full_attention": {
              "rope_type": "linear",
              "factor": 2.0,
              "rope_theta": 500.0,
          },
      },
  )
  torch.manual_seed(seed)
  model = transformers.Gemma3ForCausalLM(config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.normal_(0.0, 0.5)
  return model.eval()


@pytest.mark.parametrize("shard", [None, "8KB"])
def test_transformers_folder_loads_into_student(tmp_path, shard):
  reference = _random_hf_model()
  kwargs = {"max_shard_size": shard} if shard else {}
  reference.save_pretrained(
      tmp_path, **kwargs
  )  # transformers 5: always safetensors
  index = os.path.isfile(tmp_path / hf.WEIGHTS_INDEX)
  assert index == bool(shard)
  ours = load_student(str(tmp_path))
  assert ours.config == CONFIG
  diff = _max_diff(_forward(ours, jnp.asarray(TOKENS)), _hf_logits(reference))
  assert diff < 1e-4, diff


def test_legacy_rope_keys_and_published_270m_config():
  published = {  # google/gemma-3-270m config.json (older rope keys)
      "architectures": ["Gemma3ForCausalLM"],
      "model_type": "gemma3_text",
      "attention_bias": False,
      "attn_logit_softcapping": None,
      "final_logit_softcapping": None,
      "head_dim": 256,
      "hidden_activation": "gelu_pytorch_tanh",
      "hidden_size": 640,
      "intermediate_size": 2048,
      "max_position_embeddings": 32768,
      "num_attention_heads": 4,
      "num_hidden_layers": 18,
      "num_key_value_heads": 1,
      "query_pre_attn_scalar": 256,
      "rms_norm_eps": 1e-06,
      "rope_local_base_freq": 10000.0,
      "rope_scaling": None,
      "rope_theta": 1000000.0,
      "sliding_window": 512,
      "vocab_size": 262144,
      "_sliding_window_pattern": 6,
      "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
  }
  assert hf.config_from_hf(published) == PRESETS["gemma3_270m"]
  no_types = {k: v for k, v in published.items() if k != "layer_types"}
  assert hf.config_from_hf(no_types) == PRESETS["gemma3_270m"]
  scaled = dict(published, rope_scaling={"rope_type": "linear", "factor": 8.0})
  assert hf.config_from_hf(scaled).rope_global_scaling == 8.0
  # Our writer round-trips through our reader.
  assert hf.config_from_hf(hf.hf_config(CONFIG)) == CONFIG
  with pytest.raises(hf.HFFormatError, match="RoPE type 'yarn'"):
    hf.config_from_hf(
        dict(published, rope_scaling={"rope_type": "yarn", "factor": 8.0})
    )
  with pytest.raises(hf.HFFormatError, match="attn_logit_softcapping"):
    hf.config_from_hf(dict(published, attn_logit_softcapping=50.0))


def _tokenizer(path, specials=("<pad>", "<eos>", "<bos>")):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE(unk_token=None))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=list(specials))
  text = [
      "def add(a, b):\n    return a + b\n",
      "import os\nprint(os.getcwd())\n",
  ] * 20
  tok.train_from_iterator(text, trainer)
  tok.save(str(path))
  return tok


def _workdir(tmp_path, student, with_tokenizer=True):
  workdir = tmp_path / "w"
  run = workdir / "student" / "run1"
  checkpoint.write_config(str(run), "student", student.config)
  checkpoint.save_params(str(run), student, step=7)
  if with_tokenizer:
    _tokenizer(workdir / "tokenizer.json")
  return str(workdir)


def test_export_binary_end_to_end(tmp_path, student):
  workdir = _workdir(tmp_path, student)
  want = np.asarray(_forward(student, jnp.asarray(TOKENS)))

  # The binary, as a user runs it.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "student.export",
          f"--workdir={workdir}",
          "--run=run1",
          "--format=hf",
      ],
      capture_output=True,
      text=True,
      env=env,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  hf_dir = os.path.join(workdir, "export", "run1-hf")
  assert proc.stdout.strip().endswith(hf_dir)
  names = set(os.listdir(hf_dir))
  assert {
      "config.json",
      "model.safetensors",
      "tokenizer.json",
      "tokenizer_config.json",
      "special_tokens_map.json",
  } <= names
  modes = {n: os.stat(os.path.join(hf_dir, n)).st_mode & 0o777 for n in names}
  assert len(set(modes.values())) == 1, modes  # the weights readable as all

  tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
  with open(os.path.join(hf_dir, "config.json")) as f:
    hf_json = json.load(f)
  assert (
      tokenizer.pad_token_id,
      tokenizer.eos_token_id,
      tokenizer.bos_token_id,
  ) == (0, 1, 2)
  assert (
      hf_json["pad_token_id"],
      hf_json["eos_token_id"],
      hf_json["bos_token_id"],
  ) == (0, 1, 2)
  assert (
      tokenizer.decode(tokenizer("return a + b")["input_ids"]).replace(" ", "")
      == "returna+b"
  )
  assert (
      _max_diff(_forward(load_student(hf_dir), jnp.asarray(TOKENS)), want)
      < 1e-5
  )

  # The library call the binary makes: orbax, float32 and bfloat16.
  orbax_dir = export.export(workdir, "run1", "orbax")
  assert orbax_dir == os.path.join(workdir, "export", "run1")
  assert checkpoint.latest_step(orbax_dir) == 7
  assert (
      _max_diff(_forward(load_student(orbax_dir), jnp.asarray(TOKENS)), want)
      == 0.0
  )
  info_path = os.path.join(orbax_dir, export.EXPORT_INFO)
  mtime = os.path.getmtime(info_path)
  assert export.export(workdir, "run1", "orbax") == orbax_dir  # nothing to redo
  assert os.path.getmtime(info_path) == mtime

  export.export(
      workdir, "run1", "orbax", dtype="bfloat16"
  )  # replaces the f32 one
  half = load_student(orbax_dir)
  assert half.embed.embedding[...].dtype == jnp.bfloat16
  assert _max_diff(_forward(half, jnp.asarray(TOKENS)), want) < 0.1
  hf_half = export.export(workdir, "run1", "hf", dtype="bfloat16")
  half_torch = transformers.Gemma3ForCausalLM.from_pretrained(hf_half)
  assert half_torch.dtype == torch.bfloat16
  assert _max_diff(_hf_logits(half_torch), want) < 0.1
  leftovers = [
      n
      for n in os.listdir(os.path.join(workdir, "export"))
      if n.startswith(".")
  ]
  assert not leftovers

  # The pipeline stage: every run, both formats (float32 replaces bfloat16).
  assert export.export_all(None, workdir) == [orbax_dir, hf_dir]
  assert load_student(orbax_dir).embed.embedding[...].dtype == jnp.float32


def test_export_with_another_familys_tokenizer(tmp_path, student):
  """An imported teacher's tokenizer: specials found by their usual names."""
  path = tmp_path / "tokenizer.json"
  _tokenizer(path, specials=("<unk>", "<s>", "</s>"))
  folder = hf.save_hf(str(tmp_path / "hf"), student, tokenizer_json=str(path))
  with open(os.path.join(folder, "config.json")) as f:
    hf_json = json.load(f)
  assert (
      hf_json["bos_token_id"],
      hf_json["eos_token_id"],
      hf_json["pad_token_id"],
  ) == (1, 2, 2)
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
      "<s>",
      "</s>",
      "</s>",
  )
  assert tokenizer.eos_token_id == 2


def test_export_takes_a_run_spec_or_its_folder(tmp_path, student, capsys):
  """``--run`` as distill.train takes it (a spec with parts) or as the folder
  is named; either way the export says what it wrote, once."""
  workdir = _workdir(tmp_path, student)
  os.rename(
      os.path.join(workdir, "student", "run1"),
      os.path.join(workdir, "student", "sampled_n16"),
  )
  out = export.export(workdir, "sampled@n=16", "orbax")
  assert out == os.path.join(workdir, "export", "sampled_n16")
  assert capsys.readouterr().out == (
      f"export: sampled_n16 step 7 as orbax (float32) -> {out}\n"
  )
  assert export.export(workdir, "sampled_n16", "orbax") == out
  assert capsys.readouterr().out == (
      f"export: {out} already holds step 7 of sampled_n16; nothing to do\n"
  )


def test_export_errors_say_what_to_do(tmp_path, student):
  workdir = _workdir(tmp_path, student, with_tokenizer=False)
  with pytest.raises(export.ExportError, match="no student run 'nope'.*run1"):
    export.export(workdir, "nope", "orbax")
  with pytest.raises(
      export.ExportError, match="tokenizer.json is missing.*data.prepare"
  ):
    export.export(workdir, "run1", "hf")
  assert not os.path.exists(os.path.join(workdir, "export", "run1-hf"))


def _hf_folder(tmp_path, **config):
  payload = dict(hf.hf_config(CONFIG), **config)
  tmp_path.mkdir(exist_ok=True)
  (tmp_path / "config.json").write_text(json.dumps(payload))
  return str(tmp_path)


def test_bad_folders_are_refused_clearly(tmp_path):
  pickled = _hf_folder(tmp_path / "bin")
  (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"not unpickled")
  with pytest.raises(
      hf.HFFormatError, match="pickled weights.*pytorch_model.bin.*safetensors"
  ):
    load_student(pickled)
  llama = _hf_folder(tmp_path / "llama", model_type="llama")
  with pytest.raises(hf.HFFormatError, match="unsupported model_type 'llama'"):
    load_student(llama)
  with pytest.raises(hf.HFFormatError, match="multimodal"):
    load_student(_hf_folder(tmp_path / "mm", model_type="gemma3"))
  with pytest.raises(
      checkpoint.ModelFolderError, match="config.json is missing"
  ):
    load_student(str(tmp_path / "nowhere"))
  teacher = tmp_path / "teacher"
  checkpoint.write_config(str(teacher), "teacher", CONFIG)
  with pytest.raises(
      checkpoint.ModelFolderError, match="'teacher' model, not a 'student'"
  ):
    load_student(str(teacher))


def test_transformers_greedy_matches_ours_with_the_readme_prompt(
    tmp_path, student
):
  """The README's transformers recipe (EOS, then the prompt's tokens, as
  distill.generate encodes it) continues exactly as our decoding does."""
  from distill.decoding import generate as gen  # pylint: disable=import-outside-toplevel

  _tokenizer(tmp_path / "tokenizer.json")
  folder = hf.save_hf(
      str(tmp_path / "hf"),
      student,
      tokenizer_json=str(tmp_path / "tokenizer.json"),
  )
  ids, theirs, _ = transformers_greedy(folder, "def add(a, b):", 6)
  (ours,) = gen.generate(student, [ids], 6)
  assert theirs == ours
