"""Meshes, logical-axis rules and placement: the one home for sharding.

Every stage runs on a ``jax.sharding.Mesh`` with four named axes:

    data    pure data parallelism (parameters replicated)
    fsdp    data parallelism with parameters and optimizer state sharded
            (gathered just in time by the compiler, ZeRO-3 style)
    expert  MoE expert parallelism (expert weights split by expert)
    tensor  tensor parallelism (heads, MLP hidden, vocabulary)

``MeshConfig`` gives their sizes (``-1``: the devices left over); the default
puts every device on ``fsdp``, so one config runs on 1 or N devices unchanged.

Parameters are annotated with *logical* axis names where they are created
(``nnx.Param(..., logical_axes=("embed", "heads", None))``, see
``distill.nn.layers``); ``RULES`` maps each logical name onto mesh axes. A
dimension that the named mesh axes do not divide is left unsplit on those
axes (replicated) rather than refused, so odd head or expert counts run on
any mesh; ``spec`` says which. Everything else (activations, gradients, the
collectives) follows from ``jax.jit`` and XLA's SPMD partitioner, steered by
``constrain`` at a few places (batches, logits).

Several processes (one per host): ``initialize_distributed`` calls
``jax.distributed.initialize``; each process feeds its own rows of every
global batch (``put_batch``), and only the main process writes files other
than orbax's checkpoints and the cache shards it owns (``is_main``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from distill.core.errors import ConfigError

AXES = ("data", "fsdp", "expert", "tensor")

#: Logical axis name -> the mesh axes it is split over (in this order).
RULES: dict[str, tuple[str, ...]] = {
    # Activations.
    "batch": ("data", "fsdp", "expert"),
    # Parameters (and the matching activation axes).
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "experts": ("expert",),
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes; ``-1`` (at most one) takes the devices left."""

  data: int = 1
  fsdp: int = -1
  expert: int = 1
  tensor: int = 1


def mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
  """The axis sizes for ``num_devices`` devices, ``-1`` filled in.

  Raises ``ConfigError`` when the sizes cannot multiply to ``num_devices``.
  """
  sizes = {a: int(getattr(cfg, a)) for a in AXES}
  what = ", ".join(f"{a}={s}" for a, s in sizes.items())
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
    raise ConfigError(
        f"config.mesh ({what}): each size must be positive, and at most one"
        " -1 (the devices left over)"
    )
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(
          f"config.mesh ({what}) cannot use {num_devices} devices:"
          f" {num_devices} is not a multiple of {fixed}; change the sizes"
          " (e.g. --config.mesh.tensor=1)"
      )
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(
        f"config.mesh ({what}) has {fixed} devices but {num_devices} are"
        " present; make the sizes multiply to it or set one to -1"
    )
  return sizes


def make_mesh(
    cfg: MeshConfig | Any | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """The mesh of ``cfg`` (a ``MeshConfig`` or a config section with its
  fields) over ``devices`` (default: every device of every process)."""
  if cfg is None:
    cfg = MeshConfig()
  elif not isinstance(cfg, MeshConfig):
    cfg = MeshConfig(**{a: int(cfg[a]) for a in AXES if a in cfg})
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(cfg, len(devices))
  shape = tuple(sizes[a] for a in AXES)
  # jax.make_mesh orders the devices for fast collectives (hosts, NVLink,
  # ICI); Auto axes leave the partitioning of activations to XLA.
  return jax.make_mesh(
      shape,
      AXES,
      devices=devices,
      axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
  )


def from_config(config) -> Mesh:
  """The mesh of an experiment config's ``mesh`` section (defaults without
  one), logged once."""
  mesh = make_mesh(config.get("mesh") if "mesh" in config else None)
  logging.info("mesh: %s", describe(mesh))
  return mesh


def describe(mesh: Mesh) -> str:
  """The mesh in words: data=1 fsdp=8 expert=1 tensor=1 (8 cpu devices, ...)."""
  sizes = " ".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)
  kind = mesh.devices.flat[0].platform
  return (
      f"{sizes} ({mesh.size} {kind} devices, {jax.process_count()}"
      f" process{'es' if jax.process_count() > 1 else ''})"
  )


# ----------------------------------------------------------------------------
# Logical names -> partition specs


