"""The Theorem 1/2 experiment's quick mode, end to end, into a temporary directory."""

import json
import math
import os

import numpy as np
import pytest

from tests.notebook_runs import executed


def _all_numbers(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _all_numbers(v)
    elif isinstance(x, list):
        for v in x:
            yield from _all_numbers(v)
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield x


@pytest.fixture(scope="module")
def quick_workdir(tmp_path_factory):
    """The session's one quick run of the experiment: notebook 01 runs exactly
    ``numerics.run(get_config("quick"), workdir)`` (tests/notebook_runs.py)."""
    return str(executed("01_theorem", tmp_path_factory))


def test_command_line_runs_the_config_it_names_into_the_workdir(monkeypatch, tmp_path,
                                                               capsys):
    # experiments.theorem's own lines (the run itself is checked below, on notebook 01's)
    from experiments import theorem
    from experiments.configs.theorem import get_config
    from experiments.paper import numerics
    calls = []

    def fake_run(config, workdir):
        calls.append((config, workdir))
        return {"figures": ["a.png"], "wall_time_s": 1.0}

    monkeypatch.setattr(numerics, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    theorem.main(["--quick", "--workdir", "out", "--config.alpha=0.25"])
    ((config, workdir),) = calls
    expected = get_config("quick")
    expected.alpha = 0.25
    assert config.to_dict() == expected.to_dict()
    assert workdir == str(tmp_path / "out")
    assert f"[theorem] wrote {tmp_path / 'out'}/results.json" in capsys.readouterr().out


def test_quick_experiment_writes_finite_results_and_figures(quick_workdir):
    workdir = quick_workdir
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    numbers = list(_all_numbers(results))
    assert len(numbers) > 100 and all(math.isfinite(x) for x in numbers)
    for name in ("gap_vs_lr.png", "residual_vs_lr.png", "bounds.png", "sgd.png"):
        path = os.path.join(workdir, name)
        assert os.path.getsize(path) > 10_000, name
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    report = open(os.path.join(workdir, "report.md")).read()
    assert "## Theorem 1" in report and "## Theorem 2" in report and "SGD" in report

    runs = results["runs"]
    assert [r["run"]["activation"] for r in runs] == ["tanh", "relu"]
    for r in runs:
        # Theorem 1, k = 1: exact up to rounding, for every activation (relu included).
        assert r["theorem1"]["k1_max_abs_gap"] <= 1e-13
        # Theorem 2: measured norms below the derived constants, ||C_k|| below the bound.
        t2 = r["theorem2"]
        assert t2["grad_norm_max"] <= t2["G_max"]
        assert t2["hessian_norm_max"] <= t2["H_max"]
        assert np.all(np.array(t2["c_norms"]) <= np.array(t2["bound"]))
        assert np.all(np.array(t2["c_norms"]) <= np.array(t2["bound_measured_sups"]))
    # Theorem 1, k >= 2, on the smooth network: slopes 2 and 3 on the real digits.
    slopes = runs[0]["theorem1"]["slopes"]
    for k in ("2", "3", "4", "5"):
        assert abs(slopes["gap"][k] - 2) <= 0.1
        assert abs(slopes["residual_current"][k] - 3) <= 0.15
        assert abs(slopes["residual_previous"][k] - 3) <= 0.15
    # Minibatch SGD: full batch keeps the equality, a quarter batch breaks it.
    sgd = results["sgd"]
    assert sgd["batch_sizes"][0] == results["config"]["examples_per_task"]
    assert sgd["relative_gap"][0][0] <= 1e-12
    assert sgd["relative_gap"][0][-1] >= 1e-3
