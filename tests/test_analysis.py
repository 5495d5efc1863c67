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


def _hand_built_trajectory():
    """Moves along the first axis by d = (4, 2, 1, 1, 2) (path 10), split over two leaves,
    with epoch gradients at known angles to the first one."""
    x = np.array([0.0, 4.0, 6.0, 7.0, 8.0, 10.0])
    params = {"w": jnp.asarray(np.stack([x, np.zeros(6)], 1)), "b": jnp.zeros((6, 1))}
    g = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0], [3.0, 4.0]])
    grads = {"w": jnp.asarray(g), "b": jnp.zeros((5, 1))}
    return tvj.Trajectory(params, np.arange(6), jnp.zeros(5), grads, None)


def test_prefix_shares_cosines_to_first_and_movement_on_a_hand_built_trajectory():
    traj = _hand_built_trajectory()
    np.testing.assert_allclose(analysis.prefix_first_epoch_shares(traj, [1, 2, 4, 5]),
                               [1.0, 4 / 6, 4 / 8, 4 / 10], rtol=1e-12)
    assert float(analysis.prefix_first_epoch_shares(traj, [5])[0]) == pytest.approx(
        float(analysis.normalized_contributions(traj)[0]), abs=1e-15)
    np.testing.assert_allclose(analysis.cosines_to_first_epoch(traj, 5),
                               [1 / np.sqrt(2), 0.0, -1.0, 0.6], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(analysis.cosines_to_first_epoch(traj, 3),
                               [1 / np.sqrt(2), 0.0], rtol=1e-12, atol=1e-15)
    base = {"w": jnp.array([3.0, 4.0]), "b": jnp.zeros(1)}
    moved = {"w": jnp.array([9.0, 12.0]), "b": jnp.zeros(1)}
    assert float(analysis.relative_movement(moved, base)) == pytest.approx(2.0, rel=1e-12)
    with pytest.raises(ValueError, match=r"prefixes must lie in \[1, num_epochs=5\]"):
        analysis.prefix_first_epoch_shares(traj, [0, 6])
    with pytest.raises(ValueError, match=r"num_epochs must lie in \[2, 5\]"):
        analysis.cosines_to_first_epoch(traj, 6)
    with pytest.raises(ValueError, match="no epoch gradients"):
        analysis.cosines_to_first_epoch(traj._replace(epoch_gradients=None))


def test_plateau_epoch_is_the_first_within_tolerance_of_the_best():
    acc = [0.5, 0.8, 0.895, 0.905, 0.91, 0.906]
    assert analysis.plateau_epoch(acc) == 4                     # best 0.91, 0.905 >= 0.90
    assert analysis.plateau_epoch(acc, tolerance=0.0) == 5
    assert analysis.plateau_epoch(acc, tolerance=0.02) == 3
    assert analysis.plateau_epoch(acc, tolerance=1.0) == 1
    assert analysis.plateau_epoch(acc, epochs=[0, 1, 2, 4, 8, 16]) == 4
    assert analysis.plateau_epoch(acc, epochs=[0, 1, 2, 3, 8, 16], tolerance=0.0) == 8
    for bad, msg in [([], "non-empty"), ([0.5, float("nan")], "finite")]:
        with pytest.raises(ValueError, match=msg):
            analysis.plateau_epoch(bad)
    with pytest.raises(ValueError, match="tolerance"):
        analysis.plateau_epoch(acc, tolerance=-0.1)
    with pytest.raises(ValueError, match="epochs has 2 entries"):
        analysis.plateau_epoch(acc, epochs=[1, 2])
