"""Tests for elf_jax/parallel/mesh.py on the 8 host CPU devices of conftest.py."""
import logging

import jax
import numpy as np
import pytest

from elf_jax import config as config_lib
from elf_jax.parallel import mesh as mesh_lib

from tests.conftest import CONFIGS, config_from_command_line


def _cfg(data, fsdp, tensor):
  return dict(data=data, fsdp=fsdp, tensor=tensor)


@pytest.mark.parametrize("sizes, shape", [
    ((8, 1, 1), (8, 1, 1)),
    ((2, 4, 1), (2, 4, 1)),
    ((2, 2, 2), (2, 2, 2)),
    ((-1, 1, 1), (8, 1, 1)),
    ((-1, 2, 1), (4, 2, 1)),
    ((2, -1, 2), (2, 2, 2)),
    ((1, 2, -1), (1, 2, 4)),
])
def test_mesh_shapes(sizes, shape):
  mesh = mesh_lib.make_mesh(_cfg(*sizes))
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert tuple(mesh.shape.values()) == shape
  assert mesh.devices.shape == shape
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_default_config_fills_data_axis():
  mesh = mesh_lib.make_mesh(config_lib.base_config().mesh)
  assert dict(mesh.shape) == dict(data=8, fsdp=1, tensor=1)


def test_tensor_axis_is_innermost():
  mesh = mesh_lib.make_mesh(_cfg(2, 2, 2))
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  # Consecutive device ids (same host, nearest neighbours) along `tensor`, then `fsdp`, then `data`.
  np.testing.assert_array_equal(ids, np.arange(8).reshape(2, 2, 2))


def test_explicit_device_subset():
  devices = jax.devices()[4:]
  mesh = mesh_lib.make_mesh(_cfg(-1, 1, 2), devices=devices)
  assert dict(mesh.shape) == dict(data=2, fsdp=1, tensor=2)
  assert {d.id for d in mesh.devices.flat} == {d.id for d in devices}


def test_mesh_has_auto_axes_and_shards_a_batch():
  mesh = mesh_lib.make_mesh(_cfg(2, 2, 2))
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  spec = jax.sharding.PartitionSpec(mesh_lib.batch_axes(mesh), None)
  x = jax.device_put(np.arange(16.0).reshape(8, 2), jax.sharding.NamedSharding(mesh, spec))
  # Batch of 8 over data x fsdp = 4 shards: each device holds 2 rows; tensor-axis neighbours hold the same rows.
  assert {s.data.shape for s in x.addressable_shards} == {(2, 2)}
  rows = {s.device.id: s.index[0] for s in x.addressable_shards}
  assert rows[0] == rows[1] and rows[0] != rows[2]
  np.testing.assert_allclose(jax.jit(lambda a: (a * 2.0).sum())(x), 240.0)


@pytest.mark.parametrize("sizes, shards", [((8, 1, 1), 8), ((2, 4, 1), 8), ((2, 2, 2), 4), ((1, 1, 8), 1)])
def test_batch_axes_and_shards(sizes, shards):
  mesh = mesh_lib.make_mesh(_cfg(*sizes))
  assert mesh_lib.batch_axes(mesh) == ("data", "fsdp")
  assert mesh_lib.num_batch_shards(mesh) == shards


def test_describe_mesh():
  line = mesh_lib.describe_mesh(mesh_lib.make_mesh(_cfg(2, 2, 2)))
  assert line == "mesh data=2 fsdp=2 tensor=2: 8 cpu devices, 1 process, batch split 4 ways over data+fsdp"
  assert "\n" not in line


@pytest.mark.parametrize("sizes, message", [
    ((4, 1, 1), r"mesh data=4 fsdp=1 tensor=1 needs 4 devices, but 8 are available.*product is 8"),
    ((2, 2, 4), r"needs 16 devices, but 8 are available"),
    ((-1, -1, 1), r"at most one axis may be -1, got 2 \(data, fsdp\)"),
    ((-1, 3, 1), r"multiply to 3, which does not divide the 8 available devices"),
    ((0, 1, 1), r"data must be a positive integer or -1"),
    ((-2, 1, 1), r"data must be a positive integer or -1"),
])
def test_bad_mesh_errors(sizes, message):
  with pytest.raises(ValueError, match=message):
    mesh_lib.make_mesh(_cfg(*sizes))


def _with_preset(name: str):
  config = config_lib.base_config()
  config.mesh.preset = name
  config.lock()
  return config


def test_cpu_preset_resolves_without_touching_the_config():
  config = _with_preset("cpu-8")
  before = config.to_dict()
  assert dict(mesh_lib.make_mesh(config.mesh).shape) == dict(data=2, fsdp=2, tensor=2)
  assert config.to_dict() == before  # the preset replaced the sizes for the mesh only


@pytest.mark.parametrize("name, shape", [("data-parallel", (8, 1, 1)), ("gpu-fsdp", (1, 8, 1))])
def test_fill_presets_resolve_on_8_devices(name, shape):
  config = _with_preset(name)
  assert tuple(mesh_lib.make_mesh(config.mesh).shape.values()) == shape


