"""Hugging Face checkpoint directories read as numpy: config.json and the weights (model.safetensors, its sharded
index, pytorch_model.bin or its sharded index, looked for in that order), as a flat {Hugging Face name: float32 numpy
array} dict whatever dtype the file stores. Locating or downloading the directory is `elf_jax.hub`'s job.
"""
from collections.abc import Callable
import json
import pathlib
from typing import Any

import numpy as np

# (single file, index of its shards) per weight format, in the order they are looked for.
_LAYOUTS = (("model.safetensors", "model.safetensors.index.json"),
            ("pytorch_model.bin", "pytorch_model.bin.index.json"))


def read_config(directory: pathlib.Path | str) -> dict[str, Any]:
  """The parsed config.json of a checkpoint directory; FileNotFoundError naming the file when it is missing."""
  config_file = pathlib.Path(directory) / "config.json"
  if not config_file.exists():
    raise FileNotFoundError(f"{config_file} is missing: pass a Hugging Face checkpoint directory (one written by "
                            "save_pretrained) holding config.json and the weights")
  return json.loads(config_file.read_text())


def _weight_files(directory: pathlib.Path, what: str) -> list[pathlib.Path]:
  """The weight files of the first layout of `_LAYOUTS` that the directory has (all shards of a sharded one)."""
  for single, index in _LAYOUTS:
    if (directory / single).exists():
      return [directory / single]
    if (directory / index).exists():
      shards = sorted(set(json.loads((directory / index).read_text())["weight_map"].values()))
      return [directory / s for s in shards]
  expected = ", ".join(name for layout in _LAYOUTS for name in layout)
  raise FileNotFoundError(f"no {what + ' ' if what else ''}weights in {directory}: expected one of {expected}")


def _read_safetensors(file: pathlib.Path, keep: Callable[[str], bool]) -> dict[str, np.ndarray]:
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  with safe_open(str(file), framework="flax") as f:  # flax, not numpy: numpy has no bfloat16
    return {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys() if keep(k)}


def _read_torch(file: pathlib.Path, keep: Callable[[str], bool]) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"{file} is a PyTorch checkpoint and reading it needs torch (`pip install torch`), or convert "
                      "it to model.safetensors with save_pretrained(..., safe_serialization=True) on a machine "
                      "that has torch") from e
  state = torch.load(file, map_location="cpu", weights_only=True)
  return {k: v.float().numpy() for k, v in state.items() if keep(k)}


def read_state_dict(directory: pathlib.Path | str, keep: Callable[[str], bool] = lambda k: True,
                    what: str = "") -> dict[str, np.ndarray]:
  """Every weight of a checkpoint directory whose Hugging Face name passes `keep`, as float32 numpy arrays.

  Args:
    directory: holds model.safetensors, pytorch_model.bin, or the index json of either with its shards.
    keep: which names to read (the others are skipped, not loaded into float32).
    what: the kind of checkpoint ("GPT-2"), named in the error when there are no weights.

  Raises:
    FileNotFoundError: no weight file of a known layout in `directory`.
    ImportError: the weights are PyTorch .bin files and torch is not installed.
  """
  tensors = {}
  for file in _weight_files(pathlib.Path(directory), what):
    reader = _read_safetensors if file.name.endswith(".safetensors") else _read_torch
    tensors.update(reader(file, keep))
  return tensors
