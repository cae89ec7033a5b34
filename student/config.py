"""The Gemma-3-style student's configuration and its named presets.

Fixed by design (not options): tied input/output embeddings, gelu_tanh gated
MLP, QK-norm per head, pre- and post-norms around attention and MLP, RMSNorm
with Gemma's ``1 + scale``.
"""

from __future__ import annotations

import dataclasses

from distill.core import configs
from distill.core.errors import ConfigError
from distill.nn import attention, kernels, stack


@dataclasses.dataclass(frozen=True)
class StudentConfig:
  """A dense decoder. ``layer_pattern`` is tiled over ``num_layers``.

  ``query_pre_attn_scalar``: scores are scaled by its ``**-0.5`` (None:
  head_dim). ``rope_global_scaling``: linear RoPE scaling factor of global
  layers (positions / factor). ``dtype``: compute dtype (bfloat16 on
  accelerators; norms, softmaxes and losses stay float32); ``param_dtype``:
  parameter dtype (float32 for training: the master weights; a bfloat16
  export says so here). ``attention_impl``: whole-sequence attention kernel
  (``distill.nn.kernels.ATTENTION_IMPLS``). ``scan_layers``: run the
  blocks under one ``jax.lax.scan`` per repeating period; ``remat``:
  "none" | "full" | "dots", what the backward pass recomputes
  (``distill.nn.stack``).
  """

  vocab_size: int = 256
  d_model: int = 32
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 8
  d_ff: int = 64
  layer_pattern: tuple[str, ...] = ("local",) * 5 + ("global",)
  window: int = 512
  rope_local_base: float = 10_000.0
  rope_global_base: float = 1_000_000.0
  rope_global_scaling: float = 1.0
  query_pre_attn_scalar: float | None = None
  rms_eps: float = 1e-6
  final_logit_softcap: float | None = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "auto"
  scan_layers: bool = False
  remat: str = "none"

  def __post_init__(self):
    if not self.layer_pattern:
      raise ConfigError(
          "StudentConfig.layer_pattern is empty; give at least one layer kind"
      )
    for kind in self.layer_pattern:
      try:
        attention.check_kind(kind)
      except ConfigError as e:
        raise ConfigError(
            f"StudentConfig.layer_pattern={self.layer_pattern}: {e}"
        ) from None
    try:
      kernels.check_impl(self.attention_impl)
      stack.check_remat(self.remat)
    except ConfigError as e:
      raise ConfigError(f"StudentConfig: {e}") from None
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f"num_heads={self.num_heads} is not a multiple of"
          f" num_kv_heads={self.num_kv_heads}"
      )
    if self.head_dim % 2:
      raise ConfigError(
          f"StudentConfig: head_dim={self.head_dim} must be even for RoPE"
      )
    if attention.AttentionKind.LOCAL in self.layer_kinds and self.window < 1:
      raise ConfigError(
          f"StudentConfig: window={self.window} must be >= 1 for local layers"
      )

  @property
  def layer_kinds(self) -> tuple[str, ...]:
    """The kind of every layer: the pattern tiled (and cut) to num_layers."""
    p = self.layer_pattern
    return tuple(p[i % len(p)] for i in range(self.num_layers))

  @property
  def query_scale(self) -> float:
    scalar = self.query_pre_attn_scalar or self.head_dim
    return float(scalar) ** -0.5


PRESETS: dict[str, StudentConfig] = {
    # Runs in seconds in tests: both kinds, GQA, a short window.
    "tiny": StudentConfig(
        vocab_size=256,
        d_model=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        d_ff=64,
        layer_pattern=("local", "global"),
        window=8,
    ),
    # ~2.5M parameters (1.05M of them the 8192 x 128 embedding): a student a
    # 2-core CPU trains in minutes.
    "demo": StudentConfig(
        vocab_size=8192,
        d_model=128,
        num_layers=6,
        num_heads=4,
        num_kv_heads=1,
        head_dim=32,
        d_ff=512,
        window=128,
    ),
    # Published shapes (google/gemma-3-270m, gemma-3-1b-pt, gemma-3-4b-pt
    # config.json).
    "gemma3_270m": StudentConfig(
        vocab_size=262_144,
        d_model=640,
        num_layers=18,
        num_heads=4,
        num_kv_heads=1,
        head_dim=256,
        d_ff=2048,
        window=512,
        query_pre_attn_scalar=256,
    ),
    "gemma3_1b": StudentConfig(
        vocab_size=262_144,
        d_model=1152,
        num_layers=26,
        num_heads=4,
        num_kv_heads=1,
        head_dim=256,
        d_ff=6912,
        window=512,
        query_pre_attn_scalar=256,
    ),
    # google/gemma-3-4b-pt's text decoder (its vocabulary has 64 image
    # tokens more; global layers scale RoPE positions by 8).
    "gemma3_4b": StudentConfig(
        vocab_size=262_208,
        d_model=2560,
        num_layers=34,
        num_heads=8,
        num_kv_heads=4,
        head_dim=256,
        d_ff=10240,
        window=1024,
        rope_global_scaling=8.0,
        query_pre_attn_scalar=256,
    ),
}


def get_preset(name: str, **overrides) -> StudentConfig:
  """A named preset, with fields replaced by ``overrides``."""
  return configs.get_preset(PRESETS, name, what="student", **overrides)
