"""Tests for the magnitude selection kernel (merging._select) through magnitude_mask and trim.

References: tests/merging_refs.py (stable argsort ranks, decimal counts).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from tests.merging_refs import (COVER_SETTINGS, MASK_CONFIGS, TRANSFORMS, M, assert_same_under,
                          assert_trees_equal, class_trees, inputs, ref_count, ref_mask)


# --------------------------------------------------------------------------- masks / trim

HAND_TREE = {"a": [[3.0, -1.0, 2.0], [0.5, -4.0, 1.0]], "b": [5.0, -0.1]}


@pytest.mark.parametrize("scope, a, b", [
    # global: n = 8, k = 4 -> 5, -4, 3, 2.
    ("global", [[3.0, 0.0, 2.0], [0.0, -4.0, 0.0]], [5.0, 0.0]),
    # leaf: a has n = 6, k = 3 -> 3, 2, -4; b has n = 2, k = 1 -> 5.
    ("leaf", [[3.0, 0.0, 2.0], [0.0, -4.0, 0.0]], [5.0, 0.0]),
    # row: rows of 3 keep ceil(1.5) = 2; b is one row of 2, keeps 1.
    ("row", [[3.0, 0.0, 2.0], [0.0, -4.0, 1.0]], [5.0, 0.0]),
])
def test_trim_hand_worked_per_scope(scope, a, b):
    tree = jax.tree.map(jnp.asarray, HAND_TREE, is_leaf=lambda x: isinstance(x, list))
    out = M.trim(tree, density=0.5, scope=scope)
    np.testing.assert_array_equal(out["a"], np.array(a))
    np.testing.assert_array_equal(out["b"], np.array(b))


def test_ties_in_magnitude_go_to_the_earlier_position():
    row = {"r": jnp.array([1.0, -1.0, 1.0, 1.0])}
    np.testing.assert_array_equal(M.trim(row, density=0.5, scope="row")["r"],
                                  [1.0, -1.0, 0.0, 0.0])
    # Globally, positions run through the leaves in flattening order ('a' before 'b').
    tree = {"a": jnp.array([2.0, 1.0]), "b": jnp.array([1.0, -2.0])}
    out = M.trim(tree, density=0.75, scope="global")     # k = 3: both 2s, then a[1]
    np.testing.assert_array_equal(out["a"], [2.0, 1.0])
    np.testing.assert_array_equal(out["b"], [0.0, -2.0])
    # Signed zeros are equal magnitudes: the earlier one is kept.
    zeros = {"z": jnp.array([-0.0, 0.0, 0.0])}
    np.testing.assert_array_equal(M.magnitude_mask(zeros, density=0.33, scope="leaf")["z"],
                                  [True, False, False])


@pytest.mark.parametrize("scope", ["leaf", "row"])
@pytest.mark.parametrize("density, kept", [(0.07, 7), (0.55, 55), (0.14, 14), (0.001, 1),
                                           (1.0, 100)])
def test_count_rule_is_ceil_of_the_decimal_density(scope, density, kept):
    # 0.07 * 100 == 7.000000000000001 in floating point; the documented rule reads the
    # density as the decimal 7/100 and keeps 7, not 8. Any density > 0 keeps >= 1.
    x = {"v": jnp.arange(1.0, 101.0)}
    mask = M.magnitude_mask(x, density=density, scope=scope)["v"]
    assert int(mask.sum()) == kept
    assert bool(mask[-kept:].all())          # the largest magnitudes are the last ones


@COVER_SETTINGS
@given(tree=class_trees())
def test_mask_and_trim_match_stable_argsort_reference(tree):
    for scope, density, outliers in MASK_CONFIGS:
        _check_mask_and_trim(tree, density, outliers, scope)


def _check_mask_and_trim(tree, density, outliers, scope):
    mask = M.magnitude_mask(tree, density=density, outliers=outliers, scope=scope)
    expected = ref_mask(tree, density, outliers, scope)
    assert_trees_equal(mask, expected)
    # The documented count, group by group.
    if scope == "global":
        n = sum(x.size for x in jax.tree.leaves(tree))
        groups = [(np.concatenate([np.ravel(m) for m in jax.tree.leaves(mask)]), n)]
    elif scope == "leaf":
        groups = [(np.ravel(m), m.size) for m in jax.tree.leaves(mask)]
    else:
        groups = [(r, r.size) for m in jax.tree.leaves(mask)
                  for r in np.reshape(m, (-1, m.shape[-1] if m.ndim else 1))]
    for g, n in groups:
        lo = ref_count(outliers, n)
        assert int(np.sum(g)) == min(n, lo + ref_count(density, n)) - lo
    # trim keeps exactly the masked values and zeroes the rest.
    out = M.trim(tree, density=density, outliers=outliers, scope=scope)
    assert_trees_equal(out, jax.tree.map(lambda x, m: np.where(m, np.asarray(x), 0.0),
                                         tree, expected))


def test_global_scope_compares_mixed_dtypes_exactly():
    rng = np.random.default_rng(0)
    tree = {"a": jnp.asarray(rng.normal(size=(7, 3)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=11), jnp.float64)}
    # Make a float32 value tie a float64 value exactly (both representable in float32).
    tree["b"] = tree["b"].at[4].set(float(tree["a"][2, 1]))
    for density in (0.25, 0.75):
        mask = M.magnitude_mask(tree, density=density, scope="global")
        assert_trees_equal(mask, ref_mask(tree, density, 0.0, "global"))
    out = M.trim(tree, density=0.25, scope="global")
    assert out["a"].dtype == jnp.float32 and out["b"].dtype == jnp.float64
    assert_trees_equal(out, jax.tree.map(lambda x, m: np.where(m, np.asarray(x), 0).astype(
        x.dtype), tree, ref_mask(tree, 0.25, 0.0, "global")))


def test_none_and_integer_leaves_are_skipped():
    tau = {"w": jnp.array([[1.0, -3.0], [2.0, 0.5]]), "step": None,
           "ids": jnp.array([7, 8, 9])}
    mask = M.magnitude_mask(tau, density=0.5, scope="global")
    assert mask["step"] is None and mask["ids"] is None
    np.testing.assert_array_equal(mask["w"], [[False, True], [True, False]])  # n = 4, k = 2
    out = M.trim(tau, density=0.5, scope="row")
    assert out["step"] is None
    np.testing.assert_array_equal(out["ids"], [7, 8, 9])
    np.testing.assert_array_equal(out["w"], [[0.0, -3.0], [2.0, 0.0]])


def test_large_group_with_many_ties_needs_the_position_bisection():
    # 1000 entries, 600 of them tied at the threshold magnitude: the kept ties must be
    # exactly the earliest ones.
    rng = np.random.default_rng(1)
    x = np.where(rng.random(1000) < 0.6, 1.0, rng.uniform(1.5, 3.0, 1000))
    x = x * rng.choice([-1.0, 1.0], 1000)
    tree = {"x": jnp.asarray(x.reshape(10, 100))}
    for scope in M.SCOPES:
        mask = M.magnitude_mask(tree, density=0.5, scope=scope)
        assert_trees_equal(mask, ref_mask(tree, 0.5, 0.0, scope))



# --------------------------------------------------------------------------- jit / errors

@pytest.mark.parametrize("transform", TRANSFORMS)
def test_mask_and_trim_under_jit_equal_eager(transform):
    assert_same_under(transform, {
        "mask": lambda t: M.magnitude_mask(t[0], density=0.3, outliers=0.1, scope="leaf"),
        "trim": lambda t: M.trim(t[0], density=0.3, scope="global"),
    }, exact=("mask", "trim"))


@pytest.mark.parametrize("call, match", [
    (lambda t: M.trim(t[0], density=-0.1), r"density must lie in \(0, 1\]"),
    (lambda t: M.trim(t[0], density=float("nan")), "density must be a number"),
    (lambda t: M.magnitude_mask(t[0], density=True), "density must be a number"),
    (lambda t: M.trim(t[0], density=0.5, scope="layer"), "unknown scope 'layer'"),
    (lambda t: jax.jit(lambda d: M.trim(t[0], density=d))(0.5), "concrete Python number"),
])
def test_bad_input_raises_a_clear_value_error(call, match):
    _, taus = inputs()
    with pytest.raises(ValueError, match=match):
        call(taus)
