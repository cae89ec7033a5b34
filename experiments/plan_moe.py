"""One teacher MoE layer's forward and backward, compiled ahead of time for
one chip of a TPU slice, per grouped-matmul implementation: what
``moe_impl="auto"`` picks on TPUs rests on these figures.

    python -m experiments.plan_moe --topology=v5p-8 --tokens=8192

Prints, per implementation, the compiled program's temporaries, XLA's FLOPs
(a Pallas kernel counts the FLOPs it declares), the plan's own count over
the model's FLOPs (``distill.planning``), and the compile seconds.
Shapes default to Qwen3-30B-A3B's (D=2,048, F=768, 128 experts, top 8),
bf16 compute over float32 weights. Needs libtpu (the ``tpu`` extra).
"""

from __future__ import annotations

import os

from absl import flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

# pylint: disable=wrong-import-position
import jax
import jax.numpy as jnp
from flax import nnx

from distill import planning
from distill.core import cli, sharding, topology
from teacher import moe

_TOPOLOGY = flags.DEFINE_string("topology", "v5p-8", "A Cloud TPU slice.")
_TOKENS = flags.DEFINE_integer("tokens", 8192, "Tokens through the layer.")
_SHAPE = flags.DEFINE_list(
    "shape", ["2048", "768", "128", "8"], "d_model, d_ff, experts, top_k."
)
_IMPLS = flags.DEFINE_list("impls", ["ragged", "megablox"], "moe_impl values.")


def layer_program(impl: str, mesh, tokens: int, shape) -> planning.Program:
  """The layer's forward and backward (the gradients of its weights and of
  its input) on ``mesh``'s one device, with abstract arguments."""
  d, f, e, k = shape
  layer = planning.on_mesh(
      lambda: moe.MoE(
          d,
          f,
          e,
          k,
          rngs=nnx.Rngs(0),
          impl=impl,
          dtype=jnp.bfloat16,
          param_dtype=jnp.float32,
      ),
      mesh,
  )

  def loss(layer, x):
    y, aux = layer(x)
    return jnp.sum(jnp.square(y.astype(jnp.float32))) + aux["z_loss"]

  x = jax.ShapeDtypeStruct(
      (1, tokens, d),
      jnp.bfloat16,
      sharding=jax.sharding.SingleDeviceSharding(mesh.devices.flat[0]),
  )
  return planning.Program(
      name=impl,
      stage="teacher",
      fn=nnx.jit(nnx.grad(loss, argnums=(0, 1))),
      args=(layer, x),
      kwargs={},
      rows=1,
      tokens=tokens,
      # Each token's k experts: three [D, F] matmuls each, x6 fwd+bwd.
      model_flops=6.0 * tokens * k * 3 * d * f,
      state_bytes=planning.array_bytes(layer),
      rows_knob="--tokens",
  )


def main(argv):
  del argv
  device = topology.resolve(_TOPOLOGY.value).devices[0]
  mesh = sharding.make_mesh(devices=[device])
  shape = [int(v) for v in _SHAPE.value]
  for impl in _IMPLS.value:
    m = planning.measure(layer_program(impl, mesh, _TOKENS.value, shape), mesh)
    print(
        f"{impl}: {_TOKENS.value} tokens, temporaries"
        f" {m.temporaries / 2**30:.2f} GiB, {m.xla_flops / 1e12:.2f} TFLOPs"
        f" by XLA, {m.flops / m.model_flops:.2f}x model FLOPs by the plan's"
        f" count, compiled in {m.compile_s:.0f} s"
    )


if __name__ == "__main__":
  cli.run(main)
