"""README's first command, in its --quick form: the report is complete and finite."""

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.experiment_env import ROOT, subprocess_env
from tests.helpers import json_numbers


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reproduce")
    env = subprocess_env()
    # progress bars off: programs with host callbacks never reach JAX's persistent
    # compilation cache, and without them notebooks 02 and 03 (the same finetunes) reuse
    # this run's programs (the bars are the engine's, tested in tests/test_finetune.py)
    proc = subprocess.run([sys.executable, "-m", "experiments.reproduce", "--quick",
                           "--config.finetune.progress=False",
                           "--workdir", str(workdir)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return workdir, proc.stdout


def test_report_tables_are_filled_with_finite_numbers(quick_run):
    workdir, stdout = quick_run
    assert "first-epoch dominance" in stdout  # progress is visible while it runs
    results = json.loads((workdir / "results.json").read_text())
    nums = list(json_numbers({k: v for k, v in results.items() if k != "config"}))
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
    # every merge of the study's one list has a finite row at every epoch, in the table
    from experiments.paper.merging_study import METHODS
    mm = results["merging"]["minibatch"]
    assert set(results["merging"]["methods"]) == set(METHODS)
    for e in mm["epochs"]:
        rows = mm["per_epoch"][str(e)]
        assert list(rows) == list(METHODS), e
        for name, row in rows.items():
            assert len(row["test_accuracy"]) == len(results["setup"]["tasks"]), name
            for value in row["test_accuracy"] + [row["avg_accuracy"], row["avg_normalized"]]:
                assert math.isfinite(value) and 0 <= value <= 1.5, (e, name, value)
            assert row["avg_normalized"] == pytest.approx(
                np.mean(np.asarray(row["test_accuracy"]) / np.asarray(mm["finetuned_test"])))
            assert (row["alpha"] is None) == (METHODS[name].kind != "alpha"), name
            if row["alpha"] is not None:
                assert row["alpha"] in results["config"]["merging"]["alphas"], name
    section = report.split("## Merging after k epochs")[1].split("\n## ")[0]
    for name in METHODS:
        assert f"| {name} | **" in section, name
    assert "Merging is worth measuring" in report
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
            "c=get_config('quick'); source=data.SUITES[c.data.suite].source;"
            "src={s: data.load_task(source, s) for s in ('train','validation')};"
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


# ---- the minibatch optimizer carries the paper's knobs (experiments/paper/setup.py)

def _adamw_reference(params, grads, *, lr, weight_decay, clip_norm, b1=0.9, b2=0.999,
                     eps=1e-8):
    """AdamW after global-norm clipping, step by step in float64 (optax's documented
    update: g <- g * min(1, c / ||g||); m, v moments; u = -lr (m_hat / (sqrt(v_hat) + eps)
    + wd * p))."""
    p = np.asarray(params, np.float64)
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64)
        if clip_norm is not None:
            g = g * min(1.0, clip_norm / np.linalg.norm(g))
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        p = p - lr * (m_hat / (np.sqrt(v_hat) + eps) + weight_decay * p)
    return p


def _apply_steps(opt, params, grads):
    import jax.numpy as jnp
    import optax
    p = jnp.asarray(params, jnp.float32)
    state = opt.init(p)
    for g in grads:
        u, state = opt.update(jnp.asarray(g, jnp.float32), state, p)
        p = optax.apply_updates(p, u)
    return np.asarray(p, np.float64)


def test_weight_decay_and_clipping_reach_optax():
    import optax
    from experiments.configs.reproduce import get_config
    from experiments.paper.setup import minibatch_optimizer
    cfg = get_config("quick")
    cfg.finetune.update(dict(minibatch_optimizer="adamw", minibatch_lr=0.01,
                             weight_decay=0.1, clip_norm=1.0))
    params = np.array([1.0, -2.0, 0.5, 3.0])
    # the second gradient is clipped to a different scale than the first, so clipping
    # changes Adam's (otherwise scale-invariant) update
    grads = [np.array([3.0, -4.0, 0.0, 12.0]), np.array([-0.1, 0.2, 0.3, -0.05])]
    got = _apply_steps(minibatch_optimizer(cfg), params, grads)
    by_hand = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.01, weight_decay=0.1))
    np.testing.assert_allclose(got, _apply_steps(by_hand, params, grads), rtol=1e-6)
    ref = _adamw_reference(params, grads, lr=0.01, weight_decay=0.1, clip_norm=1.0)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    # both knobs change the result by more than the tolerance above
    for other in (dict(weight_decay=0.0, clip_norm=1.0), dict(weight_decay=0.1,
                                                                clip_norm=None)):
        alt = _adamw_reference(params, grads, lr=0.01, **other)
        assert np.max(np.abs(alt - got)) > 1e-4, other
    # clip_norm=None leaves clipping out; optax's own adamw default (1e-4) is not used
    cfg.finetune.clip_norm = None
    np.testing.assert_allclose(
        _apply_steps(minibatch_optimizer(cfg), params, grads),
        _adamw_reference(params, grads, lr=0.01, weight_decay=0.1, clip_norm=None),
        rtol=1e-5, atol=1e-6)


