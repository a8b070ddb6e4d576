"""Device mesh: axis names, mesh construction from `config.mesh` (`elf_jax.config.mesh_settings`), multi-host start-up.

The mesh has three axes, outermost to innermost: `data` (pure data parallelism), `fsdp` (data parallelism whose
parameters and optimizer state are sharded too) and `tensor` (model parallelism inside a layer). `tensor` is
innermost so that its devices are neighbours on the fastest interconnect (the same host / ICI neighbours); the
batch dimension is sharded over `data` and `fsdp` together.

Call `initialize_distributed()` once, before anything touches `jax.devices()`, then `make_mesh(config.mesh)`.
"""
from collections.abc import Mapping, Sequence
import logging
import math
import os
from typing import Any

import jax
from jax.experimental import mesh_utils
import numpy as np

from elf_jax.config import MESH_AXES, ConfigError, mesh_settings

BATCH_AXES = ("data", "fsdp")

_ENV_FLAG = "ELF_DISTRIBUTED"
_ENV_COORDINATOR = "ELF_COORDINATOR_ADDRESS"
_ENV_NUM_PROCESSES = "ELF_NUM_PROCESSES"
_ENV_PROCESS_ID = "ELF_PROCESS_ID"


def resolve_mesh_shape(mesh_config: Mapping[str, Any], num_devices: int) -> tuple[int, int, int]:
  """Returns the (data, fsdp, tensor) sizes for `num_devices` devices.

  Args:
    mesh_config: `config.mesh` (or any mapping) with integer fields `data`, `fsdp`, `tensor`, those unset (None) filled
      by its `preset` (`elf_jax.config.mesh_settings`); each a size >= 1 or -1 = the remaining devices (at most one).
    num_devices: the number of devices the mesh must cover exactly.

  Raises:
    ValueError: a size is neither >= 1 nor -1, more than one -1, or the product does not equal `num_devices`.
  """
  sizes = mesh_settings(mesh_config)
  from_preset = [axis for axis in MESH_AXES if mesh_config.get(axis) is None]
  spec = " ".join(f"{axis}={size}" for axis, size in sizes.items()) + (
      f" ({', '.join(from_preset)} from mesh.preset={mesh_config['preset']!r})" if from_preset else "")
  bad = [axis for axis, size in sizes.items() if not isinstance(size, (int, np.integer)) or size == 0 or size < -1]
  if bad:
    raise ConfigError(f"mesh {spec}: {', '.join(bad)} must be a positive integer or -1 (fill with the remaining "
                     "devices); fix --config.mesh.<axis>.")
  fill = [axis for axis, size in sizes.items() if size == -1]
  if len(fill) > 1:
    raise ConfigError(f"mesh {spec}: at most one axis may be -1, got {len(fill)} ({', '.join(fill)}); give explicit "
                     "sizes to all but one of them.")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  hint = (f"Fix: set --config.mesh.data/fsdp/tensor so that their product is {num_devices}, or set one of them to "
          "-1 to fill the remaining devices.")
  if fill:
    if num_devices % fixed:
      raise ConfigError(f"mesh {spec}: the fixed axes multiply to {fixed}, which does not divide the {num_devices} "
                       f"available devices, so {fill[0]}=-1 cannot fill them. {hint}")
    sizes[fill[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(f"mesh {spec} needs {fixed} devices, but {num_devices} are available. {hint}")
  return tuple(int(sizes[axis]) for axis in MESH_AXES)


def _device_array(shape: tuple[int, ...], devices: Sequence[jax.Device]) -> np.ndarray:
  """Arranges `devices` into `shape` so that the last (innermost) mesh axis has the fastest interconnect.

  TPU: jax's topology-aware placement on the physical torus. Elsewhere: devices ordered by (process, id), so the
  innermost axis stays within one host while it fits there.
  """
  if devices[0].platform == "tpu":
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
  return np.array(ordered).reshape(shape)


def make_mesh(mesh_config: Mapping[str, Any], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds the ("data", "fsdp", "tensor") mesh described by `mesh_config` over `devices`.

  The mesh has Auto axis types (`jax.sharding.Mesh`), so jit shardings propagate as usual.

  Args:
    mesh_config: `config.mesh`: `data`, `fsdp`, `tensor` sizes, one of them may be -1 (see `resolve_mesh_shape`).
    devices: the devices to use; default `jax.devices()` (all devices of all processes).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(mesh_config, len(devices))
  return jax.sharding.Mesh(_device_array(shape, devices), MESH_AXES)


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, "")
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"environment variable {name}={value!r} must be an integer; fix or unset it.") from None


def distributed_requested(flag: bool | None = None) -> bool:
  """True if `flag` says so, or (when `flag` is None) the environment has ELF_DISTRIBUTED=1."""
  if flag is not None:
    return bool(flag)
  value = os.environ.get(_ENV_FLAG, "")
  if value not in ("", "0", "1"):
    raise ConfigError(f"environment variable {_ENV_FLAG}={value!r} must be 1 (multi-host start-up) or 0/unset "
                     "(single process).")
  return value == "1"


def initialize_distributed(flag: bool | None = None) -> bool:
  """Starts jax's multi-host runtime when asked to; call before anything touches `jax.devices()`.

  Multi-host start-up happens when `flag` is True, or `flag` is None and ELF_DISTRIBUTED=1. The coordinator
  address, process count and process id come from ELF_COORDINATOR_ADDRESS (host:port), ELF_NUM_PROCESSES and
  ELF_PROCESS_ID when set; whatever is unset is left to jax's auto-detection (TPU VM metadata, SLURM, ...).
  Errors from `jax.distributed.initialize` propagate. CPU processes (tests, CPU clusters) run their collectives over
  gloo, jax's default `jax_cpu_collectives_implementation`. The initialisation also starts jax's preemption
  service, which catches SIGTERM from then on (`elf_jax.run.train_loop.install_preemption_handler`).

  Returns:
    True if `jax.distributed.initialize` was called, False for a single-process run.
  """
  if not distributed_requested(flag):
    logging.info("Single-process run: jax.distributed not initialised (set %s=1 for multi-host).", _ENV_FLAG)
    return False
  kwargs = dict(coordinator_address=os.environ.get(_ENV_COORDINATOR) or None,
                num_processes=_env_int(_ENV_NUM_PROCESSES), process_id=_env_int(_ENV_PROCESS_ID))
  kwargs = {key: value for key, value in kwargs.items() if value is not None}
  logging.info("Calling jax.distributed.initialize(%s)%s.", ", ".join(f"{k}={v!r}" for k, v in kwargs.items()),
               "" if len(kwargs) == 3 else " (the rest auto-detected)")
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed initialised: process %d of %d, %d local / %d global devices.",
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def batch_axes(mesh: jax.sharding.Mesh) -> tuple[str, ...]:
  """The mesh axes the batch dimension is sharded over: ("data", "fsdp"), as a PartitionSpec entry."""
  return tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names)


def num_batch_shards(mesh: jax.sharding.Mesh) -> int:
  """How many pieces the global batch is split into (product of the `batch_axes` sizes)."""
  return math.prod(mesh.shape[axis] for axis in batch_axes(mesh))


def describe_mesh(mesh: jax.sharding.Mesh) -> str:
  """One log line, e.g. 'mesh data=2 fsdp=2 tensor=2: 8 cpu devices, 1 process, batch split 4 ways over data+fsdp'."""
  axes = " ".join(f"{axis}={size}" for axis, size in mesh.shape.items())
  platform = mesh.devices.flat[0].platform
  num_processes = len({d.process_index for d in mesh.devices.flat})
  return (f"mesh {axes}: {mesh.devices.size} {platform} devices, {num_processes} "
          f"process{'es' if num_processes > 1 else ''}, batch split {num_batch_shards(mesh)} ways over "
          f"{'+'.join(batch_axes(mesh))}")
