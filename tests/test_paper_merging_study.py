"""The main job's merging study (experiments/paper/merging_study.py) and its report rows,
on hand-built numbers and tiny trees (the full pipeline: tests/test_reproduce.py)."""

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs.reproduce import get_config
from experiments.paper import merging_study, report
from experiments.paper.merging_study import METHODS, method_names, normalized_accuracy


def test_normalized_accuracy_on_a_hand_built_table():
    # per task merged / finetuned: 0.5, 1.0, 0.75 -> mean 0.75 (not 1.6 / 2.2 = 0.727)
    assert normalized_accuracy([0.4, 0.9, 0.3], [0.8, 0.9, 0.4]) == pytest.approx(0.75)
    assert normalized_accuracy(np.array([0.5]), np.array([0.5])) == 1.0
    with pytest.raises(ValueError, match="one accuracy per task"):
        normalized_accuracy([0.4, 0.9], [0.8, 0.9, 0.4])
    with pytest.raises(ValueError, match="> 0"):
        normalized_accuracy([0.4, 0.9], [0.8, 0.0])


def test_method_names_default_to_the_one_list_and_reject_unknown_names():
    cfg = get_config("quick")
    assert cfg.merging.methods is None
    assert method_names(cfg) == tuple(METHODS)
    assert method_names(cfg, ("tsv", "fisher")) == ("tsv", "fisher")
    cfg.merging.methods = ("task_arithmetic", "nope")
    with pytest.raises(ValueError, match="nope"):
        method_names(cfg)
    families = {"iso_c", "iso_cts", "tsv", "magmax", "consensus", "della", "model_stock",
                "fisher", "regmean", "adamerging_task", "adamerging_layer"}
    assert families <= set(METHODS)
    assert {METHODS[n].kind for n in METHODS} == {"alpha", "fixed", "data"}


class _Ctx:
    def __init__(self, base, taus, cfg):
        self.setup = SimpleNamespace(base=base)
        self.taus, self.cfg, self.key = taus, cfg, jax.random.key(3)


def _tree(key, scale=1.0):
    k = jax.random.split(key, 3)
    return {"Dense_0": {"kernel": scale * jax.random.normal(k[0], (12, 8)),
                        "bias": scale * jax.random.normal(k[1], (8,))},
            "Dense_1": {"kernel": scale * jax.random.normal(k[2], (8, 6))}}


@pytest.mark.parametrize("name", [n for n in METHODS if METHODS[n].kind == "alpha"])
def test_every_alpha_merge_is_homogeneous_in_alpha(name):
    """The study scales one merged task vector over the alpha grid: exact only because
    ``merge(alpha=a) = base + a (merge(alpha=1) - base)`` for every such merge."""
    key = jax.random.key(0)
    base = _tree(key)
    taus = [_tree(jax.random.fold_in(key, t + 1), 0.1) for t in range(3)]
    fn = METHODS[name].build(_Ctx(base, taus, get_config("quick").merging))
    one = fn(1.0)
    for a in (0.3, 2.5):
        got = fn(a)
        want = jax.tree.map(lambda b, m: b + a * (m - b), base, one)
        for g, w, b in zip(jax.tree.leaves(got), jax.tree.leaves(want),
                           jax.tree.leaves(base)):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
        # and the merge moves the base at all (a test that cannot pass by a no-op)
        assert max(float(jnp.max(jnp.abs(g - b))) for g, b in
                   zip(jax.tree.leaves(got), jax.tree.leaves(base))) > 1e-3


def _results(base, ft, ta, best_norm):
    per = {"task_arithmetic": {"avg_accuracy": float(np.mean(ta)), "alpha": 0.5,
                               "avg_normalized": normalized_accuracy(ta, ft)},
           "regmean": {"avg_accuracy": 0.9, "alpha": None, "avg_normalized": best_norm}}
    return {"merging": {"base_test": base, "minibatch": {
        "epochs": [1, 8], "finetuned_test": ft, "per_epoch": {"1": per, "8": per}}}}


def test_merging_headline_and_cells_from_hand_built_numbers():
    r = _results(base=[0.5, 0.7], ft=[0.9, 0.9], ta=[0.7, 0.8], best_norm=0.99)
    h = report.merging_headline(r)
    assert h["base"] == pytest.approx(0.6) and h["finetuned"] == pytest.approx(0.9)
    assert h["task_arithmetic"] == pytest.approx(0.75)
    # (0.75 - 0.6) / (0.9 - 0.6): half of the finetuning gain kept
    assert h["recovered"] == pytest.approx(0.5)
    assert h["task_arithmetic_normalized"] == pytest.approx((0.7 / 0.9 + 0.8 / 0.9) / 2)
    assert h["base_normalized"] == pytest.approx((0.5 / 0.9 + 0.7 / 0.9) / 2)
    assert h["best"] == "regmean"
    # no gain over the base: the share is undefined, not a division by zero
    assert math.isnan(report.merging_headline(
        _results([0.9, 0.9], [0.9, 0.9], [0.8, 0.8], 0.5))["recovered"])
    row = {"avg_normalized": 0.9512, "avg_accuracy": 0.8, "alpha": 0.7}
    assert report._merge_cell(row) == "**0.951** / 0.800 (a=0.7)"
    assert report._merge_cell({**row, "alpha": None}) == "**0.951** / 0.800"


def test_the_adamerging_apply_fn_is_one_object_per_setup():
    """AdaMerging's apply_fn is a static jit argument: a new one per epoch recompiles."""
    s = SimpleNamespace(encode=lambda p, x: x, heads=None, config=get_config("quick"))
    a = merging_study._Context(s, [], None).apply_fn
    assert merging_study._Context(s, [1], None).apply_fn is a
    other = SimpleNamespace(encode=lambda p, x: x, heads=None, config=s.config)
    assert merging_study._Context(other, [], None).apply_fn is not a
    assert merging_study._adam(1e-3) is merging_study._adam(1e-3)


def test_regmean_ridge_makes_a_never_set_input_the_models_mean():
    """A pixel no task ever sets: zero Gram row in every task, NaN without the ridge."""
    from taskvec_jax import merging
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(20, 4)) for _ in range(2)]
    for x in xs:
        x[:, 3] = 0.0
    models = [{"kernel": jnp.asarray(rng.normal(size=(4, 3)))} for _ in range(2)]
    grams = [{"kernel": jnp.asarray(x.T @ x)} for x in xs]
    plain = merging.regmean(models, grams, reduction=1.0)
    assert not np.all(np.isfinite(np.asarray(plain["kernel"])))
    ridged = merging_study._ridge(grams, 1e-6)
    out = np.asarray(merging.regmean(models, ridged, reduction=1.0)["kernel"])
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[3], (models[0]["kernel"][3] + models[1]["kernel"][3]) / 2,
                               rtol=1e-5)
    # the other rows are RegMean's least-squares solution on the set features, to O(ridge)
    g = sum(x[:, :3].T @ x[:, :3] for x in xs)
    rhs = sum(x[:, :3].T @ x[:, :3] @ np.asarray(m["kernel"])[:3] for x, m in zip(xs, models))
    np.testing.assert_allclose(out[:3], np.linalg.solve(g, rhs), rtol=1e-3, atol=1e-4)
