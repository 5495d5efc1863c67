"""Tests for taskvec_jax.merging.task_arithmetic."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import taskvec_jax as tvj

M = tvj.merging
FLOATS = st.floats(-100, 100, allow_nan=False, allow_subnormal=False)


@st.composite
def problems(draw):
    num_tasks = draw(st.integers(1, 4))
    shape = draw(st.sampled_from([(2, 3), (5,)]))
    arr = lambda: jnp.asarray(draw(hnp.arrays(np.float64, shape, elements=FLOATS)))
    base = {"w": arr(), "b": arr()}
    taus = [{"w": arr(), "b": arr()} for _ in range(num_tasks)]
    alpha = draw(st.one_of(FLOATS, st.lists(FLOATS, min_size=num_tasks,
                                            max_size=num_tasks)))
    return base, taus, alpha


def _close(a, b, atol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=atol), a, b)


EPS = np.finfo(np.float64).eps


@settings(max_examples=40, deadline=None)
@given(problem=problems(), c1=FLOATS, c2=FLOATS)
def test_task_arithmetic_is_affine_and_linear_in_the_task_vectors(problem, c1, c2):
    base, taus, alpha = problem
    alphas = np.broadcast_to(np.asarray(alpha, np.float64), (len(taus),))
    out = M.task_arithmetic(base, taus, alpha=alpha)
    expected = jax.tree.map(
        lambda b, *ts: np.asarray(b) + sum(a * np.asarray(t) for a, t in zip(alphas, ts)),
        base, *taus)
    # Entries are bounded by 100; a sum of T + 1 terms is within (T + 1) ulps of its size.
    size = 100 * (1 + np.abs(alphas).sum())
    _close(out, expected, 4 * (len(taus) + 1) * EPS * size)
    # Linearity: TA(base, c1 u + c2 v) - base = c1 (TA(base, u) - base) + c2 (...).
    vs = [jax.tree.map(jnp.flip, t) for t in taus]
    mixed = [jax.tree.map(lambda x, y: c1 * x + c2 * y, u, v) for u, v in zip(taus, vs)]
    lhs = tvj.tree.sub(M.task_arithmetic(base, mixed, alpha=alpha), base)
    rhs = tvj.tree.add(tvj.tree.scale(c1, tvj.tree.sub(M.task_arithmetic(base, taus, alpha=alpha), base)),
                       tvj.tree.scale(c2, tvj.tree.sub(M.task_arithmetic(base, vs, alpha=alpha), base)))
    c = 1 + abs(c1) + abs(c2)
    _close(lhs, rhs, 8 * (len(taus) + 2) * EPS * c * size * c)


def test_scalar_alpha_is_the_papers_theta_ta_and_negative_alpha_forgets():
    base = {"w": jnp.array([1.0, 2.0])}
    taus = [{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 4.0])}]
    np.testing.assert_array_equal(M.task_arithmetic(base, taus, alpha=0.5)["w"], [1.5, 4.0])
    np.testing.assert_array_equal(M.task_arithmetic(base, taus, alpha=[1.0, -1.0])["w"],
                                  [2.0, -2.0])
    # Forgetting a task vector and adding it back returns the base exactly here.
    once = M.task_arithmetic(base, taus[:1], alpha=-1.0)
    np.testing.assert_array_equal(M.task_arithmetic(once, taus[:1], alpha=1.0)["w"], base["w"])


def test_dtypes_and_non_float_leaves_follow_the_base():
    base = {"w": jnp.ones(3, jnp.bfloat16), "v": jnp.ones(2, jnp.float32),
            "step": jnp.array(7, jnp.int32)}
    ft = [{"w": jnp.array([1.5, 2.0, 3.0], jnp.bfloat16), "v": jnp.array([2.0, 0.5], jnp.float32),
           "step": jnp.array(9, jnp.int32)}]
    taus = [tvj.task_vector(f, base) for f in ft]
    assert taus[0]["step"] is None
    out = M.task_arithmetic(base, taus, alpha=2.0)
    assert out["w"].dtype == jnp.bfloat16 and out["v"].dtype == jnp.float32
    assert int(out["step"]) == 7
    np.testing.assert_array_equal(out["w"].astype(np.float32), [2.0, 3.0, 5.0])
    np.testing.assert_array_equal(out["v"], [3.0, 0.0])


@pytest.mark.parametrize("transform", [pytest.param(jax.jit, id="jit"),
                                       pytest.param(lambda f: f, id="eager")])
def test_task_arithmetic_under_jit_and_with_traced_alpha(transform):
    rng = np.random.default_rng(0)
    base = {"w": jnp.asarray(rng.normal(size=(3, 4)))}
    taus = [{"w": jnp.asarray(rng.normal(size=(3, 4)))} for _ in range(3)]
    fn = transform(lambda base, taus, alpha: M.task_arithmetic(base, taus, alpha=alpha))
    for alpha in (0.3, jnp.array([0.1, -0.2, 0.7])):
        expected = np.asarray(base["w"]) + sum(
            a * np.asarray(t["w"]) for a, t in zip(np.broadcast_to(alpha, (3,)), taus))
        np.testing.assert_allclose(fn(base, taus, alpha)["w"], expected, rtol=1e-14)
    # Sweeping alpha with vmap (one program for the whole grid).
    grid = jnp.linspace(0.0, 1.0, 5)
    swept = jax.vmap(lambda a: M.task_arithmetic(base, taus, alpha=a))(grid)
    for i, a in enumerate(grid):
        np.testing.assert_allclose(swept["w"][i], M.task_arithmetic(base, taus, alpha=a)["w"],
                                   rtol=1e-14)


def test_bad_input_raises_a_clear_value_error():
    base = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}
    tau = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
    with pytest.raises(ValueError, match="empty"):
        M.task_arithmetic(base, [])
    with pytest.raises(ValueError, match=r"task vector 1: leaf 'b' has shape \(4,\)"):
        M.task_arithmetic(base, [tau, {"w": jnp.ones((2, 3)), "b": jnp.ones(4)}])
    with pytest.raises(ValueError, match=r"task vector 0: .*missing leaf 'b'"):
        M.task_arithmetic(base, [{"w": jnp.ones((2, 3))}])
    with pytest.raises(ValueError, match="one entry per task"):
        M.task_arithmetic(base, [tau, tau], alpha=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="sequence"):
        M.task_arithmetic(base, tau)


def test_positional_alpha_is_deprecated_and_still_computes_the_same():
    base = {"w": jnp.array([1.0, 2.0])}
    taus = [{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 4.0])}]
    with pytest.warns(DeprecationWarning, match="pass alpha by keyword"):
        old = M.task_arithmetic(base, taus, [0.5, -1.0])
    np.testing.assert_array_equal(old["w"], M.task_arithmetic(base, taus, alpha=[0.5, -1.0])["w"])
    with pytest.raises(TypeError, match="positional"):
        M.task_arithmetic(base, taus, 0.5, 0.5)
