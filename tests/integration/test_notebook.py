"""examples/quickstart.ipynb runs end to end (a short training run inside it, then load, generate, complete, score,
trajectory), executed by nbclient in a fresh kernel."""
import os
import pathlib

import pytest

pytestmark = pytest.mark.slow  # end-to-end runs and equivalence checks: the full suite, not the fast loop

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NOTEBOOK = pathlib.Path(__file__).resolve().parents[2] / "examples" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(NOTEBOOK.parents[1]),
                                                                  os.environ.get("PYTHONPATH")])))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = {i: "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in cell.outputs)
             for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"}
  text = "\n".join(outputs.values())
  assert "elf_jax.Model(" in text and "gen_ppl" in text
  assert "condition() needs a conditional model" in text  # the last cell's one-line error
  assert any("<table" in str(o.get("data", {}).get("text/html", "")) for o in notebook.cells[-3].outputs)
