"""`--mode=distill` end to end (issue 15): rounds of progressive distillation from a teacher workdir."""
import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from elf_jax.config import SAMPLE_PRESET_FIELDS, few_step_settings, load_config_file
from elf_jax.model.elf import ELF, ModelConfig, init_params
from elf_jax.run import checkpoint, distill_loop, experiment

from tests.conftest import REPO, SMALL, small_config


def make_teacher_workdir(directory, config):
  """A teacher's training workdir without training it: a checkpoint of fresh params (as params and EMA) and the
  latent statistics that the students must reuse."""
  model = ELF(ModelConfig.from_config(config))
  params = nn.unbox(init_params(model, jax.random.key(0), config.data.max_length))
  manager = checkpoint.CheckpointManager(checkpoint.checkpoint_dir(str(directory)), async_save=False)
  manager.save(1, {"params": params, "ema_params": params})
  manager.close()
  (directory / experiment.LATENT_STATS_FILE).write_text(json.dumps({"mean": 0.01, "std": 0.9}))


@pytest.mark.slow
def test_mode_distill_end_to_end(tmp_path, capsys):
  """`--mode=distill` on configs/tiny_distill.py (shrunk): two rounds of two steps from a teacher workdir, each
  student sampled at its step count; a rerun finds both rounds done and trains nothing."""
  teacher = tmp_path / "teacher"
  make_teacher_workdir(teacher, small_config())
  workdir = tmp_path / "distill"
  overrides = {**SMALL, "distill.teacher": str(teacher), "distill.rounds": "2:2,1:3", "distill.steps_per_round": 2,
               "distill.warmup_steps": 1}
  xla_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  result = subprocess.run(
      [sys.executable, "-m", "elf_jax.main", "--config=configs/tiny_distill.py", f"--workdir={workdir}",
       "--mode=distill", *(f"--config.{k}={v}" for k, v in overrides.items())],
      cwd=REPO, capture_output=True, text=True, timeout=900,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags})
  assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"

  rounds = [workdir / "round1_2step", workdir / "round2_1step"]
  assert f"initialised params and EMA from {teacher}" in result.stdout
  assert f"initialised params and EMA from {rounds[0]}" in result.stdout  # round 2 starts from round 1's EMA
  for directory, steps in zip(rounds, (2, 1)):
    assert sorted(p.name for p in (directory / "checkpoints").iterdir()) == ["2"]
    done = json.loads((directory / distill_loop.ROUND_DONE_FILE).read_text())
    assert done["student_steps"] == steps and done["optimizer_steps"] == 2
    stats_file = experiment.LATENT_STATS_FILE
    assert (directory / stats_file).read_text() == (teacher / stats_file).read_text()
    sample = json.loads((directory / "config_train.json").read_text())["sample"]
    assert sample["preset"] == "fewstep"  # the saved config shows the settings the round sampled with
    assert {name: sample[name] for name in SAMPLE_PRESET_FIELDS} == few_step_settings(steps)
    rows = [json.loads(line) for line in open(directory / "metrics.jsonl")]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(np.isfinite(r["loss"]) for r in train)
    evals = [r for r in rows if r["kind"] == "eval"]
    assert len(evals) == 1 and evals[0]["gen_ppl"] > 1 and (directory / "samples" / "step_2.jsonl").exists()
  assert re.search(r"^ +2 +1 +[\d.]+", result.stdout, re.M), result.stdout[-2000:]  # the summary table

  capsys.readouterr()
  distill_loop.distill(load_config_file(REPO / "configs" / "tiny_distill.py", overrides), str(workdir))
  assert capsys.readouterr().out.count("finished before") == 2
  assert sorted(p.name for p in (rounds[1] / "checkpoints").iterdir()) == ["2"]
