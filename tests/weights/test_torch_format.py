"""The authors' PyTorch checkpoint files: import of reference_elf_train's torch_checkpoint_0 (the network of its
checkpoint.msgpack), export in the same payload layout, safetensors export (and its read-back), and the error without
torch."""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
import torch

from elf_jax.config import ConfigError, base_config
from elf_jax.model.elf import ELF, ModelConfig, init_params
from elf_jax.objective.state import TrainState
from elf_jax.run import checkpoint
from elf_jax.weights import published, torch_format

from tests.conftest import fixture_config


@pytest.fixture(scope="module")
def torch_file(train_fixture_dir):
  """The fixture's network as an official PyTorch checkpoint file."""
  return train_fixture_dir / "torch_checkpoint_0"


@pytest.fixture(scope="module")
def msgpack_file(train_fixture_dir):
  """The same network as a published Flax msgpack checkpoint."""
  return train_fixture_dir / "checkpoint.msgpack"


@pytest.fixture(scope="module")
def model_and_shapes(train_fixture_dir):
  """The fixture's flow transformer (dims from config.json) and its parameter shapes."""
  cfg = fixture_config(train_fixture_dir)
  dims, tokens = cfg["dims"], cfg["tokens"]
  model = ELF(ModelConfig.from_config(
      base_config(), latent_dim=dims["C"], hidden_size=dims["H"], depth=dims["depth"], num_heads=dims["heads"],
      bottleneck_dim=dims["BN"], vocab_size=dims["V"],
      num_time_tokens=tokens["num_time_tokens"], num_guidance_tokens=tokens["num_guidance_tokens"],
      num_mode_tokens=tokens["num_mode_tokens"]))
  shapes = jax.eval_shape(lambda: nn.unbox(init_params(model, jax.random.key(0))))
  return model, shapes, cfg


def _assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _outputs(model, params, cfg):
  """x̂ (B, S, C) and decoder logits (B, S, V) on a seeded input with padding."""
  dims = cfg["dims"]
  rng = np.random.default_rng(cfg["seed"])
  batch, length = 3, dims["S"]
  x = rng.standard_normal((batch, length, 2 * dims["C"])).astype(np.float32)
  t, w = np.array([0.2, 0.5, 0.9], np.float32), np.array([1.0, 2.0, 3.0], np.float32)
  mask = np.arange(length)[None, :] < np.array([length, length - 3, 2])[:, None]
  apply = jax.jit(model.apply, static_argnames="decode")
  return (np.asarray(apply({"params": params}, x, t, w, mask)),
          np.asarray(apply({"params": params}, x, t, w, mask, decode=True)))


@pytest.mark.parametrize("which", ["raw", "ema"])  # payload params ↔ msgpack params, ema_params1 ↔ ema_params1
def test_import_matches_the_msgpack_network(model_and_shapes, which, torch_file, msgpack_file):
  model, shapes, cfg = model_and_shapes
  from_torch = published.load_published_elf(torch_file, which, expected=shapes)
  from_msgpack = published.load_published_elf(msgpack_file, which, expected=shapes)
  _assert_same_tree(from_torch, from_msgpack)
  (x_torch, logits_torch), (x_msgpack, logits_msgpack) = (_outputs(model, p, cfg) for p in (from_torch, from_msgpack))
  assert np.abs(x_msgpack).max() > 1e-3 and np.abs(logits_msgpack).max() > 1e-3  # the outputs are not trivial
  np.testing.assert_array_equal(x_torch, x_msgpack)
  np.testing.assert_array_equal(logits_torch, logits_msgpack)


def test_init_from_accepts_a_torch_file(model_and_shapes, torch_file, msgpack_file):
  _, shapes, _ = model_and_shapes
  _assert_same_tree(published.load_params_from(str(torch_file), shapes),
                    published.load_published_elf(msgpack_file, "ema", expected=shapes))


def test_export_has_the_authors_layout_and_reimports_exactly(model_and_shapes, tmp_path, torch_file, msgpack_file):
  _, shapes, _ = model_and_shapes
  raw = published.load_published_elf(msgpack_file, "raw", expected=shapes)
  ema = jax.tree.map(lambda v: v * np.float32(0.5), raw)  # a distinct EMA tree, so a swap would show
  out = tmp_path / "checkpoint_3"
  torch_format.export_torch(out, raw, ema, step=3, epoch=1)

  for which, tree in (("raw", raw), ("ema", ema)):
    _assert_same_tree(published.load_published_elf(out, which, expected=shapes), tree)
  ours = torch.load(out, map_location="cpu", weights_only=True)
  reference = torch.load(torch_file, map_location="cpu", weights_only=True)
  assert set(ours) == set(reference)
  assert (ours["step"], ours["epoch"], ours["opt_state"]) == (3, 1, {})
  for name, tensor in reference["params"].items():  # the fixture's payload holds the msgpack's raw params
    assert torch.equal(ours["params"][name], tensor), name
    assert torch.equal(ours["ema_params1"][name], tensor * 0.5), name
  assert set(ours["params"]) == set(reference["params"]) == set(ours["ema_params1"])


