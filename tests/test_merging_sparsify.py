"""Tests for taskvec_jax.merging.sparsify: masks by scope, trim, TIES, DARE, Breadcrumbs.

The numpy references below are written independently of the library: ranks come from a
stable argsort of ``-|x|`` (ties go to the earlier position) and counts from
``decimal.Decimal`` arithmetic, the documented rounding rule ``ceil(fraction * n)``.
"""

import decimal
import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import taskvec_jax as tvj
from taskvec_jax.merging import sparsify

M = tvj.merging
# Every new (shape, density, scope) compiles a program, so examples are few and the
# shapes and densities come from small sets.
SETTINGS = settings(max_examples=20, deadline=None)
TRANSFORMS = [pytest.param(jax.jit, id="jit"), pytest.param(lambda f: f, id="eager")]


# --------------------------------------------------------------------------- references

def ref_count(fraction, n):
    if fraction == 0:
        return 0
    d = decimal.Decimal(repr(float(fraction))) * n
    return int(d.to_integral_value(rounding=decimal.ROUND_CEILING))


def ref_group_mask(values, density, outliers=0.0):
    """Band of ranks [ceil(o n), ceil(o n) + ceil(d n)) of a 1-D group, stable ranks."""
    values = np.asarray(values, np.float64).ravel()
    n = values.size
    lo = ref_count(outliers, n)
    hi = min(n, lo + ref_count(density, n))
    order = np.argsort(-np.abs(values), kind="stable")
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    return (rank >= lo) & (rank < hi)


def ref_mask(tree, density, outliers, scope):
    """Numpy mask tree; None / non-float leaves -> None."""
    leaves, treedef = jax.tree.flatten(tree, is_leaf=lambda x: x is None)
    floats = [i for i, x in enumerate(leaves)
              if x is not None and np.issubdtype(np.asarray(x).dtype, np.floating)]
    out = [None] * len(leaves)
    if scope == "global":
        flat = np.concatenate([np.asarray(leaves[i], np.float64).ravel() for i in floats])
        mask = ref_group_mask(flat, density, outliers)
        start = 0
        for i in floats:
            size = np.size(leaves[i])
            out[i] = mask[start:start + size].reshape(np.shape(leaves[i]))
            start += size
    else:
        for i in floats:
            x = np.asarray(leaves[i], np.float64)
            if scope == "leaf":
                out[i] = ref_group_mask(x, density, outliers).reshape(x.shape)
            else:
                rows = x.reshape(-1, x.shape[-1] if x.ndim else 1)
                out[i] = np.stack([ref_group_mask(r, density, outliers)
                                   for r in rows]).reshape(x.shape)
    return jax.tree.unflatten(treedef, out)


def ref_ties(taus, density, scope, merge):
    """TIES after Yadav et al.'s reference code, with elected sign 0 giving 0."""
    trimmed = []
    for tau in taus:
        mask = ref_mask(tau, density, 0.0, scope)
        trimmed.append(jax.tree.map(lambda x, m: np.where(m, np.asarray(x), 0.0), tau, mask))

    def leaf(*xs):
        stacked = np.stack(xs)
        sign = np.sign(stacked.sum(0))
        agree = np.where(sign > 0, stacked > 0, np.where(sign < 0, stacked < 0, False))
        selected = np.where(agree, stacked, 0.0).sum(0)
        if merge == "sum":
            return selected
        return selected / np.maximum(agree.sum(0), 1)

    return jax.tree.map(leaf, *trimmed)


def assert_trees_equal(actual, expected):
    a_leaves, a_def = jax.tree.flatten(actual, is_leaf=lambda x: x is None)
    e_leaves, e_def = jax.tree.flatten(expected, is_leaf=lambda x: x is None)
    assert a_def == e_def
    for a, e in zip(a_leaves, e_leaves):
        if e is None:
            assert a is None
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def assert_trees_close(actual, expected, rtol=1e-12, atol=1e-12):
    jax.tree.map(lambda a, e: np.testing.assert_allclose(np.asarray(a), np.asarray(e),
                                                         rtol=rtol, atol=atol),
                 actual, expected)


# --------------------------------------------------------------------------- strategies

DENSITIES = st.sampled_from([0.07, 0.25, 0.55, 1.0])
SCOPES = st.sampled_from(list(M.SCOPES))


SHAPES = st.sampled_from([(3, 4), (1, 5), (2, 1)])


@st.composite
def trees(draw, ints=None, shape=None):
    """Small float64 trees; integer-valued entries (many ties, zeros) half the time."""
    rows, cols = draw(SHAPES) if shape is None else shape
    if ints is None:
        ints = draw(st.booleans())
    elements = (st.integers(-3, 3).map(float) if ints
                else st.floats(-10, 10, allow_nan=False, allow_subnormal=False))
    arr = lambda shape: draw(hnp.arrays(np.float64, shape, elements=elements))
    return {"w": jnp.asarray(arr((rows, cols))), "b": jnp.asarray(arr((cols,))),
            "s": jnp.asarray(arr(()))}


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


