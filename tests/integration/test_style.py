"""House style: `ruff check` passes under ruff.toml (CI runs the lint through this test), pointers into
docs/method.md resolve, and the Markdown pages' prose lines fit in 120 columns."""
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
CHECKED = ("elf_jax", "tests", "benchmarks", "configs", "examples")


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


def _long_prose_lines(text: str, limit: int = 120) -> list[int]:
  """Line numbers (from 1) of the prose lines longer than `limit` columns. Exempt: fenced code blocks, indented code
  (4 spaces after a blank line or more code), table rows, and a line that is one word (a URL) or one code span."""
  long, fence, code, previous = [], None, False, ""
  for n, line in enumerate(text.splitlines(), 1):
    marker = re.match(r"\s*(```+|~~~+)", line)
    if fence:  # inside a fenced block until a fence of the same kind closes it
      fence = None if marker and marker.group(1).startswith(fence) else fence
    elif marker:
      fence = marker.group(1)
    else:
      code = line.startswith(("    ", "\t")) and (code or not previous.strip())
      stripped = line.strip()
      if (len(line) > limit and not code and not stripped.startswith("|") and re.search(r"\s", stripped)
          and not re.fullmatch(r"`[^`]+`", stripped)):
        long.append(n)
    previous = line
  return long


def test_markdown_prose_fits_in_120_columns():
  pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md",
           REPO / "launch" / "README.md"]
  long = [f"{page.relative_to(REPO)}:{n}" for page in pages for n in _long_prose_lines(page.read_text())]
  assert long == [], "prose lines over 120 columns (rewrap them; tables and code are exempt):\n" + "\n".join(long)


def test_the_markdown_check_exempts_only_code_tables_and_single_words():
  text = "\n".join([
      "x " * 61,  # 1: 122 columns of prose
      "```", "y " * 70, "```",  # 2-4: a fenced code block
      "| " + "z " * 70 + "|",  # 5: a table row
      "", "    " + "w " * 70,  # 6-7: indented code
      "https://" + "u" * 120,  # 8: one long URL
      "`" + "c " * 60 + "`",  # 9: one code span (a command)
      "  - " + "v " * 60,  # 10: a list item's prose
  ])
  assert _long_prose_lines(text) == [1, 10]
