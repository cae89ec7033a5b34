"""Teacher configuration: a frozen dataclass and named presets.

The teacher is a decoder-only sparse MoE (README, "teacher"). One config
describes the four imported families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) and
the from-scratch CPU teacher; `family` is bookkeeping only, the model branches
on the fields.

    config = get_preset("demo", num_layers=4)
    counts = param_counts(config)  # {"total": ..., "active": ...}
"""

from __future__ import annotations

import dataclasses
from typing import Any

from distill.core import configs
from distill.core.errors import ConfigError
from distill.nn import kernels, stack

QK_NORMS = ("none", "head", "full")
MOE_IMPLS = ("auto", "ragged", "tokamax", "megablox", "blocked")
#: How a teacher runs, not what it computes. A stage that loads a teacher
#: folder (the cache pass, online runs, evaluation, a plan) takes the ones
#: ``config.teacher.model`` sets in place of the folder's, so an imported
#: checkpoint can be scanned or rematerialised like a trained teacher.
RUNTIME_FIELDS = ("attention_impl", "moe_impl", "scan_layers", "remat")


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
  """Shapes and options of the sparse-MoE teacher.

  Attributes:
    vocab_size: V, rows of the embedding.
    d_model: D, width of the residual stream.
    num_layers: decoder blocks.
    num_heads: query heads N.
    num_kv_heads: key/value heads K (GQA when K < N).
    head_dim: H, width of one head (not necessarily D / N: Qwen3 uses 128).
    d_ff: F, hidden width of one routed expert.
    num_experts: E, routed experts per MoE layer.
    top_k: experts each token is sent to.
    norm_topk_prob: renormalise the k router weights to sum to 1 (Mixtral
      always does; Qwen2/Qwen3-MoE and OLMoE read it from their config, whose
      transformers default is False; Qwen3-30B-A3B's own config sets True).
    shared_expert_d_ff: hidden width of an always-on shared expert with a
      sigmoid gate (Qwen2-MoE); 0 = none.
    dense_layers: indices of layers with a dense MLP instead of MoE (Qwen's
      `mlp_only_layers` / `decoder_sparse_step`).
    dense_d_ff: hidden width of those dense MLPs.
    capacity_factor: None = dropless; else each expert takes at most
      ceil(capacity_factor * tokens * top_k / E) assignments, later ones drop.
    router_aux_loss_coef: weight of the Switch load-balancing loss in training.
    router_z_loss_coef: weight of the router z-loss in training.
    moe_impl: grouped matmul of the dropless path: "ragged" (lax.ragged_dot),
      "tokamax" (tokamax.ragged_dot: its GPU kernels, an optional
      dependency), "megablox" (jax's Pallas TPU grouped-matmul kernel;
      interpreted, slowly, off TPUs), "blocked" (groups padded to row
      blocks, batched matmul),
      "auto" (blocked on CPUs, where XLA lowers ragged_dot to a dense masked
      matmul that costs E times the work, and on GPUs, where it measured
      3.4x faster than ragged_dot on an H100; megablox on TPUs, whose
      compiled program needs about a quarter of ragged_dot's temporaries
      and the grouped FLOPs, not every expert's).
    qkv_bias: biases on the q, k and v projections (Qwen2-MoE).
    qk_norm: "none"; "head" (RMSNorm over each head, Qwen3); "full" (RMSNorm
      over the whole projected q and k, OLMoE).
    clip_qkv: clip q, k, v to [-c, c] after projection (OLMoE option).
    rope_base: RoPE theta.
    sliding_window: None = every layer global; else every layer attends to the
      last `sliding_window` positions (Mixtral / Qwen3-MoE semantics).
    tie_embeddings: the output head reuses the embedding.
    rms_eps: RMSNorm epsilon.
    dtype: compute dtype of activations (bfloat16 on accelerators; norms,
      softmaxes and losses stay float32 whatever it is).
    param_dtype: storage dtype of parameters (float32 to train: the master
      weights and AdamW's moments).
    attention_impl: whole-sequence attention kernel, "auto" | "xla" |
      "cudnn" | "splash" (distill.nn.attention.self_attention).
    scan_layers: run the blocks under one jax.lax.scan per repeating
      period (compile time flat in depth; distill.nn.stack).
    remat: "none" | "full" | "dots": what the backward pass recomputes.
    family: where the shape comes from ("custom", "mixtral", ...).
  """

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  d_ff: int
  num_experts: int
  top_k: int
  norm_topk_prob: bool = True
  shared_expert_d_ff: int = 0
  dense_layers: tuple[int, ...] = ()
  dense_d_ff: int = 0
  capacity_factor: float | None = None
  router_aux_loss_coef: float = 0.01
  router_z_loss_coef: float = 0.001
  moe_impl: str = "auto"
  qkv_bias: bool = False
  qk_norm: str = "none"
  clip_qkv: float | None = None
  rope_base: float = 10_000.0
  sliding_window: int | None = None
  tie_embeddings: bool = False
  rms_eps: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "auto"
  scan_layers: bool = False
  remat: str = "none"
  family: str = "custom"

  def __post_init__(self):
    def bad(msg):
      raise ConfigError(f"TeacherConfig: {msg}")

    for name in (
        "vocab_size",
        "d_model",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "d_ff",
        "num_experts",
        "top_k",
    ):
      if getattr(self, name) <= 0:
        bad(f"{name}={getattr(self, name)} must be positive")
    if self.num_heads % self.num_kv_heads:
      bad(
          f"num_heads={self.num_heads} is not a multiple of "
          f"num_kv_heads={self.num_kv_heads}"
      )
    if self.top_k > self.num_experts:
      bad(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
    if self.qk_norm not in QK_NORMS:
      bad(f"qk_norm={self.qk_norm!r}; expected one of {QK_NORMS}")
    if self.moe_impl not in MOE_IMPLS:
      bad(f"moe_impl={self.moe_impl!r}; expected one of {MOE_IMPLS}")
    try:
      kernels.check_impl(self.attention_impl)
      stack.check_remat(self.remat)
    except ConfigError as e:
      bad(str(e))
    if self.shared_expert_d_ff < 0:
      bad("shared_expert_d_ff must be >= 0 (0 = no shared expert)")
    if self.capacity_factor is not None and self.capacity_factor <= 0:
      bad(f"capacity_factor={self.capacity_factor} must be > 0 or None")
    if self.sliding_window is not None and self.sliding_window <= 0:
      bad(f"sliding_window={self.sliding_window} must be > 0 or None")
    for i in self.dense_layers:
      if not 0 <= i < self.num_layers:
        bad(f"dense_layers has {i}, outside [0, {self.num_layers})")
    if self.dense_layers and self.dense_d_ff <= 0:
      bad("dense_layers needs dense_d_ff > 0")
    if len(set(self.dense_layers)) != len(self.dense_layers):
      bad(f"dense_layers={self.dense_layers} repeats a layer")

  def is_moe_layer(self, layer: int) -> bool:
    return layer not in self.dense_layers

  @property
  def num_moe_layers(self) -> int:
    return self.num_layers - len(self.dense_layers)


def param_counts(config: TeacherConfig) -> dict[str, int]:
  """{"total", "active"} parameter counts from the shapes alone.

  Active = what one token touches: everything except the routed experts,
  plus `top_k` of the `num_experts` routed experts per MoE layer (the shared
  expert, router and embeddings count fully).
  """
  c = config
  d, h = c.d_model, c.head_dim
  attn = d * h * (2 * c.num_heads + 2 * c.num_kv_heads)
  if c.qkv_bias:
    attn += h * (c.num_heads + 2 * c.num_kv_heads)
  if c.qk_norm == "head":
    attn += 2 * h
  elif c.qk_norm == "full":
    attn += h * (c.num_heads + c.num_kv_heads)
  norms = 2 * d
  expert = 3 * d * c.d_ff
  moe_fixed = d * c.num_experts  # router
  if c.shared_expert_d_ff:
    moe_fixed += 3 * d * c.shared_expert_d_ff + d  # shared expert and its gate
  dense = 3 * d * c.dense_d_ff
  total = active = 0
  for layer in range(c.num_layers):
    base = attn + norms
    if c.is_moe_layer(layer):
      total += base + moe_fixed + c.num_experts * expert
      active += base + moe_fixed + c.top_k * expert
    else:
      total += base + dense
      active += base + dense
  embed = c.vocab_size * d * (1 if c.tie_embeddings else 2) + d  # + final norm
  return {"total": total + embed, "active": active + embed}


PRESETS: dict[str, TeacherConfig] = {
    # Tests: compiles and runs in well under a second.
    "tiny": TeacherConfig(
        vocab_size=128,
        d_model=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        d_ff=48,
        num_experts=5,
        top_k=2,
        tie_embeddings=True,
    ),
    # A CPU-trainable teacher: about 17.5M total / 6.8M active parameters.
    "demo": TeacherConfig(
        vocab_size=8192,
        d_model=256,
        num_layers=6,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        d_ff=384,
        num_experts=8,
        top_k=2,
        tie_embeddings=True,
        rope_base=10_000.0,
    ),
    # mistralai/Mixtral-8x7B-v0.1: 46.7B total, 12.9B active.
    "mixtral_8x7b": TeacherConfig(
        vocab_size=32000,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        d_ff=14336,
        num_experts=8,
        top_k=2,
        norm_topk_prob=True,
        rope_base=1e6,
        rms_eps=1e-5,
        router_aux_loss_coef=0.02,
        family="mixtral",
    ),
    # Qwen/Qwen3-30B-A3B: 30.5B total, 3.3B active.
    "qwen3_30b_a3b": TeacherConfig(
        vocab_size=151936,
        d_model=2048,
        num_layers=48,
        num_heads=32,
        num_kv_heads=4,
        head_dim=128,
        d_ff=768,
        num_experts=128,
        top_k=8,
        norm_topk_prob=True,
        qk_norm="head",
        rope_base=1e6,
        rms_eps=1e-6,
        router_aux_loss_coef=0.001,
        family="qwen3_moe",
    ),
    # allenai/OLMoE-1B-7B-0924: 6.9B total, 1.3B active.
    "olmoe_1b_7b": TeacherConfig(
        vocab_size=50304,
        d_model=2048,
        num_layers=16,
        num_heads=16,
        num_kv_heads=16,
        head_dim=128,
        d_ff=1024,
        num_experts=64,
        top_k=8,
        norm_topk_prob=False,
        qk_norm="full",
        rope_base=10_000.0,
        rms_eps=1e-5,
        router_aux_loss_coef=0.01,
        family="olmoe",
    ),
}


# Qwen/Qwen3-235B-A22B: 235B total, 22B active; Qwen3-30B-A3B's family,
# wider and deeper.
PRESETS["qwen3_235b_a22b"] = dataclasses.replace(
    PRESETS["qwen3_30b_a3b"],
    d_model=4096,
    num_layers=94,
    num_heads=64,
    d_ff=1536,
)


def get_preset(name: str, **overrides) -> TeacherConfig:
  """A named preset with fields overridden, e.g. get_preset("tiny", top_k=1)."""
  return configs.get_preset(PRESETS, name, what="teacher", **overrides)


def runtime_settings(config) -> dict[str, Any]:
  """The ``RUNTIME_FIELDS`` that ``config.teacher.model`` sets.

  An imported teacher (the config has ``teacher.hf_dir``) takes its shapes
  and dtypes from its checkpoint: any other field set there is a
  ConfigError rather than a setting silently not used.
  """
  values = configs.overrides_of(config.teacher.get("model"))
  if "hf_dir" in config.teacher:
    other = sorted(set(values) - set(RUNTIME_FIELDS))
    if other:
      raise ConfigError(
          f"config.teacher.model sets {', '.join(other)} of an imported"
          " teacher, whose shapes come from its checkpoint; set only"
          f" {', '.join(RUNTIME_FIELDS)} there (its dtypes:"
          " config.teacher.dtype and config.teacher.param_dtype)"
      )
  return {k: v for k, v in values.items() if k in RUNTIME_FIELDS}
