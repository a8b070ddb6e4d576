"""The benchmark scripts run on CPU from a checkout and print their figures (tiny shapes; no timing is asserted)."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, *args: str) -> str:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")  # one host device, as a user's CPU run
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return proc.stdout


@pytest.mark.slow
def test_train_step_benchmark_compares_schedules_on_the_same_objective():
  out = _run("train_step.py", "--config", "configs/tiny.py", "--batch", "8", "--steps", "2", "--warmup", "1",
             "--variants", "ours,reference")
  losses = dict(re.findall(r"(ours|reference) ([\d.]+)", out.split("first-step loss per variant:")[1].splitlines()[0]))
  assert losses["ours"] == losses["reference"]  # the two schedules compute the same loss
  assert re.search(r"ours vs reference schedule: [\d.]+x throughput", out)
  # The formula counts the x_sc = 0 pass on half of each denoising group: ours does less model work.
  rows = {m[0]: float(m[1]) for m in re.findall(r"^(ours|reference)\s+\S+\s+\S+\s+\S+\s+\S+\s+([\d.]+)", out, re.M)}
  assert rows["ours"] < rows["reference"]


@pytest.mark.slow
def test_sample_benchmark_prints_throughput():
  out = _run("sample.py", "--batch", "2", "--seq_len", "8", "--steps", "2", "--repeats", "1")
  assert re.search(r"samples/s", out) and re.search(r"tokens/s", out), out
