"""Sampling and evaluation runs: `--mode=sample`, `--mode=eval`, and the periodic hook of the training loop.

Samples are drawn with the EMA parameters of the latest checkpoint (or `config.init_from`), decoded to text and
written to `DIR/samples/<name>.jsonl` (one `{"text", ...}` per line) and `DIR/samples/<name>.txt`. Scores (spec §8):
the synthetic language's exact Gen. PPL and entropy (offline default), GPT-2 Gen. PPL and entropy (OpenWebText),
BLEU / ROUGE (conditional tasks).

Multi-host: every process runs the same sampling and scoring over the whole mesh (the batch split over data × fsdp)
and holds every decoded sample; process 0 writes the files and prints.
"""
import dataclasses
import itertools
import json
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from elf_jax import checkpoint
from elf_jax import fs
from elf_jax import sample as sampling
from elf_jax import trajectory
from elf_jax.data import pipeline, sources
from elf_jax.model.elf import init_params
from elf_jax.parallel.mesh import num_batch_shards
from elf_jax.train import loop


def load_ema_params(setup: loop.Setup, workdir: str):
  """EMA parameters of the latest checkpoint in `workdir`, else of `config.init_from`; clear error if neither."""
  expected = jax.eval_shape(
      lambda: nn.unbox(init_params(setup.model, jax.random.PRNGKey(0), setup.config.data.max_length)))
  ckpt_dir = checkpoint.checkpoint_dir(workdir)
  for source in (workdir if ckpt_dir.is_dir() else None, setup.config.init_from or None):
    if source:
      return checkpoint.load_params_from(source, expected)
  raise FileNotFoundError(f"no checkpoint in {ckpt_dir} and no --config.init_from: train first "
                          "(--mode=train) or point --config.init_from at a published ELF checkpoint")


def _decode(tokenizer, ids: np.ndarray) -> list[str]:
  return [tokenizer.decode([int(i) for i in row], skip_special_tokens=True).strip() for row in ids]


