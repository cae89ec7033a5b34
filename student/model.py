"""The Gemma-3-style dense student (Flax NNX), built from the shared layers.

Per block (Gemma 3)::

    h = x + post_attn_norm(attn(pre_attn_norm(x)))
    y = h + post_mlp_norm(mlp(pre_mlp_norm(h)))

Embeddings are scaled by sqrt(d_model) (cast to the compute dtype first, as
transformers does), a final norm precedes the tied output head, and logits
may be soft-capped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from distill.nn import attention, decoder, layers
from student.config import StudentConfig


class Block(nnx.Module):
  """One decoder layer of a given kind. x [B, T, D] -> [B, T, D]."""

  def __init__(self, config: StudentConfig, kind: str, *, rngs: nnx.Rngs):
    c = config
    norm = functools.partial(
        layers.RMSNorm,
        c.d_model,
        eps=c.rms_eps,
        offset_one=True,
        param_dtype=c.param_dtype,
    )
    local = attention.check_kind(kind) == attention.AttentionKind.LOCAL
    self.kind = kind
    self.pre_attn_norm = norm()
    self.attn = attention.Attention(
        c.d_model,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        rngs=rngs,
        kind=kind,
        window=c.window if local else None,
        rope_base=c.rope_local_base if local else c.rope_global_base,
        rope_scaling_factor=1.0 if local else c.rope_global_scaling,
        qk_norm="head",
        norm_eps=c.rms_eps,
        norm_offset_one=True,
        query_scale=c.query_scale,
        impl=c.attention_impl,
        dtype=c.dtype,
        param_dtype=c.param_dtype,
    )
    self.post_attn_norm = norm()
    self.pre_mlp_norm = norm()
    self.mlp = layers.MLP(
        c.d_model,
        c.d_ff,
        rngs=rngs,
        activation="gelu_tanh",
        dtype=c.dtype,
        param_dtype=c.param_dtype,
    )
    self.post_mlp_norm = norm()

  def __call__(self, x, segment_ids, positions):
    h = x + self.post_attn_norm(
        self.attn(self.pre_attn_norm(x), segment_ids, positions)
    )
    return h + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(h)))

  def decode(self, x, positions, cache):
    """KV-cache step: x [B, t, D], positions [B, t] -> ([B, t, D], cache)."""
    a, cache = self.attn.decode(self.pre_attn_norm(x), positions, cache)
    h = x + self.post_attn_norm(a)
    return h + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(h))), cache


class Student(decoder.Decoder):
  """tokens [B, T] int32 -> logits [B, T, V] float32."""

  kind = "student"
  config_class = StudentConfig

  def __init__(self, config: StudentConfig, rngs: nnx.Rngs):
    c = self.config = config
    self.embed = layers.Embed(
        c.vocab_size,
        c.d_model,
        rngs=rngs,
        dtype=c.dtype,
        param_dtype=c.param_dtype,
    )
    self.blocks = nnx.List(
        [Block(c, kind, rngs=rngs) for kind in c.layer_kinds]
    )
    self.final_norm = layers.RMSNorm(
        c.d_model, eps=c.rms_eps, offset_one=True, param_dtype=c.param_dtype
    )

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] -> embeddings scaled by sqrt(d_model) [B, T, D]."""
    x = self.embed(tokens)
    return x * jnp.asarray(self.config.d_model**0.5, x.dtype)

  def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
    """hidden [B, T, D] (from ``hidden``) -> logits [B, T, V] float32."""
    return layers.softcap(
        self.embed.attend(hidden), self.config.final_logit_softcap
    )


def abstract_student(config: StudentConfig) -> Student:
  """The student with abstract parameters (no allocation), for shapes/restore."""
  return Student.abstract(config)
