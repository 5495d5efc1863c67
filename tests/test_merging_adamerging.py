"""Tests for AdaMerging (taskvec_jax.merging.data_aware.adamerging)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import taskvec_jax as tvj

M = tvj.merging


def _apply(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


@functools.lru_cache(maxsize=None)
def _problem():
    """A base model, 3 task vectors and each task's unlabeled inputs (float64)."""
    rng = np.random.default_rng(0)
    base = {"w1": jnp.asarray(0.5 * rng.normal(size=(4, 6))), "b1": jnp.zeros(6),
            "w2": jnp.asarray(0.5 * rng.normal(size=(6, 3))), "step": jnp.asarray(7)}
    taus = [{"w1": jnp.asarray(rng.normal(size=(4, 6))),
             "b1": jnp.asarray(0.3 * rng.normal(size=6)),
             "w2": jnp.asarray(rng.normal(size=(6, 3))), "step": None} for _ in range(3)]
    inputs = [jnp.asarray(rng.normal(size=(8, 4)) + t) for t in range(3)]
    return base, taus, inputs


def _objective(coefficients, taus=None, merge_fn=M.scaled_merge):
    base, default_taus, inputs = _problem()
    merged = merge_fn(base, default_taus if taus is None else taus, coefficients)
    return M.prediction_entropy(_apply, merged, inputs)


def test_task_wise_adamerging_decreases_the_entropy():
    base, taus, inputs = _problem()
    result = M.adamerging(base, taus, _apply, inputs, num_steps=25,
                          optimizer=optax.adam(0.05))
    assert result.coefficients.shape == (3,)
    assert result.history.shape == (26, 3) and result.losses.shape == (26,)
    np.testing.assert_array_equal(result.history[0], [0.3, 0.3, 0.3])
    np.testing.assert_array_equal(result.history[-1], result.coefficients)
    assert float(result.losses[-1]) < 0.8 * float(result.losses[0])
    # losses[i] is the objective at history[i]; params is the merge at the coefficients.
    for i in (0, 10, 25):
        np.testing.assert_allclose(result.losses[i], _objective(result.history[i]),
                                   rtol=1e-12)
    expected = M.task_arithmetic(base, taus, alpha=result.coefficients)
    for k in ("w1", "b1", "w2"):
        np.testing.assert_allclose(result.params[k], expected[k], rtol=1e-13)
    assert int(result.params["step"]) == 7


def test_layer_wise_coefficients_have_the_documented_shape():
    base, taus, inputs = _problem()
    result = M.adamerging(base, taus, _apply, inputs, granularity="layer", num_steps=20,
                          optimizer=optax.adam(0.05))
    c = result.coefficients
    assert set(c) == {"w1", "b1", "w2", "step"} and c["step"] is None
    for k in ("w1", "b1", "w2"):
        assert c[k].shape == (3,)
        assert result.history[k].shape == (21, 3)
    assert result.history["step"] is None
    assert float(result.losses[-1]) < float(result.losses[0])
    # The layers learn different coefficients (else layer-wise would be task-wise).
    assert float(jnp.max(jnp.abs(c["w1"] - c["w2"]))) > 1e-3
    np.testing.assert_allclose(result.losses[-1], _objective(c), rtol=1e-12)


def _central_differences(f, x, h=1e-6):
    flat, unravel = tvj.tree.ravel(x)
    out = []
    for i in range(flat.size):
        e = jnp.zeros_like(flat).at[i].set(h)
        out.append((f(unravel(flat + e)) - f(unravel(flat - e))) / (2 * h))
    return unravel(jnp.asarray(out))


@pytest.mark.parametrize("granularity", ["task", "layer", "ties"])
def test_gradients_through_the_merge_match_finite_differences(granularity):
    base, taus, _ = _problem()
    rng = np.random.default_rng(1)
    if granularity == "layer":
        coefficients = {k: jnp.asarray(rng.uniform(0.1, 0.5, 3)) for k in ("w1", "b1", "w2")}
        coefficients["step"] = None
    else:
        coefficients = jnp.asarray(rng.uniform(0.1, 0.5, 3))
    used = M.ties_masked_task_vectors(taus, density=0.4) if granularity == "ties" else taus
    f = jax.jit(lambda c: _objective(c, used))
    grad = jax.grad(f)(coefficients)
    fd = _central_differences(f, coefficients)
    for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(fd)):
        np.testing.assert_allclose(g, d, rtol=1e-7, atol=1e-9)


def test_ties_masked_task_vectors_sum_to_ties_and_adamerging_learns_over_them():
    base, taus, inputs = _problem()
    masked = M.ties_masked_task_vectors(taus, density=0.4)
    ties = M.ties(base, taus, density=0.4, merge="sum")
    summed = M.task_arithmetic(base, masked, alpha=1.0)
    for k in ("w1", "b1", "w2"):
        np.testing.assert_allclose(summed[k], ties[k], rtol=1e-13, atol=1e-15)
        assert float(jnp.mean(masked[0][k] != 0)) < 0.9       # masks removed entries
    result = M.adamerging(base, masked, _apply, inputs, num_steps=15,
                          optimizer=optax.adam(0.05))
    assert float(result.losses[-1]) < float(result.losses[0])


def test_adamerging_with_per_task_heads_minibatches_and_a_custom_merge():
    base, taus, inputs = _problem()
    heads = [lambda p, x, t=t: _apply(p, x)[:, :t + 2] for t in range(3)]  # 2, 3, 4 classes
    heads[2] = lambda p, x: jnp.concatenate([_apply(p, x), jnp.full((x.shape[0], 1),
                                                                    -1e9)], 1)  # padded
    calls = []

    def merge(base, task_vectors, coefficients):
        calls.append(1)
        return M.scaled_merge(base, task_vectors, jnp.abs(coefficients))

    kwargs = dict(num_steps=6, optimizer=optax.sgd(0.1), merge_fn=merge, batch_size=5,
                  key=jax.random.key(0))
    a = M.adamerging(base, taus, heads, inputs, **kwargs)
    b = M.adamerging(base, taus, heads, inputs, **kwargs)
    np.testing.assert_array_equal(a.history, b.history)         # deterministic given key
    assert calls                                                 # merge_fn was used
    # The padded class (probability exactly 0) adds exactly nothing to the entropy.
    padded = M.prediction_entropy(heads[2], base, inputs[2:])
    np.testing.assert_allclose(padded, M.prediction_entropy(_apply, base, inputs[2:]),
                               rtol=1e-14)


def test_adamerging_errors():
    base, taus, inputs = _problem()
    with pytest.raises(ValueError, match="unlabeled_inputs has 2 tasks, task_vectors has 3"):
        M.adamerging(base, taus, _apply, inputs[:2])
    with pytest.raises(ValueError, match="unknown granularity"):
        M.adamerging(base, taus, _apply, inputs, granularity="leaf")
    with pytest.raises(ValueError, match="pass key="):
        M.adamerging(base, taus, _apply, inputs, batch_size=4)
    with pytest.raises(ValueError, match="task 0 has only 8"):
        M.adamerging(base, taus, _apply, inputs, batch_size=9, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"\[n, num_classes\] logits"):
        M.adamerging(base, taus, lambda p, x: _apply(p, x)[:, 0], inputs)
    with pytest.raises(ValueError, match=r"init for granularity='layer'"):
        M.adamerging(base, taus, _apply, inputs, granularity="layer", init={"w1": 1.0})
    with pytest.raises(ValueError, match="task vector 1"):
        M.adamerging(base, [taus[0], {**taus[1], "w1": jnp.ones((2, 2))}, taus[2]],
                     _apply, inputs)
