"""experiments/hf_moe.py:cpu end to end on a tiny random Qwen3-MoE checkpoint.

The checkpoint is what a real one looks like in the ways that matter here:
safetensors written by transformers, a byte-level BPE tokenizer with Qwen's
special tokens, and an embedding padded past the tokenizer's vocabulary.
"""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from data import corpus  # noqa: E402
from distill.core.errors import UserError  # noqa: E402
from experiments import hf_moe, run  # noqa: E402
from student import load_student  # noqa: E402

TOKENS = 300  # the tokenizer's vocabulary
PADDED = 320  # the checkpoint's embedding rows, as real ones pad
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _qwen_like_tokenizer(path):
  files = corpus.stdlib_files()[:20]
  texts = [corpus.read_text(f)[0] for f in files]
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.train_from_iterator(
      texts,
      trainers.BpeTrainer(
          vocab_size=TOKENS,
          special_tokens=QWEN_SPECIALS,
          show_progress=False,
          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      ),
  )
  assert tokenizer.get_vocab_size() == TOKENS
  tokenizer.save(path)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("qwen3_moe_tiny")
  torch.manual_seed(0)
  config = transformers.Qwen3MoeConfig(
      vocab_size=PADDED,
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=8,
      intermediate_size=48,
      moe_intermediate_size=16,
      num_experts=5,
      num_experts_per_tok=2,
      norm_topk_prob=True,
      eos_token_id=0,
      tie_word_embeddings=False,
  )
  transformers.Qwen3MoeForCausalLM(config).save_pretrained(directory)
  _qwen_like_tokenizer(str(directory / "tokenizer.json"))
  return str(directory)


@pytest.mark.slow  # ~60 s; the tiny end-to-end run covers the stages
def test_cpu_variant_imports_distils_and_exports(hf_dir, tmp_path):
  config = hf_moe.get_config("cpu")
  config.teacher.hf_dir = hf_dir
  workdir = str(tmp_path)
  ran = run.run_all(config, workdir)
  assert ran[:2] == ["teacher", "prepare"]  # the teacher's tokenizer first
  with (
      open(os.path.join(hf_dir, "tokenizer.json")) as a,
      open(os.path.join(workdir, "tokenizer.json")) as b,
  ):
    assert a.read() == b.read()
  with open(os.path.join(workdir, "logits", "manifest.json")) as f:
    assert json.load(f)["vocab_size"] == PADDED
  with open(os.path.join(workdir, "eval", "report.json")) as f:
    report = json.load(f)
  best = report["summary"]["best_distilled"]
  ptq = {f"{best}-{scheme}" for scheme in config.eval.ptq}  # quantised best
  assert set(report["models"]) == {"teacher", *config.distill.runs, *ptq}

  # The exported student has the teacher's padded vocabulary and loads in
  # transformers with the logits our loader gives.
  export = os.path.join(workdir, "export", "sampled-hf")
  hf_student = transformers.Gemma3ForCausalLM.from_pretrained(export).eval()
  assert hf_student.config.vocab_size == PADDED
  ours = load_student(export)
  tokens = np.random.RandomState(0).randint(0, TOKENS, (2, 12))
  with torch.no_grad():
    want = hf_student(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours(tokens)), want, atol=1e-4)
  tokenizer = transformers.AutoTokenizer.from_pretrained(export)
  assert (
      tokenizer.decode(tokenizer.encode("def f(x):\n    return x"))
      == "def f(x):\n    return x"
  )


def test_missing_hf_dir_is_refused_before_any_stage(tmp_path):
  with pytest.raises(UserError, match="--config.teacher.hf_dir"):
    run.run_all(hf_moe.get_config("cpu"), str(tmp_path))
  assert not os.listdir(tmp_path)


def test_wrong_hf_dir_is_named_as_the_user_set_it(tmp_path):
  config = hf_moe.get_config("cpu")
  config.teacher.hf_dir = str(tmp_path / "no_such_checkpoint")
  with pytest.raises(
      UserError, match=r"^--config\.teacher\.hf_dir=.*no_such_checkpoint is"
  ):
    run.run_all(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def test_unknown_variant_is_refused():
  with pytest.raises(ValueError, match="Unknown variant"):
    hf_moe.get_config("gpu")
