import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import taskvec_jax as tvj
from taskvec_jax import analysis
from taskvec_jax.models import MLP, make_loss_fn
from tests.helpers import digits, init


def _stacked(m=6, seed=0):
    rng = np.random.default_rng(seed)
    return {"a": jnp.asarray(rng.normal(size=(m, 3, 4))), "b": jnp.asarray(rng.normal(size=(m, 5)))}


def _flat(stacked):
    return np.concatenate([np.asarray(stacked["a"]).reshape(stacked["a"].shape[0], -1),
                           np.asarray(stacked["b"])], axis=1)


def test_cosine_matrix_matches_flattened_numpy():
    s = _stacked()
    x = _flat(s)
    n = np.linalg.norm(x, axis=1)
    np.testing.assert_allclose(analysis.cosine_matrix(s), x @ x.T / np.outer(n, n), rtol=1e-12)


def test_displacements_and_contributions_on_a_real_trajectory():
    data = digits(100)
    model = MLP((8, 10), "tanh", param_dtype=jnp.float64)
    params = init(model, data)
    traj = tvj.finetune(make_loss_fn(model), params, data, optax.sgd(0.5), 5, keep_epochs="all",
                        record_gradients=True)
    flat = np.stack([np.asarray(tvj.tree.ravel(traj.at(e))[0]) for e in range(6)])
    expected = np.linalg.norm(np.diff(flat, axis=0), axis=1)
    np.testing.assert_allclose(analysis.epoch_displacements(traj), expected, rtol=1e-12)
    share = analysis.normalized_contributions(traj)
    np.testing.assert_allclose(share, expected / expected.sum(), rtol=1e-12)
    assert float(jnp.sum(share)) == pytest.approx(1.0)
    # full-batch SGD: displacement e is exactly lr * ||g_e||, so both views agree
    g = np.stack([np.asarray(tvj.tree.ravel(jax.tree.map(lambda x: x[e],
                                                          traj.epoch_gradients))[0])
                  for e in range(5)])
    np.testing.assert_allclose(expected, 0.5 * np.linalg.norm(g, axis=1), rtol=1e-12)
    cos = analysis.epoch_gradient_cosines(traj)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    np.testing.assert_allclose(cos, gn @ gn.T, rtol=1e-12)
    sparse = tvj.finetune(make_loss_fn(model), params, data, optax.sgd(0.5), 5,
                          keep_epochs=[0, 2])
    with pytest.raises(ValueError, match="needs consecutive epochs"):
        analysis.epoch_displacements(sparse)


def test_pca_matches_svd_of_centred_flat_data():
    s = _stacked(7, seed=3)
    x = _flat(s)
    xc = x - x.mean(0)
    u, sv, vt = np.linalg.svd(xc, full_matrices=False)
    p = analysis.pca(s, num_components=3)
    # coordinates agree up to a sign per component
    for j in range(3):
        a, b = np.asarray(p.coords[:, j]), u[:, j] * sv[j]
        assert min(np.max(np.abs(a - b)), np.max(np.abs(a + b))) <= 1e-10
    np.testing.assert_allclose(p.explained_variance_ratio, sv[:3] ** 2 / np.sum(sv ** 2),
                               rtol=1e-10)
    # components are orthonormal directions, and projecting the points reproduces coords
    comp = _flat(p.components)
    np.testing.assert_allclose(comp @ comp.T, np.eye(3), atol=1e-10)
    np.testing.assert_allclose(analysis.project(s, p), p.coords, atol=1e-10)
    with pytest.raises(ValueError, match="num_components must lie in"):
        analysis.pca(s, 8)