def test_cli_export_of_a_workdir_with_safetensors(model_and_shapes, tmp_path, torch_file, msgpack_file):
  """A training workdir's newest step: its params become `params`, its EMA `ema_params1` and the safetensors."""
  _, shapes, _ = model_and_shapes
  raw = published.load_published_elf(msgpack_file, "raw", expected=shapes)
  ema = jax.tree.map(lambda v: v * np.float32(0.5), raw)
  state = TrainState(step=jnp.int32(5), params=raw, ema_params=ema, opt_state=optax.adamw(1e-3).init(raw),
                     rng=jax.random.key_data(jax.random.key(0)))
  manager = checkpoint.CheckpointManager(checkpoint.checkpoint_dir(str(tmp_path / "run")), async_save=False)
  manager.save(5, state)
  manager.close()

  out, ema_file = tmp_path / "checkpoint_5", tmp_path / "ema.safetensors"
  subprocess.run([sys.executable, "-m", "elf_jax.run.export", f"--source={tmp_path / 'run'}", f"--out={out}",
                  f"--safetensors={ema_file}"], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  reference = torch.load(torch_file, map_location="cpu", weights_only=True)["params"]  # the msgpack's raw params
  ours = torch.load(out, map_location="cpu", weights_only=True)
  tensors = safetensors.numpy.load_file(ema_file)
  assert set(ours["params"]) == set(ours["ema_params1"]) == set(tensors) == set(reference)
  for name, tensor in reference.items():
    assert torch.equal(ours["params"][name], tensor), name
    assert torch.equal(ours["ema_params1"][name], tensor * 0.5), name
    np.testing.assert_array_equal(tensors[name], tensor.numpy() * 0.5)


def test_a_safetensors_export_is_a_checkpoint_of_its_own(model_and_shapes, tmp_path, msgpack_file):
  """The EMA weights alone (`export --safetensors` without --out: no torch) read back by file or by the folder
  holding them (beside a run's config, as examples/tiny_cond ships them); they hold no raw parameters."""
  _, shapes, _ = model_and_shapes
  folder = tmp_path / "exported"
  folder.mkdir()
  file = folder / "ema.safetensors"
  published.export_torch_checkpoint(str(msgpack_file), None, str(file))
  (folder / "config_train.json").write_text("{}")
  ema = published.load_published_elf(msgpack_file, "ema", expected=shapes)
  for source in (file, folder):
    assert published.detect_format(str(source)).kind == "safetensors"
    _assert_same_tree(published.load_params_from(str(source), shapes), ema)
  with pytest.raises(ConfigError, match=r"holds only EMA weights") as err:
    published.load_published_elf(file, "raw")
  assert "\n" not in str(err.value)
  other = tmp_path / "other.safetensors"
  safetensors.numpy.save_file({"encoder.weight": np.zeros((2, 2), np.float32)}, other)
  with pytest.raises(ConfigError, match=r"no ELF network \(none is named t_emb_tokens\)"):
    published.load_published_elf(other)
  # The header length's first byte may look like a msgpack map header (0x80-0x8f): still safetensors.
  data = next(d for n in range(1, 300) if (d := safetensors.numpy.save({"x" * n: np.zeros(1, np.float32)}))[0] in
              range(0x80, 0x90))
  other.write_bytes(data)
  assert published.detect_format(str(other)).kind == "safetensors"
  with pytest.raises(ValueError, match="nothing to write"):
    published.export_torch_checkpoint(str(msgpack_file), None, None)


def test_compiled_model_names_are_accepted(torch_file):
  """torch.compile prefixes state-dict names with `_orig_mod.`; the authors strip it when loading, so do we."""
  reference = torch.load(torch_file, map_location="cpu", weights_only=True)["params"]
  plain = torch_format.from_torch_state(reference)
  _assert_same_tree(torch_format.from_torch_state({f"_orig_mod.{k}": v for k, v in reference.items()}), plain)


def test_missing_torch_is_a_clear_error(monkeypatch, tmp_path, torch_file):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails as if it were not installed
  with pytest.raises(ImportError, match=r"needs torch: pip install 'elf_jax\[torch\]'"):
    published.load_published_elf(torch_file)
  with pytest.raises(ImportError, match=r"needs torch"):
    torch_format.export_torch(tmp_path / "out", {"w": np.zeros(2)}, {"w": np.zeros(2)})
  torch_format.export_safetensors(tmp_path / "ema.safetensors", {"blocks_0": {"w": {"kernel": np.eye(2)}}})
  assert list(safetensors.numpy.load_file(tmp_path / "ema.safetensors")) == ["blocks.0.w.weight"]
  stacked = {"blocks": {"w": {"kernel": np.arange(8.0).reshape(2, 2, 2)}}}  # the model's layout: unstacked on export
  torch_format.export_safetensors(tmp_path / "ema.safetensors", stacked)
  tensors = safetensors.numpy.load_file(tmp_path / "ema.safetensors")
  assert sorted(tensors) == ["blocks.0.w.weight", "blocks.1.w.weight"]
  np.testing.assert_array_equal(tensors["blocks.1.w.weight"], stacked["blocks"]["w"]["kernel"][1].T)
