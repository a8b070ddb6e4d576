"""Imports flow one way, down the layer map of docs/architecture.md (base → data → model → weights → computation →
orchestration). Every module of the package, `__init__` files included, is placed in one layer; a module may import
its own layer or the ones below, and the import graph (function-level imports included) has no cycle. The tests
mirror the package (docs/architecture.md#tests): tests/X/test_Y.py names the module elf_jax/X/Y.py."""
import ast
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "elf_jax"
TESTS = ROOT / "tests"
LAYER_MAP = ROOT / "docs" / "architecture.md"


def _layers() -> list[tuple[str, tuple[str, ...]]]:
  """(layer, module names) bottom first, from the table under `## Layers` in docs/architecture.md."""
  section = LAYER_MAP.read_text().split("## Layers", 1)[1].split("\n## ", 1)[0]
  rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| ")][1:]  # skip the header
  return [(name.strip(), tuple(re.findall(r"`([\w.]+)`", modules))) for name, modules in rows]


LAYERS = _layers()


def _modules() -> dict[str, pathlib.Path]:
  """Every module of the package by dotted name (a package's `__init__.py` is the package itself)."""
  out = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def _layer(module: str) -> int | None:
  """The layer index of `module`: the longest name of the map that is the module or a package above it (the
  package itself, `elf_jax`, covers only its `__init__.py`)."""
  hits = [(len(name), i) for i, (_, names) in enumerate(LAYERS) for name in names
          if module == name or (module.startswith(name + ".") and name != PACKAGE.name)]
  return max(hits)[1] if hits else None


def _imports(path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
  """The package modules `path` imports, anywhere in the file."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.startswith("elf_jax."))
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "elf_jax":
      for alias in node.names:  # `from elf_jax.data import pipeline` imports the module elf_jax.data.pipeline
        sub = f"{node.module}.{alias.name}"
        found.add(sub if sub in modules else node.module)
  return {m for m in found if m in modules}


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _imports(path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer():
  assert [m for m in _modules() if _layer(m) is None] == []


def test_imports_only_go_down():
  climbs = [f"{m} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]})"
            for m, targets in _graph().items() for t in sorted(targets) if _layer(t) > _layer(m)]
  assert climbs == []


def test_no_import_cycles():
  graph, state, cycles = _graph(), {}, []

  def visit(node, stack):
    state[node] = "open"
    for target in sorted(graph[node]):
      if state.get(target) == "open":
        cycles.append(" → ".join(stack[stack.index(target):] + [target]))
      elif target not in state:
        visit(target, stack + [target])
    state[node] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  assert cycles == []


def test_the_layering_check_sees_a_climb(tmp_path, monkeypatch):
  """The checks above can fail: a data module importing the training loop is reported."""
  fake = tmp_path / "elf_jax"
  (fake / "data").mkdir(parents=True)
  (fake / "run").mkdir()
  (fake / "data" / "pipeline.py").write_text("def f():\n  from elf_jax.run import train_loop\n")
  (fake / "run" / "train_loop.py").write_text("from elf_jax.data import pipeline\n")
  monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
  graph = _graph()
  assert graph == {"elf_jax.data.pipeline": {"elf_jax.run.train_loop"},
                   "elf_jax.run.train_loop": {"elf_jax.data.pipeline"}}
  assert _layer("elf_jax.run.train_loop") > _layer("elf_jax.data.pipeline")


def test_the_input_pipeline_loads_without_the_network():
  """Importing the data layer pulls in neither Flax nor the model code (the point of the layering)."""
  code = ("import sys, elf_jax.data.pipeline, elf_jax.data.latent_cache; "
          "print(sorted(m for m in sys.modules if m.split('.')[0] == 'flax' or m.startswith('elf_jax.model')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def _unmirrored(tests: pathlib.Path, package: pathlib.Path) -> list[str]:
  """The test files outside tests/integration/ that name no module: tests/X/test_Y.py must match elf_jax/X/Y.py."""
  modules = {p.relative_to(package).with_suffix("") for p in package.rglob("*.py")}
  return sorted(str(p.relative_to(tests)) for p in tests.rglob("test_*.py")
                if p.relative_to(tests).parts[0] != "integration"
                and p.relative_to(tests).with_name(p.stem.removeprefix("test_")) not in modules)


def test_test_files_mirror_the_package():
  assert _unmirrored(TESTS, PACKAGE) == []


def test_the_mirror_check_sees_a_stray_file(tmp_path):
  """A test file naming no module (another folder's, or one that is gone) is reported; integration/ is free."""
  (tmp_path / "elf_jax" / "data").mkdir(parents=True)
  (tmp_path / "elf_jax" / "data" / "pipeline.py").touch()
  for name in ("data/test_pipeline.py", "data/test_loader.py", "test_pipeline.py", "integration/test_cli.py"):
    (tmp_path / "tests" / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "tests" / name).touch()
  assert _unmirrored(tmp_path / "tests", tmp_path / "elf_jax") == ["data/test_loader.py", "test_pipeline.py"]
