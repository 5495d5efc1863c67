import jax
import jax.numpy as jnp
import numpy as np
import pytest

from taskvec_jax import tree


def _trees():
    a = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.array([1.0, -2.0])}
    b = {"w": jnp.ones((2, 3)) * 0.5, "b": jnp.array([3.0, 4.0])}
    return a, b


@pytest.mark.parametrize("transform", [jax.jit, lambda f: f])
def test_cosine_equals_flat_numpy(transform):
    a, b = _trees()
    va = np.concatenate([np.ravel(a["b"]), np.ravel(a["w"])])
    vb = np.concatenate([np.ravel(b["b"]), np.ravel(b["w"])])
    expected = va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb))
    np.testing.assert_allclose(transform(tree.cosine)(a, b), expected, rtol=1e-14)
    np.testing.assert_allclose(transform(tree.cosine)(a, a), 1.0, rtol=1e-14)
    np.testing.assert_allclose(transform(tree.cosine)(a, tree.scale(-2.0, a)), -1.0,
                               rtol=1e-14)


def test_cosine_of_zero_tree_is_nan_not_a_silent_number():
    a, _ = _trees()
    assert np.isnan(tree.cosine(a, tree.zeros_like(a)))
    assert tree.cosine(a, tree.zeros_like(a), eps=1e-12) == 0.0


def test_ravel_roundtrip_and_order():
    a, _ = _trees()
    vec, unravel = tree.ravel(a)
    assert vec.shape == (8,)
    np.testing.assert_array_equal(vec[:2], a["b"])  # dict keys flatten sorted
    back = unravel(vec)
    assert jax.tree.structure(back) == jax.tree.structure(a)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(a)):
        np.testing.assert_array_equal(x, y)


def test_reexported_optax_algebra():
    a, b = _trees()
    out = tree.add_scale(a, 2.0, b)
    np.testing.assert_array_equal(out["w"], a["w"] + 2.0 * b["w"])
    np.testing.assert_allclose(tree.vdot(a, b), np.sum(a["w"] * b["w"]) + a["b"] @ b["b"])
    np.testing.assert_allclose(tree.norm(tree.sub(a, a)), 0.0)


def test_none_leaves_are_skipped():
    tau = {"w": jnp.ones(3), "step": None}
    assert float(tree.norm(tau)) == pytest.approx(np.sqrt(3.0))
    vec, _ = tree.ravel(tau)
    assert vec.shape == (3,)


def test_stack_unstack_inverse():
    a, b = _trees()
    s = tree.stack([a, b])
    assert s["w"].shape == (2, 2, 3)
    a2, b2 = tree.unstack(s)
    np.testing.assert_array_equal(a2["w"], a["w"])
    np.testing.assert_array_equal(b2["b"], b["b"])


def test_path_str_names_nested_leaves():
    t = {"params": {"Dense_0": {"kernel": jnp.zeros(2)}}, "seq": [jnp.zeros(1)]}
    names = [p for p, _ in tree.leaves_with_paths(t)]
    assert names == ["params/Dense_0/kernel", "seq/0"]


def test_is_float():
    assert tree.is_float(jnp.zeros(2))
    assert tree.is_float(jnp.zeros(2, jnp.bfloat16))
    assert not tree.is_float(jnp.zeros(2, jnp.int32))
    assert not tree.is_float(jnp.zeros(2, bool))
