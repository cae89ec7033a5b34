"""The devices a plan compiles for, by name, and the memory each one has.

    v5p-64, v4-8       Cloud TPU names counting TensorCores (2 per chip):
                       v5p-64 is 32 chips, 2x4x4
    v5e-16, v6e-64     Cloud TPU names counting chips (v5litepod-16 too)
    v5p:2x4x4          a TPU generation and its chip grid, as libtpu names it
    2xv5p-64           several slices of one of the above (multi-slice)
    cpu:8              N host CPU devices (XLA_FLAGS=
                       --xla_force_host_platform_device_count=N or more)
    local              the devices this process has (GPUs, TPUs or CPUs)

A TPU slice's devices come from ``jax.experimental.topologies``: this host
needs libtpu (``pip install -e '.[tpu]'``) but no TPU; they can compile
programs but hold no arrays. Memory per chip is the published HBM size.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax

from distill.core.errors import ConfigError

GIB = 2**30

#: Generation -> (libtpu's name, HBM per chip, Cloud names count cores?, grid dims)
TPUS: dict[str, tuple[str, int, bool, int]] = {
    "v4": ("v4", 32 * GIB, True, 3),
    "v5p": ("v5p", 95 * GIB, True, 3),
    "v5e": ("v5e", 16 * GIB, False, 2),
    "v5litepod": ("v5e", 16 * GIB, False, 2),
    "v6e": ("v6e", 32 * GIB, False, 2),
}

_CLOUD = re.compile(r"^(?:(\d+)x)?(v4|v5p|v5e|v5litepod|v6e)-(\d+)$")
_GRID = re.compile(r"^(?:(\d+)x)?(v4|v5p|v5e|v5litepod|v6e):(\d+(?:x\d+)*)$")


@dataclasses.dataclass
class Topology:
  """The devices of a named topology and the memory of each."""

  name: str
  devices: list
  memory_per_device: int  # bytes
  description: str

  @property
  def platform(self) -> str:
    return self.devices[0].platform


def grid(chips: int, dims: int) -> tuple[int, ...]:
  """The chip grid of a slice of ``chips`` chips, as Cloud TPU shapes them:
  powers of two, the later dimensions doubled first (v5p-64, 32 chips:
  2x4x4; v6e-64: 8x8)."""
  if chips < 1 or chips & (chips - 1):
    raise ConfigError(
        f"a TPU slice of {chips} chips: Cloud TPU slices have a power of two"
    )
  shape = [1] * dims
  if dims == 3 and chips >= 8:  # 3D slices start from a 2x2x2 cube
    shape, chips = [2, 2, 2], chips // 8
  elif dims == 3 and chips == 4:
    return (2, 2, 1)
  axis = dims - 1
  while chips > 1:
    shape[axis] *= 2
    chips //= 2
    axis = axis - 1 if axis > 0 else dims - 1
  return tuple(sorted(shape))


def _tpu(name: str, generation: str, shape: tuple[int, ...], slices: int):
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  libtpu_name, hbm, _, dims = TPUS[generation]
  if len(shape) != dims:
    raise ConfigError(
        f"--topology={name}: a {generation} grid has {dims} dimensions"
        f" (e.g. {generation}:{'x'.join(['2'] * dims)})"
    )
  # libtpu looks for the TPU host it runs on unless told; here there is
  # none. Several processes (parallel tests) may load it at once.
  for key, value in (
      ("TPU_SKIP_MDS_QUERY", "1"),
      ("TPU_ACCELERATOR_TYPE", f"{libtpu_name}-{math.prod(shape)}"),
      ("TPU_WORKER_HOSTNAMES", "localhost"),
      ("TPU_WORKER_ID", "0"),
      ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
  ):
    os.environ.setdefault(key, value)
  try:
    devices = topologies.get_topology_desc(
        platform="tpu",
        topology_name=f"{libtpu_name}:{'x'.join(map(str, shape))}",
        **({"num_slices": slices} if slices > 1 else {}),
    ).devices
  except (ImportError, RuntimeError) as e:
    if "libtpu" in str(e).lower() or isinstance(e, ImportError):
      raise ConfigError(
          f"--topology={name} needs libtpu: pip install -e '.[tpu]'"
      ) from e
    raise ConfigError(f"--topology={name}: libtpu refused it: {e}") from e
  chips = math.prod(shape) * slices
  per_chip = len(devices) // chips
  hosts = len(
      {(getattr(d, "slice_index", 0), d.process_index) for d in devices}
  )
  return Topology(
      name=name,
      devices=list(devices),
      memory_per_device=hbm // per_chip,
      description=(f"{slices} x " if slices > 1 else "")
      + (
          f"{generation} {'x'.join(map(str, shape))}: {chips} chips,"
          f" {len(devices)} devices, {hosts} hosts, {hbm / GIB:.0f} GiB HBM"
          " per chip"
      ),
  )


def device_memory() -> dict[str, int] | None:
  """This process's devices' memory as their allocators count it, in bytes:
  ``peak`` (the most in use at once since the process started, on the
  device where it was highest), ``in_use`` and ``limit`` of that device;
  None where the devices keep no such count (CPUs)."""
  best = None
  for device in jax.local_devices():
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" not in stats:
      continue
    if best is None or stats["peak_bytes_in_use"] > best["peak"]:
      best = {
          "peak": int(stats["peak_bytes_in_use"]),
          "in_use": int(stats.get("bytes_in_use", 0)),
          "limit": int(stats.get("bytes_limit", 0)),
      }
  return best


def _host_memory() -> int:
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resolve(name: str) -> Topology:
  """The ``Topology`` of a name (module docstring); ConfigError if none."""
  name = name.strip()
  if name == "local":
    devices = jax.devices()
    stats = devices[0].memory_stats() or {}
    memory = stats.get("bytes_limit") or _host_memory() // len(devices)
    return Topology(
        name, devices, int(memory),
        f"{len(devices)} local {devices[0].device_kind} devices",
    )  # fmt: skip
  if name.startswith("cpu:"):
    count = int(name[4:]) if name[4:].isdigit() else 0
    have = jax.devices("cpu")
    if count < 1 or count > len(have):
      raise ConfigError(
          f"--topology={name}: this process has {len(have)} CPU devices; set"
          f" XLA_FLAGS=--xla_force_host_platform_device_count={max(count, 1)}"
          " before starting it"
      )
    return Topology(
        name, have[:count], _host_memory() // count,
        f"{count} host CPU devices sharing {_host_memory() / GIB:.0f} GiB",
    )  # fmt: skip
  match = _CLOUD.match(name) or _GRID.match(name)
  if match is None:
    raise ConfigError(
        f"--topology={name!r}: use a Cloud TPU name (v5p-64, v5e-16, v6e-64,"
        " v4-8, 2xv5p-64), a grid (v5p:2x4x4), cpu:N or local"
    )
  slices = int(match.group(1) or 1)
  generation = match.group(2)
  _, _, counts_cores, dims = TPUS[generation]
  if match.re is _CLOUD:
    count = int(match.group(3))
    chips = count // 2 if counts_cores else count
    if counts_cores and count % 2:
      raise ConfigError(
          f"--topology={name}: {generation}-N counts cores (even)"
      )
    shape = grid(chips, dims)
  else:
    shape = tuple(int(x) for x in match.group(3).split("x"))
  return _tpu(name, generation, shape, slices)
