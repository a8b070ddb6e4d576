"""Figures of a run, written next to its metrics: DIR/loss_curve.png, DIR/frontier.png, DIR/steps.png."""
from typing import Any

from elf_jax import fs, report


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _log_panel(ax, xlabel: str, ylabel: str, title: str = "") -> None:
  """Labels, a log y axis and a light grid."""
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_yscale("log")
  ax.grid(alpha=0.3)
  if title:
    ax.set_title(title)


def _save(fig, workdir: str, name: str) -> str:
  """Writes DIR/<name> (local or gs://), closes the figure, returns the path."""
  fig.tight_layout()
  out = fs.savefig(fig, fs.path(workdir) / name, dpi=120)
  _pyplot().close(fig)
  return out


def loss_curve(workdir: str) -> str | None:
  """DIR/loss_curve.png from the train rows of DIR/metrics.jsonl (loss and its two branches, log scale); returns
  the path, None when there are no train rows."""
  rows = report.read_metrics(workdir, kind="train")
  if not rows:
    return None
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  steps = [r["step"] for r in rows]
  for key in ("loss", "denoise_loss", "decode_loss"):
    ax.plot(steps, [r.get(key, float("nan")) for r in rows], label=key)
  ax.legend()
  _log_panel(ax, "optimizer step", "loss", "ELF training loss")
  return _save(fig, workdir, "loss_curve.png")


def frontier(rows: list[dict[str, Any]], axes: list[str], workdir: str) -> str:
  """DIR/frontier.png: Gen. PPL (log) against entropy, one point per sweep row labelled by its `axes` values, and
  the true text's point when the rows carry it. Returns the path."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4.5))
  ax.plot([r["entropy"] for r in rows], [r["gen_ppl"] for r in rows], "o")
  for r in rows:
    label = ", ".join(f"{k}={r[k]}" for k in axes)
    ax.annotate(label, (r["entropy"], r["gen_ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
  if "true_gen_ppl" in rows[0]:
    ax.plot([rows[0]["true_entropy"]], [rows[0]["true_gen_ppl"]], "r*", markersize=12, label="true text")
    ax.legend()
  _log_panel(ax, "entropy (nats)", "Gen. PPL", "quality / diversity frontier")
  return _save(fig, workdir, "frontier.png")


def against_steps(rows: list[dict[str, Any]], other_axes: list[str], workdir: str) -> str:
  """DIR/steps.png: Gen. PPL and entropy of sweep `rows` against their `steps`, one line per setting of
  `other_axes`, with the true text's figures as dashed lines when known. Returns the path."""
  plt = _pyplot()
  lines: dict[tuple, list[dict[str, Any]]] = {}
  for r in rows:
    lines.setdefault(tuple((k, r[k]) for k in other_axes), []).append(r)
  steps = sorted({r["steps"] for r in rows})
  fig, panels = plt.subplots(1, 2, figsize=(10, 4))
  for panel, key, name in zip(panels, ("gen_ppl", "entropy"), ("Gen. PPL", "entropy (nats)")):
    for setting, line in lines.items():
      line = sorted(line, key=lambda r: r["steps"])
      panel.plot([r["steps"] for r in line], [r[key] for r in line], "o-",
                 label=", ".join(f"{k}={v}" for k, v in setting) or None)
    if f"true_{key}" in rows[0]:
      panel.axhline(rows[0][f"true_{key}"], color="r", linestyle="--", label="true text")
    panel.set_xscale("log", base=2)
    panel.set_xticks(steps, [str(s) for s in steps])
    panel.set_xlabel("sampling steps")
    panel.set_ylabel(name)
    panel.grid(alpha=0.3)
    panel.legend(fontsize=7)
  panels[0].set_yscale("log")
  return _save(fig, workdir, "steps.png")