@pytest.mark.parametrize("name, needed", [("v5p-64", 32), ("v5p-64-fsdp", 32)])
def test_tpu_presets_fail_clearly_on_8_devices(name, needed):
  config = _with_preset(name)
  with pytest.raises(ValueError, match=f"needs {needed} devices, but 8 are available"):
    mesh_lib.make_mesh(config.mesh)


def test_every_preset_names_all_axes():
  for name, preset in config_lib.MESH_PRESETS.items():
    assert set(preset) == set(config_lib.MESH_AXES), name


def test_unknown_preset():
  with pytest.raises(config_lib.ConfigError, match=r"mesh.preset='v9' is unknown; choose one of data-parallel, v5p-64"):
    mesh_lib.make_mesh(_with_preset("v9").mesh)
  with pytest.raises(config_lib.ConfigError, match=r"mesh.preset='v9' is unknown"):
    config_lib.validate(_with_preset("v9"))


def test_explicit_axes_beat_the_preset():
  """An axis set on the command line or in Python wins over mesh.preset, which fills the axes left unset; the printed
  (resolved) config shows the sizes used."""
  on_command_line = config_from_command_line(CONFIGS / "owt_b.py", "--config.mesh.preset=gpu-fsdp",
                                             "--config.mesh.fsdp=4")
  in_python = config_lib.base_config()
  in_python.mesh.preset = "gpu-fsdp"
  in_python.mesh.fsdp = 4
  for config in (on_command_line, in_python):
    assert config_lib.mesh_settings(config.mesh) == dict(data=-1, fsdp=4, tensor=1)
    assert dict(mesh_lib.make_mesh(config.mesh).shape) == dict(data=2, fsdp=4, tensor=1)
    resolved = config_lib.resolve(config).mesh
    assert (resolved.preset, resolved.data, resolved.fsdp, resolved.tensor) == ("gpu-fsdp", -1, 4, 1)
    assert config.mesh.data is None  # resolving leaves the config as it was
  # Every axis set: the preset has nothing left to fill.
  assert dict(mesh_lib.make_mesh(config_from_command_line(
      CONFIGS / "owt_b.py", "--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=4").mesh).shape) == (
          dict(data=1, fsdp=2, tensor=4))


def test_a_mesh_that_does_not_fit_names_the_preset():
  config = _with_preset("v5p-64")
  config.mesh.fsdp = 2
  with pytest.raises(config_lib.ConfigError, match=r"mesh data=32 fsdp=2 tensor=1 \(data, tensor from "
                     r"mesh.preset='v5p-64'\) needs 64 devices, but 8 are available"):
    mesh_lib.make_mesh(config.mesh)


@pytest.fixture
def fake_initialize(monkeypatch):
  """Records the keyword arguments of jax.distributed.initialize instead of starting a runtime."""
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
  for name in ("ELF_DISTRIBUTED", "ELF_COORDINATOR_ADDRESS", "ELF_NUM_PROCESSES", "ELF_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  return calls


def test_initialize_distributed_off_by_default(fake_initialize, caplog):
  with caplog.at_level(logging.INFO):
    assert mesh_lib.initialize_distributed() is False
  assert fake_initialize == []
  assert "not initialised" in caplog.text


def test_initialize_distributed_flag_false_overrides_env(fake_initialize, monkeypatch):
  monkeypatch.setenv("ELF_DISTRIBUTED", "1")
  assert mesh_lib.initialize_distributed(False) is False
  assert fake_initialize == []


def test_initialize_distributed_from_env(fake_initialize, monkeypatch, caplog):
  monkeypatch.setenv("ELF_DISTRIBUTED", "1")
  monkeypatch.setenv("ELF_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("ELF_NUM_PROCESSES", "4")
  monkeypatch.setenv("ELF_PROCESS_ID", "3")
  with caplog.at_level(logging.INFO):
    assert mesh_lib.initialize_distributed() is True
  assert fake_initialize == [dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)]
  assert "jax.distributed.initialize(coordinator_address='10.0.0.1:1234'" in caplog.text


def test_initialize_distributed_auto_detect(fake_initialize, caplog):
  with caplog.at_level(logging.INFO):
    assert mesh_lib.initialize_distributed(True) is True
  assert fake_initialize == [{}]
  assert "auto-detected" in caplog.text


@pytest.mark.parametrize("name, value, message", [
    ("ELF_DISTRIBUTED", "yes", "ELF_DISTRIBUTED='yes' must be 1"),
    ("ELF_NUM_PROCESSES", "four", "ELF_NUM_PROCESSES='four' must be an integer"),
])
def test_initialize_distributed_bad_env(fake_initialize, monkeypatch, name, value, message):
  if name != "ELF_DISTRIBUTED":
    monkeypatch.setenv("ELF_DISTRIBUTED", "1")
  monkeypatch.setenv(name, value)
  with pytest.raises(ValueError, match=message):
    mesh_lib.initialize_distributed()
  assert fake_initialize == []


def test_initialize_distributed_errors_propagate(monkeypatch):
  def fail(**kwargs):
    raise RuntimeError("coordinator unreachable")
  monkeypatch.setattr(jax.distributed, "initialize", fail)
  with pytest.raises(RuntimeError, match="coordinator unreachable"):
    mesh_lib.initialize_distributed(True)
