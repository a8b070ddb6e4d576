"""The ELF network inside a PyTorch Lightning checkpoint (e.g. `last.ckpt`) or any other `torch.save` payload,
found by content: no layout is assumed; read with `weights_only=True`.

How copies are found and chosen: docs/checkpoints.md#lightning-checkpoints.
"""
from collections.abc import Mapping
import dataclasses
import pickle
from typing import Any

from elf_jax.config import ConfigError
from elf_jax.weights import torch_format

MARKER = "t_emb_tokens"  # a parameter every ELF network has, at its top level


@dataclasses.dataclass(frozen=True)
class Copy:
  """One copy of the network in a payload: its name prefix and its state dict (torch_format names → tensors)."""
  prefix: str
  state: dict[str, Any]

  @property
  def is_ema(self) -> bool:
    return "ema" in self.prefix.lower()


def tensors_by_name(payload: Any, prefix: str = "") -> dict[str, Any]:
  """{dotted path: tensor} of every tensor in nested dicts / lists / tuples of `payload`."""
  if hasattr(payload, "detach"):
    return {prefix.removesuffix("."): payload}
  if isinstance(payload, Mapping):
    items = payload.items()
  elif isinstance(payload, (list, tuple)):
    items = enumerate(payload)
  else:
    return {}
  found = {}
  for key, value in items:
    found.update(tensors_by_name(value, f"{prefix}{key}."))
  return found


def find_copies(tensors: Mapping[str, Any]) -> list[Copy]:
  """Every copy of the network among `tensors` (see the module docstring), EMA copies first, then by prefix.

  A copy's state holds the tensors under its prefix, less those under a longer prefix of another copy (an EMA copy
  nested in the module of the raw one belongs to the EMA copy only).
  """
  prefixes = sorted({n[:-len(MARKER)] for n in tensors if n == MARKER or n.endswith("." + MARKER)})
  copies = []
  for prefix in prefixes:
    nested = [p for p in prefixes if p != prefix and p.startswith(prefix)]
    state = {n[len(prefix):]: v for n, v in tensors.items()
             if n.startswith(prefix) and not any(n.startswith(p) for p in nested)}
    copies.append(Copy(prefix, state))
  return sorted(copies, key=lambda c: (not c.is_ema, c.prefix))


def load_payload(path) -> Any:
  """The payload of a `torch.save` file, read with `weights_only=True`.

  Raises:
    ConfigError: the payload needs objects `weights_only=True` refuses (named); says how to proceed.
  """
  try:
    return torch_format.load_payload(path)
  except pickle.UnpicklingError as e:
    lines = [line.strip() for line in str(e).splitlines()]
    refused = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else "")
    raise ConfigError(
        f"{path}: this torch.save payload holds Python objects that a safe read (weights_only=True) refuses "
        f"({refused[:200]}); nothing in it was run. If you trust the file, extract its tensors where that is safe "
        "to do, e.g. torch.save(torch.load(f, weights_only=False)['state_dict'], 'elf_state.pt'), and load that "
        "file.") from e


def read_copies(path, payload: Any = None) -> list[Copy]:
  """The copies of the network in the `torch.save` file at `path` (or its already-read `payload`), EMA first.

  Raises:
    ConfigError: the payload needs objects `weights_only=True` refuses, or holds no copy of the network; the message
      says what was found and how to proceed.
  """
  tensors = tensors_by_name(load_payload(path) if payload is None else payload)
  copies = find_copies(tensors)
  if not copies:
    counts: dict[str, int] = {}
    for name in tensors:
      head = name.rsplit(".", 1)[0]
      counts[head] = counts.get(head, 0) + 1
    top = ", ".join(f"{k} ({v})" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:6])
    raise ConfigError(
        f"{path}: no ELF network among its {len(tensors)} tensors (none is named *{MARKER}); tensors by prefix: "
        f"{top or 'none'}. Rename the network's tensors to the ELF PyTorch names (elf_jax/weights/torch_format.py) "
        "under one prefix and save that state dict.")
  return copies


def describe(chosen: Copy, copies: list[Copy]) -> str:
  """One line saying which copy of the network was used, and which others were found."""
  others = [f"{c.prefix or '(no prefix)'} ({len(c.state)} tensors)" for c in copies if c is not chosen]
  kind = "the EMA copy" if chosen.is_ema else "a copy that is not named EMA (no EMA copy was found)"
  return (f"using {kind} under {chosen.prefix or '(no prefix)'!r} ({len(chosen.state)} tensors)"
          + (f"; also found {', '.join(others)}" if others else ""))
