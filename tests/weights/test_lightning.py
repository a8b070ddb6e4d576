"""PyTorch Lightning checkpoints (the seed's `last.ckpt` kind), written here by the real PyTorch Lightning
(`Trainer.save_checkpoint` of a LightningModule holding an ELF-shaped torch module and an EMA copy), read by content
(elf_jax/weights/lightning.py) with weights_only=True."""
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from elf_jax.config import ConfigError
from elf_jax.model.elf import init_params
from elf_jax.weights import published, torch_format

from tests.conftest import tiny_fixture_model

pl = pytest.importorskip("pytorch_lightning")


class Named(torch.nn.Module):
  """A torch module whose state dict is `state` (dotted names → arrays), as an ELF port's would be."""

  def __init__(self, state):
    super().__init__()
    children = {}
    for name, value in state.items():
      head, _, rest = name.partition(".")
      if rest:
        children.setdefault(head, {})[rest] = value
      else:
        self.register_parameter(head, torch.nn.Parameter(torch.tensor(np.asarray(value))))
    for head, sub in children.items():
      self.add_module(head, Named(sub))


class ElfModule(pl.LightningModule):
  """The network under `model` and its EMA under `ema_model` (torch's AveragedModel: `ema_model.module.*`)."""

  def __init__(self, raw_state, ema_state=None, **hparams):
    super().__init__()
    self.save_hyperparameters(hparams)
    self.model = Named(raw_state)
    if ema_state is not None:
      self.ema_model = torch.optim.swa_utils.AveragedModel(Named(ema_state))

  def configure_optimizers(self):
    return torch.optim.AdamW(self.parameters(), lr=1e-3)


def save_with_lightning(module: pl.LightningModule, path: pathlib.Path) -> pathlib.Path:
  trainer = pl.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", enable_progress_bar=False,
                       enable_model_summary=False)
  trainer.strategy.connect(module)
  trainer.save_checkpoint(path)
  return path


@pytest.fixture(scope="module")
def tiny(tiny_fixture_dir):
  model = tiny_fixture_model(tiny_fixture_dir)
  shapes = jax.eval_shape(lambda: nn.unbox(init_params(model, jax.random.key(0))))
  raw = published.load_published_elf(tiny_fixture_dir / "checkpoint_7", "raw")
  ema = published.load_published_elf(tiny_fixture_dir / "checkpoint_7", "ema")
  return model, shapes, raw, ema, np.load(tiny_fixture_dir / "reference.npz")


def test_lightning_checkpoint_ema_and_raw(tiny, tmp_path, capsys):
  """The EMA copy is read by default (the reference's outputs to 1e-5) and said so; "raw" reads the other copy."""
  model, shapes, raw, ema, ref = tiny
  folder = tmp_path / "elf-torch"
  folder.mkdir()
  save_with_lightning(ElfModule(torch_format.to_torch_state(raw), torch_format.to_torch_state(ema), lr=1e-3,
                                name="elf"), folder / "last.ckpt")
  params = published.load_params_from(str(folder), shapes)  # the folder: its last.ckpt
  assert "using the EMA copy under 'state_dict.ema_model.module.'" in capsys.readouterr().out
  x, t, w, mask = ref["x"], ref["t"], ref["w"], ref["mask"]
  np.testing.assert_allclose(model.apply({"params": params}, x, t, w, mask), ref["out_den"], atol=1e-5, rtol=0)
  logits = model.apply({"params": params}, x, jnp.ones_like(t), w, mask, decode=True)
  np.testing.assert_allclose(logits, ref["logits"], atol=1e-5, rtol=0)
  got_raw = published.load_params_from(str(folder / "last.ckpt"), shapes, which="raw")
  for a, b in zip(jax.tree.leaves(got_raw), jax.tree.leaves(raw)):
    np.testing.assert_array_equal(a, b)


def test_without_an_ema_copy_the_network_is_used_and_said(tiny, tmp_path, capsys):
  _, shapes, raw, _, _ = tiny
  path = save_with_lightning(ElfModule(torch_format.to_torch_state(raw)), tmp_path / "last.ckpt")
  params = published.load_params_from(str(path), shapes)
  assert "a copy that is not named EMA (no EMA copy was found) under 'state_dict.model.'" in capsys.readouterr().out
  np.testing.assert_array_equal(params["t_emb_tokens"], raw["t_emb_tokens"])


def test_a_payload_with_objects_is_refused_in_one_line(tiny, tmp_path):
  """Hyper-parameters holding a Python object (here a path) make weights_only refuse the file: nothing is run."""
  _, _, raw, ema, _ = tiny
  path = save_with_lightning(ElfModule(torch_format.to_torch_state(raw), torch_format.to_torch_state(ema),
                                       data_dir=pathlib.PurePosixPath("/data")), tmp_path / "last.ckpt")
  with pytest.raises(ConfigError) as err:
    published.load_params_from(str(path))
  message = str(err.value)
  assert "\n" not in message and "weights_only=True" in message and "nothing in it was run" in message, message


def test_no_elf_network_says_what_was_found(tmp_path):
  path = save_with_lightning(ElfModule({"encoder.weight": np.ones((3, 2), np.float32),
                                        "encoder.bias": np.zeros(3, np.float32)}), tmp_path / "last.ckpt")
  with pytest.raises(ConfigError) as err:
    published.load_params_from(str(path))
  message = str(err.value)
  assert "\n" not in message and "no ELF network among its 2 tensors" in message, message
  assert message.startswith(f"init_from={str(path)!r}: ")
  assert "tensors by prefix: state_dict.model.encoder (2)" in message
