"""The Theorem 1/2 experiment's quick mode, end to end, into a temporary directory."""

import json
import math
import os

import numpy as np

from experiments import theorem


def _all_numbers(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _all_numbers(v)
    elif isinstance(x, list):
        for v in x:
            yield from _all_numbers(v)
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield x


def test_quick_experiment_writes_finite_results_and_figures(tmp_path):
    workdir = str(tmp_path / "theorem")
    theorem.main(["--quick", "--workdir", workdir])
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


def test_digits_tasks_are_deterministic_and_distinct():
    a = theorem.digits_tasks(3, 50, seed=0)
    b = theorem.digits_tasks(3, 50, seed=0)
    for ta, tb in zip(a, b):
        np.testing.assert_array_equal(ta["image"], tb["image"])
        np.testing.assert_array_equal(ta["label"], tb["label"])
    assert a[0]["image"].shape == (50, 64) and float(a[0]["image"].max()) <= 1.0
    from sklearn.datasets import load_digits
    raw = load_digits().data / 16.0
    rows = {tuple(r): i for i, r in enumerate(raw)}
    by_multiset = {tuple(np.sort(r)): i for i, r in enumerate(raw)}
    # Task 0 shows raw digits; task 1 shows other digits through a pixel permutation.
    task0 = {rows[tuple(np.asarray(r))] for r in a[0]["image"]}
    assert not any(tuple(np.asarray(r)) in rows for r in a[1]["image"])
    task1 = {by_multiset[tuple(np.sort(np.asarray(r)))] for r in a[1]["image"]}
    assert len(task0) == 50 and not task0 & task1
    assert set(np.unique(np.concatenate([t["label"] for t in a]))) == set(range(10))
    try:
        theorem.digits_tasks(20, 100)
    except ValueError as e:
        assert "exceed" in str(e)
    else:
        raise AssertionError("expected a ValueError")
