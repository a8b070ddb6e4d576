"""Does the compiled train step fit in one chip's memory? Budget, headroom, and one message naming the knobs
(`DoesNotFitError`, a ConfigError).

Where the budget comes from and who checks: docs/running.md#memory-check.
"""
from collections.abc import Mapping, Sequence
import dataclasses
import re
from typing import Any

import jax
import ml_collections

from elf_jax.config import ConfigError

GIB = 1 << 30
# Per-chip HBM that XLA's compile-time check allows (GiB, as its CompileTimeHbmOom error states it with libtpu
# 0.0.52), by jax device_kind: v5p, v5e, v6e.
TPU_HBM_GIB = {"TPU v5": 95.73, "TPU v5 lite": 15.75, "TPU v6 lite": 31.24}
# XLA's compile-time out-of-memory message, e.g. "... the total memory required for HLO temporaries (119.73G)
# exceeds available HBM (95.73G)"; sizes in GiB ("G") or other binary units.
_XLA_OOM = re.compile(r"required for (?P<what>[^()]+?) \((?P<need>[\d.]+)(?P<need_unit>[KMGT]?)\) exceeds available "
                      r"HBM \((?P<have>[\d.]+)(?P<have_unit>[KMGT]?)\)")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class DoesNotFitError(ConfigError):
  """The train step needs more memory per chip than the budget; the message names the knobs to turn."""


@dataclasses.dataclass(frozen=True)
class MemoryUsage:
  """Per-chip bytes of one compiled program (XLA's `memory_analysis()`)."""
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int

  @classmethod
  def of(cls, compiled: jax.stages.Compiled) -> "MemoryUsage":
    m = compiled.memory_analysis()
    return cls(argument_bytes=int(m.argument_size_in_bytes), output_bytes=int(m.output_size_in_bytes),
               alias_bytes=int(m.alias_size_in_bytes), temp_bytes=int(m.temp_size_in_bytes),
               code_bytes=int(m.generated_code_size_in_bytes))

  @property
  def total_bytes(self) -> int:
    """Peak estimate: arguments + outputs − outputs aliased to donated arguments + temporaries + generated code."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes


def budget_bytes(mesh_config: ml_collections.ConfigDict, device: jax.Device) -> int | None:
  """Per-chip memory budget in bytes (module docstring); None = no budget (CPU, nothing injected)."""
  if mesh_config.get("hbm_limit_gib", 0) > 0:
    return int(mesh_config.hbm_limit_gib * GIB)
  if device.platform == "cpu":
    return None
  try:
    stats = device.memory_stats()
  except jax.errors.JaxRuntimeError:  # abstract (topology) devices have no memory stats
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  if device.device_kind in TPU_HBM_GIB:
    return int(TPU_HBM_GIB[device.device_kind] * GIB)
  return None


def headroom_percent(total_bytes: int, budget: int) -> float:
  """Share of the budget left free, in percent (negative = over budget)."""
  return 100.0 * (budget - total_bytes) / budget


def does_not_fit(config: ml_collections.ConfigDict, mesh_shape: Mapping[str, int], device_kind: str, budget: int,
                 needed: int | None, what: str = "") -> DoesNotFitError:
  """The one error for a step that does not fit: what it needs, what the chip has, and the knobs to turn.

  Args:
    config: the run config (its current remat / dtype / batch are quoted).
    mesh_shape: the mesh's axis sizes (quoted).
    device_kind: the chip, e.g. "TPU v5".
    budget: bytes per chip (`budget_bytes`, or what XLA reported as available).
    needed: bytes per chip the step needs; None = unknown (XLA gave no figure).
    what: what `needed` counts, e.g. "HLO temporaries" (default: the whole step).
  """
  m, o = config.model, config.optim
  injected = " (config.mesh.hbm_limit_gib)" if config.mesh.get("hbm_limit_gib", 0) > 0 else ""
  mesh = " ".join(f"{axis}={size}" for axis, size in mesh_shape.items())
  have = f"{budget / GIB:.2f} GiB{injected}"
  if needed is None:
    head = f"the train step does not fit in the memory of one {device_kind} chip ({have})"
  else:
    over = -headroom_percent(needed, budget)
    head = (f"the train step does not fit in one {device_kind} chip: it needs {needed / GIB:.2f} GiB per chip"
            f"{' for ' + what if what else ''} but the budget is {have} ({over:.0f}% over)")
  rows = o.global_batch_size // o.grad_accum_steps
  return DoesNotFitError(
      f"{head}. Turn one of these knobs (current values in brackets):\n"
      f"  - remat: --config.model.remat=full recomputes each block's activations in the backward pass "
      f"[model.remat={m.remat}]\n"
      f"  - fsdp: --config.mesh.fsdp=N (with --config.mesh.data=-1) shards params, EMA and optimizer state over N "
      f"chips, e.g. --config.mesh.preset=v5p-64-fsdp [mesh {mesh}]\n"
      f"  - precision: --config.model.compute_dtype=bfloat16 halves the activations "
      f"[model.compute_dtype={m.compute_dtype}]\n"
      f"  - batch: --config.optim.grad_accum_steps=N runs each step as N micro-steps of fewer rows, or lower "
      f"--config.optim.global_batch_size [{rows} rows per micro-step = global_batch_size {o.global_batch_size} / "
      f"grad_accum_steps {o.grad_accum_steps}]")


def compile_or_explain(lowered: jax.stages.Lowered, config: ml_collections.ConfigDict,
                       mesh: jax.sharding.Mesh) -> jax.stages.Compiled:
  """`lowered.compile()` for `mesh`, with XLA's compile-time out-of-memory error turned into `does_not_fit`."""
  try:
    return lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    device = mesh.devices.flat[0]
    found = _XLA_OOM.search(str(e))
    if found is None:
      budget = budget_bytes(config.mesh, device) or 0
      raise does_not_fit(config, mesh.shape, device.device_kind, budget, None) from e
    need = float(found["need"]) * _UNITS[found["need_unit"]]
    have = float(found["have"]) * _UNITS[found["have_unit"]]
    raise does_not_fit(config, mesh.shape, device.device_kind, int(have), int(need), found["what"]) from None


def check_fits(usage: MemoryUsage, budget: int | None, config: ml_collections.ConfigDict,
               mesh_shape: Mapping[str, int], device_kind: str) -> None:
  """Raises `does_not_fit` if `usage` exceeds `budget` bytes per chip (None: nothing to check)."""
  if budget is not None and usage.total_bytes > budget:
    raise does_not_fit(config, mesh_shape, device_kind, budget, usage.total_bytes)


def check_step_fits(step: Any, args: Sequence[Any], mesh: jax.sharding.Mesh,
                    config: ml_collections.ConfigDict) -> MemoryUsage | None:
  """Compiles the jitted `step` for `args` (arrays or ShapeDtypeStructs) and checks its per-chip memory against the
  budget of the mesh's chips before anything runs; returns the usage, or None when there is no budget (then
  nothing is compiled here)."""
  device = mesh.devices.flat[0]
  budget = budget_bytes(config.mesh, device)
  if budget is None:
    return None
  usage = MemoryUsage.of(compile_or_explain(step.lower(*args), config, mesh))
  check_fits(usage, budget, config, mesh.shape, device.device_kind)
  return usage
