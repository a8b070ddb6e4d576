"""Ahead-of-time compilation of the real train step: the same path as --mode=compile, on the 8 CPU devices (no
libtpu needed), and clear errors for unknown slices."""
import os
import sys

import jax
import pytest

from elf_jax.config import ConfigError
from elf_jax.parallel import aot

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "configs"))
import tiny  # noqa: E402


def _tiny_config():
  c = tiny.get_config()
  c.model.update(hidden_size=48, depth=1, num_heads=2)  # SwiGLU hidden 128: tensor=2 divides it
  c.optim.global_batch_size = 16
  c.mesh.update(data=2, fsdp=2, tensor=2)
  return c


def test_compile_on_cpu_mesh_reports_memory_and_flops():
  report = aot.compile_train_step(_tiny_config(), jax.devices()[:8], topology="cpu-8")
  assert report.mesh_shape == {"data": 2, "fsdp": 2, "tensor": 2}
  assert report.batch_shape == (16, 16)
  assert report.num_params > 0 and report.flops > 0
  assert report.argument_bytes > 0 and report.output_bytes > 0 and report.temp_bytes > 0
  # The state is donated: every output buffer but the (small, replicated) metrics aliases an argument.
  assert 0 < report.alias_bytes <= report.output_bytes
  assert report.total_bytes == (report.argument_bytes + report.output_bytes - report.alias_bytes +
                                report.temp_bytes + report.code_bytes)
  assert "per-chip memory" in report.describe()


def test_unknown_topology_is_a_clear_error():
  with pytest.raises(ValueError, match=r"unknown compile topology 'v5p-63'.*v5p-64"):
    aot.topology_devices("v5p-63")
  c = _tiny_config()
  c.mesh.compile_topology = ""
  with pytest.raises(ConfigError, match="compile_topology"):
    aot.main(c)


def test_topology_names():
  assert aot.TOPOLOGIES["v5p-64"] == "v5p:2x4x4"  # 32 chips
  assert aot.TOPOLOGIES["v5p-8"] == "v5p:2x2x1"  # 4 chips
  assert aot.TOPOLOGIES["v5p-128"] == "v5p:4x4x4"  # 64 chips