def spec(
    names: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
) -> PartitionSpec:
  """The partition spec of an array with logical axis ``names``.

  Each name maps through ``RULES`` to mesh axes; axes of size 1, axes already
  used by an earlier dimension, and axes that would not divide the dimension
  are left out (that dimension is then replicated over them).
  """
  if not names:
    return PartitionSpec()
  used: set[str] = set()
  out = []
  for name, dim in zip(names, shape, strict=True):
    axes = []
    size = 1
    for axis in RULES.get(name, ()) if name else ():
      n = mesh.shape[axis]
      if n == 1 or axis in used or dim % (size * n):
        continue
      axes.append(axis)
      size *= n
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return PartitionSpec(*out)


def named(
    names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh
) -> NamedSharding:
  return NamedSharding(mesh, spec(names, shape, mesh))


def logical_names(variable: nnx.Variable) -> tuple[str | None, ...] | None:
  """The logical axis names a variable was created with (None: none)."""
  names = variable.get_metadata().get("logical_axes")
  return tuple(names) if names else None


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def state_shardings(state: Any, mesh: Mesh) -> Any:
  """The ``NamedSharding`` of every variable of an ``nnx.State`` (same tree;
  optimizer moments inherit their parameter's names)."""

  def one(v):
    if not _is_variable(v):
      return NamedSharding(mesh, PartitionSpec())
    return v.replace(named(logical_names(v), np.shape(v.get_value()), mesh))

  return jax.tree.map(one, state, is_leaf=_is_variable)


def place(module: Any, mesh: Mesh) -> Any:
  """Moves every variable of ``module`` (an ``nnx.Module`` or
  ``nnx.Optimizer``) onto ``mesh`` by the rules; returns it."""
  state = nnx.state(module)
  nnx.update(module, jax.device_put(state, state_shardings(state, mesh)))
  return module


def gather(x: Any) -> Any:
  """``x`` whole in this process: an array that other processes hold parts
  of is gathered from them (a collective); anything else is returned."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return multihost_utils.process_allgather(x, tiled=True)
  return x


def to_device(module: Any, device: jax.Device) -> Any:
  """A copy of ``module`` with every variable whole on one ``device`` (parts
  held by other processes are gathered first)."""

  def whole(x):
    return jax.device_put(gather(x), device)

  graph, state = nnx.split(module)
  return nnx.merge(graph, jax.tree.map(whole, state))


def abstract_state(state: Any, mesh: Mesh) -> Any:
  """An abstract state (``nnx.eval_shape``) with each leaf's sharding on
  ``mesh`` set: the target that restores a checkpoint onto the mesh."""

  def one(v):
    value = v.get_value()
    sharding = named(logical_names(v), value.shape, mesh)
    return v.replace(
        jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)
    )

  return jax.tree.map(one, state, is_leaf=_is_variable)


# ----------------------------------------------------------------------------
# The active mesh and activations


@contextlib.contextmanager
def use(mesh: Mesh) -> Iterator[Mesh]:
  """Makes ``mesh`` the active mesh (``jax.set_mesh``) inside the block."""
  with jax.set_mesh(mesh):
    yield mesh


def active() -> Mesh | None:
  """The active mesh (``use``) outside ``jax.jit``, or None."""
  mesh = jax.sharding.get_mesh()
  if mesh.empty or not set(AXES) <= set(mesh.axis_names):
    return None
  return mesh


def current():
  """The active mesh's abstract form (also under ``jax.jit``), or None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(AXES) <= set(mesh.axis_names):
    return None
  return mesh


def platform() -> str:
  """The platform the code being traced or run will run on: that of the
  active mesh's devices (also under ``jax.jit``; a TPU slice's mesh planned
  on a CPU host says 'tpu'), else the default backend's. What branches on
  the hardware (kernels, MoE matmuls) asks this, so that a program compiled
  for a mesh is the one that mesh runs."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  if device is not None:
    return device.platform
  return jax.default_backend()


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
  """``x`` constrained to the sharding of logical axis ``names`` on the
  active mesh; unchanged outside one."""
  mesh = current()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, spec(names, x.shape, mesh))


# ----------------------------------------------------------------------------
# Batches and processes


_WARNED: set[tuple[int, int]] = set()


def batch_ways(mesh: Mesh) -> int:
  """How many ways a batch's rows split: data x fsdp x expert."""
  return math.prod(mesh.shape[a] for a in RULES["batch"])


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
  """A batch array [B, ...]: rows over (data, fsdp, expert), rest whole.

  Rows that do not split over all of those devices are split over the axes
  that divide them (the other devices compute the same rows); said once.
  """
  sharding = named(("batch",) + (None,) * (len(shape) - 1), shape, mesh)
  ways = batch_ways(mesh)
  split = math.prod(mesh.shape[a] for a in axes_of(sharding.spec[0]))
  if split < ways and (shape[0], ways) not in _WARNED:
    _WARNED.add((shape[0], ways))
    logging.warning(
        "a batch of %d rows splits %d ways, not over all %d devices of"
        " data x fsdp x expert (%s); the others repeat its work. A multiple"
        " of %d rows uses them all.",
        shape[0],
        split,
        ways,
        describe(mesh),
        ways,
    )
  return sharding


