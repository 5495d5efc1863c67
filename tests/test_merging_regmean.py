"""Tests for RegMean and its Gram collector (taskvec_jax.merging.data_aware.regmean)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tests import fusionbench_reference
import taskvec_jax as tvj
from tests.helpers import digits
from taskvec_jax.models import CNN, MLP

M = tvj.merging


def _linear_tasks(sizes=(7, 12, 9), d=4, k=3, seed=0):
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=(n, d)) for n in sizes]
    ys = [x @ rng.normal(size=(d, k)) + 0.3 * rng.normal(size=(x.shape[0], k)) for x in xs]
    return xs, ys


# --------------------------------------------------------------------------- merge

def test_regmean_with_reduction_one_is_least_squares_on_all_tasks_data():
    # Each task's model is its own least-squares fit; RegMean's merge of them (from the
    # Grams the collector records) is the least-squares fit to all tasks' data at once.
    xs, ys = _linear_tasks()
    dense = nn.Dense(3, use_bias=False, param_dtype=jnp.float64)
    models = [{"params": {"kernel": jnp.asarray(np.linalg.lstsq(x, y, rcond=None)[0])}}
              for x, y in zip(xs, ys)]
    grams = [M.regmean_grams(dense.apply, m, jnp.asarray(x)) for m, x in zip(models, xs)]
    merged = M.regmean(models, grams, reduction=1.0)
    joint = np.linalg.lstsq(np.concatenate(xs), np.concatenate(ys), rcond=None)[0]
    np.testing.assert_allclose(merged["params"]["kernel"], joint, rtol=1e-12, atol=1e-14)
    # Not the average of the fits: the property is not trivially met.
    assert np.max(np.abs(np.mean([m["params"]["kernel"] for m in models], 0) - joint)) > 1e-2


# FusionBench builds its off-diagonal scale in float32 (torch.ones, fill_): reductions
# exactly representable in float32 keep the comparison at float64 precision.
@pytest.mark.parametrize("reduction", [1.0, 0.625, 0.0])
def test_regmean_matches_fusionbench(reduction):
    fb = fusionbench_reference.regmean()
    rng = np.random.default_rng(1)
    models, grams, weights = [], [], {"fc.weight": [], "fc.bias": []}
    for t in range(3):
        x = rng.normal(size=(20, 5)) * rng.uniform(0.5, 2, size=5)
        kernel, bias = rng.normal(size=(5, 4)), rng.normal(size=4)
        models.append({"fc": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}})
        grams.append({"fc": {"kernel": jnp.asarray(x.T @ x / 20), "bias": None}})
        weights["fc.weight"].append(torch.tensor(kernel.T))    # torch Linear: [out, in]
        weights["fc.bias"].append(torch.tensor(bias))
    expected = fb.merging_with_regmean_weights(
        weights, [{"fc": torch.tensor(np.asarray(g["fc"]["kernel"]))} for g in grams],
        reduce_non_diagonal_ratio=reduction)
    merged = M.regmean(models, grams, reduction=reduction)
    np.testing.assert_allclose(merged["fc"]["kernel"], expected["fc.weight"].numpy().T,
                               rtol=1e-11)
    np.testing.assert_allclose(merged["fc"]["bias"], expected["fc.bias"].numpy(), rtol=1e-13)


def test_regmean_leaves_without_gram_are_averaged_and_ints_kept():
    models = [{"w": jnp.eye(2) * (t + 1), "b": jnp.full(2, float(t)), "n": jnp.asarray(t)}
              for t in range(2)]
    grams = [{"w": jnp.eye(2), "b": None, "n": None}] * 2
    out = M.regmean(models, grams)
    np.testing.assert_allclose(out["w"], 1.5 * np.eye(2), rtol=1e-15)
    np.testing.assert_allclose(out["b"], [0.5, 0.5], rtol=1e-15)
    assert int(out["n"]) == 0


def test_regmean_errors_name_the_problem():
    models = [{"w": jnp.ones((3, 2)), "b": jnp.ones(2)}] * 2
    good = {"w": jnp.eye(3), "b": None}
    with pytest.raises(ValueError, match=r"grams\[0\]: leaf 'b' has a Gram, but only 2-D"):
        M.regmean(models, [{"w": jnp.eye(3), "b": jnp.eye(2)}] * 2)
    with pytest.raises(ValueError, match=r"grams\[1\]: leaf 'w' has shape \(2, 2\), "
                                         r"expected \(3, 3\)"):
        M.regmean(models, [good, {"w": jnp.eye(2), "b": None}])
    with pytest.raises(ValueError, match="grams has 1 entries, models has 2"):
        M.regmean(models, [good])
    with pytest.raises(ValueError, match=r"reduction must lie in \[0, 1\]"):
        M.regmean(models, [good] * 2, reduction=1.5)


# --------------------------------------------------------------------------- Grams

@functools.lru_cache(maxsize=None)
def _images():
    return digits(20)["image"]


def _gram(x):
    x = np.asarray(x).reshape(-1, np.shape(x)[-1])
    return x.T @ x


def test_grams_of_a_linen_mlp_are_xtx_of_its_layer_inputs():
    model = MLP((6, 5, 3), "tanh", param_dtype=jnp.float64)
    x = _images()
    params = model.init(jax.random.key(0), x[:1])
    grams = M.regmean_grams(model.apply, params, x, microbatch_size=7)   # 7 + 7 + 6
    # The layer inputs, computed independently from the parameters.
    p = params["params"]
    h0 = np.asarray(x).reshape(20, -1)
    h1 = np.tanh(h0 @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    h2 = np.tanh(h1 @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"])
    for name, h in (("Dense_0", h0), ("Dense_1", h1), ("Dense_2", h2)):
        np.testing.assert_allclose(grams["params"][name]["kernel"], _gram(h), rtol=1e-12)
        assert grams["params"][name]["bias"] is None


def test_grams_of_a_cnns_dense_layers_are_xtx_of_their_inputs():
    model = CNN(10, channels=(3,), hidden=8, activation="tanh", param_dtype=jnp.float64)
    x = _images()
    params = model.init(jax.random.key(1), x[:1])["params"]
    grams = M.regmean_grams(lambda p, b: model.apply({"params": p}, b), params, x)
    convs = {"Conv_0": params["Conv_0"]}
    flat = model.clone(hidden=0, include_head=False).apply({"params": convs}, x)
    hidden = model.clone(include_head=False).apply(
        {"params": {k: v for k, v in params.items() if k != "Dense_1"}}, x)
    np.testing.assert_allclose(grams["Dense_0"]["kernel"], _gram(flat), rtol=1e-12)
    np.testing.assert_allclose(grams["Dense_1"]["kernel"], _gram(hidden), rtol=1e-12)
    assert grams["Conv_0"]["kernel"] is None      # a convolution has no Gram


class _NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.first = nnx.Linear(3, 4, param_dtype=jnp.float64, rngs=rngs)
        self.second = nnx.Linear(4, 2, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):                        # x: [batch, tokens, 3]
        return self.second(jnp.tanh(self.first(x))).mean(1)


def test_grams_of_an_nnx_model_and_regmean_on_nnx_states():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(6, 5, 3)))
    graphdef, state = nnx.split(_NnxMLP(nnx.Rngs(0)), nnx.Param)
    states = [state, jax.tree.map(lambda a: a + 0.1, state)]
    apply = lambda s, b: nnx.merge(graphdef, s)(b)            # noqa: E731
    # normalize: each Gram divided by its rows, here examples times tokens (6 * 5 = 30).
    grams = [M.regmean_grams(apply, s, x, microbatch_size=4, normalize=True)
             for s in states]
    model = nnx.merge(graphdef, states[1])
    h1 = np.tanh(np.asarray(x) @ np.asarray(model.first.kernel[...])
                 + np.asarray(model.first.bias[...]))
    np.testing.assert_allclose(grams[0]["first"]["kernel"][...], _gram(x) / 30, rtol=1e-12)
    np.testing.assert_allclose(grams[1]["second"]["kernel"][...], _gram(h1) / 30,
                               rtol=1e-12)
    merged = M.regmean(states, grams)
    g0, g1 = (np.asarray(g["second"]["kernel"][...]) for g in grams)
    w0, w1 = (np.asarray(s["second"]["kernel"][...]) for s in states)
    np.testing.assert_allclose(merged["second"]["kernel"][...],
                               np.linalg.solve(g0 + g1, g0 @ w0 + g1 @ w1), rtol=1e-10)
    np.testing.assert_allclose(merged["first"]["bias"][...],
                               (np.asarray(states[0]["first"]["bias"][...])
                                + np.asarray(states[1]["first"]["bias"][...])) / 2,
                               rtol=1e-15)


def test_gram_collector_errors():
    params = {"w": jnp.ones((3, 2))}
    with pytest.raises(ValueError, match="called no flax nn.Dense or nnx.Linear"):
        M.regmean_grams(lambda p, b: b @ p["w"], params, jnp.ones((4, 3)))
    dense = nn.Dense(2, param_dtype=jnp.float64)
    variables = dense.init(jax.random.key(0), jnp.ones((1, 3)))
    cast = lambda v, b: dense.apply(jax.tree.map(lambda a: a * 1.0, v), b)   # noqa: E731
    with pytest.raises(ValueError, match="not a leaf of params"):
        M.regmean_grams(cast, variables, jnp.ones((4, 3)))
