"""Reading Hugging Face checkpoint directories: locate (or download) one, read its config.json and its weights.

A checkpoint directory holds config.json and the weights in one of these layouts (searched in this order):
model.safetensors, model.safetensors.index.json + shards, pytorch_model.bin, pytorch_model.bin.index.json + shards.
Weights come back as a flat {Hugging Face name: float32 numpy array} dict, whatever dtype the file stores.
"""
from collections.abc import Callable
import json
import pathlib
from typing import Any

import numpy as np

from elf_jax import fs
from elf_jax.config import ConfigError

# (single file, index of its shards) per weight format, in the order they are looked for.
_LAYOUTS = (("model.safetensors", "model.safetensors.index.json"),
            ("pytorch_model.bin", "pytorch_model.bin.index.json"))
_SAFETENSORS_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
_TORCH_PATTERNS = ["pytorch_model*"]


def hub_id(name: str) -> tuple[str, str] | None:
  """(repository id, path inside it) of a Hugging Face hub id, or None for a path.

  `org/name` or a bare id such as `t5-small` is a repository (path ""); `org/name/sub/path` a file or folder in it.
  Anything that starts with /, ., ~ or has a URL scheme (gs://) is a path, not an id.
  """
  if not name or name.startswith(("/", ".", "~")) or "://" in name:
    return None
  parts = name.split("/")
  return "/".join(parts[:2]), "/".join(parts[2:])


def _download(repo_id: str, sub_path: str, allow_patterns: list[str] | None) -> pathlib.Path:
  """The local copy (the hub cache) of a repository, or of the file or folder `sub_path` in it."""
  import huggingface_hub  # pylint: disable=import-outside-toplevel
  import huggingface_hub.errors  # pylint: disable=import-outside-toplevel
  if not sub_path:
    return pathlib.Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=allow_patterns))
  try:
    return pathlib.Path(huggingface_hub.hf_hub_download(repo_id, sub_path))
  except huggingface_hub.errors.EntryNotFoundError:  # offline and not cached is a subclass: a folder is tried too
    folder = pathlib.Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=[f"{sub_path}/**"])) / sub_path
    if not folder.exists():
      raise FileNotFoundError(f"{repo_id} has no file or folder {sub_path!r}") from None
    return folder


def _fetch_error(field: str, name: str, what: str, error: Exception) -> ConfigError:
  """field: a config field ("init_from") or an API argument ("elf_jax.load(id_or_path)")."""
  detail = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
  use = f"pass DIR as {field}" if "(" in field else f"set --config.{field}=DIR"
  return ConfigError(
      f"{field}={name!r}: no such local or gs:// path, and fetching it as a Hugging Face hub id failed "
      f"({type(error).__name__}{': ' + detail if detail else ''}). Offline? Download the {what} on a machine with "
      f"internet (`hf download {(hub_id(name) or (name,))[0]} --local-dir DIR`) and {use}.")


def resolve(name_or_path: str, field: str, what: str, allow_patterns: list[str] | None = None):
  """A local or gs:// path (an `epath.Path`) for `name_or_path`: the path itself if it exists, else the hub id
  fetched (or found in the hub cache when offline, HF_HUB_OFFLINE=1), see `hub_id`.

  Args:
    field: the config field (or API argument) that named it, named in errors.
    what: the kind of thing ("ELF checkpoint", "encoder pickle"), named in errors.
    allow_patterns: for a repository id, the files to fetch (None = all).

  Raises:
    ConfigError: a path that does not exist, or an id that cannot be fetched (one line naming field and value).
  """
  path = fs.path(name_or_path)
  if path.exists():
    return path
  hub = hub_id(name_or_path)
  if hub is None:
    raise ConfigError(f"{field}={name_or_path!r}: no such file or folder (a path, so no Hugging Face hub id was "
                      f"tried); pass an existing {what} or a hub id such as org/name")
  try:
    return _download(*hub, allow_patterns)
  except Exception as e:  # offline, unknown id, gated, no huggingface_hub: all need the same fix
    raise _fetch_error(field, name_or_path, what, e) from e


def resolve_dir(name_or_path: str, what: str, allow_patterns: list[str], field: str) -> pathlib.Path:
  """A local Hugging Face checkpoint directory: `name_or_path` itself, or a hub id downloaded (and cached).

  Args:
    name_or_path: a local directory, or a Hugging Face hub id such as "gpt2-large" (`org/name/sub` = a folder in
      a repository, see `hub_id`).
    what: the kind of checkpoint ("T5", "GPT-2"), named in error messages.
    field: the config field that named it (e.g. "eval.gpt2"), named in the offline error.
    allow_patterns: the non-weight files to download from the hub (e.g. ["config.json"], tokenizer files).
      The weights are added: safetensors files if the repository has them, else pytorch_model*.

  Raises:
    FileNotFoundError: `name_or_path` is a path but not a directory.
    ConfigError: the hub id cannot be fetched (offline, unknown id, gated); one line naming `field` and the fix.
  """
  path = pathlib.Path(name_or_path).expanduser()
  if path.is_dir():
    return path
  hub = hub_id(name_or_path)
  if path.exists() or hub is None:
    raise FileNotFoundError(f"{what} checkpoint directory {name_or_path!r} does not exist (or is not a directory); "
                            "pass the Hugging Face checkpoint directory holding config.json and model.safetensors "
                            "(or pytorch_model.bin)")
  repo_id, sub_path = hub
  patterns = lambda weights: [f"{sub_path}/{p}" if sub_path else p for p in list(allow_patterns) + weights]
  try:
    path = _download(repo_id, "", patterns(_SAFETENSORS_PATTERNS)) / sub_path
    if not any(path.glob("*.safetensors")):
      path = _download(repo_id, "", patterns(_TORCH_PATTERNS)) / sub_path
  except Exception as e:  # offline, unknown id, gated, no huggingface_hub: all need the same fix
    raise _fetch_error(field, name_or_path, f"{what} checkpoint", e) from e
  return path


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
