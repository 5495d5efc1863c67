"""Every notebook executes top to bottom, headless, on the embedded suite (small sizes)."""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

from tests.experiment_env import subprocess_env

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_the_four_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_theorem.ipynb", "02_first_epoch.ipynb",
                                           "03_merging.ipynb", "04_tangent.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped_and_executes(path, tmp_path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, \
                f"{path.name}: outputs must be stripped in git"
    # one device per kernel (the fake 8-device XLA flag of the test process is not needed),
    # Agg, and the compilation cache the experiment tests share
    for name, value in subprocess_env(TASKVEC_NOTEBOOK_QUICK="1").items():
        if os.environ.get(name) != value:
            monkeypatch.setenv(name, value)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError on any failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors
    # figures were written where the notebook says
    workdir = path.parent.parent / "results" / f"notebook_{path.stem}"
    if path.stem != "01_theorem":
        assert any((workdir / "figures").glob("*.png"))
