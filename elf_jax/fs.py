"""One filesystem layer for local paths and object stores (gs://) alike: every file a run reads or writes under its
workdir, data, latent-cache, init and checkpoint paths goes through `path()` (an `etils.epath.Path`).

    p = fs.path(workdir) / "samples" / "step_6.jsonl"    # local (made absolute) or gs://bucket/...
    p.parent.mkdir(parents=True, exist_ok=True); p.write_text(...); p.read_text(); p.exists(); p.open("rb")

epath reaches gs:// through gcsfs (installed by the `tpu`, `gpu` and `test` extras). Object stores cannot append
to or memory-map a file: `append_text` rewrites the object there, and `load_npy` reads the rows it is asked for.
Multi-host runs share one workdir: only process 0 writes single files (the callers check `jax.process_index()`).
"""
import importlib.util
import io
import os

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
