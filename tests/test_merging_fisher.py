"""Tests for Fisher merging and the diagonal Fisher (taskvec_jax.merging.data_aware.fisher)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import taskvec_jax as tvj
from tests import fusionbench_reference
from tests.helpers import digits

M = tvj.merging
TRANSFORMS = [pytest.param(jax.jit, id="jit"), pytest.param(lambda f: f, id="eager")]


def _models(seed, num, with_int=False):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        m = {"w": jnp.asarray(rng.normal(size=(4, 3))), "b": jnp.asarray(rng.normal(size=3))}
        if with_int:
            m["step"] = jnp.asarray(int(rng.integers(10)))
        out.append(m)
    return out


def _fishers(seed, num):
    rng = np.random.default_rng(seed)
    return [{"w": jnp.asarray(rng.uniform(size=(4, 3)) ** 3),
             "b": jnp.asarray(rng.uniform(size=3) ** 3)} for _ in range(num)]


# --------------------------------------------------------------------------- merge

@pytest.mark.parametrize("transform", TRANSFORMS)
def test_equal_fishers_give_the_uniform_soup(transform):
    models = _models(0, 3)
    f = {"w": jnp.asarray(np.random.default_rng(1).uniform(size=(4, 3))),
         "b": jnp.zeros(3)}                          # zero Fisher: eps alone weighs
    merged = transform(lambda ms, fs: M.fisher(ms, fs, eps=1e-6))(models, [f] * 3)
    soup = M.uniform_soup(models)
    for k in ("w", "b"):
        np.testing.assert_allclose(merged[k], soup[k], rtol=1e-13, atol=1e-15)


def test_fisher_is_the_weighted_formula_with_none_and_int_leaves():
    models = _models(2, 3, with_int=True)
    fishers = [dict(f, b=None, step=None) for f in _fishers(3, 3)]
    weights = jnp.asarray([0.5, 0.3, 0.2])
    merged = M.fisher(models, fishers, eps=1e-3, weights=weights)
    w = np.asarray(weights)[:, None, None]
    fw = np.stack([np.asarray(f["w"]) for f in fishers]) + 1e-3
    theta = np.stack([np.asarray(m["w"]) for m in models])
    np.testing.assert_allclose(merged["w"], (w * fw * theta).sum(0) / (w * fw).sum(0),
                               rtol=1e-13)
    # No Fisher at "b": the weight-weighted average; the int leaf is model 0's.
    np.testing.assert_allclose(merged["b"], sum(float(weights[t]) * np.asarray(m["b"])
                                                for t, m in enumerate(models)), rtol=1e-13)
    assert int(merged["step"]) == int(models[0]["step"])


def test_fisher_keeps_bfloat16():
    models = [{"w": jnp.array([1.0, 2.0], jnp.bfloat16)}, {"w": jnp.array([3.0, 4.0],
                                                                        jnp.bfloat16)}]
    fishers = [{"w": jnp.array([1.0, 0.0], jnp.float32)}, {"w": jnp.array([1.0, 1.0])}]
    out = M.fisher(models, fishers, eps=0.0)
    assert out["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out["w"], np.float32), [2.0, 4.0])


@pytest.mark.parametrize("normalize", [False, True])
def test_fisher_matches_fusionbench(normalize):
    fb = fusionbench_reference.fisher_merging()
    models, fishers = _models(4, 3), _fishers(5, 3)
    fishers[1] = jax.tree.map(lambda f: 100.0 * f, fishers[1])   # scales differ
    weights = [0.2, 0.5, 0.3]
    expected = fb.merging_with_fisher_weights(
        {k: [torch.tensor(np.asarray(m[k])) for m in models] for k in ("w", "b")},
        [{k: torch.tensor(np.asarray(f[k])) for k in ("w", "b")} for f in fishers],
        torch.tensor(weights, dtype=torch.float64), normalize_fisher_weight=normalize,
        minimal_fisher_weight=1e-6)
    merged = M.fisher(models, fishers, eps=1e-6, weights=weights, normalize=normalize)
    for k in ("w", "b"):
        np.testing.assert_allclose(merged[k], expected[k].numpy(), rtol=1e-12)


def test_fisher_errors_name_the_problem():
    models, fishers = _models(0, 2), _fishers(0, 2)
    with pytest.raises(ValueError, match="fishers has 1 entries, models has 2"):
        M.fisher(models, fishers[:1])
    bad = [fishers[0], dict(fishers[1], w=jnp.ones((3, 4)))]
    with pytest.raises(ValueError, match=r"fishers\[1\]: leaf 'w' has shape \(3, 4\)"):
        M.fisher(models, bad)
    with pytest.raises(ValueError, match="disagree on which leaves.*'b'"):
        M.fisher(models, [fishers[0], dict(fishers[1], b=None)])
    with pytest.raises(ValueError, match="weights must be non-negative"):
        M.fisher(models, fishers, weights=[1.0, -0.5])
    with pytest.raises(ValueError, match="eps must be >= 0"):
        M.fisher(models, fishers, eps=-1.0)
    with pytest.raises(ValueError, match="model 1"):
        M.fisher([models[0], {"w": models[1]["w"]}], fishers)


# --------------------------------------------------------------------------- statistics

def _logits(p, batch):
    h = jnp.tanh(batch["image"].reshape(batch["image"].shape[0], -1) @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"]


def _loss(p, batch):
    logp = jax.nn.log_softmax(_logits(p, batch))
    return -jnp.mean(jnp.take_along_axis(logp, batch["label"][:, None], 1))


@functools.lru_cache(maxsize=None)
def _setup():
    data = digits(11)
    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(0.3 * rng.normal(size=(64, 5))), "b1": jnp.zeros(5),
              "w2": jnp.asarray(0.5 * rng.normal(size=(5, 10))),
              "b2": jnp.asarray(0.1 * rng.normal(size=10))}
    return params, data


def _example(data, i):
    return jax.tree.map(lambda x: x[i:i + 1], data)


@jax.jit
def _grad_log_prob(params, example, c):
    """The reference's own per-example gradient of ``log p(c | x)`` (one compilation)."""
    return jax.grad(lambda p: jax.nn.log_softmax(_logits(p, example)[0])[c])(params)


