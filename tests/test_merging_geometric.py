"""SLERP and Model Stock: endpoints, the arc, ratios and conventions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import taskvec_jax as tvj

M = tvj.merging
TOL = dict(rtol=1e-12, atol=1e-12)


def rand(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


@pytest.mark.parametrize("scope", ["leaf", "global"])
def test_slerp_endpoints_and_constant_norm_on_the_arc(scope):
    a = {"w": rand(0, 4, 3), "b": rand(1, 3), "step": jnp.int32(1)}
    b = {"w": rand(2, 4, 3), "b": rand(3, 3), "step": jnp.int32(2)}
    # equal norms (per leaf for "leaf", overall for "global")
    b = {"w": b["w"] * jnp.linalg.norm(a["w"]) / jnp.linalg.norm(b["w"]),
         "b": b["b"] * jnp.linalg.norm(a["b"]) / jnp.linalg.norm(b["b"]), "step": b["step"]}
    f = jax.jit(lambda t: M.slerp(a, b, t=t, scope=scope))
    for name in ("w", "b"):
        np.testing.assert_allclose(f(0.0)[name], a[name], **TOL)
        np.testing.assert_allclose(f(1.0)[name], b[name], **TOL)
    assert f(0.5)["step"] == 1
    norm = lambda tree, name: float(jnp.linalg.norm(tree[name]))  # noqa: E731
    whole = lambda tree: float(tvj.tree.norm({"w": tree["w"], "b": tree["b"]}))  # noqa: E731
    for t in np.linspace(0, 1, 7):
        out = f(t)
        np.testing.assert_allclose(whole(out), whole(a), rtol=1e-12)
        if scope == "leaf":
            for name in ("w", "b"):
                np.testing.assert_allclose(norm(out, name), norm(a, name), rtol=1e-12)
    # the angle to a grows linearly with t
    vec = (lambda x: x["w"]) if scope == "leaf" else (  # noqa: E731
        lambda x: jnp.concatenate([x["w"].ravel(), x["b"]]))
    cos = lambda x, y: float(jnp.vdot(x, y) / jnp.linalg.norm(x) / jnp.linalg.norm(y))
    theta = np.arccos(cos(vec(a), vec(b)))
    np.testing.assert_allclose(np.arccos(cos(vec(a), vec(f(0.3)))), 0.3 * theta, rtol=1e-9)


def test_slerp_of_task_vectors_and_the_collinear_fallback():
    base = {"w": rand(4, 5)}
    ta, tb = rand(5, 5), rand(6, 5)
    out = M.slerp({"w": base["w"] + ta}, {"w": base["w"] + tb}, t=0.4, base=base)
    ref = M.slerp({"w": ta}, {"w": tb}, t=0.4)
    np.testing.assert_allclose(out["w"], base["w"] + ref["w"], rtol=1e-12, atol=1e-12)
    # collinear: linear interpolation (2a at t = 0.5 of a and 3a is 2.5a... linear)
    x = rand(7, 5)
    np.testing.assert_allclose(M.slerp({"w": x}, {"w": 3 * x}, t=0.5)["w"], 2 * x, **TOL)


def test_model_stock_ratio_closed_forms():
    x = rand(8, 6)
    same = M.model_stock_ratio([{"w": x}, {"w": x}, {"w": x}])["w"]
    np.testing.assert_allclose(same, 1.0, **TOL)                      # cos 1: t = 1
    e = jnp.eye(3)
    orth = M.model_stock_ratio([{"w": e[0]}, {"w": e[1]}, {"w": e[2]}])["w"]
    np.testing.assert_allclose(orth, 0.0, **TOL)                      # cos 0: t = 0
    # N = 2, cos = c: t = 2c / (1 + c)
    a, b = jnp.array([1.0, 0.0]), jnp.array([0.6, 0.8])
    np.testing.assert_allclose(M.model_stock_ratio([{"w": a}, {"w": b}])["w"],
                               2 * 0.6 / 1.6, **TOL)


def test_model_stock_merge_per_leaf():
    taus = [{"w": rand(10 + t, 4, 3), "b": rand(20 + t, 3), "step": None} for t in range(3)]
    base = {"w": rand(30, 4, 3), "b": rand(31, 3), "step": jnp.int32(5)}
    out = M.model_stock(base, taus)
    ratio = M.model_stock_ratio(taus)
    for name in ("w", "b"):
        mean = sum(t[name] for t in taus) / 3
        np.testing.assert_allclose(out[name], base[name] + ratio[name] * mean, **TOL)
    assert out["step"] == 5
    np.testing.assert_allclose(jax.jit(M.model_stock)(base, taus)["w"], out["w"], **TOL)


def test_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        M.model_stock({"w": jnp.zeros(2)}, [{"w": jnp.ones(2)}])
    with pytest.raises(ValueError, match="scope"):
        M.slerp({"w": jnp.ones(2)}, {"w": jnp.ones(2)}, scope="row")
    with pytest.raises(ValueError, match="model_b"):
        M.slerp({"w": jnp.ones(2)}, {"w": jnp.ones(3)})
