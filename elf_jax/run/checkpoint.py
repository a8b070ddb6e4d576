"""The orbax manager of a training workdir: TrainState + data-iterator state per step.

Layout (orbax defaults): `<directory>/<step>/state/` (the TrainState PyTree), `<directory>/<step>/data/` (grain
iterator state, one JSON per process) and `<directory>/<step>/commit_success.txt`, the marker orbax writes once a
step is complete. After the commit, `<directory>/<step>/digest.json` records a content digest of every file of the
step (locally blake2b of the bytes, hashed on a background thread; on gs:// the crc32c the store keeps per object);
`restore` verifies it and treats a mismatch like a missing commit marker. A training workdir keeps them under
`checkpoint_dir(workdir)`; `elf_jax.weights.published` reads the same layout for `init_from`.
"""
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
import warnings

from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from elf_jax import fs, report
from elf_jax.objective.state import TrainState
from elf_jax.weights.published import CHECKPOINT_SUBDIR, COMMIT_MARKER, DATA_ITEM, STATE_ITEM

DIGEST_FILE = "digest.json"


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
    self._pending = None  # the step of a save not yet known to be complete
    _quiet_orbax_tracebacks()
    self._digesting = None  # the thread writing the newest step's digest

  def save(self, step: int, state: TrainState, data_iterator=None, force: bool = False) -> bool:
    """Saves `state` (and the iterator's position, if given) as step `step`; returns whether it saved.

    Raises:
      report.RunStopped: this save, or an earlier asynchronous one, failed (e.g. no space left); one line naming
        the step, its directory and the cause.
    """
    self.wait()  # an earlier save's failure stops the run before anything else is written
    items = {STATE_ITEM: ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iterator)
    self._pending = int(step)
    saved = self._with_save_errors(lambda: self._manager.save(int(step), args=ocp.args.Composite(**items),
                                                              force=force))
    if not saved:
      self._pending = None
    elif not self._manager.is_saving_in_progress():
      self.check_saved()
    return saved

  def check_saved(self) -> None:
    """Without blocking: once the pending asynchronous save has finished, raises `report.RunStopped` if it failed,
    else starts recording its digest on a background thread. Call once per training step."""
    if self._pending is not None and not self._manager.is_saving_in_progress():
      self._finish_pending()

  def _finish_pending(self) -> None:
    self._with_save_errors(self._manager.wait_until_finished)
    step, self._pending = self._pending, None
    if jax.process_index() == 0:  # one writer for the shared directory
      self._digesting = threading.Thread(target=write_digest, args=(self.directory / str(step),),
                                         name=f"checkpoint digest {step}", daemon=True)
      self._digesting.start()

  def _with_save_errors(self, fn):
    """fn() with orbax's save errors turned into one line naming the step, its directory and the cause."""
    try:
      return fn()
    except Exception as e:  # pylint: disable=broad-except  # tensorstore / orbax raise many types
      step, self._pending = self._pending, None
      raise report.RunStopped(
          f"saving checkpoint step {step} to {self.directory / str(step)} failed: {short_cause(e)}; nothing after "
          "the previous saved step is kept. Free space (or fix access) there and rerun the same command to resume "
          "from the last saved step.") from e

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
    self.wait()
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    failures = []
    for candidate in steps:
      try:
        state = self._restore_step(candidate, abstract_state, data_iterator)
      except Exception as e:  # pylint: disable=broad-except  # any read error; judged against older steps below
        failures.append((candidate, short_cause(e)))
        continue
      for bad_step, reason in failures:
        self._set_aside(bad_step, reason, candidate)
      return state
    problems = "; ".join(f"step {s}: {reason[:200]}" for s, reason in failures)
    raise report.RunStopped(
        f"No checkpoint in {self.directory} could be restored (nothing was moved): {problems}. If the model, "
        "optimizer or mesh config changed since they were written, run with the original config or start a new "
        "workdir.")

  def _restore_step(self, step: int, abstract_state: TrainState, data_iterator) -> TrainState:
    step_dir = self.directory / str(step)
    if not (step_dir / COMMIT_MARKER).exists():
      raise FileNotFoundError(f"{step_dir} has no {COMMIT_MARKER}: the save did not complete")
    verify_digest(step_dir)
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
    """Blocks until pending asynchronous saves are on disk and their digests written; raises `report.RunStopped`
    if a save failed."""
    if self._pending is not None:
      self._finish_pending()
    if self._digesting is not None:
      self._digesting.join()
      self._digesting = None

  def close(self) -> None:
    """Waits for pending saves and releases orbax's resources (also after a failed save: nothing is left running
    at exit)."""
    try:
      self.wait()
    finally:
      self._pending = None
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-except  # the failure was already raised by wait() / save()
        pass


def _drop_orbax_traceback(record: logging.LogRecord) -> bool:
  """False for orbax's error logs with a traceback (unless logging at DEBUG): every orbax failure reaches the user as
  the one-line error of the save or restore that raised it, not as four tracebacks from its threads before it."""
  from_orbax = "orbax" in record.pathname.split("/") and record.exc_info is not None
  return not from_orbax or logging.getLogger("absl").getEffectiveLevel() <= logging.DEBUG


