"""The tangent-space experiment's quick mode, end to end (one module-scoped run)."""

import json
import math
import os

import numpy as np
import pytest

from experiments import tangent
from tests.helpers import json_numbers
from tests.notebook_runs import executed


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The session's one quick run: notebook 04 runs exactly
    ``tangent.run(get_config("quick"), workdir)`` (tests/notebook_runs.py)."""
    workdir = str(executed("04_tangent", tmp_path_factory))
    with open(os.path.join(workdir, "results.json")) as f:
        return workdir, json.load(f)


def test_command_line_runs_the_config_it_names_into_the_workdir(monkeypatch):
    # experiments.tangent's own lines (the run itself is checked below, on notebook 04's)
    from experiments.configs.tangent import get_config
    from experiments.paper import tangent as paper_tangent
    calls = []
    monkeypatch.setattr(paper_tangent, "run",
                        lambda config, workdir: calls.append((config, workdir)) or {})
    tangent.main(["--quick", "--workdir", "/tmp/w"])
    tangent.main([])
    assert [(c.to_dict(), w) for c, w in calls] == [
        (get_config("quick").to_dict(), "/tmp/w"),
        (get_config("default").to_dict(), tangent.DEFAULT_WORKDIR)]


def test_results_are_finite_and_figures_and_report_exist(run):
    workdir, res = run
    numbers = list(json_numbers(res))
    assert len(numbers) > 80 and all(math.isfinite(x) for x in numbers)
    assert res["figures"] == ["disentanglement_0.png", "linear_paths.png"]
    for name in res["figures"]:
        with open(os.path.join(workdir, "figures", name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    report = open(os.path.join(workdir, "report.md")).read()
    for section in ("## 1. Single-task", "## 2. Task arithmetic", "## 3. Weight",
                    "## 4. Kernels", "## 5. Linear paths"):
        assert section in report
    assert report.count("2305.12827") >= 5


def test_findings_are_consistent(run):
    _, res = run
    st = res["single_task"]
    np.testing.assert_allclose(st["nonlinear_advantage"],
                               np.subtract(st["nonlinear"], st["linearized"]), atol=1e-12)
    for r in res["task_arithmetic"].values():
        assert r["alpha"] in (0.3, 0.6, 1.0)
        assert r["alpha"] == (0.3, 0.6, 1.0)[int(np.argmax(r["validation"]))]
    pair = res["disentanglement"]["pairs"][0]
    for kind in ("nonlinear", "linearized"):
        xi = np.asarray(pair[kind])
        assert xi.shape == (5, 5) and xi.min() >= 0 and xi.max() <= 2
    overlap = np.asarray(res["kernels"]["overlap"])
    np.testing.assert_allclose(np.diag(overlap), 1.0, atol=1e-5)
    np.testing.assert_allclose(overlap, overlap.T, atol=1e-5)
    # at lambda = 0 both paths are the base model: f_lin(theta_0) == f(theta_0)
    paths = res["diagnostics"]["paths"]
    for a, b in zip(paths["nonlinear"], paths["linearized"]):
        assert a["own"][0] == b["own"][0]
    assert res["diagnostics"]["barrier"]["accuracy_barrier"] >= 0
