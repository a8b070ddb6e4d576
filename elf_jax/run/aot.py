r"""Ahead-of-time compilation of the sharded train step for a TPU slice, on any host (`--mode=compile`).

  JAX_PLATFORMS=cpu python -m elf_jax.main --config=configs/owt_b.py --mode=compile \
    --config.mesh.compile_topology=v5p-64

What is compiled, the memory / FLOPs report and failures: docs/running.md#ahead-of-time-compilation.
"""
from collections.abc import Sequence
import dataclasses
import functools
import os
import sys

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from elf_jax import report
from elf_jax.config import ConfigError
from elf_jax.objective import step as step_lib
from elf_jax.run import experiment, hbm, train_loop

# Slice name → jax topology name ("<generation>:<chip grid>"). v5p-N counts TensorCores (2 per chip, so N / 2
# chips on a 3-D torus); v5litepod-N and v6e-N count chips (2-D). Chip grids are the slice shapes Cloud TPU offers.
_V5P_GRIDS = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8"}
_LITE_GRIDS = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
TOPOLOGIES: dict[str, str] = {
    **{f"v5p-{2 * chips}": f"v5p:{grid}" for chips, grid in _V5P_GRIDS.items()},
    **{f"v5litepod-{chips}": f"v5e:{grid}" for chips, grid in _LITE_GRIDS.items()},
    **{f"v6e-{chips}": f"v6e:{grid}" for chips, grid in _LITE_GRIDS.items()},
}

@dataclasses.dataclass(frozen=True)
class CompileReport:
  """Per-chip figures of one compiled optimizer step (all micro-batches). Bytes are per device; `flops` is XLA's
  per-device count."""
  topology: str
  num_devices: int
  device_kind: str
  mesh_shape: dict[str, int]
  batch_shape: tuple[int, int]
  num_params: int
  memory: hbm.MemoryUsage
  budget_bytes: int | None  # per-chip memory budget (`hbm.budget_bytes`); None = unknown (CPU)
  flops: float

  @property
  def headroom_percent(self) -> float | None:
    """Share of the budget the step leaves free (negative: over budget); None without a budget."""
    return None if self.budget_bytes is None else hbm.headroom_percent(self.memory.total_bytes, self.budget_bytes)

  def describe(self) -> str:
    """Human-readable lines for the console."""
    mesh = " ".join(f"{k}={v}" for k, v in self.mesh_shape.items())
    gib = lambda b: f"{b / hbm.GIB:8.3f} GiB"
    m = self.memory
    total = f"  total            {gib(m.total_bytes)}"
    if self.budget_bytes is not None:
      headroom = self.headroom_percent
      total += (f" of {gib(self.budget_bytes).strip()} HBM: " +
                (f"{headroom:.1f}% headroom" if headroom >= 0 else f"does not fit, {-headroom:.1f}% over"))
    return "\n".join([
        f"compiled train step for {self.topology}: {self.num_devices} x {self.device_kind}, mesh {mesh}, "
        f"global batch {self.batch_shape[0]} x {self.batch_shape[1]}, {self.num_params / 1e6:.2f}M parameters",
        "per-chip memory:",
        f"  arguments        {gib(m.argument_bytes)}",
        f"  outputs          {gib(m.output_bytes)}  ({gib(m.alias_bytes).strip()} aliased to donated state)",
        f"  temporaries      {gib(m.temp_bytes)}",
        f"  generated code   {gib(m.code_bytes)}",
        total,
        f"per-chip FLOPs of one step: {self.flops:.4e} (XLA cost analysis)",
    ])


@functools.cache
def _explain_libtpu_start() -> None:
  """One line before libtpu first starts on a host that is no TPU VM, where it prints complaints to stderr."""
  if not os.environ.get("TPU_ACCELERATOR_TYPE"):
    report.say("libtpu starts without a TPU here: its complaints that follow (\"Failed to find host bounds\", "
               "\"unexpected worker hostname\") are expected on a CPU host and do not affect the compile")


