"""Every notebook executes top to bottom, headless, on the embedded suite (small sizes).

The execution itself is tests/notebook_runs.py's (once per session: the experiment tests
check notebooks 01 and 04's runs of their experiments)."""

import pytest

from tests.notebook_runs import NOTEBOOKS, executed


def test_the_four_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_theorem.ipynb", "02_first_epoch.ipynb",
                                           "03_merging.ipynb", "04_tangent.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped_and_executes(path, tmp_path_factory):
    workdir = executed(path.stem, tmp_path_factory)
    # figures were written where the notebook says
    if path.stem != "01_theorem":
        assert any((workdir / "figures").glob("*.png"))