@SETTINGS
@given(tree=trees(), density=DENSITIES, outliers=st.sampled_from([0.0, 0.0, 0.1, 0.3]),
       scope=SCOPES)
def test_mask_and_trim_match_stable_argsort_reference(tree, density, outliers, scope):
    assume(outliers + density <= 1.0)
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


# --------------------------------------------------------------------------- TIES

TAUS_HAND = [jnp.array([1.0, -1.0, 2.0, 0.0, 1.0]),
             jnp.array([-1.0, -2.0, 2.0, 0.0, -1.0]),
             jnp.array([-1.0, 4.0, -1.0, 0.0, 0.0])]


@pytest.mark.parametrize("density, merge, expected", [
    # No trimming. Column sums 1-1-1 = -1, -1-2+4 = 1, 2+2-1 = 3, 0, 1-1+0 = 0.
    # Elected signs -, +, +, 0, 0; agreeing values {-1, -1}, {4}, {2, 2}, {}, {}.
    (1.0, "mean", [-1.0, 4.0, 2.0, 0.0, 0.0]),
    (1.0, "sum", [-2.0, 4.0, 4.0, 0.0, 0.0]),
    # density 0.4 keeps k = ceil(2.0) = 2 per task (ties to the earlier position):
    # tau_1 -> [1, 0, 2, 0, 0], tau_2 -> [0, -2, 2, 0, 0], tau_3 -> [-1, 4, 0, 0, 0].
    # Column 0 now sums to 0: no sign is elected and it merges to 0.
    (0.4, "mean", [0.0, 4.0, 2.0, 0.0, 0.0]),
    (0.4, "sum", [0.0, 4.0, 4.0, 0.0, 0.0]),
])
def test_ties_hand_worked(density, merge, expected):
    taus = [{"v": t} for t in TAUS_HAND]
    merged = M.ties_merge(taus, density=density, merge=merge)
    np.testing.assert_array_equal(merged["v"], expected)
    base = {"v": jnp.full(5, 10.0)}
    out = M.ties(base, taus, density=density, merge=merge, alpha=0.5)
    np.testing.assert_array_equal(out["v"], 10.0 + 0.5 * np.array(expected))


@SETTINGS
@given(taus=st.tuples(st.integers(1, 4), SHAPES).flatmap(
           lambda ts: st.lists(trees(ints=True, shape=ts[1]), min_size=ts[0],
                               max_size=ts[0])),
       density=DENSITIES, scope=SCOPES, merge=st.sampled_from(["mean", "sum"]))
def test_ties_matches_reference(taus, density, scope, merge):
    merged = M.ties_merge(taus, density=density, scope=scope, merge=merge)
    assert_trees_close(merged, ref_ties(taus, density, scope, merge), rtol=1e-15, atol=0)


@SETTINGS
@given(signs=hnp.arrays(np.float64, (3, 4), elements=st.sampled_from([-1.0, 1.0])),
       mags=hnp.arrays(np.float64, (5, 3, 4), elements=st.floats(0.1, 10.0)),
       num_tasks=st.integers(1, 5))
def test_ties_density_one_on_same_signed_vectors_is_mean_or_sum(signs, mags, num_tasks):
    taus = [{"w": jnp.asarray(signs * mags[t])} for t in range(num_tasks)]
    stacked = signs * mags[:num_tasks]
    np.testing.assert_allclose(M.ties_merge(taus, density=1.0, merge="mean")["w"],
                               stacked.mean(0), rtol=1e-14)
    np.testing.assert_allclose(M.ties_merge(taus, density=1.0, merge="sum")["w"],
                               stacked.sum(0), rtol=1e-14)
    base = {"w": jnp.ones((3, 4))}
    np.testing.assert_allclose(M.ties(base, taus, density=1.0, alpha=0.3)["w"],
                               1.0 + 0.3 * stacked.mean(0), rtol=1e-14)


def test_ties_keeps_base_at_non_float_leaves_and_float32():
    base = {"w": jnp.ones((2, 3), jnp.float32), "step": jnp.array(5)}
    taus = [{"w": jnp.array([[1.0, -2.0, 3.0], [0.5, 0.0, -1.0]], jnp.float32), "step": None},
            {"w": jnp.array([[-1.0, -1.0, 2.0], [1.5, 1.0, -1.0]], jnp.float32), "step": None}]
    out = M.ties(base, taus, density=1.0)
    assert out["w"].dtype == jnp.float32
    assert int(out["step"]) == 5
    expected = ref_ties([{"w": np.asarray(t["w"], np.float64)} for t in taus], 1.0,
                        "global", "mean")["w"]
    np.testing.assert_allclose(out["w"], 1.0 + expected, rtol=1e-6)


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


