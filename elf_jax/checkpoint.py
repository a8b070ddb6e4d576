"""Checkpoints: an orbax manager for TrainState + data-iterator state, and import / export of ELF checkpoints.

Layout written by `CheckpointManager` (orbax defaults): `<directory>/<step>/state/` (the TrainState PyTree),
`<directory>/<step>/data/` (grain iterator state, one JSON per process) and `<directory>/<step>/commit_success.txt`,
the marker orbax writes once a step is complete. A training workdir keeps them under `checkpoint_dir(workdir)`.

Published ELF checkpoints are either a Flax msgpack file or an orbax PyTree directory, each holding the
raw parameters under `params` and their EMA under `ema_params1`, with the names of docs/method.md#checkpoint-names
(blocks `blocks_{i}`; they are read into the model's stacked `blocks` layout, and our own workdirs store that layout).
The authors' PyTorch checkpoint files (`torch.save` payloads, renamed and transposed by `elf_jax.torch_checkpoint`)
load the same way; `python -m elf_jax.checkpoint export SOURCE OUT` writes ours in their layout.
"""
import argparse
from collections.abc import Mapping
import logging
import time
from typing import Any

from etils import epath
import flax.serialization
import grain
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from elf_jax import fs
from elf_jax import torch_checkpoint
from elf_jax.model import elf
from elf_jax.train.state import TrainState

CHECKPOINT_SUBDIR = "checkpoints"
COMMIT_MARKER = "commit_success.txt"
STATE_ITEM = "state"
DATA_ITEM = "data"
_SINGLE_ITEM = "default"  # item name orbax uses for a single-item CheckpointManager
_PARAM_KEYS = {"ema": ("ema_params1", "ema_params"), "raw": ("params",)}  # published names, then ours


def checkpoint_dir(workdir: str) -> epath.Path:
  """Where a training run in `workdir` keeps its checkpoints."""
  return fs.path(workdir) / CHECKPOINT_SUBDIR


class CheckpointManager:
  """Saves and restores TrainState (and the grain iterator) with orbax: async, keep-N, resume past bad steps.

  Multi-host: every process calls every method (orbax writes each process's shards and process 0 the metadata).
  """

  def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True, save_interval_steps: int = 1):
    """Opens (creating if needed) a checkpoint directory.

    Args:
      directory: root holding one sub-directory per saved step (local path or gs://).
      max_to_keep: newest steps kept; older ones are deleted by orbax after each save (None keeps all).
      async_save: write in a background thread; call `wait()` before reading the files or exiting.
      save_interval_steps: `save` is a no-op for steps that are not a multiple of this (unless `force`; orbax
        also always saves into a directory that holds no checkpoint yet).
    """
    self.directory = fs.path(directory)  # absolute: orbax takes no relative paths
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                             enable_async_checkpointing=async_save, create=True))

  def save(self, step: int, state: TrainState, data_iterator=None, force: bool = False) -> bool:
    """Saves `state` (and the iterator's position, if given) as step `step`; returns whether it saved."""
    items = {STATE_ITEM: ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(int(step), args=ocp.args.Composite(**items), force=force)

  def latest_step(self) -> int | None:
    """Newest step directory present (complete or not; `restore` is what validates), None if there is none."""
    return self._manager.latest_step()

  def restore(self, abstract_state: TrainState, data_iterator=None, step: int | None = None) -> TrainState | None:
    """Restores a TrainState onto the shardings of `abstract_state`, and the iterator's position in place.

    Without `step`, tries the newest step first. A step that cannot be read (no commit marker, unreadable or
    garbage files) while an older one can is logged by name, moved aside to `<step>.unreadable-<time>` (nothing
    is deleted) and the older step is used. If no step can be read, nothing is moved and the error lists every
    step's problem: that usually means `abstract_state` does not match what was saved (a changed config).

    Args:
      abstract_state: TrainState whose leaves are `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`.
      data_iterator: grain iterator to reposition; left untouched if the checkpoint has no iterator state.
      step: restore exactly this step (errors are raised, no fallback).

    Returns:
      The restored TrainState, or None when the directory holds no checkpoint at all.
    """
    self._manager.wait_until_finished()
    if step is not None:
      return self._restore_step(int(step), abstract_state, data_iterator)
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    failures = []
    for candidate in steps:
      try:
        state = self._restore_step(candidate, abstract_state, data_iterator)
      except Exception as e:  # pylint: disable=broad-except  # any read error; judged against older steps below
        failures.append((candidate, f"{type(e).__name__}: {str(e).strip()[:500]}"))
        continue
      for bad_step, reason in failures:
        self._set_aside(bad_step, reason, candidate)
      return state
    lines = "\n".join(f"  {self.directory / str(s)}: {reason}" for s, reason in failures)
    raise RuntimeError(
        f"No checkpoint in {self.directory} could be restored (nothing was moved):\n{lines}\n"
        "If the model, optimizer or mesh config changed since they were written, run with the original config "
        "or start a new workdir.")

  def _restore_step(self, step: int, abstract_state: TrainState, data_iterator) -> TrainState:
    step_dir = self.directory / str(step)
    if not (step_dir / COMMIT_MARKER).exists():
      raise FileNotFoundError(f"{step_dir} has no {COMMIT_MARKER}: the save did not complete")
    items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      if (step_dir / DATA_ITEM).exists():
        items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
      else:
        logging.warning("Checkpoint %s holds no data-iterator state; the data iterator starts from its beginning.",
                        step_dir)
    return self._manager.restore(step, args=ocp.args.Composite(**items))[STATE_ITEM]

  def _set_aside(self, bad_step: int, reason: str, good_step: int) -> None:
    bad_dir = self.directory / str(bad_step)
    aside = self.directory / f"{bad_step}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:  # one mover for the shared directory; the others wait for it
      bad_dir.rename(aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint step {bad_step} set aside")
    self._manager.reload()
    logging.warning("Checkpoint step directory %s is unusable (%s); moved it to %s and resumed from step %d.",
                    bad_dir, reason, aside, good_step)

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax's resources."""
    self._manager.close()


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
    read = _read_torch if torch_checkpoint.is_torch_checkpoint(path) else _read_msgpack
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
  payload = torch_checkpoint.load_payload(path)
  return torch_checkpoint.from_torch_state(payload[_pick_key(payload, keys, path)])


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
  torch_checkpoint.export_torch(out, load_params_from(source, which="raw"), ema)
  if safetensors_out:
    torch_checkpoint.export_safetensors(safetensors_out, ema)


def main(argv: list[str] | None = None) -> None:
  """`python -m elf_jax.checkpoint export SOURCE OUT [--safetensors EMA_FILE]`."""
  parser = argparse.ArgumentParser(prog="python -m elf_jax.checkpoint")
  commands = parser.add_subparsers(dest="command", required=True)
  export = commands.add_parser("export", help="write a checkpoint as the authors' PyTorch checkpoint file")
  export.add_argument("source", help="a training workdir, or a published msgpack / orbax / PyTorch checkpoint")
  export.add_argument("out", help="the PyTorch checkpoint file to write (params and ema_params1)")
  export.add_argument("--safetensors", help="also write the EMA weights to this safetensors file")
  args = parser.parse_args(argv)
  export_torch_checkpoint(args.source, args.out, args.safetensors)
  print(f"wrote {args.out}" + (f" and {args.safetensors}" if args.safetensors else ""))


if __name__ == "__main__":
  main()
