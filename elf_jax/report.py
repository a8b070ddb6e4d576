"""What a run tells a person: console lines (process 0 only), metric tables, and DIR/metrics.jsonl + TensorBoard.

Library logs stay at WARNING unless `--verbosity` is given, so these lines are the run's progress output.
"""
import json
from typing import Any

import jax
import numpy as np

from elf_jax import fs


class RunStopped(RuntimeError):
  """A fault the run cannot continue past (divergence, a failed save, a workdir held by another run); the message is
  one line naming the cause and the fix, which `elf_jax.main` prints before exiting with status 1."""


def say(message: str) -> None:
  """Prints `message` on process 0 (every process of a multi-host run computes the same thing)."""
  if jax.process_index() == 0:
    print(message, flush=True)


def format_table(metrics: dict[str, Any]) -> str:
  """One `  name  value` line per metric, floats with 4 decimals."""
  width = max(len(k) for k in metrics)
  return "\n".join(f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}"
                   for k, v in metrics.items())


def print_samples(texts: list[str], n: int = 8) -> None:
  """The first `n` texts, numbered."""
  say("\n".join(f"  [{i}] {t}" for i, t in enumerate(texts[:n])))


def python_value(v):
  """A numpy / jax scalar or array as a JSON-able Python number or list."""
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


class MetricsWriter:
  """DIR/metrics.jsonl (always; one {"step", "kind", ...} object per line), TensorBoard event files in DIR/tb
  (`tensorboard=True`) and a Weights & Biases run (`wandb_project`, e.g. config.logging.wandb_project; its local
  files in DIR/wandb, or the current directory for a gs:// workdir), written by process 0 only."""

  def __init__(self, workdir: str, tensorboard: bool, wandb_project: str | None = None, run_config: dict | None = None):
    self.active = jax.process_index() == 0
    self.path = str(fs.path(workdir) / "metrics.jsonl")
    self.tb = self.wandb = None
    if self.active and tensorboard:
      import tensorboardX  # optional at import time: only the writer needs it (it writes gs:// itself)
      self.tb = tensorboardX.SummaryWriter(str(fs.path(workdir) / "tb"))
    if self.active and wandb_project:
      try:
        import wandb  # pylint: disable=import-outside-toplevel
      except ImportError as e:
        raise ImportError("logging.wandb_project is set but wandb is not installed: pip install 'elf_jax[wandb]' "
                          "(or --config.logging.wandb_project='')") from e
      self.wandb = wandb.init(project=wandb_project, config=run_config, dir=None if fs.is_remote(workdir) else workdir)

  def write(self, step: int, metrics: dict[str, Any], kind: str = "train"):
    """Appends one row; `kind` is train | eval | frontier (also the TensorBoard / W&B prefix)."""
    if not self.active:
      return
    row = {"step": int(step), "kind": kind, **{k: python_value(v) for k, v in metrics.items()}}
    fs.append_text(self.path, json.dumps(row) + "\n")
    scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step" and np.isfinite(v)}
    if self.tb is not None:
      for k, v in scalars.items():
        self.tb.add_scalar(f"{kind}/{k}", v, step)
      self.tb.flush()
    if self.wandb is not None:  # W&B steps must grow; eval rows may repeat a step, so it is logged as a value
      self.wandb.log({**{f"{kind}/{k}": v for k, v in scalars.items()}, f"{kind}/step": row["step"]})

  def drop_after(self, step: int, kinds=("train", "eval")) -> None:
    """Removes the rows of `kinds` logged after `step`: a run resumed from `step` logs those steps again, so the
    file keeps one row per step (one curve in a plot)."""
    path = fs.path(self.path)
    if not self.active or not path.exists():
      return
    lines = path.read_text().splitlines(keepends=True)
    keep = [line for line in lines if not _logged_after(line, step, kinds)]
    if len(keep) < len(lines):
      fs.replace_text(path, "".join(keep))

  def close(self):
    if self.tb is not None:
      self.tb.close()
    if self.wandb is not None:
      self.wandb.finish()


def _logged_after(line: str, step: int, kinds) -> bool:
  try:
    row = json.loads(line)
  except json.JSONDecodeError:  # a line cut by a kill mid-write is dropped too
    return bool(line.strip())
  return row.get("kind") in kinds and row.get("step", 0) > step


def read_metrics(workdir: str, kind: str | None = None) -> list[dict[str, Any]]:
  """The rows of DIR/metrics.jsonl (of one `kind` if given); [] when there is no file."""
  path = fs.path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [r for r in rows if kind is None or r.get("kind") == kind]
