"""`python -m elf_jax.main` end to end (issue 4, items 1, 6, 7): train, then --mode=sample and --mode=eval on the
same workdir, and --mode=eval on a samples file. One training run (small overrides of configs/tiny.py, one CPU
device as on a fresh machine) is shared by the tests; the conditional demo (configs/tiny_cond.py) has its own."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from elf_jax import recipes
from elf_jax.data import sources, synthetic
from elf_jax.eval import text_metrics

from tests.conftest import REPO, SMALL, small_config

pytestmark = pytest.mark.slow  # end-to-end runs and equivalence checks: the full suite, not the fast loop

OVERRIDES = [f"--config.{key}={value}" for key, value in SMALL.items()]


def run_main(workdir, *args) -> str:
  """Runs the CLI on configs/tiny.py + OVERRIDES + args; returns stdout (the test fails, with the output, on
  rc != 0)."""
  xla_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  result = subprocess.run(
      [sys.executable, "-m", "elf_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}", *OVERRIDES, *args],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags})
  assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
  return result.stdout


def printed_figures(stdout: str) -> dict[str, float]:
  """`  name   value` lines of the printed tables (the last value of each name)."""
  return {m.group(1): float(m.group(2)) for m in re.finditer(r"^  (\w+)\s+(-?[\d.]+|nan)\b", stdout, re.M)}


def metric_rows(workdir, kind: str) -> list[dict]:
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl") if line.strip()]
  return [r for r in rows if r["kind"] == kind]


def read_texts(path) -> list[str]:
  return [json.loads(line)["text"] for line in open(path)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("cli")
  return workdir, run_main(workdir)


def test_train_prints_and_saves_the_config_and_writes_every_artefact(trained):
  workdir, stdout = trained
  assert stdout.startswith("Resolved config:\n")
  saved = json.loads((workdir / "config_train.json").read_text())
  assert saved["model"]["hidden_size"] == 32 and saved["optim"]["num_steps"] == 6  # the overrides took effect
  assert saved["data"]["tokenizer"] == "synthetic"  # the rest is configs/tiny.py
  assert json.dumps(saved, indent=2) in stdout  # the printed config is the saved one

  # Output to a pipe: one progress line per logging interval instead of a live bar.
  assert re.search(r"^train step 6/6  loss [\d.]+  [\d.]+ s/step  ETA 0:00$", stdout, re.M), stdout[-2000:]
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "6"]
  assert [r["step"] for r in metric_rows(workdir, "train")] == [1, 2, 3, 4, 5, 6]
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir / "tb"))
  assert (workdir / "loss_curve.png").read_bytes().startswith(b"\x89PNG")
  texts = read_texts(workdir / "samples" / "step_6.jsonl")
  assert len(texts) == 8 and (workdir / "samples" / "step_6.txt").read_text().splitlines() == texts


def test_train_prints_the_final_quality_figures(trained):
  workdir, stdout = trained
  (final,) = metric_rows(workdir, "eval")
  printed = printed_figures(stdout.split("Samples at step 6")[1])
  for key in ("gen_ppl", "entropy", "true_gen_ppl", "true_entropy"):
    assert printed[key] == pytest.approx(final[key], abs=1e-4)  # printed with 4 decimals
  # They are the synthetic language's exact figures of the samples written.
  language = sources.make_language(small_config().data)
  exact = language.gen_ppl_and_entropy(read_texts(workdir / "samples" / "step_6.jsonl"))
  assert final["gen_ppl"] == pytest.approx(exact["gen_ppl"]) and final["entropy"] == pytest.approx(exact["entropy"])


def test_sample_mode_reproduces_the_final_samples_from_the_checkpoint(trained):
  workdir, _ = trained
  stdout = run_main(workdir, "--mode=sample")
  path = re.search(r"wrote 8 samples to (\S+\.jsonl)", stdout).group(1)
  assert os.path.dirname(path) == str(workdir / "samples") and os.path.exists(path[:-len("jsonl")] + "txt")
  # Same EMA params (restored from step 6), seed and sampler as the end-of-training samples: the same texts.
  assert read_texts(path) == read_texts(workdir / "samples" / "step_6.jsonl")
  assert json.loads((workdir / "config_sample.json").read_text())["model"]["hidden_size"] == 32


def test_eval_mode_reports_mean_and_std_over_seeds(trained):
  workdir, _ = trained
  stdout = run_main(workdir, "--mode=eval", "--config.eval.num_seeds=2")
  summary = metric_rows(workdir, "eval")[-1]
  assert summary["num_seeds"] == 2
  language = sources.make_language(small_config().data)
  per_seed = [language.gen_ppl_and_entropy(read_texts(workdir / "samples" / f"eval_seed{s}.jsonl")) for s in (0, 1)]
  for key in ("gen_ppl", "entropy"):
    values = [r[key] for r in per_seed]
    assert summary[key] == pytest.approx(np.mean(values)) and summary[f"{key}_std"] == pytest.approx(np.std(values))
    assert re.search(rf"^  {key}\s+{summary[key]:.4f} ± {summary[key + '_std']:.4f}$", stdout, re.M)
  # Diversity is in every row (no GPT-2 here: no MAUVE key), averaged over seeds and printed the same way.
  diversity = [text_metrics.diversity(read_texts(workdir / "samples" / f"eval_seed{s}.jsonl")) for s in (0, 1)]
  for key in ("self_bleu", "distinct_1", "distinct_4"):
    assert summary[key] == pytest.approx(np.mean([r[key] for r in diversity]), nan_ok=True)
    assert re.search(rf"^  {key}\s+{summary[key]:.4f} ± {summary[key + '_std']:.4f}$", stdout, re.M)
  assert "mauve" not in summary
  # Two seeds, two different sets of samples (gen_ppl may still agree: 6 steps in, every sample is ungrammatical).
  assert summary["entropy_std"] > 0
  # Seed 0 is the seed of the end-of-training samples.
  assert read_texts(workdir / "samples" / "eval_seed0.jsonl") == read_texts(workdir / "samples" / "step_6.jsonl")


def test_eval_mode_scores_a_samples_file(trained):
  workdir, _ = trained
  samples = workdir / "samples" / "step_6.jsonl"
  run_main(workdir, "--mode=eval", f"--config.eval.samples_path={samples}")
  summary = metric_rows(workdir, "eval")[-1]
  (final,) = [r for r in metric_rows(workdir, "eval") if r["step"] == 6]  # what training measured on that file
  assert summary["num_seeds"] == 1 and summary["gen_ppl_std"] == 0.0
  for key in ("gen_ppl", "entropy", "true_gen_ppl"):
    assert summary[key] == pytest.approx(final[key])


def test_the_literal_owt_b_command_starts_and_stops_offline_on_one_line(tmp_path):
  """`python -m elf_jax.main --config=configs/owt_b.py` (no --workdir): the run directory defaults to runs/owt_b, and
  offline the run stops at the first thing it cannot fetch with one line naming the config field — no traceback."""
  result = subprocess.run(
      [sys.executable, "-m", "elf_jax.main", f"--config={REPO / 'configs' / 'owt_b.py'}"], cwd=tmp_path,
      capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
  assert result.returncode == 1
  assert "workdir: runs/owt_b" in result.stdout and (tmp_path / "runs" / "owt_b").is_dir()
  assert "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert re.match(r"error: data\.tokenizer='t5-small': .* Set --config\.data\.tokenizer=DIR", last), last


def test_owt_b_prints_and_saves_the_sample_steps_it_uses(tmp_path):
  """--config.sample.steps=64 on configs/owt_b.py (preset owt_sde32, 32 steps) wins over the preset: the config
  printed at start-up and saved as config_train.json show 64 steps and the preset's other fields."""
  result = subprocess.run(
      [sys.executable, "-m", "elf_jax.main", f"--config={REPO / 'configs' / 'owt_b.py'}", "--config.sample.steps=64",
       "--config.mesh.fsdp=2"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
  assert result.returncode == 1 and "Traceback" not in result.stderr  # offline: stops at the tokenizer
  saved = json.loads((tmp_path / "runs" / "owt_b" / "config_train.json").read_text())
  assert json.dumps(saved, indent=2) in result.stdout  # the printed config is the saved one
  assert saved["sample"] == {**saved["sample"], "preset": "owt_sde32", "steps": 64, "method": "sde", "gamma": 1.5}
  assert saved["mesh"] == {**saved["mesh"], "preset": "data-parallel", "data": -1, "fsdp": 2, "tensor": 1}


@pytest.mark.parametrize("override, error", [
    ("--config.eval.sweep=steps=1,x", "eval.sweep entry 'steps=1,x': every value of steps must be of type int"),
    ("--config.eval.sweep=method=euler", "sample.method='euler' (eval.sweep point {'method': 'euler'}): expected"),
    ("--config.distill.rounds=16:0", "distill.rounds entry '16:0': expected STUDENT_STEPS:TEACHER_SUB_STEPS"),
    ("--config.sample.preset=owt", "sample.preset='owt' is unknown; choose one of owt_sde32"),
    ("--config.model.remat=all", "model.remat='all': expected one of none, full, dots_saveable"),
])
def test_a_config_mistake_stops_the_run_before_it_starts(tmp_path, override, error):
  """A bad sweep, rounds, preset or enum value ends the run at start-up with one error naming it: nothing is built,
  sampled or written."""
  result = subprocess.run(
      [sys.executable, "-m", "elf_jax.main", "--config=configs/tiny.py", f"--workdir={tmp_path / 'run'}", override],
      cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert result.stderr.startswith("error: invalid config: ") and result.stderr.count("\n") == 1  # one line
  assert error in result.stderr, result.stderr
  assert not (tmp_path / "run").exists()


def test_default_workdir_names_the_config_and_its_argument():
  from elf_jax import main  # pylint: disable=import-outside-toplevel
  assert main.default_workdir("configs/owt_b.py") == os.path.join("runs", "owt_b")
  assert main.default_workdir("/abs/configs/owt.py:l") == os.path.join("runs", "owt_l")


@pytest.mark.slow  # two CLI runs with their compiles: 183 s under load 10 on 2 cores
def test_the_conditional_demo_trains_and_reports_bleu_with_guidance(cli, tmp_path):
  """configs/tiny_cond.py (small overrides, 6 steps): samples translate the evaluation split's sources, each with
  its exact reference translation, and training and --mode=eval (CFG s = 3) report BLEU of those samples."""
  workdir = tmp_path / "run"
  args = [f"--config={REPO / 'configs' / 'tiny_cond.py'}", f"--workdir={workdir}", *OVERRIDES]
  stdout = cli.run(*args, cwd=REPO, devices=1)[0]
  assert re.search(r"^train step 6/6  loss [\d.]+", stdout, re.M), stdout[-2000:]
  config = json.loads((workdir / "config_train.json").read_text())
  assert config["data"]["conditional"] and config["flow"]["label_drop_prob"] == 0.1
  assert config["sample"]["cfg_scale"] == 2.0
  data = recipes.tiny_cond().data
  records = sources.make_source(data, data.eval_split)
  translation = synthetic.SyntheticTranslation(sources.make_language(data).vocabulary)
  for name, scale in (("step_6", 2.0), ("eval_seed0", 3.0)):
    if name == "eval_seed0":
      stdout = cli.run(*args, "--mode=eval", f"--config.sample.cfg_scale={scale}", cwd=REPO, devices=1)[0]
      assert json.loads((workdir / "config_eval.json").read_text())["sample"]["cfg_scale"] == scale
    rows = [json.loads(line) for line in open(workdir / "samples" / f"{name}.jsonl")]
    assert len(rows) == 8
    for i, row in enumerate(rows):
      assert row["condition"] == " ".join(records[i]["input"].split()[:data.max_condition_length])
      assert row["reference"] == records[i]["output"] == translation.translate(records[i]["input"])
    scored = metric_rows(workdir, "eval")[-1]
    expected = text_metrics.bleu([r["text"] for r in rows], [r["reference"] for r in rows])
    assert scored["bleu"] == pytest.approx(expected) and "gen_ppl" not in scored
    assert printed_figures(stdout)["bleu"] == pytest.approx(expected, abs=1e-4)