def _drop_unretrieved_save_error(record: logging.LogRecord) -> bool:
  """False (unless logging at DEBUG) for asyncio's "exception was never retrieved" log of a failed write that the
  save already reported in its one line: orbax gathers its array writes and drops the gather once one has failed."""
  return ("exception was never retrieved" not in record.getMessage()
          or logging.getLogger("absl").getEffectiveLevel() <= logging.DEBUG)


def _is_closed_loop_error(error: BaseException | None) -> bool:
  """`RuntimeError: Event loop is closed` (unless logging at DEBUG): tensorstore's completion callbacks of writes still
  in flight when orbax's event loop closed after a failed save, which the save already reported in one line."""
  return (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
          and logging.getLogger("absl").getEffectiveLevel() > logging.DEBUG)


def _closed_loop_unraisablehook(previous):
  """A sys.unraisablehook that drops `_is_closed_loop_error`s (tensorstore reports them as unraisable)."""
  def hook(unraisable):
    if not _is_closed_loop_error(unraisable.exc_value):
      previous(unraisable)
  hook.drops_closed_loop_errors = True
  return hook


def _quiet_orbax_tracebacks() -> None:
  absl_logger = logging.getLogger("absl")  # orbax logs through absl's logger
  if _drop_orbax_traceback not in absl_logger.filters:
    absl_logger.addFilter(_drop_orbax_traceback)
  asyncio_logger = logging.getLogger("asyncio")
  if _drop_unretrieved_save_error not in asyncio_logger.filters:
    asyncio_logger.addFilter(_drop_unretrieved_save_error)
  if not getattr(sys.unraisablehook, "drops_closed_loop_errors", False):
    sys.unraisablehook = _closed_loop_unraisablehook(sys.unraisablehook)
  if logging.getLogger("absl").getEffectiveLevel() > logging.DEBUG:  # orbax's writes dropped after a failed save
    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)


def short_cause(error: BaseException) -> str:
  """The useful part of a (chained) orbax / tensorstore error, on one line: the OS error if one is named (e.g.
  "No space left on device"), else the innermost message, cut to 300 characters."""
  chain = []
  while error is not None and error not in chain:
    chain.append(error)
    error = error.__cause__ or error.__context__
  text = " ".join(" ".join(str(e).split()) for e in chain)
  for pattern in (r"No space left on device", r"Disk quota exceeded", r"Permission denied", r"RESOURCE_EXHAUSTED",
                  r"Read-only file system", r"quota"):
    if re.search(pattern, text, re.I):
      code = re.search(r"os_error_code='(\d+)'", text)
      return pattern + (f" (errno {code.group(1)})" if code else "")
  inner = chain[-1]
  return f"{type(inner).__name__}: {' '.join(str(inner).split())[:300]}"


def _file_digests(step_dir: epath.Path) -> dict[str, str]:
  """{path relative to `step_dir`: digest} of every file of a step (the digest file itself excluded): on an object
  store the crc32c (else md5) it keeps per object, locally the blake2b of the bytes."""
  if fs.is_remote(step_dir):
    import fsspec  # pylint: disable=g-import-not-at-top  # present whenever gs:// paths work (fs.path checks)
    store, root = fsspec.core.url_to_fs(str(step_dir))
    found = store.find(root, detail=True)
    return {name[len(root):].lstrip("/"): str(info.get("crc32c") or info.get("md5Hash") or info.get("size"))
            for name, info in found.items() if not name.endswith("/" + DIGEST_FILE)}
  digests = {}
  for root, _, names in os.walk(step_dir):
    for name in names:
      file = os.path.join(root, name)
      if file == os.path.join(step_dir, DIGEST_FILE):
        continue
      h = hashlib.blake2b(digest_size=16)
      with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):  # pylint: disable=cell-var-from-loop
          h.update(block)
      digests[os.path.relpath(file, step_dir)] = h.hexdigest()
  return digests


def write_digest(step_dir: epath.Path) -> None:
  """Records the content digest of a committed step as `<step_dir>/digest.json`. A failure is logged, not raised:
  the step stays usable (unverified), like one written before digests existed."""
  try:
    (step_dir / DIGEST_FILE).write_text(json.dumps(_file_digests(step_dir), indent=0, sort_keys=True))
  except Exception as e:  # pylint: disable=broad-except  # e.g. orbax already deleted the step (max_to_keep)
    logging.warning("Could not record the digest of checkpoint %s: %s", step_dir, short_cause(e))


def verify_digest(step_dir: epath.Path) -> None:
  """Raises ValueError naming the first file of `step_dir` whose content differs from its recorded digest (or that
  is missing). A step without digest.json (killed between its commit and its digest) is not checked."""
  recorded_file = step_dir / DIGEST_FILE
  if not recorded_file.exists():
    return
  recorded = json.loads(recorded_file.read_text())
  actual = _file_digests(step_dir)
  for name in sorted(recorded):
    if actual.get(name) != recorded[name]:
      state = "is missing" if name not in actual else "does not match its recorded digest (corrupted)"
      raise ValueError(f"{name} {state}")
