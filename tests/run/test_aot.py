"""Ahead-of-time compilation of the real train step (--mode=compile): on the 8 CPU devices, for a small TPU v5p slice
with the Pallas attention kernel (libtpu as the compiler), the per-chip headroom against HBM, and the one message
that names the knobs when a step does not fit, in --mode=compile and in a training run before its first step."""
import dataclasses
import os
import re

# libtpu takes a host-wide lock when it loads; compiling touches no TPU, so share it with other processes.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from elf_jax import recipes
from elf_jax.config import ConfigError
from elf_jax.parallel import mesh as mesh_lib
from elf_jax.parallel.mesh import make_mesh
from elf_jax.run import aot, hbm, train_loop

pytestmark = pytest.mark.slow  # end-to-end runs and equivalence checks: the full suite, not the fast loop

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax.monitoring: one per XLA compile
KNOBS = ("--config.model.remat=full", "--config.mesh.fsdp=N", "--config.model.compute_dtype=bfloat16",
         "--config.optim.grad_accum_steps=N")


def _tiny_config():
  c = recipes.tiny()
  c.model.update(hidden_size=48, depth=1, num_heads=2)  # SwiGLU hidden 128: tensor=2 divides it
  c.optim.global_batch_size = 16
  c.mesh.update(data=2, fsdp=2, tensor=2)
  return c


def _assert_names_the_knobs(message: str):
  assert "Traceback" not in message and "RESOURCE_EXHAUSTED" not in message
  for knob in KNOBS:
    assert knob in message, (knob, message)


def test_compile_on_cpu_mesh_reports_memory_and_flops():
  c = _tiny_config()
  c.mesh.hbm_limit_gib = 0.5  # an injected budget; a CPU has none of its own
  report = aot.compile_train_step(c, jax.devices()[:8], topology="cpu-8")
  assert report.mesh_shape == {"data": 2, "fsdp": 2, "tensor": 2}
  assert report.batch_shape == (16, c.data.max_length)
  assert report.num_params > 0 and report.flops > 0
  m = report.memory
  assert m.argument_bytes > 0 and m.output_bytes > 0 and m.temp_bytes > 0
  # The state is donated: every output buffer but the (small, replicated) metrics aliases an argument.
  assert 0 < m.alias_bytes <= m.output_bytes
  assert m.total_bytes == m.argument_bytes + m.output_bytes - m.alias_bytes + m.temp_bytes + m.code_bytes
  assert report.budget_bytes == hbm.GIB // 2
  assert report.headroom_percent == pytest.approx(100 * (1 - m.total_bytes / (hbm.GIB / 2)))
  assert re.search(r"total +[\d.]+ GiB of 0\.500 GiB HBM: \d+\.\d% headroom", report.describe()), report.describe()
  assert "HBM" not in dataclasses.replace(report, budget_bytes=None).describe()  # no budget, no percentage


def test_unknown_topology_is_a_clear_error():
  with pytest.raises(ConfigError, match=r"unknown compile topology 'v5p-63'.*v5p-64"):
    aot.topology_devices("v5p-63")
  c = _tiny_config()
  c.mesh.compile_topology = ""
  with pytest.raises(SystemExit, match="^error: --mode=compile needs a target slice.*compile_topology"):
    aot.main(c)


def test_topology_names():
  assert aot.TOPOLOGIES["v5p-64"] == "v5p:2x4x4"  # 32 chips
  assert aot.TOPOLOGIES["v5p-8"] == "v5p:2x2x1"  # 4 chips
  assert aot.TOPOLOGIES["v5p-128"] == "v5p:4x4x4"  # 64 chips


@pytest.fixture(scope="module")
def v5p_pallas():
  """The tiny train step with the Pallas attention, compiled for v5p-8 (4 chips) on a data=2 x tensor=2 mesh: the
  loss's shard_map makes "data" manual, so the kernel sits inside it with "fsdp" (size 1) and "tensor" free."""
  c = _tiny_config()
  c.model.attention_impl = "pallas"
  c.mesh.update(data=2, fsdp=1, tensor=2)
  return c, aot.compile_for_topology(c, "v5p-8")


