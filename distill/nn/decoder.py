"""The decoder both models are: one base class for the teacher and the student.

A model subclasses ``Decoder`` and provides ``embed``, ``blocks`` (each with
``.attn``, ``__call__(x, segment_ids, positions)`` and ``decode(x, positions,
layer_cache)``), ``final_norm``, ``config`` and ``logits_from_hidden``; it
may override ``embed_tokens`` (the student scales its embeddings),
``block_call`` and ``merge_aux`` (the teacher collects its routers'
statistics). The base class gives it the rest:

- ``hidden`` and ``__call__``: tokens [B, T] int32 -> hidden [B, T, D] / logits
  [B, T, V] float32, with default segment ids (one document) and positions;
- ``init_cache`` and ``decode``: KV-cache decoding (see ``distill.nn.attention``);
- ``run_blocks`` by ``distill.nn.stack`` (scanned and rematerialised as
  the config's ``scan_layers`` and ``remat`` say), which can also return
  chosen blocks' outputs (feature distillation);
- ``param_counts``; ``abstract(config)`` (parameters as shapes only, no
  memory); ``load(directory)`` from a model folder of its ``kind``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
from flax import nnx

from distill.core import checkpoint, sharding
from distill.nn import attention, layers
from distill.nn import stack as stack_lib


class Decoder(nnx.Module):
  """tokens [B, T] int32 -> logits [B, T, V] float32."""

  # Set by the subclass's __init__.
  config: Any
  embed: layers.Embed
  blocks: nnx.List
  final_norm: layers.RMSNorm

  #: The "kind" a model folder of this model records in its config.json.
  kind: ClassVar[str]
  #: The frozen dataclass its ``config`` is.
  config_class: ClassVar[type]

  def __init__(self, config: Any, rngs: nnx.Rngs):
    raise NotImplementedError

  # --------------------------------------------------------------- forward

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] -> embeddings [B, T, D]."""
    return self.embed(tokens)

  def block_call(
      self, segment_ids: jax.Array, positions: jax.Array
  ) -> stack_lib.BlockCall:
    """``call(block, x) -> (x, aux)`` running one block on these rows."""
    return lambda block, x: (block(x, segment_ids, positions), None)

  def merge_aux(self, auxes: list[Any]) -> dict:
    """The blocks' auxes (one per block, in order) -> the model's aux dict."""
    del auxes
    return {}

  def run_blocks(
      self,
      x: jax.Array,
      segment_ids: jax.Array,
      positions: jax.Array,
      features: tuple[int, ...] = (),
  ) -> tuple[jax.Array, dict]:
    """x [B, T, D] through every block -> (x [B, T, D], aux dict).

    Unrolled or scanned, rematerialised or not, as the config's
    ``scan_layers`` and ``remat`` say (``distill.nn.stack``). ``features``:
    block indices (negative from the end) whose outputs, the residual
    stream after that block [B, T, D], aux holds as ``aux["features"]``, a
    tuple in the order asked (feature distillation reads them).
    """
    call = self.block_call(segment_ids, positions)
    if features:
      inner = call

      def call(block, x):  # pylint: disable=function-redefined
        y, aux = inner(block, x)
        return y, (aux, y)

    x, auxes = self.stack(call, x)
    if not features:
      return x, self.merge_aux(auxes)
    aux = self.merge_aux([a for a, _ in auxes])
    outputs = [y for _, y in auxes]
    return x, {**aux, "features": tuple(outputs[i] for i in features)}

  def stack(self, call: stack_lib.BlockCall, x: jax.Array):
    """``stack_lib.run`` over this model's blocks with its config's
    ``scan_layers`` and ``remat`` -> (x, [aux of each block])."""
    return stack_lib.run(
        self.blocks,
        call,
        x,
        scan=self.config.scan_layers,
        remat=self.config.remat,
    )

  def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
    """hidden [B, T, D] (from ``hidden``) -> logits [B, T, V] float32."""
    raise NotImplementedError

  def hidden(
      self,
      tokens: jax.Array,
      segment_ids: jax.Array | None = None,
      positions: jax.Array | None = None,
      *,
      features: tuple[int, ...] = (),
  ) -> tuple[jax.Array, dict]:
    """tokens [B, T] -> (hidden [B, T, D] after the final norm, aux).

    segment_ids [B, T] (0 = padding; default all ones), positions [B, T]
    (default arange(T)). ``aux``: the model's auxiliary outputs (the
    teacher's router statistics; empty for a dense model), and with
    ``features`` (block indices) those blocks' outputs (``run_blocks``).
    """
    if segment_ids is None:
      segment_ids = attention.default_segment_ids(tokens)
    if positions is None:
      positions = attention.default_positions(tokens)
    x = sharding.constrain(self.embed_tokens(tokens), "batch", None, None)
    x, aux = self.run_blocks(x, segment_ids, positions, features)
    return self.final_norm(x), aux

  def __call__(
      self,
      tokens: jax.Array,
      segment_ids: jax.Array | None = None,
      positions: jax.Array | None = None,
  ) -> jax.Array:
    hidden, _ = self.hidden(tokens, segment_ids, positions)
    return self.logits_from_hidden(hidden)

  # -------------------------------------------------------------- decoding

  def init_cache(
      self, batch: int, max_len: int, *, rollback: int = 0
  ) -> list[dict[str, jax.Array]]:
    """An empty KV cache: one ``Attention.init_cache`` dict per layer.

    Global layers hold ``max_len`` positions; local (sliding-window) layers
    a ring of ``window + rollback`` (``rollback``: how many of the latest
    tokens a caller may take back, e.g. rejected speculative drafts).
    """
    return [
        block.attn.init_cache(
            batch, max_len, rollback=rollback, dtype=self.config.dtype
        )
        for block in self.blocks
    ]

  def decode(
      self,
      tokens: jax.Array,
      cache: list[dict[str, jax.Array]],
      positions: jax.Array,
  ) -> tuple[jax.Array, list[dict]]:
    """Feeds new tokens through the KV cache (prefill: the whole prompt).

    tokens [B, t] int32 at positions [B, t] (consecutive per row, after the
    cache's; -1 = left padding) -> (logits [B, t, V] float32, the updated
    cache). Equal to ``__call__`` on the whole sequence at these rows.
    """
    x = self.embed_tokens(tokens)
    new_cache = []
    for block, layer_cache in zip(self.blocks, cache, strict=True):
      x, layer_cache = block.decode(x, positions, layer_cache)
      new_cache.append(layer_cache)
    return self.logits_from_hidden(self.final_norm(x)), new_cache

  # ------------------------------------------------- construction, loading

  def param_counts(self) -> dict[str, int]:
    """{"total", "active"} parameters; a dense model uses every one per
    token, so they are equal unless a subclass says otherwise."""
    total = layers.count_params(self)
    return {"total": total, "active": total}

  @classmethod
  def abstract(cls, config: Any):
    """The model with abstract parameters (no allocation), for shapes and
    restoring."""
    return nnx.eval_shape(lambda: cls(config, nnx.Rngs(0)))

  @classmethod
  def load(cls, directory: str, step: int | None = None, **runtime):
    """The model saved in a model folder of this ``kind``, latest step by
    default.

    Reads ``config.json``, builds the model abstractly and restores only its
    parameters, so a training checkpoint and a params-only export load the
    same way. ``runtime``: config fields that say how the model runs, not
    what it computes (``scan_layers``, ``remat``, kernels), in place of
    the folder's. Raises ``checkpoint.ModelFolderError`` with what to do.
    """
    payload = checkpoint.read_config(directory, kind=cls.kind)
    config = checkpoint.config_from_dict(cls.config_class, payload["model"])
    config = dataclasses.replace(config, **runtime)
    return checkpoint.restore_params(directory, cls.abstract(config), step)