def _loop_mean(per_example, n):
    """``(1/n) sum_i per_example(i)`` in numpy, one example at a time."""
    total = None
    for i in range(n):
        g = {k: np.asarray(v) for k, v in per_example(i).items()}
        total = g if total is None else {k: total[k] + g[k] for k in g}
    return {k: v / n for k, v in total.items()}


def test_empirical_fisher_is_mean_squared_per_example_gradient():
    params, data = _setup()
    got = M.diagonal_fisher(_loss, params, data, num_examples=10,
                            microbatch_size=4)   # 2 chunks of 4 in a scan + a tail of 2
    grad = jax.jit(jax.grad(_loss))
    want = _loop_mean(lambda i: {k: np.asarray(v) ** 2 for k, v in
                                 grad(params, _example(data, i)).items()}, 10)
    for k in params:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-16)


def test_sampled_fisher_uses_one_label_per_example_from_the_model():
    params, data = _setup()
    key = jax.random.key(3)
    got = M.diagonal_fisher(_logits, params, data, mode="sampled", key=key)
    logp = jax.nn.log_softmax(_logits(params, data), axis=-1)

    labels = jax.jit(jax.vmap(lambda i, lp: jax.random.categorical(
        jax.random.fold_in(key, i), lp)))(jnp.arange(11), logp)

    def per_example(i):
        y = labels[i]
        return {k: np.asarray(v) ** 2 for k, v in
                _grad_log_prob(params, _example(data, i), y).items()}

    want = _loop_mean(per_example, 11)
    for k in params:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-16)


def test_expected_fisher_is_the_exact_expectation_over_classes():
    params, data = _setup()
    got = M.diagonal_fisher(_logits, params, data, mode="expected", num_examples=4)
    prob = np.exp(np.asarray(jax.nn.log_softmax(_logits(params, data), axis=-1)))

    def per_example(i):
        total = {k: 0.0 for k in params}
        for c in range(10):
            g = _grad_log_prob(params, _example(data, i), c)
            total = {k: total[k] + prob[i, c] * np.asarray(g[k]) ** 2 for k in params}
        return total

    want = _loop_mean(per_example, 4)
    for k in params:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-11, atol=1e-16)


def test_diagonal_fisher_errors():
    params, data = _setup()
    with pytest.raises(ValueError, match="unknown mode"):
        M.diagonal_fisher(_loss, params, data, mode="exact")
    with pytest.raises(ValueError, match="pass key="):
        M.diagonal_fisher(_logits, params, data, mode="sampled")
    with pytest.raises(ValueError, match="num_examples is 12, but data has only 11"):
        M.diagonal_fisher(_loss, params, data, num_examples=12)
    with pytest.raises(ValueError, match=r"\[batch, num_classes\] logits"):
        M.diagonal_fisher(_loss, params, data, mode="expected")
    with pytest.raises(ValueError, match="scalar mean loss"):
        M.diagonal_fisher(_logits, params, data)