def test_schedule_and_warmup_reach_optax():
    import optax
    from experiments.configs.reproduce import get_config
    from experiments.paper.setup import learning_rate_schedule, minibatch_optimizer
    cfg = get_config("quick")
    cfg.finetune.update(dict(minibatch_optimizer="sgd", minibatch_lr=0.1, weight_decay=0.0,
                             clip_norm=None, schedule="cosine", warmup_steps=2))
    sched = learning_rate_schedule(cfg, num_steps=10)
    expected = optax.warmup_cosine_decay_schedule(0.0, 0.1, 2, 10, end_value=0.0)
    for step in range(11):
        assert float(sched(step)) == pytest.approx(float(expected(step)), abs=1e-9)
    assert float(sched(0)) == 0.0 and float(sched(2)) == pytest.approx(0.1)
    # SGD with this schedule: step t moves by lr(t) * g
    params, g = np.array([1.0, 2.0]), np.array([0.5, -1.0])
    got = _apply_steps(minibatch_optimizer(cfg, num_steps=10), params, [g] * 3)
    lrs = [float(expected(t)) for t in range(3)]
    np.testing.assert_allclose(got, params - sum(lrs) * g, rtol=1e-6)
    cfg.finetune.schedule = "constant"   # warmup, then the constant rate
    sched = learning_rate_schedule(cfg, num_steps=10)
    assert [float(sched(t)) for t in (0, 1, 2, 7)] == pytest.approx([0.0, 0.05, 0.1, 0.1])


@pytest.mark.parametrize("update, message", [
    (dict(minibatch_optimizer="adam", weight_decay=0.1), "weight_decay"),
    (dict(clip_norm=-1.0), "clip_norm"),
    (dict(schedule="linear"), "schedule"),
    (dict(schedule="cosine"), "num_steps"),
    (dict(minibatch_optimizer="lion"), "minibatch_optimizer"),
])
def test_optimizer_knobs_reject_bad_values(update, message):
    from experiments.configs.reproduce import get_config
    from experiments.paper.setup import minibatch_optimizer
    cfg = get_config("quick")
    cfg.finetune.update(update)
    with pytest.raises(ValueError, match=message):
        minibatch_optimizer(cfg)


def test_regime_sweep_vmapped_over_learning_rates_equals_separate_runs():
    import jax
    import optax
    import taskvec_jax as tvj
    from experiments.configs.reproduce import get_config
    from experiments.paper.regime import regime_optimizer, sweep_learning_rates
    from taskvec_jax import analysis
    from taskvec_jax.models import MLP, accuracy, make_loss_fn
    from tests.helpers import digits, init
    data = jax.tree.map(lambda x: x.astype("float32") if x.dtype.kind == "f" else x,
                        digits(60))
    model = MLP((8, 10), "tanh")
    params = init(model, data)
    cfg = get_config("quick")
    cfg.finetune.update(dict(minibatch_optimizer="adamw", weight_decay=0.1, clip_norm=10.0))
    loss, key = make_loss_fn(model), jax.random.key(0)
    acc = lambda p, d: accuracy(model, p, d)  # noqa: E731
    lrs = [1e-3, 3e-2]
    shares, cos, move, val = sweep_learning_rates(
        loss, params, data, regime_optimizer(cfg), lrs, 4, batch_size=15, key=key,
        accuracy=acc, validation=data)
    assert shares.shape == (2, 4) and cos.shape == (2, 3) and val.shape == (2, 5)
    # one separate run (each optimizer object compiles its own program): the larger rate,
    # which the vmapped program runs beside the smaller one
    for i, lr in [(1, lrs[1])]:
        opt = optax.chain(optax.clip_by_global_norm(10.0), optax.adamw(lr, weight_decay=0.1))
        t = tvj.finetune(loss, params, data, opt, 4, batch_size=15, key=key,
                         keep_epochs="all", record_gradients=True)
        np.testing.assert_allclose(shares[i], analysis.normalized_contributions(t),
                                   rtol=1e-4)
        np.testing.assert_allclose(cos[i], analysis.cosines_to_first_epoch(t, 4),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(move[i], analysis.relative_movement(t.final_params,
                                                                       params), rtol=1e-4)
        assert float(val[i, -1]) == pytest.approx(float(acc(t.final_params, data)))
    assert move[1] > 5 * move[0]    # the larger rate moves much further


def test_readme_section_is_generated_from_results(quick_run):
    from experiments.paper import readme
    workdir, _ = quick_run
    results = json.loads((workdir / "results.json").read_text())
    text = (ROOT and open(f"{ROOT}/README.md").read())
    new = readme.rewrite(text, readme.render(results))
    section = new[new.index(readme.HEADING):]
    section = section[:section.index("\n## ", 1)]
    assert f"{results['elapsed_s']:.0f} s" in section
    for row in results["findings"]:
        assert row["verdict"] in section
    # the rest of README is untouched, and rewriting twice changes nothing
    assert new[:new.index(readme.HEADING)] == text[:text.index(readme.HEADING)]
    assert new[new.index("\n## ", new.index(readme.HEADING)):] == \
        text[text.index("\n## ", text.index(readme.HEADING)):]
    assert readme.rewrite(new, readme.render(results)) == new