def topology_devices(name: str) -> list:
  """The abstract devices of the TPU slice `name` (e.g. "v5p-64"), via libtpu; nothing needs a TPU.

  Raises:
    ConfigError: `name` is not in TOPOLOGIES (the message lists them).
    ImportError: libtpu is missing (the message says how to install it).
  """
  if name not in TOPOLOGIES:
    raise ConfigError(f"unknown compile topology {name!r}; known: {', '.join(TOPOLOGIES)}. "
                      "Fix: --config.mesh.compile_topology=<one of these>.")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  _explain_libtpu_start()
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGIES[name]).devices)
  except Exception as e:  # jax raises a RuntimeError / JaxRuntimeError naming the missing TPU plug-in
    import importlib.util  # pylint: disable=g-import-not-at-top
    if importlib.util.find_spec("libtpu") is None:
      raise ImportError(f"compiling for {name} needs libtpu; install it with `pip install -e .[compile]` "
                        "(or `pip install libtpu`) and run with JAX_PLATFORMS=cpu") from e
    if "lockfile" in str(e):  # another process on this host has libtpu loaded (another compile, a TPU job)
      raise RuntimeError(f"libtpu is in use by another process on this host ({e}); to compile alongside it, set "
                         "ALLOW_MULTIPLE_LIBTPU_LOAD=1 (compiling touches no TPU)") from e
    raise


def compile_train_step(config: ml_collections.ConfigDict, devices: Sequence[jax.Device],
                       topology: str = "") -> CompileReport:
  """Lowers and compiles the train step of `config` for a mesh over `devices` (real or abstract).

  Args:
    config: a full run config; `config.mesh` (or `config.mesh.preset`) gives the mesh sizes, `optim` the batch
      (global_batch_size rows of data.max_length tokens per step, in grad_accum_steps micro-batches).
    devices: the devices of the mesh, e.g. `topology_devices("v5p-64")` or `jax.devices()`.
    topology: a label for the report (default: the device count and kind).

  Returns:
    The CompileReport of the compiled executable, with the budget of `hbm.budget_bytes`.

  Raises:
    hbm.DoesNotFitError: XLA ran out of memory compiling the step (the message names the knobs to turn).
  """
  exp = experiment.build(config, devices=devices, with_training_plan=True, abstract=True)
  plan, mesh = exp.training_plan, exp.mesh
  train_step = train_loop.elf_train_step(exp)
  replicated = NamedSharding(mesh, P())
  encoder_params = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                                          exp.encoder_params)
  batch = exp.abstract_batch()
  device = mesh.devices.flat[0]
  frozen = step_lib.FrozenInputs(encoder_params)
  compiled = hbm.compile_or_explain(train_step.lower(plan.abstract_state, frozen, batch), config, mesh)

  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax returned one dict per computation
  return CompileReport(
      topology=topology or f"{mesh.devices.size} x {device.device_kind}", num_devices=int(mesh.devices.size),
      device_kind=device.device_kind, mesh_shape=dict(mesh.shape), batch_shape=batch["ids"].shape,
      num_params=int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(exp.param_shapes))),
      memory=hbm.MemoryUsage.of(compiled), budget_bytes=hbm.budget_bytes(config.mesh, device),
      flops=float(cost.get("flops", 0.0)))


def compile_for_topology(config: ml_collections.ConfigDict, name: str) -> CompileReport:
  """`compile_train_step` over the abstract devices of the TPU slice `name`.

  The mesh sizes come from `config.mesh` (`elf_jax.config.mesh_settings`; by default pure data parallelism over the
  slice's chips).
  """
  devices = topology_devices(name)
  return compile_train_step(config, devices, topology=name)


def main(config: ml_collections.ConfigDict) -> CompileReport:
  """`--mode=compile`: compiles for `config.mesh.compile_topology` and prints the report.

  Bad input and a step that does not fit end the process with one `error: ...` message (exit status 1), as the
  other modes of `elf_jax.main` do, not with a traceback.
  """
  try:
    name = config.mesh.compile_topology
    if not name:
      raise ConfigError("--mode=compile needs a target slice: set --config.mesh.compile_topology (one of "
                        f"{', '.join(TOPOLOGIES)})")
    report = compile_for_topology(config, name)
    print(report.describe(), flush=True)
    hbm.check_fits(report.memory, report.budget_bytes, config, report.mesh_shape, report.device_kind)
  except ConfigError as e:
    sys.exit(f"error: {e}")
  return report
