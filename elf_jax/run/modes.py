"""The sampling and evaluation modes of `elf_jax.main` (`--mode=sample`, `--mode=eval`), and the training
loop's sample/eval hook.

What each writes and reads: docs/running.md#sample-and-eval-modes.
"""
import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np

from elf_jax import fs, report
from elf_jax.config import SAMPLE_PRESET_FIELDS, parse_sweep
from elf_jax.eval import plots
from elf_jax.run import api, experiment
from elf_jax.run import generate as gen
from elf_jax.sampling import sampler
from elf_jax.sampling.files import read_samples, write_samples

TRAJECTORY_EXAMPLES = 8  # samples whose denoising trajectory --mode=sample renders


@dataclasses.dataclass(frozen=True)
class EvalSummary:
  """--mode=eval's result: mean and std over seeds of every numeric score, and the sweep's rows (one dict of
  settings and scores per sampling setting; empty without `eval.sweep`)."""
  mean: dict[str, float]
  std: dict[str, float]
  num_seeds: int
  frontier: list[dict[str, Any]]


def sample_mode(config: ml_collections.ConfigDict, workdir: str) -> str:
  """--mode=sample: draws config.sample.num_samples samples with the EMA parameters and writes them; returns the
  samples file's path."""
  exp = experiment.build(config, workdir)
  params = exp.load_ema_params(workdir)
  sc = exp.sample_config()
  name = f"sample_{sc.method}{sc.steps}_w{sc.guidance_scale:g}_seed{config.seed}"
  if config.sample.inputs:  # the user's texts: one output per input, in order
    texts = api.read_inputs(config.sample.inputs)
    samples = api.answer_inputs(exp, params, texts, config.seed)
    path = write_samples(workdir, f"inputs_{name}", samples)
    report.say(f"wrote {len(samples.texts)} outputs, one per input, to {path}")
    return path
  num = config.sample.num_samples
  result = gen.generate(exp, params, num, config.seed, conditions=gen.eval_conditions(exp, num))
  path = write_samples(workdir, name, result.samples)
  report.say(f"wrote {len(result.samples.texts)} samples to {path}")
  report.print_samples(result.samples.texts)
  if result.first_batch is not None and jax.process_index() == 0:  # decoded and written by one process
    _render_trajectory(exp, params, result, workdir, sc)
  return path


def _render_trajectory(exp: experiment.Experiment, params, result: gen.Generation, workdir: str,
                       sc: sampler.SampleConfig) -> None:
  paths = gen.render_first_batch(exp, params, result, fs.path(workdir) / "samples", sc, TRAJECTORY_EXAMPLES)
  report.say(f"denoising trajectory of the first samples: {paths['html']}")


def eval_mode(config: ml_collections.ConfigDict, workdir: str) -> EvalSummary:
  """--mode=eval: the scores over seeds (`evaluate`), then, with `eval.sweep`, the sweep of sampling settings
  (`frontier`); both append to DIR/metrics.jsonl."""
  exp = experiment.build(config, workdir)
  writer = report.MetricsWriter(workdir, tensorboard=False)
  params = None if config.eval.samples_path else exp.load_ema_params(workdir)
  summary = evaluate(exp, params, workdir, writer)
  if config.eval.sweep:
    params = exp.load_ema_params(workdir) if params is None else params
    summary = dataclasses.replace(summary, frontier=frontier(exp, params, workdir, writer))
  report.say(f"eval over {summary.num_seeds} seed(s) appended to {writer.path}")
  return summary


def evaluate(exp: experiment.Experiment, params, workdir: str, writer: report.MetricsWriter) -> EvalSummary:
  """Scores `eval.samples_path`, or samples `eval.num_seeds` times with `params` and scores each draw; writes and
  prints the mean ± std over seeds."""
  config = exp.config
  if config.eval.samples_path:
    runs = [gen.score(exp, read_samples(config.eval.samples_path))]
  else:
    num = config.sample.num_samples
    conditions = gen.eval_conditions(exp, num)
    runs = []
    for i in range(config.eval.num_seeds):
      scored = gen.generate_and_score(exp, params, num, config.seed + i, conditions=conditions)
      _write(workdir, f"eval_seed{config.seed + i}", scored)
      runs.append(scored.metrics)
  keys = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
  summary = EvalSummary(mean={k: float(np.mean([r[k] for r in runs])) for k in keys},
                        std={k: float(np.std([r[k] for r in runs])) for k in keys}, num_seeds=len(runs), frontier=[])
  writer.write(0, {**summary.mean, **{f"{k}_std": v for k, v in summary.std.items()}, "num_seeds": len(runs)},
               kind="eval")
  report.say(f"evaluation over {len(runs)} seed(s), mean ± std:")
  report.say(report.format_table({k: f"{summary.mean[k]:.4f} ± {summary.std[k]:.4f}" for k in keys}))
  return summary


def training_hook(exp: experiment.Experiment, workdir: str, state, step: int, writer: report.MetricsWriter,
                  final: bool) -> None:
  """Periodic (and final) sampling + scores with the EMA parameters during training: every process samples its
  part of the mesh; process 0 writes and prints."""
  del final  # the same at the end of training as in between
  num = exp.config.sample.num_samples
  scored = gen.generate_and_score(exp, state.ema_params, num, exp.config.seed, conditions=gen.eval_conditions(exp, num))
  path = _write(workdir, f"step_{step}", scored)
  writer.write(step, scored.metrics, kind="eval")
  report.say(f"\nSamples at step {step} ({path}):")
  report.print_samples(scored.samples.texts)
  report.say(report.format_table({"step": step, **scored.metrics}))


def _write(workdir: str, name: str, scored: gen.Scored) -> str:
  """Writes the samples as DIR/samples/<name>.* (and the MBR choices as <name>_mbr.*); returns the first path."""
  if scored.mbr_samples is not None:
    write_samples(workdir, f"{name}_mbr", scored.mbr_samples)
  return write_samples(workdir, name, scored.samples)


def frontier(exp: experiment.Experiment, params, workdir: str, writer: report.MetricsWriter) -> list[dict[str, Any]]:
  """Scores every sampling setting of `config.eval.sweep` (every score of `generate.generate_and_score`: diversity,
  MAUVE and MBR too) and plots Gen. PPL against entropy (DIR/frontier.png) and, when the sweep varies `steps`, Gen.
  PPL and entropy against steps (DIR/steps.png). `sample.preset` fills what a sweep point and the config leave unset
  (under `fewstep`, each step count gets its own few-step settings, docs/method.md#distillation). Returns one row per
  setting: the sampling settings used (SAMPLE_PRESET_FIELDS) and the scores."""
  config = exp.config
  settings = parse_sweep(config.eval.sweep)
  axes = list(settings[0])
  conditions = gen.eval_conditions(exp, config.sample.num_samples)
  rows = []
  for overrides in settings:
    sc = exp.sample_config(**overrides)
    scored = gen.generate_and_score(exp, params, config.sample.num_samples, config.seed, sample_config=sc,
                                    conditions=conditions)
    row = {**{name: getattr(sc, name) for name in SAMPLE_PRESET_FIELDS}, **scored.metrics}
    writer.write(0, row, kind="frontier")
    rows.append(row)
    report.say(report.format_table(row))
  if jax.process_index() == 0 and "gen_ppl" in rows[0]:  # conditional tasks: the rows only (BLEU / ROUGE)
    report.say(f"frontier plot: {plots.frontier(rows, axes, workdir)}")
    if "steps" in axes:
      report.say(f"steps plot: {plots.against_steps(rows, [a for a in axes if a != 'steps'], workdir)}")
  return rows
