"""Published ELF checkpoints and our own workdirs, read as parameter trees; export in the authors' PyTorch layout.

`detect_format` is the one place that tells what a checkpoint is, by content: see `FORMATS`.

Published ELF checkpoints (docs/method.md, checkpoint names) are a Flax msgpack file or an orbax PyTree directory,
each holding the raw parameters under `params` and their EMA under `ema_params1`, with the published parameter names
(blocks `blocks_{i}`, read into the model's stacked `blocks` layout). The authors' PyTorch checkpoint files
(`torch.save` payloads, renamed and transposed by `elf_jax.weights.torch_format`) load the same way, and so do the
EMA weights that `python -m elf_jax.run.export --safetensors` writes (the same PyTorch names, no torch needed).
"""
from collections.abc import Mapping
import dataclasses
import re
from typing import Any

from etils import epath
import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

from elf_jax import hub, report
from elf_jax.config import ConfigError
from elf_jax.model import elf
from elf_jax.weights import lightning, torch_format

# The layout of a training workdir (written by elf_jax.run.checkpoint.CheckpointManager).
CHECKPOINT_SUBDIR = "checkpoints"
COMMIT_MARKER = "commit_success.txt"
STATE_ITEM = "state"
DATA_ITEM = "data"
_SINGLE_ITEM = "default"  # item name orbax uses for a single-item CheckpointManager
_PARAM_KEYS = {"ema": ("ema_params1", "ema_params"), "raw": ("params",)}  # published names, then ours
_STEP_ENTRY = re.compile(r"checkpoint_(\d+)")  # the official code's checkpoint_<step> files (or folders)
_ORBAX_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt")
_MSGPACK_MAP_HEADERS = {*range(0x80, 0x90), 0xDE, 0xDF}  # a msgpack file holding a dict starts with one of these
_SAFETENSORS_SUFFIX = ".safetensors"

# What `detect_format` recognises, in the order it looks (named in the error when nothing matches).
FORMATS = (
    "our training workdir (checkpoints/<step>/state)",
    "an orbax CheckpointManager folder (<step>/ with commit_success.txt)",
    "an official repository snapshot: a folder of checkpoint_<step> files or folders (newest step; JAX or PyTorch)",
    "a folder with a PyTorch Lightning *.ckpt (last.ckpt preferred)",
    "an orbax PyTree folder",
    "a torch.save file (the authors' payload with params / ema_params1, a PyTorch Lightning checkpoint or a state "
    "dict)",
    "a safetensors file of EMA weights in the PyTorch names (what `elf_jax.run.export --safetensors` writes), or a "
    "folder holding one",
    "a flax msgpack file (params / ema_params1)",
)


@dataclasses.dataclass(frozen=True)
class Detected:
  """What a checkpoint is: `kind` "orbax" (folder), "torch", "safetensors" or "msgpack" (files), read at `path` (the
  newest step, the item folder or the one weights file inside what was named); `source` is what was named."""
  kind: str
  path: epath.Path
  source: str


def not_a_checkpoint(field: str, source: str, found: str) -> ConfigError:
  """The one-line error for something that is no ELF checkpoint: what was found and every format tried."""
  return ConfigError(f"{field}={source!r}: not an ELF checkpoint ({found}); tried: " + "; ".join(FORMATS) + ".")


def detect_format(source: str, field: str = "init_from") -> Detected:
  """The format of the checkpoint at `source` (a local or gs:// path, or a hub id: see `hub.resolve`), by
  content, not by name.

  Raises:
    ConfigError: a missing path or an id that cannot be fetched, or nothing of `FORMATS` (one line naming `field`,
      what was found and the formats tried).
  """
  path = hub.resolve(str(source), field, "ELF checkpoint")
  return _detect(path, str(source), field)


