"""Analyses of finetuning trajectories: how much each epoch moves, where it points, and
what the trajectories look like in a 2-D projection of parameter space.

The quantities follow the paper's gradient analysis (Zhou et al., arXiv 2508.16082,
Sec. 5) and the authors' public code:

* the normalized contribution of epoch ``e`` is
  ``||theta^(e) - theta^(e-1)|| / sum_j ||theta^(j) - theta^(j-1)||``;
* direction consistency is the cosine matrix ``cos(g_i, g_j)`` between epoch gradients,
  where an epoch's gradient is the sum of its steps' gradients (for full-batch GD, the one
  gradient; :attr:`taskvec_jax.Trajectory.epoch_gradients`); the paper plots the row
  ``cos(g_1, g_e)`` against epoch 1 (:func:`cosines_to_first_epoch`).

The first-epoch share depends on the run's length (the same first step is a smaller part
of a longer path), so the reproduction also reports it for the run cut at ``E`` epochs
(:func:`prefix_first_epoch_shares`) and at the epoch where validation accuracy plateaus
(:func:`plateau_epoch`), and how far the run moved, ``||tau|| / ||theta_0||``
(:func:`relative_movement`): the lazy regime where gradients stay aligned is the one where
parameters move little.

All functions take *stacked* trees (every leaf with a leading axis of ``M`` points) and
work through ``M x M`` Gram matrices, so they never form a ``P x P`` matrix or even one
flattened ``M x P`` copy of the parameters.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from taskvec_jax import tree
from taskvec_jax.training import Trajectory

PyTree = Any

__all__ = ["PCA", "cosine_matrix", "cosines_to_first_epoch", "epoch_displacements",
           "epoch_gradient_cosines", "gram", "normalized_contributions", "pca",
           "plateau_epoch", "prefix_first_epoch_shares", "project", "relative_movement"]


def _num_points(stacked: PyTree) -> int:
    leaves = [x for x in jax.tree.leaves(stacked)]
    if not leaves:
        raise ValueError("expected a stacked tree with at least one leaf")
    m = leaves[0].shape[0]
    for x in leaves:
        if x.shape[0] != m:
            raise ValueError(f"stacked leaves disagree on the leading axis: {x.shape[0]} vs "
                             f"{m}")
    return m


def gram(stacked: PyTree, other: PyTree | None = None) -> jax.Array:
    """``K[i, j] = <x_i, y_j>`` for stacked trees ``x`` (``M`` points) and ``y`` (``M'``).

    Computed leaf by leaf, ``sum_leaf X_leaf @ Y_leaf^T``, in the leaves' dtype.
    """
    other = stacked if other is None else other
    _num_points(stacked)
    terms = jax.tree.leaves(jax.tree.map(
        lambda x, y: x.reshape(x.shape[0], -1) @ y.reshape(y.shape[0], -1).T,
        stacked, other))
    return sum(terms[1:], terms[0])


def cosine_matrix(stacked: PyTree) -> jax.Array:
    """``C[i, j] = <x_i, x_j> / (||x_i|| ||x_j||)`` over the ``M`` stacked points."""
    k = gram(stacked)
    d = jnp.sqrt(jnp.diag(k))
    return k / jnp.outer(d, d)


def epoch_displacements(traj_params: PyTree | Trajectory) -> jax.Array:
    """``||theta^(e) - theta^(e-1)||`` for consecutive snapshots (``[M - 1]``).

    Pass a :class:`Trajectory` that kept every epoch (the default), or its ``params``.
    """
    params = traj_params.params if isinstance(traj_params, Trajectory) else traj_params
    if isinstance(traj_params, Trajectory):
        epochs = jnp.asarray(traj_params.epochs)
        if not bool(jnp.all(jnp.diff(epochs) == 1)):
            raise ValueError("epoch_displacements needs consecutive epochs; this trajectory "
                             f"kept {list(map(int, epochs))} (finetune with keep_epochs='all')")
    if _num_points(params) < 2:
        raise ValueError("need at least two snapshots to measure a displacement")
    sq = jax.tree.leaves(jax.tree.map(
        lambda x: jnp.sum(jnp.square(jnp.diff(x, axis=0)).reshape(x.shape[0] - 1, -1), 1),
        params))
    return jnp.sqrt(sum(sq[1:], sq[0]))


def normalized_contributions(traj_params: PyTree | Trajectory) -> jax.Array:
    """Each epoch's share of the path length: ``d_e / sum_j d_j`` (sums to 1)."""
    d = epoch_displacements(traj_params)
    return d / jnp.sum(d)


def epoch_gradient_cosines(traj: Trajectory) -> jax.Array:
    """The ``[E, E]`` cosine matrix of a trajectory's epoch gradients."""
    if traj.epoch_gradients is None:
        raise ValueError("this trajectory has no epoch gradients (finetune with "
                         "record_gradients=True)")
    return cosine_matrix(traj.epoch_gradients)


def prefix_first_epoch_shares(traj_params: PyTree | Trajectory,
                              prefixes: Sequence[int]) -> jax.Array:
    """The first epoch's share of the path of the run cut at ``E`` epochs, per ``E``.

    ``share_1(E) = d_1 / sum_{j=1}^{E} d_j`` with ``d_j = ||theta^(j) - theta^(j-1)||``
    (:func:`epoch_displacements`); ``share_1(E_total)`` is
    ``normalized_contributions(...)[0]``. A prefix is the same run stopped earlier, which is
    what a shorter run with a constant learning rate would have produced.

    Args:
      traj_params: a :class:`Trajectory` that kept every epoch, or its stacked ``params``.
      prefixes: run lengths ``E``, each in ``[1, num_epochs]``.

    Returns:
      ``[len(prefixes)]`` shares.

    Raises:
      ValueError: for a prefix outside ``[1, num_epochs]``.
    """
    d = epoch_displacements(traj_params)
    prefixes = [int(e) for e in prefixes]
    bad = [e for e in prefixes if not 1 <= e <= d.shape[0]]
    if bad:
        raise ValueError(f"prefixes must lie in [1, num_epochs={d.shape[0]}], got {bad}")
    cum = jnp.cumsum(d)
    return d[0] / cum[jnp.asarray(prefixes, jnp.int32) - 1]


def cosines_to_first_epoch(traj: Trajectory, num_epochs: int = 5) -> jax.Array:
    """``cos(g_1, g_e)`` for ``e = 2..num_epochs``: epoch gradients against the first one.

    The paper's direction-consistency curve (Sec. 5); the mean over all pairs of the same
    epochs (the off-diagonal of :func:`epoch_gradient_cosines`) also counts pairs of later
    epochs, which agree with each other more than with epoch 1.

    Returns:
      ``[num_epochs - 1]`` cosines (entry ``i`` is epoch ``i + 2``).

    Raises:
      ValueError: without recorded gradients, or ``num_epochs`` outside ``[2, E]``.
    """
    if traj.epoch_gradients is None:
        raise ValueError("this trajectory has no epoch gradients (finetune with "
                         "record_gradients=True)")
    total = _num_points(traj.epoch_gradients)
    if not 2 <= num_epochs <= total:
        raise ValueError(f"num_epochs must lie in [2, {total}] (the recorded epochs), got "
                         f"{num_epochs}")
    g = jax.tree.map(lambda x: x[:num_epochs], traj.epoch_gradients)
    return cosine_matrix(g)[0, 1:]


def relative_movement(params: PyTree, base: PyTree) -> jax.Array:
    """``||theta - theta_0|| / ||theta_0||``: how far finetuning moved from the base."""
    return tree.norm(tree.sub(params, base)) / tree.norm(base)


def plateau_epoch(accuracies: Sequence[float], *, tolerance: float = 0.01,
                  epochs: Sequence[int] | None = None) -> int:
    """The first epoch whose (validation) accuracy is within ``tolerance`` of the run's best.

    ``min {e : acc_e >= max_j acc_j - tolerance}``: where the run has converged for
    practical purposes; later epochs add at most ``tolerance``.

    Args:
      accuracies: accuracy after each epoch.
      tolerance: how far below the best still counts as converged (>= 0).
      epochs: the epoch of each accuracy (default ``1..len(accuracies)``).

    Returns:
      The plateau epoch (an element of ``epochs``).

    Raises:
      ValueError: for an empty or non-finite sequence, a negative tolerance, or
        ``epochs`` of another length.
    """
    acc = np.asarray(accuracies, np.float64)
    if acc.ndim != 1 or acc.size == 0:
        raise ValueError(f"accuracies must be a non-empty sequence, got shape {acc.shape}")
    if not np.all(np.isfinite(acc)):
        raise ValueError(f"accuracies must be finite, got {acc.tolist()}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    epochs = np.arange(1, acc.size + 1) if epochs is None else np.asarray(epochs)
    if epochs.shape != acc.shape:
        raise ValueError(f"epochs has {epochs.shape[0]} entries for {acc.size} accuracies")
    return int(epochs[np.argmax(acc >= acc.max() - tolerance)])


class PCA(NamedTuple):
    """A principal-component projection of ``M`` points of parameter space.

    Attributes:
      coords: ``[M, k]`` coordinates of the points on the top ``k`` components.
      explained_variance_ratio: ``[k]`` share of the total variance on each component.
      mean: the tree the points were centred on.
      components: the ``k`` unit-norm directions as a stacked tree ``[k, ...]``.
    """

    coords: jax.Array
    explained_variance_ratio: jax.Array
    mean: PyTree
    components: PyTree


def pca(stacked: PyTree, num_components: int = 2) -> PCA:
    """PCA of ``M`` stacked parameter vectors through their ``M x M`` Gram matrix.

    With ``X`` the centred ``M x P`` data, ``X X^T = U diag(s^2) U^T`` gives the
    coordinates ``U_k diag(s_k)`` and the directions ``V_k = X^T U_k / s_k``, which is
    exact and costs ``O(M^2 P)`` instead of ``O(P^2)``.

    Args:
      stacked: a tree whose leaves have a leading axis of ``M`` points (e.g. snapshots of
        several trajectories concatenated with ``jax.tree.map(jnp.concatenate, ...)``).
      num_components: ``k``, at most ``M``.

    Returns:
      A :class:`PCA`.
    """
    m = _num_points(stacked)
    if not 1 <= num_components <= m:
        raise ValueError(f"num_components must lie in [1, {m}], got {num_components}")
    mean = jax.tree.map(lambda x: jnp.mean(x, axis=0), stacked)
    centred = jax.tree.map(lambda x, mu: x - mu, stacked, mean)
    k = gram(centred)
    evals, evecs = jnp.linalg.eigh(k)
    order = jnp.argsort(evals)[::-1][:num_components]
    evals = jnp.clip(evals[order], 0.0)
    u = evecs[:, order]
    # Fix the sign so that the largest-magnitude coordinate of each component is positive.
    sign = jnp.sign(u[jnp.argmax(jnp.abs(u), axis=0), jnp.arange(num_components)])
    u = u * jnp.where(sign == 0, 1.0, sign)
    s = jnp.sqrt(evals)
    coords = u * s
    total = jnp.trace(k)
    safe_s = jnp.where(s > 0, s, 1.0)
    components = jax.tree.map(
        lambda x: jnp.tensordot(u.T / safe_s[:, None], x, axes=1), centred)
    return PCA(coords, evals / jnp.where(total > 0, total, 1.0), mean, components)


def project(stacked: PyTree, basis: PCA) -> jax.Array:
    """Coordinates of further points (``[M', k]``) in an existing :class:`PCA` basis."""
    centred = jax.tree.map(lambda x, mu: x - mu, stacked, basis.mean)
    return gram(centred, basis.components)
