"""Published ELF checkpoints and our own workdirs, read as parameter trees; export in the authors' PyTorch layout.

Published ELF checkpoints (docs/method.md, checkpoint names) are a Flax msgpack file or an orbax PyTree directory,
each holding the raw parameters under `params` and their EMA under `ema_params1`, with the published parameter names
(blocks `blocks_{i}`, read into the model's stacked `blocks` layout). The authors' PyTorch checkpoint files
(`torch.save` payloads, renamed and transposed by `elf_jax.weights.torch_format`) load the same way.
"""
from collections.abc import Mapping
from typing import Any

from etils import epath
import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

from elf_jax import fs
from elf_jax.model import elf
from elf_jax.weights import torch_format

# The layout of a training workdir (written by elf_jax.run.checkpoint.CheckpointManager).
CHECKPOINT_SUBDIR = "checkpoints"
COMMIT_MARKER = "commit_success.txt"
STATE_ITEM = "state"
DATA_ITEM = "data"
_SINGLE_ITEM = "default"  # item name orbax uses for a single-item CheckpointManager
_PARAM_KEYS = {"ema": ("ema_params1", "ema_params"), "raw": ("params",)}  # published names, then ours


def load_published_elf(path: str, which: str = "ema", expected: Any = None) -> dict[str, Any]:
  """Reads the parameter tree of an ELF checkpoint (docs/method.md#checkpoint-names) as numpy arrays.

  Args:
    path: a Flax msgpack file or an orbax PyTree directory holding `params` and `ema_params1` (our own `state`
      items, holding `params` and `ema_params`, work too), or the authors' PyTorch checkpoint file (a `torch.save`
      payload, recognised by its content; needs torch).
    which: "ema" (the EMA copy, used for sampling) or "raw" (the trained parameters).
    expected: optional tree of `jax.ShapeDtypeStruct`s or arrays, e.g. `jax.eval_shape` of the model's init.
      Every leaf path and shape must match (per block, in the published names); the leaves are then cast to its
      dtypes.

  Returns:
    Nested dict of numpy arrays named as in docs/method.md#checkpoint-names (a wrapping `{"params": ...}` level is
    removed), with the blocks stacked as the model holds them (`blocks/...`, see `elf_jax.model.elf.stack_blocks`).

  Raises:
    ValueError: `expected` was given and leaves are missing, extra or mis-shaped (all are named, '/'-joined).
    ImportError: `path` is a PyTorch checkpoint and torch is not installed.
  """
  if which not in _PARAM_KEYS:
    raise ValueError(f"which={which!r}; use 'ema' or 'raw'.")
  path = fs.path(path)
  if path.is_file():
    read = _read_torch if torch_format.is_torch_checkpoint(path) else _read_msgpack
    tree = read(path, _PARAM_KEYS[which])
  elif path.is_dir():
    tree = _read_orbax(path, _PARAM_KEYS[which])
  else:
    raise FileNotFoundError(f"No checkpoint at {path}.")
  while isinstance(tree, Mapping) and set(tree) == {"params"}:
    tree = tree["params"]
  if expected is not None:  # compared by published names, so that a problem names its block
    tree = _match_expected(elf.unstack_blocks(tree), jax.eval_shape(elf.unstack_blocks, expected), path)
  return elf.stack_blocks(tree)


def load_params_from(path: str, expected: Any = None, which: str = "ema") -> dict[str, Any]:
  """EMA parameters for `--config.init_from`: a published checkpoint, or the latest step of one of our runs.

  Args:
    path: a msgpack file, a PyTorch checkpoint file, an orbax PyTree directory, a training workdir, a
      `CheckpointManager` directory or one of its step directories (then the newest step with a commit marker).
    expected: as in `load_published_elf`.
    which: as in `load_published_elf`; "raw" reads the trained parameters instead of their EMA.
  """
  path = fs.path(path)
  if path.is_dir():
    if (path / CHECKPOINT_SUBDIR).is_dir():
      path = path / CHECKPOINT_SUBDIR
    complete = [int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / COMMIT_MARKER).exists()]
    if complete:
      path = path / str(max(complete))
    for item in (STATE_ITEM, _SINGLE_ITEM):
      if (path / item).is_dir():
        path = path / item
        break
  return load_published_elf(path, which, expected)


def _pick_key(available, keys, path: epath.Path) -> str:
  for key in keys:
    if key in available:
      return key
  raise KeyError(f"{path} holds none of {list(keys)}; its top-level entries are {sorted(available)}.")


def _read_msgpack(path: epath.Path, keys) -> Any:
  tree = flax.serialization.msgpack_restore(path.read_bytes())
  return tree[_pick_key(tree, keys, path)]


def _read_torch(path: epath.Path, keys) -> Any:
  payload = torch_format.load_payload(path)
  return torch_format.from_torch_state(payload[_pick_key(payload, keys, path)])


def _read_orbax(path: epath.Path, keys) -> Any:
  """Restores only the chosen top-level entry of an orbax PyTree directory, as numpy arrays."""
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    metadata = checkpointer.metadata(path).item_metadata
  except Exception as e:  # pylint: disable=broad-except  # orbax raises various types for a non-checkpoint dir
    raise FileNotFoundError(f"{path} is not an orbax PyTree checkpoint ({type(e).__name__}: {e}); pass a msgpack "
                            "file, an orbax PyTree directory, a workdir or a CheckpointManager directory.") from e
  key = _pick_key(metadata, keys, path)
  item = {key: metadata[key]}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                    partial_restore=True))
  return restored[key]


def _path_str(key_path) -> str:
  return jax.tree_util.keystr(key_path, simple=True, separator="/")


def _match_expected(tree, expected, path: epath.Path):
  """Checks leaf paths and shapes against `expected`, then casts to its dtypes; one error names every problem."""
  got = {_path_str(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  want = {_path_str(k): v for k, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
  problems = [f"  missing: {k} {tuple(want[k].shape)}" for k in sorted(want.keys() - got.keys())]
  problems += [f"  extra: {k} {tuple(np.shape(got[k]))}" for k in sorted(got.keys() - want.keys())]
  problems += [f"  mis-shaped: {k} checkpoint {tuple(np.shape(got[k]))} vs expected {tuple(want[k].shape)}"
               for k in sorted(got.keys() & want.keys()) if tuple(np.shape(got[k])) != tuple(want[k].shape)]
  if problems:
    raise ValueError(f"Checkpoint {path} does not match the model's parameters ({len(problems)} problems):\n"
                     + "\n".join(problems)
                     + "\nCheck that config.model (hidden_size, depth, num_heads, bottleneck_dim, vocab_size) and "
                       "config.encoder.dim match the checkpoint.")
  return jax.tree_util.tree_map_with_path(lambda k, v: np.asarray(v, dtype=want[_path_str(k)].dtype), tree)


def export_torch_checkpoint(source: str, out: str, safetensors_out: str | None = None) -> None:
  """Writes the parameters of `source` as the authors' PyTorch checkpoint file, and optionally the EMA weights
  as safetensors.

  Args:
    source: anything `load_params_from` reads: a training workdir (its newest step), a published msgpack, orbax
      or PyTorch checkpoint.
    out: the `torch.save` file to write, holding `params` and `ema_params1` (what the authors' PyTorch code reads
      for a teacher or a warm start) and no optimizer state, so their resume path cannot continue from it.
    safetensors_out: if given, the EMA weights are written there too (PyTorch names and layout; needs no torch).
  """
  ema = load_params_from(source)
  torch_format.export_torch(out, load_params_from(source, which="raw"), ema)
  if safetensors_out:
    torch_format.export_safetensors(safetensors_out, ema)


