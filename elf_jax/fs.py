"""One filesystem layer for local paths and object stores (gs://) alike: `path()` (an `etils.epath.Path`),
`append_text`, `load_npy` and the one-run-per-workdir `workdir_lease`.

Usage, object-store limits and multi-host rules: docs/running.md#filesystem.
"""
import contextlib
import importlib.util
import io
import json
import logging
import os
import socket
import time
import uuid

from etils import epath
import numpy as np

from elf_jax.config import ConfigError

if importlib.util.find_spec("fsspec"):  # epath's gs:// backend (gcsfs) is an fsspec filesystem
  import fsspec  # pylint: disable=g-import-not-at-top
  # Several hosts write one workdir: answer exists / is_dir / iterdir from the store, never from a listing this
  # process cached before another host wrote (gcsfs keeps listings forever by default).
  fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)


def is_remote(p) -> bool:
  """True for a URL (gs://bucket/..., s3://...), False for a local path."""
  return "://" in str(p)


def path(p) -> epath.Path:
  """`p` as an epath.Path: URLs are kept, local paths are made absolute (orbax and tensorstore take no relative
  paths). Raises ConfigError for gs:// without a gs:// filesystem installed."""
  if not is_remote(p):
    return epath.Path(os.path.abspath(os.fspath(p)))
  if str(p).startswith("gs://") and not any(importlib.util.find_spec(m) for m in ("gcsfs", "tensorflow")):
    raise ConfigError(f"{p}: gs:// paths need the gcsfs package; pip install gcsfs (or install elf_jax with the "
                      "[tpu] or [gpu] extra)")
  return epath.Path(p)


def append_text(p, text: str) -> None:
  """Appends `text` to the file `p` (created if missing). An object store cannot append: the object is read and
  written back whole, so keep such files small (metrics, not data)."""
  p = path(p)
  if is_remote(p):
    p.write_text((p.read_text() if p.exists() else "") + text)
  else:
    with p.open("a") as f:
      f.write(text)


def replace_text(p, text: str) -> None:
  """Writes `text` as the whole content of `p`: locally through a temporary file renamed over `p` (a kill leaves the
  old or the new content, never half of it); an object store replaces objects whole anyway."""
  p = path(p)
  if is_remote(p):
    p.write_text(text)
    return
  tmp = p.parent / f".{p.name}.tmp-{os.getpid()}"
  tmp.write_text(text)
  os.replace(tmp, p)


def savefig(fig, p, **kwargs) -> str:
  """Writes a matplotlib figure to `p` (format from the suffix, e.g. .png); returns str(p)."""
  p = path(p)
  with p.open("wb") as f:
    fig.savefig(f, format=p.suffix.lstrip("."), **kwargs)
  return str(p)


def save_npy(p, array: np.ndarray) -> None:
  """Writes `array` in .npy format to `p`."""
  with path(p).open("wb") as f:
    np.save(f, array)


class _RemoteNpy:
  """Rows of a .npy file in an object store, each fetched by one ranged read: `x[i]` (shape[1:]), `x.shape`,
  `x.dtype`. C-order arrays only (what np.save writes)."""

  _HEADER_BYTES = 4096  # .npy headers are padded to a multiple of 64 bytes; ours are well under this

  def __init__(self, p: epath.Path):
    self._fs, self._key = fsspec.core.url_to_fs(str(p))
    head = io.BytesIO(self._fs.cat_file(self._key, start=0, end=self._HEADER_BYTES))
    version = np.lib.format.read_magic(head)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    self.shape, fortran, self.dtype = read_header(head)
    if fortran:
      raise ValueError(f"{p}: Fortran-ordered .npy files are not supported")
    self._offset = head.tell()
    self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, row: int) -> np.ndarray:
    start = self._offset + int(row) * self._row_bytes
    data = self._fs.cat_file(self._key, start=start, end=start + self._row_bytes)
    return np.frombuffer(data, self.dtype).reshape(self.shape[1:])


def load_npy(p):
  """A .npy file for row access (`x[i]`, `x.shape`): memory-mapped when local, read row by row from an object
  store (a shard is never downloaded whole)."""
  p = path(p)
  return _RemoteNpy(p) if is_remote(p) else np.load(p, mmap_mode="r")


