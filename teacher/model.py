"""The sparse-MoE teacher (Flax NNX), built from the shared layers and the MoE.

Per block (pre-norm, as Mixtral / Qwen-MoE / OLMoE)::

    h = x + attn(attn_norm(x))
    y = h + ffn(ffn_norm(h))        ffn: MoE, or a dense gated MLP on the
                                    layers in config.dense_layers

then a final RMSNorm and the output head (the embedding when tied).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from distill.nn import attention, decoder, layers
import teacher.moe as moe_lib
from teacher.config import TeacherConfig


class Block(nnx.Module):
  """One decoder layer. x [B, T, D] -> ([B, T, D], MoE aux dict or None)."""

  def __init__(self, config: TeacherConfig, layer: int, *, rngs: nnx.Rngs):
    c = config
    norm = functools.partial(
        layers.RMSNorm, c.d_model, eps=c.rms_eps, param_dtype=c.param_dtype
    )
    local = c.sliding_window is not None
    self.attn_norm = norm()
    self.attn = attention.Attention(
        c.d_model,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        rngs=rngs,
        kind="local" if local else "global",
        window=c.sliding_window,
        rope_base=c.rope_base,
        qkv_bias=c.qkv_bias,
        qk_norm=c.qk_norm,
        norm_eps=c.rms_eps,
        clip_qkv=c.clip_qkv,
        impl=c.attention_impl,
        dtype=c.dtype,
        param_dtype=c.param_dtype,
    )
    self.ffn_norm = norm()
    self.is_moe = c.is_moe_layer(layer)
    if self.is_moe:
      self.moe = moe_lib.MoE(
          c.d_model,
          c.d_ff,
          c.num_experts,
          c.top_k,
          rngs=rngs,
          norm_topk_prob=c.norm_topk_prob,
          shared_expert_d_ff=c.shared_expert_d_ff,
          capacity_factor=c.capacity_factor,
          impl=c.moe_impl,
          dtype=c.dtype,
          param_dtype=c.param_dtype,
      )
      self.mlp = None
    else:
      self.moe = None
      self.mlp = layers.MLP(
          c.d_model,
          c.dense_d_ff,
          rngs=rngs,
          dtype=c.dtype,
          param_dtype=c.param_dtype,
      )

  def __call__(self, x, segment_ids, positions):
    x = x + self.attn(self.attn_norm(x), segment_ids, positions)
    h = self.ffn_norm(x)
    if self.is_moe:
      y, aux = self.moe(h, mask=segment_ids != 0)
    else:
      y, aux = self.mlp(h), None
    return x + y, aux

  def decode(self, x, positions, cache):
    """KV-cache step: x [B, t, D], positions [B, t] -> ([B, t, D], cache).

    The MoE runs as configured; with a capacity factor the capacity depends
    on the tokens in the call, so drops may differ from a full forward.
    """
    a, cache = self.attn.decode(self.attn_norm(x), positions, cache)
    x = x + a
    h = self.ffn_norm(x)
    if self.is_moe:
      y, _ = self.moe(h, mask=positions >= 0)
    else:
      y = self.mlp(h)
    return x + y, cache


class Teacher(decoder.Decoder):
  """tokens [B, T] int32 -> logits [B, T, V] float32.

  ``hidden`` returns the router statistics as aux: "load_balancing_loss",
  "z_loss", "dropped_fraction" (means over the MoE layers, not multiplied by
  any coefficient) and "expert_load" [num_moe_layers, E] (routed assignments
  per expert). Padding (segment id 0) is left out of them.
  """

  kind = "teacher"
  config_class = TeacherConfig

  def __init__(self, config: TeacherConfig, rngs: nnx.Rngs):
    c = self.config = config
    self.embed = layers.Embed(
        c.vocab_size,
        c.d_model,
        rngs=rngs,
        dtype=c.dtype,
        param_dtype=c.param_dtype,
    )
    self.blocks = nnx.List(
        [Block(c, i, rngs=rngs) for i in range(c.num_layers)]
    )
    self.final_norm = layers.RMSNorm(
        c.d_model, eps=c.rms_eps, param_dtype=c.param_dtype
    )
    self.head = (
        None
        if c.tie_embeddings
        else layers.Unembed(
            c.d_model,
            c.vocab_size,
            rngs=rngs,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
        )
    )

  def block_call(self, segment_ids, positions):
    return lambda block, x: block(x, segment_ids, positions)

  def merge_aux(self, auxes):
    auxes = [aux for aux in auxes if aux is not None]
    return _merge_aux(auxes, self.config.num_experts)

  def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
    """hidden [B, T, D] -> logits [B, T, V] float32."""
    if self.head is None:
      return self.embed.attend(hidden)
    return self.head(hidden)

  def param_counts(self) -> dict[str, int]:
    """{"total", "active"}: active counts top_k of the E routed experts."""
    total = layers.count_params(self)
    c = self.config
    idle = 0
    for block in self.blocks:
      if block.is_moe:
        m = block.moe
        per_expert = sum(
            w.shape[1] * w.shape[2] for w in (m.gate, m.up, m.down)
        )
        idle += (c.num_experts - c.top_k) * per_expert
    return {"total": total, "active": total - idle}


def _merge_aux(auxes: list[dict], num_experts: int) -> dict[str, jax.Array]:
  if not auxes:
    zero = jnp.zeros((), jnp.float32)
    return {
        "load_balancing_loss": zero,
        "z_loss": zero,
        "dropped_fraction": zero,
        "expert_load": jnp.zeros((0, num_experts), jnp.float32),
    }
  mean = lambda key: jnp.mean(jnp.stack([a[key] for a in auxes]))
  return {
      "load_balancing_loss": mean("load_balancing_loss"),
      "z_loss": mean("z_loss"),
      "dropped_fraction": mean("dropped_fraction"),
      "expert_load": jnp.stack([a["expert_load"] for a in auxes]),
  }


def abstract_teacher(config: TeacherConfig) -> Teacher:
  """The teacher with abstract parameters (no allocation), for shapes/restore."""
  return Teacher.abstract(config)


def load_teacher(directory: str, step: int | None = None, **runtime) -> Teacher:
  """The teacher saved in a model folder (``W/teacher``), latest step by default.

  ``runtime``: ``teacher.config.RUNTIME_FIELDS`` values in place of the
  folder's (``runtime_settings(config)``). Raises
  checkpoint.ModelFolderError with what to do when it cannot.
  """
  return Teacher.load(directory, step, **runtime)
