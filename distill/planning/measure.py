"""Compiling a program for a mesh's devices and reading what it needs."""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import jax

from distill.core import sharding
from distill.planning.arguments import array_bytes
from distill.planning.flops import matmul_flops
from distill.planning.programs import Program


@dataclasses.dataclass
class Measure:
  """Per device, in bytes and FLOPs, of one compiled program."""

  name: str
  arguments: int
  outputs: int
  temporaries: int
  aliased: int
  code: int
  flops: float
  xla_flops: float
  model_flops: float
  estimated_s: float | None
  compile_s: float
  rows: int
  tokens: int
  #: Bytes the stage keeps on the device beside the program while it runs:
  #: what it holds and does not pass (``Program.held`` less the arguments),
  #: and what it passes but the compiled program does not read (XLA drops
  #: unread arguments: a validation pass reads the teacher's head alone).
  resident: int = 0
  #: Why the compiler refused the program (it checks the device's memory
  #: itself on TPUs), if it did; the bytes are then its own figure for the
  #: temporaries and the arguments' shares.
  refused: str | None = None

  @property
  def peak(self) -> int:
    """Bytes the program needs on a device while it runs."""
    return (
        self.arguments
        + self.outputs
        - self.aliased
        + self.temporaries
        + self.code
        + self.resident
    )

  def as_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "peak": self.peak}


#: What the TPU compiler says when a program's buffers exceed the chip, in
#: either of its two messages: "... required for HLO temporaries (16.49G)
#: exceeds available HBM ..." or "CompileTimeHbmOom ... Program hbm
#: requirement 14.78G: ..." (temporaries, scoped memory and overlays).
_OUT_OF_MEMORY = re.compile(
    r"(?:HLO temporaries \(|Program hbm requirement )([0-9.]+)([KMGT])"
)


def _resident(program: Program, arguments: int) -> int:
  """``Measure.resident`` of ``program`` whose compiled arguments take
  ``arguments`` bytes (padded to the device's tiles on a TPU)."""
  if not program.held:
    return 0
  given = array_bytes(program.args, per_device=True)
  return max(0, program.held - given) + max(0, given - arguments)


def measure(program: Program, mesh) -> Measure:
  """Compiles ``program`` for ``mesh``'s devices and reads its analyses.

  A program the compiler refuses for want of memory (the TPU compiler
  checks the chip's HBM itself) is measured from its message: its
  temporaries, and the arguments' shares of one device.
  """
  start = time.perf_counter()
  with sharding.use(mesh):
    traced = program.trace()
    try:
      compiled = traced.lower().compile()
      refused = None
    except jax.errors.JaxRuntimeError as e:
      found = _OUT_OF_MEMORY.search(str(e))
      if "RESOURCE_EXHAUSTED" not in str(e) or found is None:
        raise
      compiled, refused = None, str(e).strip().splitlines()[0]
  seconds = time.perf_counter() - start
  # An nnx.jit's Traced wraps jax's.
  jaxpr = getattr(traced, "traced", traced).jaxpr
  counted = matmul_flops(jaxpr, program.while_trips) / mesh.size
  common = dict(
      name=program.name,
      flops=counted,
      model_flops=program.model_flops / mesh.size,
      compile_s=seconds,
      rows=program.rows,
      tokens=program.tokens,
  )
  if compiled is None:
    scale = 1024 ** ("KMGT".index(found.group(2)) + 1)
    arguments = array_bytes(program.args, per_device=True)
    return Measure(
        arguments=arguments,
        resident=_resident(program, arguments),
        outputs=0,
        temporaries=int(float(found.group(1)) * scale),
        aliased=0,
        code=0,
        xla_flops=float("nan"),
        estimated_s=None,
        refused=refused,
        **common,
    )
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  estimated = cost.get("optimal_seconds")
  arguments = int(memory.argument_size_in_bytes)
  return Measure(
      arguments=arguments,
      resident=_resident(program, arguments),
      outputs=int(memory.output_size_in_bytes),
      temporaries=int(memory.temp_size_in_bytes),
      aliased=int(memory.alias_size_in_bytes),
      code=int(memory.generated_code_size_in_bytes),
      xla_flops=float(cost.get("flops", float("nan"))),
      estimated_s=float(estimated) if estimated and estimated > 0 else None,
      **common,
  )
