"""Each notebook executes at most once per test session, whichever test asks first.

Notebooks 01 and 04 run the Theorem and tangent experiments' quick configs end to end, so
the experiments' own tests (tests/test_theorem_experiment.py,
tests/test_tangent_experiment.py) check those runs' outputs instead of running the same
experiment a second time. pytest-xdist runs files on different workers (processes), so a
module- or session-scoped fixture would run once per worker: :func:`executed` serializes
on a file lock in the directory every worker of the session shares (the parent of each
worker's base temporary directory) and records a finished execution there, so the other
worker waits for it and reuses it. A failed execution records nothing: every test that
needs the notebook then fails with its error.
"""

from __future__ import annotations

import fcntl
import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

from tests.experiment_env import ROOT, subprocess_env

__all__ = ["NOTEBOOKS", "executed", "workdir"]

NOTEBOOKS = sorted((pathlib.Path(ROOT) / "notebooks").glob("*.ipynb"))


def workdir(name: str) -> pathlib.Path:
    """Where notebook ``name`` (e.g. ``"01_theorem"``) writes its results."""
    return pathlib.Path(ROOT) / "results" / f"notebook_{name}"


def _clear_outputs(path: pathlib.Path) -> None:
    """Removes what a previous session's run left in the notebook's workdir (its results,
    report and figures; cached checkpoints stay), so that only this run's count."""
    out = workdir(path.stem)
    for f in [out / "results.json", out / "report.md", *out.glob("*.png"),
              *out.glob("figures/*.png")]:
        f.unlink(missing_ok=True)


def _execute(path: pathlib.Path) -> None:
    nb = nbformat.read(path, as_version=4)
    _clear_outputs(path)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, \
                f"{path.name}: outputs must be stripped in git"
    # one device per kernel, Agg, the run's compilation cache, quick mode
    with pytest.MonkeyPatch.context() as mp:
        for name, value in subprocess_env(TASKVEC_NOTEBOOK_QUICK="1").items():
            mp.setenv(name, value)
        client = NotebookClient(nb, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}})
        client.execute()  # raises CellExecutionError on any failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors, errors


def executed(name: str, tmp_path_factory) -> pathlib.Path:
    """Executes ``notebooks/{name}.ipynb`` headless in quick mode unless this session
    already did; returns its workdir (:func:`workdir`)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent          # common to every worker of this session
    done = shared / f"notebook_{name}.done"
    with open(shared / f"notebook_{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            _execute(pathlib.Path(ROOT) / "notebooks" / f"{name}.ipynb")
            done.write_text("executed\n")
    return workdir(name)
