"""README's first command, in its --quick form: the report is complete and finite."""

import json
import math
import re
import subprocess
import sys

import pytest

from tests.experiment_env import ROOT, subprocess_env


def _numbers(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _numbers(v)
    elif isinstance(x, list):
        for v in x:
            yield from _numbers(v)
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield x


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reproduce")
    env = subprocess_env()
    proc = subprocess.run([sys.executable, "-m", "experiments.reproduce", "--quick",
                           "--workdir", str(workdir)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return workdir, proc.stdout


def test_report_tables_are_filled_with_finite_numbers(quick_run):
    workdir, stdout = quick_run
    assert "first-epoch dominance" in stdout  # progress is visible while it runs
    results = json.loads((workdir / "results.json").read_text())
    nums = list(_numbers({k: v for k, v in results.items() if k != "config"}))
    assert len(nums) > 200 and all(math.isfinite(x) for x in nums)
    report = (workdir / "report.md").read_text()
    for heading in ["## Theorem 1 on this model", "## First-epoch dominance",
                    "## Merging after k epochs vs at convergence",
                    "## Iterative task arithmetic (ATM)",
                    "## Trajectories in parameter space",
                    "## Findings against the paper's claims"]:
        assert heading in report
    assert not re.search(r"\b(nan|inf|n/a)\b", report.lower().split("## findings")[0]
                         .replace("| n/a | n/a |", "")), "a table cell is not a number"
    # every figure the report shows exists
    for fig in re.findall(r"\(figures/([^)]+\.png)\)", report):
        assert (workdir / "figures" / fig).stat().st_size > 1000, fig
    # Theorem 1 at k = 1 holds to float64 rounding on the real model
    assert results["theorem"]["rows"][0]["max_gap"] < 1e-10
    assert len(results["findings"]) >= 4
    # checkpoints were written and closed
    assert (workdir / "checkpoints" / "base").is_dir()
    assert (workdir / "checkpoints" / "atm").is_dir()


def test_second_run_reuses_the_cached_base_model(quick_run):
    workdir, _ = quick_run
    env = subprocess_env()
    code = ("import sys; sys.argv=['x']; from experiments.configs.reproduce import get_config;"
            "from experiments.paper.setup import pretrain_base; import jax.numpy as jnp;"
            "from taskvec_jax import data;"
            f"c=get_config('quick'); src={{s: data.load_task('embedded/source', s) for s in "
            "('train','validation')};"
            f"pretrain_base(c, src, {str(workdir)!r}, jnp.float32)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "reusing the cached base model" in proc.stdout


def test_real_data_config_stops_with_a_clear_missing_data_error(tmp_path):
    env = subprocess_env(TFDS_DATA_DIR=str(tmp_path / "tfds"))
    proc = subprocess.run([sys.executable, "-m", "experiments.reproduce",
                           "--config=experiments/configs/reproduce.py:vision8",
                           "--workdir", str(tmp_path / "run")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "sun397" in proc.stderr and str(tmp_path / "tfds") in proc.stderr