def _detect(path: epath.Path, source: str, field: str) -> Detected:
  if path.is_dir():
    if (path / CHECKPOINT_SUBDIR).is_dir():
      path = path / CHECKPOINT_SUBDIR
    entries = {p.name: p for p in path.iterdir()}
    committed = [int(n) for n, p in entries.items() if n.isdigit() and (p / COMMIT_MARKER).exists()]
    if committed:
      path = path / str(max(committed))
      entries = {p.name: p for p in path.iterdir()}
    for item in (STATE_ITEM, _SINGLE_ITEM):
      if item in entries and entries[item].is_dir():
        return Detected("orbax", entries[item], source)
    steps = {int(m.group(1)): p for n, p in entries.items() if (m := _STEP_ENTRY.fullmatch(n))}
    if steps:
      return _detect(steps[max(steps)], source, field)
    ckpts = sorted((n for n in entries if n.endswith(".ckpt")), key=lambda n: (n != "last.ckpt", n))
    if ckpts:
      return _detect(entries[ckpts[0]], source, field)
    if any(n in entries for n in _ORBAX_FILES):
      return Detected("orbax", path, source)
    if set(entries) == {"checkpoint"}:  # the old flax layout: one msgpack file in a checkpoint_<step> folder
      return _detect(entries["checkpoint"], source, field)
    tensors = [n for n in entries if n.endswith(_SAFETENSORS_SUFFIX)]
    if len(tensors) == 1:  # an exported model: its EMA weights beside config_train.json and latent_stats.json
      return _detect(entries[tensors[0]], source, field)
    names = sorted(entries)
    listed = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    raise not_a_checkpoint(field, source, f"a folder holding {listed}" if names else "an empty folder")
  with path.open("rb") as f:
    head = f.read(9)
  if head.startswith(torch_format.TORCH_ZIP_MAGIC):
    return Detected("torch", path, source)
  # safetensors: a little-endian u64 header length, then the JSON header (checked before msgpack, whose map headers
  # the length's first byte may look like).
  if len(head) == 9 and head[8:] == b"{" and 8 + int.from_bytes(head[:8], "little") <= path.stat().length:
    return Detected("safetensors", path, source)
  if head and head[0] in _MSGPACK_MAP_HEADERS:
    return Detected("msgpack", path, source)
  raise not_a_checkpoint(field, source, f"a {path.stat().length}-byte file that is neither a torch.save zip, a "
                                        "safetensors file nor a flax msgpack dict" if head else "an empty file")


def load_published_elf(path: str, which: str = "ema", expected: Any = None, field: str = "init_from"
                       ) -> dict[str, Any]:
  """Reads the parameter tree of an ELF checkpoint (docs/method.md#checkpoint-names) as numpy arrays.

  Args:
    path: anything `detect_format` recognises (a path or a hub id): a Flax msgpack file or an orbax PyTree directory
      holding `params` and `ema_params1` (our own `state` items, holding `params` and `ema_params`, work too), the
      authors' PyTorch checkpoint file or a PyTorch Lightning checkpoint (`torch.save` payloads, recognised by their
      content; need torch), an exported safetensors file of EMA weights, a folder of them or one of our workdirs.
    which: "ema" (the EMA copy, used for sampling) or "raw" (the trained parameters; not in a safetensors export).
    expected: optional tree of `jax.ShapeDtypeStruct`s or arrays, e.g. `jax.eval_shape` of the model's init.
      Every leaf path and shape must match (per block, in the published names); the leaves are then cast to its
      dtypes.
    field: the config field that named `path`, named in errors.

  Returns:
    Nested dict of numpy arrays named as in docs/method.md#checkpoint-names (a wrapping `{"params": ...}` level is
    removed), with the blocks stacked as the model holds them (`blocks/...`, see `elf_jax.model.elf.stack_blocks`).

  Raises:
    ConfigError: `path` is no ELF checkpoint (one line: what was found, the formats tried).
    ValueError: `expected` was given and leaves are missing, extra or mis-shaped (all are named, '/'-joined).
    ImportError: `path` is a PyTorch checkpoint and torch is not installed.
  """
  if which not in _PARAM_KEYS:
    raise ValueError(f"which={which!r}; use 'ema' or 'raw'.")
  found = detect_format(path, field)
  read = {"torch": _read_torch, "safetensors": _read_safetensors, "msgpack": _read_msgpack,
          "orbax": _read_orbax}[found.kind]
  try:
    tree = read(found.path, _PARAM_KEYS[which])
  except ConfigError as e:  # the Lightning reader's: what it found and how to proceed
    raise ConfigError(f"{field}={found.source!r}: {e}") from e
  except ImportError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # a corrupt or foreign file: one line, whatever the reader
    detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    raise not_a_checkpoint(field, found.source, f"{found.path} looks like a {found.kind} checkpoint but cannot be "
                                                f"read: {type(e).__name__}: {detail}") from e
  while isinstance(tree, Mapping) and set(tree) == {"params"}:
    tree = tree["params"]
  if expected is not None:  # compared by published names, so that a problem names its block
    return conform(tree, expected, found.path)
  return elf.stack_blocks(tree)


