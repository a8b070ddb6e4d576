"""The authors' PyTorch ELF checkpoint files (`torch.save` payloads) to and from our parameter trees.

Payload keys, the name / layout mapping and what exports hold: docs/checkpoints.md#pytorch-checkpoint-files.
torch is optional (`pip install 'elf_jax[torch]'`); safetensors exports need no torch.
"""
from collections.abc import Mapping
import re
from typing import Any

from etils import epath
import jax
import numpy as np

from elf_jax.model import elf

TORCH_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's (zip) file format
_COMPILED_PREFIX = "_orig_mod."  # torch.compile's prefix on state-dict names; the authors strip it too
_BLOCK = re.compile(r"blocks_(\d+)")


def _import_torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("reading or writing PyTorch ELF checkpoints needs torch: pip install 'elf_jax[torch]' (or "
                      "export the EMA weights as safetensors, which needs no torch)") from e
  return torch


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, prefix + (str(key),)))
    else:
      flat[prefix + (str(key),)] = value
  return flat


def to_torch_state(params: Mapping) -> dict[str, np.ndarray]:
  """{PyTorch name: array in PyTorch layout} of a parameter tree named as in docs/method.md#checkpoint-names (numpy or
  jax leaves), its blocks stacked (`blocks`, as the model holds them) or not (`blocks_{i}`)."""
  state = {}
  for path, value in _flatten(elf.unstack_blocks(params)).items():
    value = np.asarray(jax.device_get(value))
    if path[-1] == "kernel":
      path, value = path[:-1] + ("weight",), value.T
    name = ".".join(f"blocks.{m.group(1)}" if (m := _BLOCK.fullmatch(key)) else key for key in path)
    state[name] = np.ascontiguousarray(value)
  return state


def from_torch_state(state: Mapping[str, Any]) -> dict[str, Any]:
  """The nested parameter tree (docs/method.md#checkpoint-names, `blocks_{i}`, numpy arrays) of a PyTorch state dict."""
  tree = {}
  for name, value in state.items():
    if hasattr(value, "detach"):  # a torch tensor; float32 also turns bfloat16, which numpy lacks, into numbers
      value = value.detach().cpu().float().numpy()
    value = np.asarray(value)
    keys = re.sub(r"(^|\.)blocks\.(\d+)(?=\.|$)", r"\1blocks_\2", name.removeprefix(_COMPILED_PREFIX)).split(".")
    if keys[-1] == "weight" and value.ndim == 2:
      keys[-1], value = "kernel", value.T
    node = tree
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = value
  return tree


def load_payload(path) -> dict[str, Any]:
  """The payload of a `torch.save` file, read with `weights_only=True` (tensors and plain containers only)."""
  torch = _import_torch()
  with epath.Path(path).open("rb") as f:
    payload = torch.load(f, map_location="cpu", weights_only=True)
  if not isinstance(payload, Mapping):
    raise ValueError(f"{path} holds a {type(payload).__name__}, not the dict of an ELF PyTorch checkpoint (with "
                     "`params` and `ema_params1`)")
  return payload


def export_torch(path, params: Mapping, ema_params: Mapping, step: int = 0, epoch: int = 0) -> None:
  """Writes `params` and their EMA as the authors' PyTorch checkpoint payload (`torch.save`) at `path`.

  Args:
    path: the file to write (the authors name theirs `checkpoint_<step>`).
    params: raw parameter tree (docs/method.md#checkpoint-names), written as the `params` state dict.
    ema_params: EMA parameter tree, written as `ema_params1`.
    step, epoch: recorded as such. `opt_state` is left empty (see the module docstring).
  """
  torch = _import_torch()
  as_tensors = lambda tree: {k: torch.tensor(v) for k, v in to_torch_state(tree).items()}  # copies
  payload = {"params": as_tensors(params), "ema_params1": as_tensors(ema_params), "opt_state": {},
             "lr_scheduler": None, "step": int(step), "epoch": int(epoch), "dropout_rng": None,
             "grad_accum_buffers": {}}
  with epath.Path(path).open("wb") as f:
    torch.save(payload, f)


def export_safetensors(path, params: Mapping) -> None:
  """Writes a parameter tree (e.g. the EMA weights) as safetensors at `path`, with PyTorch names and layout."""
  from safetensors.numpy import save  # pylint: disable=import-outside-toplevel
  epath.Path(path).write_bytes(save(to_torch_state(params)))
