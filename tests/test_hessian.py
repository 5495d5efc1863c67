"""Hessian-vector products, power iteration and Hutchinson's trace against dense algebra."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from taskvec_jax import hessian, tree
from taskvec_jax.models import MLP, make_loss_fn

TRANSFORMS = [jax.jit, lambda f: f]


@functools.cache
def _problem(activation="tanh", loss="cross_entropy", n=11):
    """A tiny MLP, its loss and data (float64), and the dense Hessian of the mean loss."""
    model = MLP(features=(5, 4, 3), activation=activation, param_dtype=jnp.float64)
    loss_fn = make_loss_fn(model, loss)
    x = jax.random.normal(jax.random.key(1), (n, 4), jnp.float64)
    data = {"image": x, "label": jax.random.randint(jax.random.key(2), (n,), 0, 3)}
    params = model.init(jax.random.key(0), x[:1])["params"]
    flat, unravel = tree.ravel(params)
    dense = jax.jit(jax.hessian(lambda f: loss_fn(unravel(f), data)))(flat)
    return loss_fn, params, data, np.asarray(dense), unravel


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("microbatch_size", [None, 3])
def test_hvp_equals_dense_hessian_times_v(transform, microbatch_size):
    loss_fn, params, data, dense, unravel = _problem()
    v_flat = jax.random.normal(jax.random.key(3), (dense.shape[0],), jnp.float64)
    hv = transform(lambda p, d, v: hessian.hvp(loss_fn, p, d, v,
                                               microbatch_size=microbatch_size))(
        params, data, unravel(v_flat))
    np.testing.assert_allclose(np.asarray(tree.ravel(hv)[0]), dense @ np.asarray(v_flat),
                               rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_power_iteration_matches_eigh_on_mlp_hessian(transform):
    loss_fn, params, data, dense, _ = _problem()
    exact = np.max(np.abs(np.linalg.eigvalsh(dense)))
    res = transform(lambda p, d, k: hessian.hessian_spectral_norm(
        loss_fn, p, d, k, tol=1e-13, max_steps=5000))(params, data, jax.random.key(4))
    assert bool(res.converged)
    assert abs(float(res.norm) - exact) <= 1e-6 * exact
    assert float(res.norm) <= exact * (1 + 1e-12)  # ||H v|| never exceeds ||H||_2


def test_power_iteration_finds_a_dominant_negative_eigenvalue():
    # Spectrum {-5, 3, 1, 0.5, ...}: the norm is 5 and the Rayleigh quotient is -5.
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    eig = np.array([-5.0, 3.0, 1.0, 0.5] + [0.1] * 8)
    a = jnp.asarray(q @ np.diag(eig) @ q.T)
    v0 = {"w": jnp.asarray(rng.normal(size=(3, 4)))}
    matvec = lambda v: {"w": (a @ v["w"].reshape(-1)).reshape(3, 4)}  # noqa: E731
    res = jax.jit(lambda v: hessian.power_iteration(matvec, v, tol=1e-14,
                                                    max_steps=2000))(v0)
    assert abs(float(res.norm) - 5.0) <= 1e-10
    assert abs(float(res.eigenvalue) + 5.0) <= 1e-8
    np.testing.assert_allclose(float(tree.norm(res.vector)), 1.0, rtol=1e-12)


def test_power_iteration_of_the_zero_operator_is_zero():
    res = hessian.power_iteration(tree.zeros_like, {"w": jnp.ones(3)})
    assert float(res.norm) == 0.0 and bool(res.converged)


def test_power_iteration_respects_the_iteration_cap():
    loss_fn, params, data, _, _ = _problem()
    res = hessian.hessian_spectral_norm(loss_fn, params, data, jax.random.key(0),
                                        tol=0.0, max_steps=7)
    assert int(res.num_iterations) == 7 and not bool(res.converged)
    with pytest.raises(ValueError, match="max_steps"):
        hessian.power_iteration(tree.zeros_like, {"w": jnp.ones(3)}, max_steps=0)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_hutchinson_trace_within_four_standard_errors(transform):
    loss_fn, params, data, dense, _ = _problem("softplus", "mse")
    est = transform(lambda p, d, k: hessian.hessian_trace(loss_fn, p, d, k,
                                                          num_samples=200))(
        params, data, jax.random.key(5))
    exact = np.trace(dense)
    assert float(est.stderr) > 0
    assert abs(float(est.estimate) - exact) <= 4 * float(est.stderr)
    # The standard error is that of the samples' mean, and the estimator is not exact.
    np.testing.assert_allclose(float(est.stderr),
                               np.std(np.asarray(est.samples), ddof=1) / np.sqrt(200),
                               rtol=1e-12)
    assert abs(float(est.estimate) - exact) > 1e-8


def test_hutchinson_is_exact_for_a_diagonal_operator():
    # z_i^2 = 1 for Rademacher probes, so z^T D z = tr D for every probe.
    d = {"a": jnp.arange(1.0, 7.0).reshape(2, 3), "b": jnp.array([-2.0, 0.5])}
    est = hessian.hutchinson_trace(lambda v: tree.mul(d, v), d, jax.random.key(0),
                                   num_samples=5, chunk_size=2)
    np.testing.assert_allclose(float(est.estimate), 21.0 - 1.5, rtol=1e-15)
    assert float(est.stderr) == 0.0
    with pytest.raises(ValueError, match="num_samples"):
        hessian.hutchinson_trace(lambda v: v, d, jax.random.key(0), num_samples=1)


def test_microbatched_trace_equals_one_pass_trace():
    loss_fn, params, data, _, _ = _problem()
    key = jax.random.key(6)
    one = hessian.hessian_trace(loss_fn, params, data, key, num_samples=8)
    chunked = hessian.hessian_trace(loss_fn, params, data, key, num_samples=8,
                                    microbatch_size=4)
    np.testing.assert_allclose(np.asarray(chunked.samples), np.asarray(one.samples),
                               rtol=1e-12)


def test_deprecated_keyword_aliases_warn_and_agree():
    d = {"a": jnp.arange(1.0, 7.0).reshape(2, 3)}
    matvec = lambda v: tree.mul(d, v)  # noqa: E731
    key = jax.random.key(0)
    new = hessian.hutchinson_trace(matvec, d, key, num_samples=4, chunk_size=2)
    with pytest.warns(DeprecationWarning, match="num_samples"):
        old = hessian.hutchinson_trace(matvec, d, key, num_probes=4, batch_size=2)
    np.testing.assert_array_equal(old.samples, new.samples)
    with pytest.warns(DeprecationWarning, match="max_steps"):
        res = hessian.power_iteration(matvec, d, tol=0.0, max_iters=3)
    assert int(res.num_iterations) == 3
    with pytest.raises(TypeError, match="max_steps"):
        hessian.power_iteration(matvec, d, max_steps=4, max_iters=3)
