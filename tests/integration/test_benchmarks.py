"""The benchmark scripts run on CPU from a checkout and print their figures (tiny shapes; no timing is asserted)."""
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # end-to-end runs and equivalence checks: the full suite, not the fast loop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(script: str, *args: str) -> str:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")  # one host device, as a user's CPU run
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return proc.stdout


def _rows(out: str) -> dict[str, list[float]]:
  """The train-step benchmark's table: variant → its numeric columns (denoise ms ... args+out MiB)."""
  table = re.split(r"^-{20,}$", out, flags=re.M)[1]
  return {m[0]: [float(x) for x in m[1].replace("x", "").split()]
          for m in re.findall(r"^(ours|official|cached|scan|unrolled) +([\d.]+ .+)$", table, re.M)}


def _profile_table(out: str, title: str) -> dict[str, dict[str, float]]:
  """A `--profile` table (by kind / by source): column (variant and branch) → row → summed ms ("total" included)."""
  block = out.split(title)[1].split("\n\n")[0].splitlines()
  columns = re.findall(r"\S+ (?:denoise|decode)", block[0])
  table = {column: {} for column in columns}
  for line in block[1:]:
    row = re.match(r"^(.+?)\s+((?:[\d.]+ms\s*)+)$", line)
    if not row:  # the table's end
      break
    name, values = row.groups()
    for column, value in zip(columns, re.findall(r"([\d.]+)ms", values)):
      table[column][name] = float(value)
  return table


@pytest.mark.slow
def test_train_step_benchmark_times_ours_in_alternating_rounds():
  out = _run("train_step.py", "--config", "configs/tiny.py", "--batch", "8", "--rounds", "2", "--steps", "2",
             "--variants", "ours,cached")
  assert re.search(r"^round 0: ours [\d.]+ ms, cached [\d.]+ ms", out, re.M), out
  assert re.search(r"^round 1: cached [\d.]+ ms, ours [\d.]+ ms", out, re.M), out  # the order flips
  rows = _rows(out)
  denoise, decode, _, tokens_per_s, ratio, xla, formula = rows["ours"][:7]
  assert denoise > 0 and decode > 0 and tokens_per_s > 0 and ratio == 1.0  # both branches ran in every round
  assert rows["cached"][5] < xla  # no encoder in the cached step
  assert rows["cached"][6] == formula  # the same flow-transformer work


def test_train_step_benchmark_profiles_both_block_loops(tmp_path):
  """`--profile` traces a denoising and a decoding step of each variant and sums the traced instructions' time by
  kind and by source; the scanned blocks' stacking copies (dynamic slices / updates) are what unrolling removes."""
  out = _run("train_step.py", "--config", "configs/tiny.py", "--batch", "8", "--rounds", "1", "--steps", "2",
             "--variants", "scan,unrolled", "--profile", str(tmp_path))
  rows = _rows(out)
  assert rows["scan"][6] == rows["unrolled"][6]  # the same flow-transformer work
  kinds, sources = _profile_table(out, "by kind (summed op ms)"), _profile_table(out, "by source (summed op ms)")
  assert set(kinds) == {"scan denoise", "scan decode", "unrolled denoise", "unrolled decode"}
  for column, by_kind in kinds.items():
    assert by_kind["matmul"] > 0 and by_kind["total"] == pytest.approx(sources[column]["total"], abs=0.2)
    assert by_kind["total"] == pytest.approx(sum(v for k, v in by_kind.items() if k != "total"), abs=0.5)
    assert sources[column]["attention"] > 0 and sources[column]["mlp"] > 0
  slices = lambda column: kinds[column].get("dynamic-slice", 0) + kinds[column].get("dynamic-update-slice", 0)
  assert slices("scan denoise") > slices("unrolled denoise")
  assert sources["scan decode"]["readout"] > 0 and sources["scan denoise"]["readout"] == 0
  assert len(list(tmp_path.glob("*/plugins/profile/*/*.trace.json.gz"))) == 4  # one trace per column


def test_train_step_benchmark_names_a_path_without_the_official_code(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"), "--reference_src",
                         str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))
  assert proc.returncode != 0 and "does not hold the official ELF code" in proc.stderr, proc.stderr[-2000:]


def test_train_step_benchmark_names_a_missing_package_of_the_official_code(tmp_path):
  for name in ("train_step.py", "modules/model.py", "modules/t5_encoder.py", "utils/train_utils.py",
               "utils/encoder_utils.py", "configs/config.py"):
    (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "src" / name).write_text("import elf_benchmark_absent_package\n")
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"), "--reference_src",
                         str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))
  assert proc.returncode != 0, proc.stdout[-2000:]
  assert "package 'elf_benchmark_absent_package' is missing" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("ELF_REFERENCE_SRC"),
                    reason="needs a checkout of the official ELF code (github.com/lillian039/ELF): set "
                           "ELF_REFERENCE_SRC to its path")
def test_train_step_benchmark_times_the_official_train_step():
  out = _run("train_step.py", "--config", "configs/tiny.py", "--batch", "8", "--rounds", "2", "--steps", "2",
             "--reference_src", os.environ["ELF_REFERENCE_SRC"])
  assert re.search(r"^round 1: official [\d.]+ ms, ours [\d.]+ ms", out, re.M), out
  assert re.search(r"ours vs official train_step: [\d.]+x throughput \(median of per-round expected-step ratios: "
                   r"[\d.]+, [\d.]+\)", out), out
  losses = dict(re.findall(r"(ours|official) ([\d.]+)", out.split("first-step loss:")[1].splitlines()[0]))
  assert set(losses) == {"ours", "official"}  # both steps ran and gave finite losses
  rows = _rows(out)
  # The official denoising step runs three no-gradient passes to our one: more model work per step.
  assert rows["official"][6] > rows["ours"][6]
  assert rows["official"][0] > 0 and rows["official"][1] > 0


@pytest.mark.slow
def test_sample_benchmark_prints_throughput():
  out = _run("sample.py", "--batch", "2", "--seq_len", "8", "--steps", "2", "--repeats", "1")
  assert re.search(r"samples/s", out) and re.search(r"tokens/s", out), out