def generate(setup: loop.Setup, params, num_samples: int, seed: int, sample_config: sampling.SampleConfig | None = None,
             conditions: dict[str, np.ndarray] | None = None) -> dict[str, list]:
  """Draws `num_samples` samples (rounded up to whole batches, then cut) and decodes them.

  conditions: for conditional tasks, a batch-major dict of `ids`, `valid`, `cond_mask` (N, S) of the first N
  examples of the evaluation split (`eval_conditions`) whose condition parts are encoded and kept clean; the target
  parts are ignored. At most N samples are drawn, one per example.
  Returns {"texts": [...], "ids": [...]} (+ "conditions" (the decoded condition ids) and "references" (the raw
  target texts of the examples, `held_out_texts`) for conditional tasks, and "first" = the SampleOutput of the
  first batch with its condition mask when the sampler keeps trajectories), the same on every process.
  """
  config, mesh = setup.config, setup.mesh
  if conditions is not None:
    num_samples = min(num_samples, len(conditions["ids"]))
  sc = sample_config or sampling.SampleConfig.from_config(config, eos_id=setup.tokenizer.eos_token_id,
                                                         pad_id=setup.tokenizer.pad_token_id)
  sampler = sampling.make_sampler(setup.model, sc, mesh)
  shards = num_batch_shards(mesh)
  batch = max(shards, config.sample.batch_size // shards * shards)
  s, c = config.data.max_length, setup.encoder.dim
  encode = jax.jit(lambda p, ids, valid, cm: setup.encoder.encode(p, ids, valid, cm))
  texts, ids_out = [], []
  for b in range(math.ceil(num_samples / batch)):
    cond = None
    if conditions is not None:
      part = {k: _take_rows(v, b * batch, batch) for k, v in conditions.items()}
      latents = encode(setup.encoder_params, part["ids"], part["valid"], part["cond_mask"])
      cond = {"latents": jnp.where(part["cond_mask"][..., None], latents, 0.0), "mask": jnp.asarray(part["cond_mask"])}
    out = sampling.sample_from_seed(sampler, params, jax.random.fold_in(jax.random.PRNGKey(seed), b), sc, batch=batch,
                                    seq_len=s, latent_dim=c, mesh=mesh, cond=cond)
    if b == 0 and sc.return_trajectory:  # on every process, as numpy (the batch may span processes)
      first = (multihost_utils.process_allgather(out, tiled=True), None if cond is None else np.asarray(cond["mask"]))
    ids = multihost_utils.process_allgather(out.ids, tiled=True)
    ids_out.extend(ids.tolist())
    texts.extend(_decode(setup.tokenizer, ids))
  result = {"texts": texts[:num_samples], "ids": ids_out[:num_samples]}
  if sc.return_trajectory:
    result["first"] = first
  if conditions is not None:
    ids, cm = conditions["ids"][:num_samples], conditions["cond_mask"][:num_samples]
    result["conditions"] = _decode(setup.tokenizer, np.where(cm, ids, setup.tokenizer.pad_token_id))
    result["references"] = held_out_texts(setup, num_samples, field="output")
  return result


def _take_rows(x: np.ndarray, start: int, n: int) -> np.ndarray:
  """Rows [start, start + n) of x, wrapping around so that the last batch is full."""
  return x[np.arange(start, start + n) % len(x)]


def eval_conditions(setup: loop.Setup, num: int) -> dict[str, np.ndarray] | None:
  """The first `num` examples of the evaluation split (conditional tasks), unshuffled; None if unconditional."""
  config = setup.config
  if not config.data.conditional:
    return None
  ds = pipeline.make_dataset(config, setup.tokenizer, config.data.eval_split, language=setup.language, shuffle=False,
                             num_epochs=1, drop_remainder=False, batch_size=config.sample.batch_size)
  rows: dict[str, list] = {}
  for batch in ds:
    for k, v in batch.items():
      rows.setdefault(k, []).append(v)
    if sum(len(v) for v in rows["ids"]) >= num:
      break
  return {k: np.concatenate(v)[:num] for k, v in rows.items()}


def held_out_texts(setup: loop.Setup, num: int, field: str = "text") -> list[str]:
  """The raw `field` ("text"; conditional: "input" / "output") of the first `num` records of the evaluation split.

  Text fields are returned as stored (the references of BLEU / ROUGE are the dataset's target text, as in the
  official evaluation, not a re-decoding of truncated target ids); pre-tokenized fields are decoded with the
  tokenizer, special tokens skipped.
  """
  source = sources.make_source(setup.config.data, setup.config.data.eval_split, setup.language)
  values = [source[i][field] for i in range(min(num, len(source)))]
  return [v if isinstance(v, str) else _decode(setup.tokenizer, [v])[0] for v in values]


def score(setup: loop.Setup, result: dict[str, list]) -> dict[str, float]:
  """Spec §8 scores of decoded samples: exact (synthetic language), GPT-2 Gen. PPL, or BLEU / ROUGE.

  Gen. PPL and entropy drop empty samples first and report how many as `num_empty` (the official protocol);
  BLEU / ROUGE score every sample against its reference.
  """
  from elf_jax.eval import gen_ppl
  config, texts = setup.config, result["texts"]
  if config.data.conditional:
    from elf_jax.eval import text_metrics
    return {"bleu": text_metrics.bleu(texts, result["references"]),
            **text_metrics.rouge(texts, result["references"])}
  if setup.language is None:
    scorer = gen_ppl.GenPPLScorer.from_pretrained(config.eval.gpt2, batch_size=config.eval.batch_size,
                                                  mesh=setup.mesh)
    return scorer.score(texts)
  kept = gen_ppl.nonempty(texts)
  true = setup.language.gen_ppl_and_entropy(held_out_texts(setup, len(texts)))
  figures = setup.language.gen_ppl_and_entropy(kept) if kept else {"gen_ppl": math.nan, "entropy": math.nan}
  return {**figures, "num_empty": len(texts) - len(kept), "true_gen_ppl": true["gen_ppl"],
          "true_entropy": true["entropy"], "gen_ppl_ratio": figures["gen_ppl"] / true["gen_ppl"],
          "entropy_ratio": figures["entropy"] / true["entropy"]}


def parse_sweep(spec: str) -> list[dict[str, Any]]:
  """'guidance_scale=1,2;steps=16,32' → every combination as SampleConfig overrides (values cast to the field type)."""
  types = {f.name: f.type for f in dataclasses.fields(sampling.SampleConfig)}
  axes = []
  for part in filter(None, (p.strip() for p in spec.split(";"))):
    name, _, values = part.partition("=")
    name = name.strip()
    if name not in types or not values:
      raise ValueError(f"eval.sweep entry {part!r}: expected FIELD=v1,v2 with FIELD one of {sorted(types)}")
    kind = types[name] if isinstance(types[name], str) else types[name].__name__
    cast = {"int": int, "float": float, "str": str, "bool": lambda v: v.lower() in ("1", "true")}[kind]
    axes.append([(name, cast(v.strip())) for v in values.split(",")])
  return [dict(combo) for combo in itertools.product(*axes)]


def frontier(setup: loop.Setup, params, workdir: str, writer: loop.MetricsWriter) -> list[dict[str, Any]]:
  """Scores every sampling setting of `config.eval.sweep` and plots Gen. PPL against entropy (DIR/frontier.png) and,
  when the sweep varies `steps`, Gen. PPL and entropy against steps (DIR/steps.png). Under the `fewstep` preset each
  step count gets its own few-step settings (a distilled student, spec §11)."""
  config = setup.config
  few_step = config.sample.preset == sampling.FEW_STEP_PRESET
  rows = []
  for overrides in parse_sweep(config.eval.sweep):
    if few_step and "steps" in overrides:
      overrides = {**sampling.few_step_settings(overrides["steps"]), **overrides}
    sc = sampling.SampleConfig.from_config(config, eos_id=setup.tokenizer.eos_token_id,
                                           pad_id=setup.tokenizer.pad_token_id, **overrides)
    result = generate(setup, params, config.sample.num_samples, config.seed, sample_config=sc)
    row = {**overrides, **score(setup, result)}
    writer.write(0, row, kind="frontier")
    rows.append(row)
    loop.say(format_table(row))
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4.5))
  ax.plot([r["entropy"] for r in rows], [r["gen_ppl"] for r in rows], "o")
  for r in rows:
    label = ", ".join(f"{k}={r[k]}" for k in parse_sweep(config.eval.sweep)[0])
    ax.annotate(label, (r["entropy"], r["gen_ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
  if "true_gen_ppl" in rows[0]:
    ax.plot([rows[0]["true_entropy"]], [rows[0]["true_gen_ppl"]], "r*", markersize=12, label="true text")
    ax.legend()
  ax.set_xlabel("entropy (nats)")
  ax.set_ylabel("Gen. PPL")
  ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.set_title("quality / diversity frontier")
  fig.tight_layout()
  if jax.process_index() == 0:
    path = fs.savefig(fig, fs.path(workdir) / "frontier.png", dpi=120)
    loop.say(f"frontier plot: {path}")
  plt.close(fig)
  axes = list(parse_sweep(config.eval.sweep)[0])
  if "steps" in axes and jax.process_index() == 0:
    loop.say(f"steps plot: {plot_against_steps(rows, [a for a in axes if a != 'steps'], workdir)}")
  return rows


def plot_against_steps(rows: list[dict[str, Any]], other_axes: list[str], workdir: str) -> str:
  """Gen. PPL and entropy of sweep `rows` against their `steps` (DIR/steps.png), one line per setting of
  `other_axes`, with the true text's figures as dashed lines when known. Returns the path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  lines: dict[tuple, list[dict[str, Any]]] = {}
  for r in rows:
    lines.setdefault(tuple((k, r[k]) for k in other_axes), []).append(r)
  fig, panels = plt.subplots(1, 2, figsize=(10, 4))
  for panel, key, name in zip(panels, ("gen_ppl", "entropy"), ("Gen. PPL", "entropy (nats)")):
    for setting, line in lines.items():
      line = sorted(line, key=lambda r: r["steps"])
      panel.plot([r["steps"] for r in line], [r[key] for r in line], "o-",
                 label=", ".join(f"{k}={v}" for k, v in setting) or None)
    if f"true_{key}" in rows[0]:
      panel.axhline(rows[0][f"true_{key}"], color="r", linestyle="--", label="true text")
    panel.set_xscale("log", base=2)
    panel.set_xticks(sorted({r["steps"] for r in rows}), [str(s) for s in sorted({r["steps"] for r in rows})])
    panel.set_xlabel("sampling steps")
    panel.set_ylabel(name)
    panel.grid(alpha=0.3)
    panel.legend(fontsize=7)
  panels[0].set_yscale("log")
  fig.tight_layout()
  path = fs.savefig(fig, fs.path(workdir) / "steps.png", dpi=120)
  plt.close(fig)
  return path


def write_samples(workdir: str, name: str, result: dict[str, list]) -> str:
  """DIR/samples/<name>.jsonl (one record per sample) and <name>.txt (the texts, one per line), written by process
  0 only (every process holds the same `result`); returns the .jsonl path."""
  out_dir = fs.path(workdir) / "samples"
  path = out_dir / f"{name}.jsonl"
  if jax.process_index() == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = [k for k in ("texts", "conditions", "references", "ids") if k in result]
    path.write_text("".join(json.dumps({k.rstrip("s") if k != "ids" else "ids": result[k][i] for k in keys}) + "\n"
                            for i in range(len(result["texts"]))))
    (out_dir / f"{name}.txt").write_text("\n".join(result["texts"]) + "\n", encoding="utf-8")
  return str(path)


def read_samples(path: str) -> dict[str, list]:
  """Reads a samples JSONL written by `write_samples` (or any JSONL with a "text" field per line)."""
  if not fs.path(path).exists():
    raise FileNotFoundError(f"samples file {path!r} (config.eval.samples_path) does not exist")
  rows = [json.loads(line) for line in fs.path(path).read_text().split("\n") if line.strip()]
  if not rows or "text" not in rows[0]:
    raise ValueError(f"{path!r} holds no JSON lines with a 'text' field")
  result = {"texts": [r["text"] for r in rows]}
  if "reference" in rows[0]:
    result["references"] = [r["reference"] for r in rows]
  return result


def _print_samples(texts: list[str], n: int = 8):
  loop.say("\n".join(f"  [{i}] {t}" for i, t in enumerate(texts[:n])))


def training_hook(setup: loop.Setup, workdir: str, state, step: int, writer: loop.MetricsWriter, final: bool):
  """Periodic (and final) sampling + evaluation with the EMA parameters during training: every process samples
  its part of the mesh; process 0 writes and prints."""
  config = setup.config
  num = config.sample.num_samples
  result = generate(setup, state.ema_params, num, config.seed, conditions=eval_conditions(setup, num))
  name = f"step_{step}"
  path = write_samples(workdir, name, result)
  metrics = score(setup, result)
  writer.write(step, metrics, kind="eval")
  loop.say(f"\nSamples at step {step} ({path}):")
  _print_samples(result["texts"])
  loop.say(format_table({"step": step, **metrics}))


def format_table(metrics: dict[str, Any]) -> str:
  width = max(len(k) for k in metrics)
  lines = [f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}" for k, v in metrics.items()]
  return "\n".join(lines)


def sample_mode(config: ml_collections.ConfigDict, workdir: str) -> str:
  """--mode=sample: draws config.sample.num_samples samples with the EMA parameters and writes them."""
  setup = loop.build(config, workdir)
  params = load_ema_params(setup, workdir)
  num = config.sample.num_samples
  result = generate(setup, params, num, config.seed, conditions=eval_conditions(setup, num))
  s = sampling.apply_preset(config.sample)
  name = f"sample_{s.method}{s.steps}_w{s.guidance_scale:g}_seed{config.seed}"
  path = write_samples(workdir, name, result)
  loop.say(f"wrote {len(result['texts'])} samples to {path}")
  _print_samples(result["texts"])
  if config.sample.save_trajectory and jax.process_index() == 0:  # decoded and written by one process
    out, cond_mask = result["first"]
    n = min(8, out.ids.shape[0])
    out = out._replace(latents=out.latents[:n], ids=out.ids[:n], raw_ids=out.raw_ids[:n],
                       trajectory=out.trajectory[:, :n], trajectory_t=out.trajectory_t[:, :n])
    paths = trajectory.render_trajectory(
        fs.path(workdir) / "samples", params, setup.model, out, setup.tokenizer, guidance_scale=s.guidance_scale,
        cond_mask=None if cond_mask is None else cond_mask[:n], eos_id=setup.tokenizer.eos_token_id,
        pad_id=setup.tokenizer.pad_token_id, png=True,
        max_target_length=sampling.SampleConfig.from_config(config).max_target_length)
    loop.say(f"denoising trajectory of {n} samples: {paths['html']}")
  return path


def eval_mode(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """--mode=eval: scores `config.eval.samples_path`, or samples `eval.num_seeds` times from the checkpoint and
  reports mean ± std over seeds; appends to DIR/metrics.jsonl."""
  setup = loop.build(config, workdir)
  writer = loop.MetricsWriter(workdir, tensorboard=False)
  if config.eval.samples_path:
    runs = [score(setup, read_samples(config.eval.samples_path))]
  else:
    params = load_ema_params(setup, workdir)
    num = config.sample.num_samples
    conditions = eval_conditions(setup, num)
    runs = []
    for i in range(config.eval.num_seeds):
      result = generate(setup, params, num, config.seed + i, conditions=conditions)
      write_samples(workdir, f"eval_seed{config.seed + i}", result)
      runs.append(score(setup, result))
  keys = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
  summary = {k: float(np.mean([r[k] for r in runs])) for k in keys}
  summary.update({f"{k}_std": float(np.std([r[k] for r in runs])) for k in keys})
  summary["num_seeds"] = len(runs)
  writer.write(0, summary, kind="eval")
  loop.say(f"evaluation over {len(runs)} seed(s), mean ± std:")
  loop.say(format_table({k: f"{summary[k]:.4f} ± {summary[k + '_std']:.4f}" for k in keys}))
  if config.eval.sweep:
    summary["frontier"] = frontier(setup, load_ema_params(setup, workdir), workdir, writer)
  loop.say(f"eval over {len(runs)} seed(s) appended to {writer.path}")
  return summary