# --------------------------------------------------------------------------- Breadcrumbs

def test_breadcrumbs_hand_worked():
    tau = {"w": jnp.array([[5.0, -1.0, 3.0, -2.0, 0.5], [0.1, 0.2, -9.0, 0.3, 4.0]]),
           "b": jnp.array([2.0, -3.0])}
    # Rows of n = 5: drop ceil(0.2 * 5) = 1 outlier, keep the next ceil(0.4 * 5) = 2.
    # Row 0 by magnitude: 5, 3, -2, -1, 0.5 -> keep 3, -2.  Row 1: -9, 4, 0.3, ... -> 4, 0.3.
    # b is one row of n = 2: drop ceil(0.4) = 1 (the -3), keep min(2, 1 + 1) - 1 = 1: 2.
    band = {"w": np.array([[0.0, 0.0, 3.0, -2.0, 0.0], [0.0, 0.0, 0.0, 0.3, 4.0]]),
            "b": np.array([2.0, 0.0])}
    base = {"w": jnp.ones((2, 5)), "b": jnp.zeros(2)}
    second = jax.tree.map(lambda x: -2.0 * x, tau)        # same band, scaled
    out = M.breadcrumbs(base, [tau, second], density=0.4, outliers=0.2, alpha=[1.0, 0.25])
    np.testing.assert_allclose(out["w"], 1.0 + 0.5 * band["w"], rtol=1e-15)
    np.testing.assert_allclose(out["b"], 0.5 * band["b"], rtol=1e-15)
    trimmed = M.trim(tau, density=0.4, outliers=0.2, scope="row")
    assert_trees_equal(trimmed, band)


@SETTINGS
@given(taus=st.tuples(st.integers(1, 3), SHAPES).flatmap(
           lambda ts: st.lists(trees(shape=ts[1]), min_size=ts[0], max_size=ts[0])),
       density=DENSITIES, outliers=st.sampled_from([0.0, 0.1, 0.2]), scope=SCOPES)
def test_breadcrumbs_keeps_exactly_its_band(taus, density, outliers, scope):
    assume(outliers + density <= 1.0)
    base = jax.tree.map(jnp.zeros_like, taus[0])
    alphas = np.linspace(0.5, 1.5, len(taus))
    out = M.breadcrumbs(base, taus, density=density, outliers=outliers, alpha=alphas,
                        scope=scope)
    expected = jax.tree.map(np.zeros_like, base)
    for a, tau in zip(alphas, taus):
        band = ref_mask(tau, density, outliers, scope)
        expected = jax.tree.map(lambda e, x, m, a=a: e + a * np.where(m, x, 0.0),
                                expected, tau, band)
    assert_trees_close(out, expected, rtol=1e-14, atol=1e-14)


# --------------------------------------------------------------------------- jit / errors

def _inputs():
    rng = np.random.default_rng(11)
    base = {"w": jnp.asarray(rng.normal(size=(3, 4))), "b": jnp.asarray(rng.normal(size=4)),
            "n": jnp.array(3)}
    taus = [{"w": jnp.asarray(rng.normal(size=(3, 4))), "b": jnp.asarray(rng.normal(size=4)),
             "n": None} for _ in range(3)]
    return base, taus


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_every_function_under_jit_equals_eager(transform):
    base, taus = _inputs()
    key = jax.random.key(0)
    cases = {
        "mask": (lambda t: M.magnitude_mask(t[0], density=0.3, outliers=0.1, scope="leaf"),),
        "trim": (lambda t: M.trim(t[0], density=0.3, scope="global"),),
        "ties_merge": (lambda t: M.ties_merge(t, density=0.5, scope="row"),),
        "ties": (lambda t: M.ties(base, t, density=0.5, alpha=jnp.asarray(0.7)),),
        "dare": (lambda t: M.dare(t[0], drop_rate=0.3, key=key),),
        "breadcrumbs": (lambda t: M.breadcrumbs(base, t, density=0.4, outliers=0.1,
                                                alpha=jnp.array([1.0, 0.5, 2.0])),),
    }
    for name, (fn,) in cases.items():
        got = transform(fn)(taus)
        want = fn(taus)
        if name in ("mask", "trim", "dare"):
            assert_trees_equal(got, want)
        else:  # XLA may contract a * b + c into one FMA in one program and not the other
            assert_trees_close(got, want, rtol=1e-15, atol=1e-15)


def test_dare_accepts_a_traced_drop_rate():
    x = {"x": jnp.arange(1.0, 41.0)}
    fn = jax.jit(lambda p: M.dare(x, drop_rate=p, key=jax.random.key(1)))
    assert_trees_equal(fn(0.25), M.dare(x, drop_rate=0.25, key=jax.random.key(1)))