def check_writable(directory: str, process_index: int = 0) -> None:
  """Creates `directory` (local or gs://) and checks that this process can write there, before anything compiles.
  Raises ConfigError naming the directory otherwise."""
  try:
    d = path(directory)
    d.mkdir(parents=True, exist_ok=True)
    probe = d / f".write_test_{process_index}"
    probe.write_text("ok")
    probe.unlink()
  except (OSError, ValueError) as e:  # gcsfs raises OSError subclasses and ValueError (bad bucket names)
    raise ConfigError(f"--workdir={directory!r} is not writable ({type(e).__name__}: {e}); pass a directory you can "
                      "write to") from e


LEASE_FILE = "lease.json"
_held_leases: dict[str, "WorkdirLease"] = {}  # lease path -> the lease this process holds there


def _create_exclusive(p: epath.Path, text: str) -> bool:
  """Writes `text` to `p` only if `p` does not exist, atomically; False if it existed."""
  if is_remote(p):
    store, key = fsspec.core.url_to_fs(str(p))
    try:
      store.pipe_file(key, text.encode(), mode="create")  # an upload with ifGenerationMatch=0
    except (FileExistsError, OSError) as e:
      if p.exists():  # the precondition failed: someone else created it first
        return False
      raise e
    return True
  try:
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    f.write(text)
  return True


def _lease_stale(holder: dict, stale_after_s: float) -> str:
  """Why the lease of `holder` may be taken over ("" if it may not): its process is gone (same host), or it was not
  renewed for `stale_after_s` seconds."""
  if holder.get("host") == socket.gethostname():
    try:
      os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
      return f"its process {holder.get('pid')} no longer runs on this host"
    except (PermissionError, ValueError, OverflowError):
      pass
  age = time.time() - float(holder.get("renewed", 0))
  if age > stale_after_s:
    return f"it was last renewed {age:.0f} s ago (> checkpoint.lease_stale_after_s={stale_after_s:g})"
  return ""


class WorkdirLease:
  """This process's hold on a workdir (DIR/lease.json: host, pid, start time, last renewal, a token)."""

  def __init__(self, directory):
    self.path = path(directory) / LEASE_FILE
    now = time.time()
    self.record = {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "renewed": now,
                   "token": uuid.uuid4().hex}

  def take(self, stale_after_s: float) -> None:
    """Creates the lease, taking over a stale one with a warning; raises ConfigError naming a live holder."""
    for _ in range(3):  # a stale lease removed by someone else between our read and our create: try again
      if _create_exclusive(self.path, json.dumps(self.record)):
        return
      try:
        holder = json.loads(self.path.read_text())
      except (FileNotFoundError, json.JSONDecodeError):  # released meanwhile, or half written by a killed run
        holder = {}
      reason = _lease_stale(holder, stale_after_s) if holder else "it is unreadable"
      if not reason:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
        raise ConfigError(
            f"--workdir={str(self.path.parent)!r} is in use by another run (host {holder.get('host')}, pid "
            f"{holder.get('pid')}, started {started}; {self.path}); wait for it or stop it, or pass another "
            f"--workdir. If that run is gone, delete {self.path}.")
      logging.warning("Taking over the lease of %s from host %s pid %s: %s.", self.path.parent, holder.get("host"),
                      holder.get("pid"), reason)
      with contextlib.suppress(FileNotFoundError):
        self.path.unlink()
    raise ConfigError(f"could not take the lease {self.path}: other runs keep taking it; pass another --workdir")

  def renew(self) -> None:
    """Records that the run is alive (call at least every checkpoint.lease_stale_after_s seconds)."""
    self.record["renewed"] = time.time()
    self.path.write_text(json.dumps(self.record))

  def release(self) -> None:
    """Removes the lease if it is still ours (a run that took it over keeps it)."""
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
      if json.loads(self.path.read_text()).get("token") == self.record["token"]:
        self.path.unlink()


@contextlib.contextmanager
def workdir_lease(directory, stale_after_s: float, take: bool = True):
  """Holds `directory`'s lease for the block and yields it (`WorkdirLease`); yields None without taking it when
  `take` is False (the processes of a multi-process run other than the holder). A nested block of the process that
  holds the lease yields the outer block's lease."""
  key = str(path(directory) / LEASE_FILE)
  if not take or key in _held_leases:
    yield _held_leases.get(key)
    return
  lease = WorkdirLease(directory)
  lease.take(stale_after_s)
  _held_leases[key] = lease
  try:
    yield lease
  finally:
    del _held_leases[key]
    lease.release()
