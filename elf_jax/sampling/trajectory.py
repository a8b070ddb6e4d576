"""Denoising-trajectory view: decode the x̂ of every sampling step into text, as the paper's trajectory figure does.

Each step's x̂ (from `sample(..., return_trajectory=True)`) is decoded like a finished sample: input
concat[x̂, 0], t = 1, the run's guidance scale on the guidance tokens, mode tokens on, argmax; then the same
post-processing as the sampler (condition stripped, everything from the first EOS on → pad). A last row holds the
final sample. Outputs: JSONL (one line per row: {"step", "t", "texts"}), a self-contained HTML page (one table per
sample, one row per step with t and the text; tokens that changed since the previous row highlighted) and
optionally a PNG text table (matplotlib).
"""
import dataclasses
import html
import json

import jax
import jax.numpy as jnp
import numpy as np

from elf_jax import fs
from elf_jax.sampling import sampler


def decode_trajectory(params, model, trajectory: jax.Array, guidance_scale, mask: jax.Array | None = None
                      ) -> jax.Array:
  """Argmax token ids (steps, B, S) int32 of every step's x̂ in `trajectory` (steps, B, S, C) (decode=True, t = 1)."""
  batch = trajectory.shape[1]
  w = jnp.broadcast_to(jnp.asarray(guidance_scale, jnp.float32), (batch,))

  @jax.jit
  def decode_all(params, trajectory, w, mask):
    def one(x_hat):
      x = jnp.concatenate([x_hat, jnp.zeros_like(x_hat)], -1)
      return jnp.argmax(model.apply({"params": params}, x, jnp.ones((batch,)), w, mask, decode=True), -1)
    return jax.lax.map(one, trajectory).astype(jnp.int32)

  return decode_all(params, trajectory, w, mask)


@dataclasses.dataclass
class TrajectoryView:
  """Rows of a trajectory: times (rows, B), labels (rows,), final token ids (rows, B, S) (pad_id = nothing),
  texts[row][b] (decoded strings) and tokens[row][b] (one display string per non-pad position)."""
  times: np.ndarray
  labels: list[str]
  ids: np.ndarray
  texts: list[list[str]]
  tokens: list[list[list[str]]]
  pad_id: int


def build_view(step_ids, step_times, final_ids, tokenizer, *, cond_mask=None, mask=None, eos_id: int, pad_id: int,
               max_target_length: int = 0) -> TrajectoryView:
  """Post-processes raw per-step ids (steps, B, S) like the sampler and decodes them with a Hugging Face tokenizer.

  step_times (steps, B): the time of each step's x̂; final_ids (B, S): the sampler's `ids` (added as the last row,
  t = 1).
  """
  finalize = lambda ids: np.asarray(sampler.finalize_ids(ids, cond_mask, mask, eos_id=eos_id, pad_id=pad_id,
                                                          max_target_length=max_target_length))
  ids = np.concatenate([np.stack([finalize(s) for s in step_ids]), np.asarray(final_ids)[None]], 0)
  times = np.concatenate([np.asarray(step_times, np.float64), np.ones((1, ids.shape[1]))], 0)
  labels = [str(i) for i in range(len(step_ids))] + ["final"]
  texts, tokens = [], []
  for row in ids:
    kept = [[int(i) for i in seq if i != pad_id] for seq in row]
    texts.append([tokenizer.decode(k, skip_special_tokens=True) for k in kept])
    tokens.append([[tokenizer.decode([i]) for i in k] for k in kept])
  return TrajectoryView(times, labels, ids, texts, tokens, pad_id)


def _time_value(times_row: np.ndarray):
  """One float when every example shares the time (one grid per batch), else the per-example list."""
  return float(times_row[0]) if np.all(times_row == times_row[0]) else [float(t) for t in times_row]


