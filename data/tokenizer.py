"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``).

The specials follow the Gemma convention, so an exported student needs no id
remapping: ``<pad>`` = 0, ``<eos>`` = 1, ``<bos>`` = 2. Byte-level BPE with no
normaliser round-trips any text exactly, non-ASCII included.

An imported teacher brings its own ``tokenizer.json``; then the workdir's file
is used as it is and its special ids are looked up by name (see
``special_ids``).
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from distill.core import files
from distill.core.errors import UserError

PAD, EOS, BOS = "<pad>", "<eos>", "<bos>"
SPECIALS = (PAD, EOS, BOS)
# Names other tokenizers use for the same roles, tried in order on import.
_ALIASES = {
    PAD: (PAD, "<|endoftext|>", "<|padding|>", "[PAD]", "</s>"),
    EOS: (EOS, "</s>", "<|endoftext|>", "<|im_end|>", "<|end_of_text|>"),
    BOS: (BOS, "<s>", "<|begin_of_text|>", "<|endoftext|>"),
}


class TokenizerError(UserError):
  """The tokenizer file is missing, unreadable or does not fit the config."""


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2
) -> Tokenizer:
  """Trains a byte-level BPE with ``vocab_size`` entries, specials first."""
  if vocab_size < 256 + len(SPECIALS):
    raise TokenizerError(
        f"config.data.vocab_size={vocab_size} is too small for a byte-level BPE;"
        f" use at least {256 + len(SPECIALS)}"
    )
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      min_frequency=min_frequency,
      special_tokens=list(SPECIALS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tokenizer.train_from_iterator(texts, trainer=trainer)
  return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: str) -> None:
  """Writes atomically: a crash never leaves a half-written tokenizer.json."""
  files.write_text(path, tokenizer.to_str(pretty=True))


def load_tokenizer(path: str) -> Tokenizer:
  if not os.path.isfile(path):
    raise TokenizerError(
        f"No tokenizer at {path}; run `python -m data.prepare` first."
    )
  try:
    return Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises a bare Exception on bad JSON.
    raise TokenizerError(f"{path} is not a readable tokenizer.json: {e}") from e


def tokenizer_hash(path: str) -> str:
  """sha256 of the tokenizer file: the identity caches and students check."""
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
  """Ids of pad/eos/bos, by our names or the usual names of other families."""
  ids = {}
  for role, names in _ALIASES.items():
    for name in names:
      token_id = tokenizer.token_to_id(name)
      if token_id is not None:
        ids[role] = token_id
        break
  if EOS not in ids:
    raise TokenizerError(
        "The tokenizer has no end-of-sequence token (looked for"
        f" {', '.join(_ALIASES[EOS])}); documents cannot be separated."
    )
  ids.setdefault(PAD, ids[EOS])
  ids.setdefault(BOS, ids[EOS])
  return {"pad": ids[PAD], "eos": ids[EOS], "bos": ids[BOS]}


def encode_batch(tokenizer: Tokenizer, texts: list[str]) -> Iterator[list[int]]:
  """Token ids of each text (no specials added)."""
  for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
    yield encoding.ids
