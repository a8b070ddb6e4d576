"""House style: `ruff check` passes under ruff.toml (CI runs the lint through this test), and pointers into
docs/method.md resolve."""
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
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


def _github_anchor(heading: str) -> str:
  """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces → hyphens."""
  kept = "".join(ch for ch in heading.strip().lower() if ch.isalnum() or ch in " -_")
  return kept.replace(" ", "-")


def test_method_references_resolve():
  """Every `method.md#anchor` pointer in the code and the READMEs names a heading of docs/method.md (the method's one
  home; no references to an outside spec remain)."""
  headings = re.findall(r"^#{1,4} (.+)$", (REPO / "docs" / "method.md").read_text(), flags=re.M)
  anchors = {_github_anchor(h) for h in headings}
  files = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "benchmarks").glob("*.md"),
           *(REPO / "tests" / "fixtures").rglob("README.md")]
  files += [f for folder in (*CHECKED, "launch") for f in (REPO / folder).rglob("*.py") if f != pathlib.Path(__file__)]
  bad, spec = [], []
  for path in files:
    text = path.read_text(encoding="utf-8")
    # `docs/method.md#a, #b`: a pointer may list further anchors of the same page after a comma.
    for group in re.findall(r"method\.md(#[\w-]+(?:,? #[\w-]+)*)", text):
      bad += [f"{path.relative_to(REPO)}: {a}" for a in re.findall(r"#([\w-]+)", group) if a not in anchors]
    spec += [f"{path.relative_to(REPO)}: {m}" for m in re.findall(r"spec §\S*", text)]
  assert not bad, f"pointers to missing sections of docs/method.md (anchors: {sorted(anchors)}):\n" + "\n".join(bad)
  assert not spec, "references to the old spec; point into docs/method.md instead:\n" + "\n".join(spec)
