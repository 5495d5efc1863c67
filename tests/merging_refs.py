"""Independent numpy references and hypothesis strategies for the sparsifying merges' tests.

The references are written independently of the library: ranks come from a stable argsort
of ``-|x|`` (ties go to the earlier position) and counts from ``decimal.Decimal``
arithmetic, the documented rounding rule ``ceil(fraction * n)``.
"""

import decimal

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st

import taskvec_jax as tvj

M = tvj.merging
# Every new (shape, density, scope) compiles a program, so examples are few and the
# shapes and densities come from small sets.
SETTINGS = settings(max_examples=20, deadline=None)
TRANSFORMS = [pytest.param(jax.jit, id="jit"), pytest.param(lambda f: f, id="eager")]


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


def ref_ties(taus, density, scope, merge, consensus="mass", alphas=None):
    """TIES after Yadav et al.'s reference code, with elected sign 0 giving 0.

    ``alphas`` scale each task vector before the trim; ``consensus="count"`` elects the
    sign of ``#positive - #negative`` (mergekit's ``count``).
    """
    if alphas is not None:
        taus = [jax.tree.map(lambda x, a=a: a * np.asarray(x, np.float64), tau)
                for a, tau in zip(alphas, taus)]
    trimmed = []
    for tau in taus:
        mask = ref_mask(tau, density, 0.0, scope)
        trimmed.append(jax.tree.map(lambda x, m: np.where(m, np.asarray(x), 0.0), tau, mask))

    def leaf(*xs):
        stacked = np.stack(xs)
        votes = stacked if consensus == "mass" else np.sign(stacked)
        sign = np.sign(votes.sum(0))
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




def inputs():
    """A base with a non-float leaf and three float64 task vectors (``None`` there)."""
    rng = np.random.default_rng(11)
    base = {"w": jnp.asarray(rng.normal(size=(3, 4))), "b": jnp.asarray(rng.normal(size=4)),
            "n": jnp.array(3)}
    taus = [{"w": jnp.asarray(rng.normal(size=(3, 4))), "b": jnp.asarray(rng.normal(size=4)),
             "n": None} for _ in range(3)]
    return base, taus


def assert_same_under(transform, cases, exact):
    """Each ``fn(taus)`` of ``cases`` equals itself under ``transform`` (jit or eager)."""
    _, taus = inputs()
    for name, fn in cases.items():
        got, want = transform(fn)(taus), fn(taus)
        if name in exact:
            assert_trees_equal(got, want)
        else:  # XLA may contract a * b + c into one FMA in one program and not the other
            assert_trees_close(got, want, rtol=1e-15, atol=1e-15)


# Every (structure, density, outliers, scope) compiles a program of the selection kernel
# (seconds each on CPU). So the property tests draw values for ONE structure holding every
# shape class -- several rows, a single column (rows of one), a 1-D leaf (one row), a
# scalar -- and loop over a covering list of configurations in every example: each
# compiles once for the whole test, and every example exercises every class (each scope
# with outliers 0 and > 0, each density including the decimal 0.07 and the keep-all 1.0).
SHAPE_CLASSES = {"w": (3, 4), "c": (2, 1), "b": (5,), "s": ()}
MASK_CONFIGS = [  # (scope, density, outliers)
    ("global", 0.07, 0.3), ("global", 0.55, 0.0), ("global", 1.0, 0.0),
    ("leaf", 0.25, 0.1), ("leaf", 0.07, 0.0), ("leaf", 1.0, 0.0),
    ("row", 0.55, 0.3), ("row", 0.25, 0.0), ("row", 1.0, 0.0),
]
COVER_SETTINGS = settings(max_examples=10, deadline=None)


@st.composite
def class_trees(draw, ints=None):
    """A float64 tree of :data:`SHAPE_CLASSES`; integer-valued (ties, zeros) half the time."""
    if ints is None:
        ints = draw(st.booleans())
    elements = (st.integers(-3, 3).map(float) if ints
                else st.floats(-10, 10, allow_nan=False, allow_subnormal=False))
    return {k: jnp.asarray(draw(hnp.arrays(np.float64, shape, elements=elements)))
            for k, shape in SHAPE_CLASSES.items()}
