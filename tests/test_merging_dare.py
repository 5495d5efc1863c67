"""Tests for DARE (merging.drop_and_rescale): dare and dare_task_arithmetic."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.merging_refs import (SETTINGS, TRANSFORMS, M, assert_same_under, assert_trees_close,
                          assert_trees_equal, inputs, ref_ties, trees)


# --------------------------------------------------------------------------- DARE

@SETTINGS
@given(tree=trees(ints=False), seed=st.integers(0, 2**31 - 1))
def test_dare_with_drop_rate_zero_is_the_identity(tree, seed):
    out = M.dare(tree, drop_rate=0.0, key=jax.random.key(seed))
    assert_trees_equal(out, tree)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_dare_survivors_are_exactly_input_over_keep_rate(p, dtype):
    x = jnp.asarray(np.random.default_rng(2).normal(size=(40, 30)), dtype)
    out = M.dare({"x": x}, drop_rate=p, key=jax.random.key(3))["x"]
    assert out.dtype == dtype
    kept = np.asarray(out) != 0
    xn = np.asarray(x)
    # Correctly rounded division in the input's dtype, entry by entry.
    np.testing.assert_array_equal(np.asarray(out)[kept], (xn / np.dtype(dtype).type(1 - p))[kept])
    # The dropped fraction is Binomial(n, p): within 5 standard deviations.
    n = x.size
    assert abs((~kept).sum() - n * p) <= 5 * math.sqrt(n * p * (1 - p))
    unscaled = M.dare({"x": x}, drop_rate=p, key=jax.random.key(3), rescale=False)["x"]
    np.testing.assert_array_equal(np.asarray(unscaled)[kept], xn[kept])
    np.testing.assert_array_equal(np.asarray(unscaled) != 0, kept)


def test_dare_mean_over_keys_converges_to_the_input():
    p, num_keys = 0.6, 4000
    x = jnp.asarray(np.random.default_rng(4).normal(size=64))
    keys = jax.random.split(jax.random.key(5), num_keys)
    draws = jax.vmap(lambda k: M.dare({"x": x}, drop_rate=p, key=k)["x"])(keys)
    mean = np.asarray(draws.mean(0))
    # Each entry is x / (1 - p) * Bernoulli(1 - p): std |x| sqrt(p / (1 - p)).
    sigma = np.abs(np.asarray(x)) * math.sqrt(p / (1 - p)) / math.sqrt(num_keys)
    assert np.all(np.abs(mean - np.asarray(x)) <= 5 * sigma)
    # And the CLT scale is right (the error is not suspiciously small either).
    z = (mean - np.asarray(x)) / sigma
    assert 0.5 < np.std(z) < 1.5


def test_dare_is_deterministic_per_key_and_leaf_independent():
    tree = {"a": jnp.ones(50), "b": jnp.ones(50)}
    k = jax.random.key(7)
    out1, out2 = M.dare(tree, drop_rate=0.5, key=k), M.dare(tree, drop_rate=0.5, key=k)
    assert_trees_equal(out1, out2)
    assert not np.array_equal(out1["a"], out1["b"])   # leaves draw from different keys
    other = M.dare(tree, drop_rate=0.5, key=jax.random.key(8))
    assert not np.array_equal(out1["a"], other["a"])


def test_dare_ties_composes():
    base = {"w": jnp.zeros((4, 6))}
    rng = np.random.default_rng(9)
    taus = [{"w": jnp.asarray(rng.normal(size=(4, 6)))} for _ in range(3)]
    keys = jax.random.split(jax.random.key(10), 3)
    dropped = [M.dare(t, drop_rate=0.5, key=k) for t, k in zip(taus, keys)]
    out = M.ties(base, dropped, density=1.0)
    assert_trees_close(out, ref_ties(dropped, 1.0, "global", "mean"))



def test_dare_task_arithmetic_is_task_arithmetic_of_the_dropped_task_vectors():
    base, taus = inputs()
    key = jax.random.key(14)
    for alpha in (0.3, [1.0, -0.5, 2.0]):
        dropped = [M.dare(t, drop_rate=0.4, key=jax.random.fold_in(key, i))
                   for i, t in enumerate(taus)]
        want = M.task_arithmetic(base, dropped, alpha=alpha)
        got = M.dare_task_arithmetic(base, taus, alpha=alpha, drop_rate=0.4, key=key)
        assert_trees_close(got, want, rtol=1e-15, atol=1e-15)
        assert int(got["n"]) == 3
    # drop_rate 0 is plain task arithmetic, exactly.
    assert_trees_equal(M.dare_task_arithmetic(base, taus, alpha=0.5, drop_rate=0.0, key=key),
                       M.task_arithmetic(base, taus, alpha=0.5))


# --------------------------------------------------------------------------- jit / errors

@pytest.mark.parametrize("transform", TRANSFORMS)
def test_dare_under_jit_equals_eager(transform):
    base, _ = inputs()
    key = jax.random.key(0)
    assert_same_under(transform, {
        "dare": lambda t: M.dare(t[0], drop_rate=0.3, key=key),
        "dare_task_arithmetic": lambda t: M.dare_task_arithmetic(
            base, t, alpha=jnp.array([1.0, 0.5, 2.0]), drop_rate=0.3, key=key),
    }, exact=("dare",))


def test_dare_accepts_a_traced_drop_rate():
    x = {"x": jnp.arange(1.0, 41.0)}
    fn = jax.jit(lambda p: M.dare(x, drop_rate=p, key=jax.random.key(1)))
    assert_trees_equal(fn(0.25), M.dare(x, drop_rate=0.25, key=jax.random.key(1)))


@pytest.mark.parametrize("call, match", [
    (lambda b, t: M.dare(t[0], drop_rate=1.0, key=jax.random.key(0)),
     r"drop_rate must lie in \[0, 1\)"),
    (lambda b, t: M.dare(t[0], drop_rate=-0.1, key=jax.random.key(0)),
     r"drop_rate must lie in \[0, 1\)"),
    (lambda b, t: M.dare_task_arithmetic(b, t, drop_rate=1.0, key=jax.random.key(0)),
     r"drop_rate must lie in \[0, 1\)"),
    (lambda b, t: M.dare_task_arithmetic(b, [], drop_rate=0.5, key=jax.random.key(0)),
     "empty"),
    (lambda b, t: M.dare_task_arithmetic(b, t, alpha=[1.0, 2.0], drop_rate=0.5,
                                         key=jax.random.key(0)), "one entry per task"),
])
def test_bad_input_raises_a_clear_value_error(call, match):
    base, taus = inputs()
    with pytest.raises(ValueError, match=match):
        call(base, taus)