def test_pallas_train_step_compiles_for_a_v5p_slice(v5p_pallas):
  _, report = v5p_pallas
  assert (report.num_devices, report.device_kind) == (4, "TPU v5")
  assert report.mesh_shape == {"data": 2, "fsdp": 1, "tensor": 2}
  assert report.flops > 0 and report.memory.total_bytes > 0
  assert report.budget_bytes == int(hbm.TPU_HBM_GIB["TPU v5"] * hbm.GIB)
  assert 99 < report.headroom_percent < 100
  assert re.search(r"total +[\d.]+ GiB of 95\.730 GiB HBM: \d+\.\d% headroom", report.describe()), report.describe()


def test_compile_mode_prints_headroom_and_stops_with_the_knobs_when_over(v5p_pallas, monkeypatch, capsys):
  c, report = v5p_pallas
  c.mesh.compile_topology = "v5p-8"
  monkeypatch.setattr(aot, "compile_for_topology", lambda config, name: report)
  assert aot.main(c) is report
  assert "headroom" in capsys.readouterr().out
  over = dataclasses.replace(report, budget_bytes=report.memory.total_bytes // 2)
  monkeypatch.setattr(aot, "compile_for_topology", lambda config, name: over)
  with pytest.raises(SystemExit) as exit_info:
    aot.main(c)
  assert "does not fit, 100.0% over" in capsys.readouterr().out
  message = str(exit_info.value.code)
  assert message.startswith("error: the train step does not fit in one TPU v5 chip: it needs ")
  assert "(100% over)" in message
  _assert_names_the_knobs(message)
  assert "[model.remat=none]" in message and "[mesh data=2 fsdp=1 tensor=2]" in message


def test_xla_out_of_memory_becomes_the_knobs_message():
  """XLA's own compile-time check (RESOURCE_EXHAUSTED: CompileTimeHbmOom) on a program with 256 GiB of
  temporaries for one v5p chip."""
  mesh = make_mesh(dict(data=1, fsdp=1, tensor=1), aot.topology_devices("v5p-8")[:1])
  x = jax.ShapeDtypeStruct((1 << 18,), jnp.float32, sharding=NamedSharding(mesh, P()))
  lowered = jax.jit(lambda x: x[:, None] * x[None, :]).lower(x)
  with pytest.raises(hbm.DoesNotFitError) as error:
    hbm.compile_or_explain(lowered, _tiny_config(), mesh)
  message = str(error.value)
  assert message.startswith("the train step does not fit in one TPU v5 chip: it needs 256.00 GiB per chip for "
                            "HLO temporaries but the budget is 95.73 GiB (167% over)"), message
  _assert_names_the_knobs(message)


def _small_run_config(**mesh):
  """configs/tiny.py shrunk to a 1-block width-32 model, batch 8, 2 steps, on the 8 CPU devices."""
  c = recipes.tiny()
  c.model.update(hidden_size=32, depth=1, num_heads=2, bottleneck_dim=16)
  c.encoder.update(dim=16, random_num_layers=1, random_num_heads=2, random_d_kv=8, random_d_ff=32,
                   measure_latent_stats=False)
  c.flow.decoder_groups = -1
  c.data.synthetic_num_sentences = 200
  c.optim.update(global_batch_size=8, num_steps=2, warmup_steps=1)
  c.checkpoint.update(every_steps=2, async_save=False)
  c.logging.update(log_every_steps=1, tensorboard=False)
  c.mesh.update(**mesh)
  return c


def test_training_stops_before_the_first_step_when_the_step_does_not_fit(tmp_path):
  """An injected per-chip budget (config.mesh.hbm_limit_gib) below the compiled step's memory: the run stops with
  the knobs message before any step runs."""
  with pytest.raises(hbm.DoesNotFitError) as error:
    train_loop.train(_small_run_config(hbm_limit_gib=1e-5), str(tmp_path))
  message = str(error.value)
  assert re.match(r"the train step does not fit in one cpu chip: it needs [\d.]+ GiB per chip but the budget is "
                  r"0\.00 GiB \(config\.mesh\.hbm_limit_gib\) \(\d+% over\)", message), message
  _assert_names_the_knobs(message)
  assert not (tmp_path / "metrics.jsonl").exists()  # no step ran


def test_fit_check_compiles_the_step_that_the_first_call_runs():
  """`check_step_fits` with arrays and ShapeDtypeStructs (as the loop passes them): no budget, nothing compiled; a
  budget it fits returns the usage, and the first real call reuses that executable (no second compile)."""
  mesh = make_mesh(dict(data=-1, fsdp=1, tensor=1))
  rows = NamedSharding(mesh, P(mesh_lib.BATCH_AXES))
  step = jax.jit(lambda state, batch: state + jnp.tanh(batch.astype(jnp.float32)).sum(), in_shardings=(None, rows),
                 donate_argnums=(0,))
  state = jnp.zeros(())
  batch = jax.device_put(jnp.ones((8, 4), jnp.int32), rows)
  args = (state, jax.ShapeDtypeStruct(batch.shape, batch.dtype, sharding=rows))
  config = _tiny_config()
  assert hbm.check_step_fits(step, args, mesh, config) is None  # CPU: no budget
  config.mesh.hbm_limit_gib = 1.0
  usage = hbm.check_step_fits(step, args, mesh, config)
  assert 0 < usage.total_bytes < hbm.GIB
  compiles = []
  listener = lambda event, *_, **__: compiles.append(event) if event == BACKEND_COMPILE_EVENT else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    assert float(step(state, batch)) == pytest.approx(32 * np.tanh(1.0))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not compiles
  config.mesh.hbm_limit_gib = usage.total_bytes / 2 / hbm.GIB
  with pytest.raises(hbm.DoesNotFitError, match=r"needs [\d.]+ GiB per chip but the budget .* \(100% over\)"):
    hbm.check_step_fits(step, args, mesh, config)


def test_pallas_sampler_compiles_for_a_v5p_slice():
  """The sampler (SDE, CFG: the batch doubles inside) with the Pallas attention compiles for v5p-8 on a data=2 x
  tensor=2 mesh: traced under the mesh, every kernel call runs per shard (Mosaic refuses a whole-array call)."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  from elf_jax.model.elf import ELF, ModelConfig, init_params  # pylint: disable=import-outside-toplevel
  from elf_jax.sampling import sampler  # pylint: disable=import-outside-toplevel
  c = _tiny_config()
  c.model.attention_impl = "pallas"
  mesh = make_mesh(dict(data=2, fsdp=1, tensor=2), aot.topology_devices("v5p-8"))
  model = ELF(ModelConfig.from_config(c))
  params = jax.eval_shape(lambda: nn.unbox(init_params(model, jax.random.key(0))))
  config = sampler.SampleConfig.from_config(c, method="sde", steps=2, cfg_scale=2.0, grid="uniform", eos_id=1,
                                            pad_id=0)
  b, s, d = 4, c.data.max_length, c.encoder.dim
  rep, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P(("data", "fsdp")))
  abstract = lambda shape, dtype, sh: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
  params = jax.tree.map(lambda x: abstract(x.shape, x.dtype, rep), params)
  run = sampler.make_sampler(model, config, mesh)
  inputs = sampler.SampleInputs(
      abstract((b, s, d), jnp.float32, rows), abstract((3,), jnp.float32, rep), rng=jax.random.key(0),
      guidance_scale=abstract((b,), jnp.float32, rows),
      condition=sampler.PinnedLatents(abstract((b, s, d), jnp.float32, rows), abstract((b, s), jnp.bool_, rows)))
  compiled = run.lower(params, inputs).compile()
  assert "tpu_custom_call" in compiled.as_text()


def test_libtpu_start_up_complaints_are_announced_as_expected():
  """On a host without TPUs libtpu prints start-up complaints to stderr that read like failures; one line before
  them says they are expected (once per process)."""
  import importlib.util
  import subprocess
  import sys
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("needs libtpu")
  code = "from elf_jax.run import aot; aot.topology_devices('v5p-8'); aot.topology_devices('v5p-8')"
  env = {k: v for k, v in os.environ.items() if k != "TPU_ACCELERATOR_TYPE"}
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**env, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.count("are expected on a CPU host and do not affect the compile") == 1
