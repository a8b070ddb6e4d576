"""House style: `ruff check` passes under ruff.toml (CI runs the lint through this test)."""
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
CHECKED = ("elf_jax", "tests", "benchmarks", "configs")


def _ruff_check(*paths) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--config", str(REPO / "ruff.toml"),
                         *map(str, paths)], cwd=REPO, capture_output=True, text=True, check=False)


def test_ruff_check_passes():
  result = _ruff_check(*CHECKED)
  assert result.returncode == 0, (f"ruff check {' '.join(CHECKED)} found problems (ruff is in the test extra; "
                                  f"`ruff check --fix` fixes some):\n{result.stdout}{result.stderr}")


def test_ruff_applies_the_house_limits(tmp_path):
  """The configuration is the one read: 2-space indents pass, a 121-column line and an unused import do not."""
  good = tmp_path / "good.py"
  good.write_text("def f(x):\n  return x  # " + "." * (120 - len("  return x  # ")) + "\n")
  assert _ruff_check(good).returncode == 0, _ruff_check(good).stdout
  bad = tmp_path / "bad.py"
  bad.write_text("import os\n\n\ndef f(x):\n  return x  # " + "." * (121 - len("  return x  # ")) + "\n")
  output = _ruff_check(bad).stdout
  assert "E501" in output and "F401" in output, output

