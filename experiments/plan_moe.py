"""One teacher MoE layer's forward and backward, compiled ahead of time for
one chip of a TPU slice, per grouped-matmul implementation: what
``moe_impl="auto"`` picks on TPUs rests on these figures.

    python -m experiments.plan_moe --topology=v5p-8 --tokens=8192

Prints, per implementation, the compiled program's temporaries and FLOPs
(a Pallas kernel counts the FLOPs it declares) and the compile seconds.
Shapes default to Qwen3-30B-A3B's (D=2,048, F=768, 128 experts, top 8),
bf16 compute over float32 weights. Needs libtpu (the ``tpu`` extra).
"""

from __future__ import annotations

import os
import time

from absl import app, flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

# pylint: disable=wrong-import-position
import jax
import jax.numpy as jnp
from flax import nnx

from distill.core import sharding, topology
from teacher import moe

_TOPOLOGY = flags.DEFINE_string("topology", "v5p-8", "A Cloud TPU slice.")
_TOKENS = flags.DEFINE_integer("tokens", 8192, "Tokens through the layer.")
_SHAPE = flags.DEFINE_list(
    "shape", ["2048", "768", "128", "8"], "d_model, d_ff, experts, top_k."
)
_IMPLS = flags.DEFINE_list("impls", ["ragged", "megablox"], "moe_impl values.")


def compile_layer(impl: str, device, tokens: int, shape) -> dict[str, float]:
  """Temporaries (GiB), FLOPs (T) and compile seconds of the layer's
  forward and backward on ``device`` alone."""
  d, f, e, k = shape
  abstract = nnx.eval_shape(
      lambda: moe.MoE(
          d,
          f,
          e,
          k,
          rngs=nnx.Rngs(0),
          impl=impl,
          dtype=jnp.bfloat16,
          param_dtype=jnp.float32,
      )
  )
  graphdef, state = nnx.split(abstract)

  def loss(state, x):
    y, aux = nnx.merge(graphdef, state)(x)
    return jnp.sum(jnp.square(y.astype(jnp.float32))) + aux["z_loss"]

  where = jax.sharding.SingleDeviceSharding(device)
  state = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=where), state
  )
  x = jax.ShapeDtypeStruct((1, tokens, d), jnp.bfloat16, sharding=where)
  started = time.time()
  with sharding.use(sharding.make_mesh(devices=[device])):
    compiled = (
        jax.jit(jax.grad(loss, argnums=(0, 1)))
        .trace(state, x)
        .lower()
        .compile()
    )
  memory = compiled.memory_analysis()
  return {
      "temp_gib": memory.temp_size_in_bytes / 2**30,
      "tflops": compiled.cost_analysis().get("flops", 0.0) / 1e12,
      "compile_s": time.time() - started,
  }


def main(argv):
  del argv
  device = topology.resolve(_TOPOLOGY.value).devices[0]
  shape = [int(v) for v in _SHAPE.value]
  for impl in _IMPLS.value:
    r = compile_layer(impl, device, _TOKENS.value, shape)
    print(
        f"{impl}: {_TOKENS.value} tokens, temporaries {r['temp_gib']:.2f} GiB,"
        f" {r['tflops']:.2f} TFLOPs, compiled in {r['compile_s']:.0f} s"
    )


if __name__ == "__main__":
  app.run(main)
