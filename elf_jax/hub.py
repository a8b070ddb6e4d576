"""Hugging Face hub ids wherever a path is taken: an existing local or gs:// path first, else a hub id (`org/name` or
`t5-small` = a repository, `org/name/sub/path` = a file or folder in it) fetched into (or read from) the hub cache;
offline and not cached, one ConfigError line naming the field. Reading what was found is `elf_jax.weights.hf`'s job.
"""
import pathlib

from elf_jax import fs
from elf_jax.config import ConfigError

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
