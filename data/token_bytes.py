"""The UTF-8 bytes each token of a tokenizer stands for.

Two tokenizations of one text agree on its bytes, not on their tokens: the
bytes are the common measure (bits per byte) and the common coordinate
(``data.align``) of a teacher and a student with different vocabularies.

``token_bytes(tokenizer)`` reads them from the tokenizer's own vocabulary:

- byte-level BPE (GPT-2, Qwen, Llama 3, ours): each character of a token
  stands for one byte through the byte-to-character table of the
  ``ByteLevel`` pre-tokenizer;
- SentencePiece-style vocabularies (Gemma, Llama 2): ``<0xAB>`` is the byte
  0xAB (byte fallback) and ``▁`` a space; every other character is its
  UTF-8;
- special tokens (``<eos>``, ``<pad>``, ...) are no bytes of text: a
  document's end costs its loss but adds no byte.

A token of a byte-level vocabulary may be part of a character (one byte of
a 3-byte ``€``): bytes, not characters, are what every token covers whole.
"""

from __future__ import annotations

import functools
import json
import re

import numpy as np
from tokenizers import Tokenizer

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPACE_MARK = "\u2581"  # SentencePiece's ▁


@functools.cache
def _byte_of_char() -> dict[str, int]:
  """The inverse of byte-level BPE's byte -> printable character table:
  printable Latin-1 bytes stand for themselves, the other 68 bytes for the
  characters from U+0100 on, in byte order."""
  keep = [
      *range(ord("!"), ord("~") + 1),
      *range(ord("¡"), ord("¬") + 1),
      *range(ord("®"), ord("ÿ") + 1),
  ]
  chars = {b: chr(b) for b in keep}
  extra = 0
  for b in range(256):
    if b not in chars:
      chars[b] = chr(256 + extra)
      extra += 1
  return {c: b for b, c in chars.items()}


def _kinds(spec: dict) -> set[str]:
  """Every component type named in a tokenizer.json section (nested
  ``Sequence``s included)."""
  if not isinstance(spec, dict):
    return set()
  kinds = {spec.get("type", "")}
  for key in ("decoders", "pretokenizers"):
    for part in spec.get(key) or ():
      kinds |= _kinds(part)
  return kinds


@functools.cache
def _char_of_byte() -> dict[int, str]:
  return {b: c for c, b in _byte_of_char().items()}


def _spec_is_byte_level(spec: dict) -> bool:
  return "ByteLevel" in (
      _kinds(spec.get("decoder")) | _kinds(spec.get("pre_tokenizer"))
  )


def is_byte_level(tokenizer: Tokenizer) -> bool:
  """Whether the tokenizer is a byte-level BPE (its pieces spell bytes)."""
  return _spec_is_byte_level(json.loads(tokenizer.to_str()))


def byte_level_string(data: bytes) -> str:
  """``data`` in a byte-level BPE's alphabet (what its model merges)."""
  chars = _char_of_byte()
  return "".join(chars[b] for b in data)


def token_bytes(tokenizer: Tokenizer) -> list[bytes]:
  """The bytes of every id of ``tokenizer`` (b"" for special tokens)."""
  spec = json.loads(tokenizer.to_str())
  byte_level = _spec_is_byte_level(spec)
  specials = {t["id"] for t in spec.get("added_tokens", []) if t["special"]}
  table = _byte_of_char()
  out = []
  for i in range(tokenizer.get_vocab_size()):
    piece = tokenizer.id_to_token(i)
    if piece is not None and (match := _BYTE_FALLBACK.fullmatch(piece)):
      out.append(bytes([int(match.group(1), 16)]))
    elif i in specials or piece is None:
      out.append(b"")
    elif byte_level and all(c in table for c in piece):
      out.append(bytes(table[c] for c in piece))
    else:
      out.append(piece.replace(_SPACE_MARK, " ").encode("utf-8"))
  return out


def byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
  """int32 [V]: how many bytes of text each id stands for."""
  return np.asarray([len(b) for b in token_bytes(tokenizer)], np.int32)