def conform(tree: Any, expected: Any, source) -> dict[str, Any]:
  """A tree read by `load_published_elf` (no `expected`) checked against and cast to `expected`, as passing it
  there would have (ValueError naming every missing, extra or mis-shaped leaf)."""
  tree = _match_expected(elf.unstack_blocks(tree), jax.eval_shape(elf.unstack_blocks, expected), source)
  return elf.stack_blocks(tree)


def load_params_from(path: str, expected: Any = None, which: str = "ema", field: str = "init_from") -> dict[str, Any]:
  """EMA parameters for `--config.init_from` / `distill.teacher` (named by `field` in errors): a published
  checkpoint, the latest step of one of our runs, or anything else `detect_format` recognises.

  Args:
    path: a path or hub id: a msgpack file, a PyTorch (or Lightning) checkpoint file, an orbax PyTree directory, a
      training workdir, a `CheckpointManager` directory or one of its step directories (then the newest step with a
      commit marker), a folder of official checkpoint_<step> files, an exported safetensors file (or its folder).
    expected: as in `load_published_elf`.
    which: as in `load_published_elf`; "raw" reads the trained parameters instead of their EMA.
  """
  return load_published_elf(path, which, expected, field)


def _pick_key(available, keys, path: epath.Path) -> str:
  for key in keys:
    if key in available:
      return key
  raise KeyError(f"{path} holds none of {list(keys)}; its top-level entries are {sorted(available)}.")


def _read_msgpack(path: epath.Path, keys) -> Any:
  tree = flax.serialization.msgpack_restore(path.read_bytes())
  return tree[_pick_key(tree, keys, path)]


def _read_torch(path: epath.Path, keys) -> Any:
  """The authors' payload (`params` / `ema_params1`), else the network found by content (`lightning`)."""
  payload = lightning.load_payload(path)
  if "params" in payload:
    return torch_format.from_torch_state(payload[_pick_key(payload, keys, path)])
  copies = lightning.read_copies(path, payload)
  want_ema = "params" not in keys
  chosen = next((c for c in copies if c.is_ema == want_ema), copies[0])
  report.say(f"{path}: {lightning.describe(chosen, copies)}")
  return torch_format.from_torch_state(chosen.state)


def _read_safetensors(path: epath.Path, keys) -> Any:
  """The EMA weights of an exported safetensors file (PyTorch names and layout); it holds no raw parameters."""
  from safetensors.numpy import load  # pylint: disable=import-outside-toplevel
  if "params" in keys:
    raise ConfigError(f"{path} holds only EMA weights (an `elf_jax.run.export --safetensors` file), not the raw "
                      "parameters; export from the training workdir or its PyTorch checkpoint instead")
  state = load(path.read_bytes())
  if lightning.MARKER not in state:
    raise ConfigError(f"{path} holds {len(state)} tensors but no ELF network (none is named {lightning.MARKER}); "
                      "pass the EMA weights `python -m elf_jax.run.export --safetensors` writes")
  return torch_format.from_torch_state(state)


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


def export_torch_checkpoint(source: str, out: str | None, safetensors_out: str | None = None) -> None:
  """Writes the parameters of `source` as the authors' PyTorch checkpoint file, the EMA weights as safetensors, or
  both.

  Args:
    source: anything `load_params_from` reads: a training workdir (its newest step), a published msgpack, orbax
      or PyTorch checkpoint.
    out: the `torch.save` file to write (None: none), holding `params` and `ema_params1` (what the authors' PyTorch
      code reads for a teacher or a warm start) and no optimizer state, so their resume path cannot continue from it.
    safetensors_out: the file to write the EMA weights to (None: none), with PyTorch names and layout; needs no
      torch, and `elf_jax.load` / `init_from` read it back.

  Raises:
    ValueError: neither file is named.
  """
  if not out and not safetensors_out:
    raise ValueError("nothing to write: name the PyTorch checkpoint (--out=FILE: params and EMA) and / or the EMA "
                     "weights' safetensors file (--safetensors=FILE)")
  ema = load_params_from(source)
  if out:
    torch_format.export_torch(out, load_params_from(source, which="raw"), ema)
  if safetensors_out:
    torch_format.export_safetensors(safetensors_out, ema)