def write_jsonl(path: str, view: TrajectoryView) -> str:
  """One line per row: {"step": label, "t": float or per-example list, "texts": [text of each example]}."""
  fs.path(path).write_text("".join(json.dumps({"step": label, "t": _time_value(times), "texts": texts}) + "\n"
                                   for label, times, texts in zip(view.labels, view.times, view.texts)))
  return str(path)


_STYLE = ("body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin-bottom:2em}"
          "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}"
          "td.t{font-family:monospace;white-space:nowrap}span.chg{background:#ffd84d}")


def write_html(path: str, view: TrajectoryView, title: str = "ELF denoising trajectory") -> str:
  """A self-contained page: one table per example, one row per step (t, text); changed tokens highlighted."""
  parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
  for b in range(view.ids.shape[1]):
    parts.append(f"<h2>Sample {b}</h2><table><tr><th>step</th><th>t</th><th>text</th></tr>")
    prev = None
    for r, label in enumerate(view.labels):
      row = view.ids[r, b]
      positions = [j for j in range(row.shape[0]) if row[j] != view.pad_id]
      spans = []
      for tok, j in zip(view.tokens[r][b], positions):
        cls = " class='chg'" if prev is not None and prev[j] != row[j] else ""
        spans.append(f"<span{cls}>{html.escape(tok)}</span>")
      parts.append(f"<tr><td class='t'>{html.escape(label)}</td><td class='t'>{view.times[r, b]:.3f}</td>"
                   f"<td>{' '.join(spans)}</td></tr>")
      prev = row
    parts.append("</table>")
  parts.append("</body></html>")
  fs.path(path).write_text("".join(parts), encoding="utf-8")
  return str(path)


def write_png(path: str, view: TrajectoryView, example: int = 0, max_chars: int = 100) -> str:
  """A matplotlib text table of one example's rows (step, t, text truncated to `max_chars`)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  cells = [[label, f"{view.times[r, example]:.3f}", view.texts[r][example][:max_chars]]
           for r, label in enumerate(view.labels)]
  fig, ax = plt.subplots(figsize=(12, 0.3 * len(cells) + 0.6))
  ax.axis("off")
  table = ax.table(cellText=cells, colLabels=["step", "t", "text"], colWidths=[0.06, 0.08, 0.86], loc="center",
                   cellLoc="left")
  table.auto_set_font_size(False)
  table.set_fontsize(8)
  for (_, col), cell in table.get_celld().items():
    if col == 2:
      cell.PAD = 0.01  # matplotlib pads by a fraction of the cell's width: keep the wide text column flush left
  path = fs.savefig(fig, path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return path


def render_trajectory(out_dir: str, params, model, output: sampler.SampleOutput, tokenizer, *, guidance_scale,
                      cond_mask=None, mask=None, eos_id: int, pad_id: int, max_target_length: int = 0,
                      png: bool = False) -> dict[str, str]:
  """Decodes `output.trajectory` and writes trajectory.jsonl, trajectory.html (and trajectory.png) to `out_dir`.

  `output` must come from a sampler run with return_trajectory=True; guidance_scale, cond_mask, mask and
  max_target_length are the run's. Returns {"jsonl": path, "html": path[, "png": path]}.
  """
  if output.trajectory is None:
    raise ValueError("the sample output has no trajectory: sample with return_trajectory=True "
                     "(config.sample.save_trajectory=True)")
  step_ids = decode_trajectory(params, model, output.trajectory, guidance_scale, mask)
  view = build_view(np.asarray(step_ids), np.asarray(output.trajectory_t), output.ids, tokenizer,
                    cond_mask=cond_mask, mask=mask, eos_id=eos_id, pad_id=pad_id, max_target_length=max_target_length)
  out_dir = fs.path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = {"jsonl": write_jsonl(out_dir / "trajectory.jsonl", view),
           "html": write_html(out_dir / "trajectory.html", view)}
  if png:
    paths["png"] = write_png(out_dir / "trajectory.png", view)
  return paths
