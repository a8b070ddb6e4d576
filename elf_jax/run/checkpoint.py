"""The orbax manager of a training workdir: TrainState + data-iterator state per step.

Layout (orbax defaults): `<directory>/<step>/state/` (the TrainState PyTree), `<directory>/<step>/data/` (grain
iterator state, one JSON per process) and `<directory>/<step>/commit_success.txt`, the marker orbax writes once a
step is complete. A training workdir keeps them under `checkpoint_dir(workdir)`; `elf_jax.weights.published` reads
the same layout for `init_from`.
"""
import logging
import time

from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from elf_jax import fs
from elf_jax.objective.state import TrainState
from elf_jax.weights.published import CHECKPOINT_SUBDIR, COMMIT_MARKER, DATA_ITEM, STATE_ITEM


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