@pytest.mark.parametrize("call, match", [
    (lambda b, t: M.ties(b, [], density=0.5), "empty"),
    (lambda b, t: M.ties_merge([], density=0.5), "empty"),
    (lambda b, t: M.breadcrumbs(b, []), "empty"),
    (lambda b, t: M.ties(b, t, density=0.0), r"density must lie in \(0, 1\]"),
    (lambda b, t: M.ties(b, t, density=1.5), r"density must lie in \(0, 1\]"),
    (lambda b, t: M.trim(t[0], density=-0.1), r"density must lie in \(0, 1\]"),
    (lambda b, t: M.trim(t[0], density=float("nan")), "density must be a number"),
    (lambda b, t: M.magnitude_mask(t[0], density=True), "density must be a number"),
    (lambda b, t: M.trim(t[0], density=0.5, scope="layer"), "unknown scope 'layer'"),
    (lambda b, t: M.ties(b, t, scope="column"), "unknown scope 'column'"),
    (lambda b, t: M.breadcrumbs(b, t, scope="tensor"), "unknown scope 'tensor'"),
    (lambda b, t: M.ties(b, t, merge="median"), "unknown merge 'median'"),
    (lambda b, t: M.dare(t[0], drop_rate=1.0, key=jax.random.key(0)),
     r"drop_rate must lie in \[0, 1\)"),
    (lambda b, t: M.dare(t[0], drop_rate=-0.1, key=jax.random.key(0)),
     r"drop_rate must lie in \[0, 1\)"),
    (lambda b, t: M.breadcrumbs(b, t, density=0.5, outliers=0.6), "must not exceed 1"),
    (lambda b, t: M.breadcrumbs(b, t, outliers=1.0), r"outliers must lie in \[0, 1\)"),
    (lambda b, t: M.breadcrumbs(b, t, alpha=[1.0, 2.0]), "one entry per task"),
    (lambda b, t: M.ties(b, t, alpha=[1.0, 2.0, 3.0]), "real scalar"),
    (lambda b, t: jax.jit(lambda d: M.trim(t[0], density=d))(0.5), "concrete Python number"),
])
def test_bad_input_raises_a_clear_value_error(call, match):
    base, taus = _inputs()
    with pytest.raises(ValueError, match=match):
        call(base, taus)


def test_mismatched_trees_name_the_task_and_path():
    base, taus = _inputs()
    bad = dict(taus[1], w=jnp.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"task vector 1: leaf 'w' has shape \(3, 5\)"):
        M.ties(base, [taus[0], bad], density=0.5)
    with pytest.raises(ValueError, match=r"task vector 1: leaf 'w' has shape \(3, 5\)"):
        M.ties_merge([taus[0], bad])
    missing = {"w": taus[2]["w"], "n": None}
    with pytest.raises(ValueError, match=r"task vector 2: .*missing leaf 'b'"):
        M.breadcrumbs(base, [taus[0], taus[1], missing])
    cplx = [{"w": jnp.ones(3, jnp.complex64)}]
    with pytest.raises(ValueError, match=r"task vector 0: leaf 'w' is complex"):
        M.ties_merge(cplx)


def test_merge_memory_does_not_grow_with_the_number_of_tasks():
    # The documented memory claims, checked on the compiled programs (CPU). Eagerly, each
    # task is one step whose accumulators are donated (aliased) and whose temporaries stay
    # within 3 model sizes. Under an outer jit, the tasks run in a fori_loop: temporaries
    # are the same for 2 and 8 tasks.
    base = {"w": jnp.zeros((500, 400), jnp.float32), "b": jnp.zeros(100_000, jnp.float32)}
    model_bytes = 300_000 * 4
    state = sparsify._ties_init(base, 8, "mean")
    for scope in ("global", "row"):
        stats = sparsify._ties_step_jit.lower(
            state, base, density=0.2, scope=scope, merge="mean").compile().memory_analysis()
        assert stats.temp_size_in_bytes <= 3 * model_bytes
        assert stats.alias_size_in_bytes == 2.5 * model_bytes   # P, N, two uint8 counts
    temps = {}
    for num_tasks in (2, 8):
        taus = tuple(base for _ in range(num_tasks))
        ties = sparsify._ties_merge_graph.lower(taus, density=0.2, scope="global",
                                                merge="mean").compile().memory_analysis()
        crumbs = sparsify._breadcrumbs_graph.lower(
            base, taus, jnp.ones(num_tasks), density=0.2, outliers=0.1,
            scope="row").compile().memory_analysis()
        temps[num_tasks] = (ties.temp_size_in_bytes, crumbs.temp_size_in_bytes)
    for two, eight in zip(temps[2], temps[8]):
        assert eight <= two + 0.01 * model_bytes
        assert eight <= 6 * model_bytes