def axes_of(entry) -> tuple[str, ...]:
  """The mesh axes of one partition-spec entry (None, a name or a tuple)."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def put_batch(batch: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a global batch -> global arrays on ``mesh``.

  Each process passes its own ``B / process_count`` rows (the pipeline's
  per-process shard); the result has the global batch size ``B``.
  """
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
    if value.ndim == 0:
      out[key] = jax.device_put(value, NamedSharding(mesh, PartitionSpec()))
      continue
    try:
      out[key] = jax.make_array_from_process_local_data(
          batch_sharding(mesh, shape), value, shape
      )
    except ValueError as e:  # rows not split by process
      raise ConfigError(
          f"a batch of {shape[0]} rows from {jax.process_count()} processes"
          f" does not split over the mesh {describe(mesh)}: with several"
          " processes each process's rows must land on its own devices, so"
          " the global batch must be a multiple of data x fsdp x expert and"
          " those axes must span the processes (keep tensor within a host)"
      ) from e
  return out


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a global batch array (``put_batch``'s inverse);
  in one process, all of them."""
  if x.is_fully_addressable:
    return np.asarray(x)
  parts = {}
  for shard in x.addressable_shards:  # Replicas repeat a row range: once.
    parts.setdefault(shard.index[0].start or 0, shard.data)
  return np.concatenate([np.asarray(parts[k]) for k in sorted(parts)])


def barrier(name: str) -> None:
  """Waits until every process gets here (nothing to wait for in one)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def main_says(value: bool) -> bool:
  """The main process's ``value``, in every process (a decision all of them
  must take alike, such as whether to write a collective checkpoint)."""
  if jax.process_count() == 1:
    return bool(value)
  return bool(multihost_utils.broadcast_one_to_all(np.bool_(value)))


def main_ints(values: Sequence[int]) -> list[int]:
  """The main process's ``values`` (integers), in every process."""
  if jax.process_count() == 1:
    return [int(v) for v in values]
  count = int(multihost_utils.broadcast_one_to_all(np.int32(len(values))))
  if not count:
    return []
  mine = np.zeros(count, np.int32)
  if is_main():
    mine[:] = values
  return [int(v) for v in multihost_utils.broadcast_one_to_all(mine)]


def is_main() -> bool:
  """True in the process that writes metrics, reports and manifests."""
  return jax.process_index() == 0


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
  """``jax.distributed.initialize`` when started as several processes.

  The arguments (flags) win over ``FLASHDISTILL_COORDINATOR``,
  ``FLASHDISTILL_NUM_PROCESSES`` and ``FLASHDISTILL_PROCESS_ID``; without
  either nothing is done and the run is one process, unless a cluster
  environment JAX detects itself (SLURM, Open MPI) is present. Returns True
  when JAX was initialised for several processes.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get(
      "FLASHDISTILL_COORDINATOR"
  )
  if num_processes is None and env.get("FLASHDISTILL_NUM_PROCESSES"):
    num_processes = int(env["FLASHDISTILL_NUM_PROCESSES"])
  if process_id is None and env.get("FLASHDISTILL_PROCESS_ID"):
    process_id = int(env["FLASHDISTILL_PROCESS_ID"])
  detected = any(
      k in env
      for k in (
          "SLURM_JOB_ID",
          "OMPI_COMM_WORLD_SIZE",
          "JAX_COORDINATOR_ADDRESS",
      )
  )
  if coordinator_address is None and not detected:
    if num_processes not in (None, 1):
      raise ConfigError(
          f"--num_processes={num_processes} needs --coordinator_address"
          " (host:port of process 0)"
      )
    return False
  # CPU processes exchange collectives over gloo (GPUs and TPUs use their
  # own); set before the backends start.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
  )
  logging.info(
      "process %d of %d, %d local devices",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
  )
  return jax.process_count() > 1
