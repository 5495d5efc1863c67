"""Model Breadcrumbs (Davari & Belilovsky, "Model Breadcrumbs", ECCV 2024).

Each task vector keeps a band of its magnitude ranks per scope (the largest outliers and
the small tail dropped), ranked by the exact kernel of :mod:`taskvec_jax.merging._select`;
the banded vectors are summed and added to the base with
:func:`taskvec_jax.merging.arithmetic.add_weighted`.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jax.sharding import PartitionSpec as P

from taskvec_jax.merging import _common, _select, _shards, arithmetic

PyTree = Any

__all__ = ["breadcrumbs"]


def breadcrumbs(base: PyTree, task_vectors: Sequence[PyTree], *, density: float = 0.15,
                outliers: float = 0.006, alpha: float | jax.Array = 1.0,
                scope: str = "row") -> PyTree:
    """Model Breadcrumbs (Davari & Belilovsky, 2024).

    ``out = base + sum_t alpha_t * where(band_t, tau_t, 0)`` where ``band_t`` masks, in
    each ``scope`` group of ``n`` entries of ``tau_t``, the magnitude ranks ``r`` with
    ``lo <= r < hi``, ``lo = ceil(outliers * n)`` and ``hi = min(n, lo + ceil(density * n))``:
    the largest ``lo`` entries (outliers) are dropped, the next ``ceil(density * n)`` kept,
    the small rest dropped (see :func:`~taskvec_jax.merging.magnitude_mask`).

    Memory: besides the inputs and the output, one leaf's ranking transients at a time:
    each task is ranked first (eagerly one compiled program per task and leaf), keeping
    only two thresholds per group, then every output leaf is one fused pass over the
    ``T`` task leaves (the float32 sum stays in registers). Under an outer ``jax.jit``
    the rankings run in a ``lax.fori_loop`` (see
    :func:`~taskvec_jax.merging.ties_task_vector`).

    Args:
      base: the pretrained model.
      task_vectors: a non-empty sequence of task vectors shaped like ``base``.
      density: fraction kept per group after the outliers, in ``(0, 1]``.
      outliers: fraction of largest magnitudes dropped per group, in ``[0, 1)``, with
        ``outliers + density <= 1``.
      alpha: a scalar or one coefficient per task (may be traced).
      scope: ``"row"`` (default), ``"leaf"`` or ``"global"``.

    Returns:
      The merged model, shaped like ``base`` with its dtypes.

    Raises:
      ValueError: empty input, mismatched trees (naming task and leaf path), a NaN/Inf
        entry (naming task and leaf; under ``jit`` it is kept, not dropped as an outlier,
        and propagates), fractions out of range, an unknown scope, or alpha of the wrong
        shape.
    """
    density = _common.check_density(density)
    outliers = _common.check_outliers(outliers, density)
    scope = _select.check_scope(scope)
    _common.flatten_tasks(task_vectors, base)
    _common.check_finite(task_vectors)
    alphas = _common.per_task_alpha(alpha, len(task_vectors))
    options = dict(density=density, outliers=outliers, scope=scope)
    lay = _shards.layout(task_vectors[0])
    if lay is None and _common.is_traced((base, task_vectors, alphas)):
        return _breadcrumbs_graph(base, tuple(task_vectors), alphas, **options)
    if lay is not None:     # each device merges its blocks (see _shards)
        leaves = [_common.flatten(tv)[0] for tv in task_vectors]
        thresholds = _shards.thresholds(leaves, lay, density, outliers, scope)
        if scope != "global":
            return _merge_sharded_by_leaf(base, leaves, thresholds, alphas, lay, outliers,
                                          scope)
        thr_specs = [_shards.threshold_specs(leaves[0], lay, outliers, scope)] * len(leaves)
        specs = _shards.tree_specs(task_vectors[0], lay)
        return _shards.run(_breadcrumbs_merge, lay,
                           (base, tuple(task_vectors), thresholds, alphas),
                           (specs, (specs,) * len(task_vectors), thr_specs, P()), specs,
                           scope=scope, shards=lay.shards)
    # Eagerly: one compiled ranking per task (it returns only thresholds), then one
    # program whose every output leaf is one fused pass over the T task leaves.
    thresholds = [_select.band_thresholds_eager(_common.flatten(tv)[0], density, outliers,
                                                scope) for tv in task_vectors]
    return _breadcrumbs_merge_jit(base, tuple(task_vectors), thresholds, alphas, scope=scope)


def _merge_sharded_by_leaf(base, task_leaves, thresholds, alphas, lay, outliers, scope):
    """The leaf and row scopes on a sharded tree, after every task's ranking: one merge
    program per leaf, each leaf's thresholds released once it is merged.

    The row scope's thresholds are four numbers per row and task (0.05 of a model's
    blocks for ``T = 8`` at ViT-B/32 shapes); merged all at once they were alive beside
    the whole output. Released leaf by leaf, thresholds and merged blocks together stay
    under one model's blocks. (Ranking leaf by leaf instead would run the later leaves'
    rankings, whose transients are a few blocks, beside almost the whole output.) The
    output is the same whatever the order: each leaf is its own sum.
    ``thresholds``: :func:`~taskvec_jax.merging._shards.thresholds`' lists, one per task
    (emptied here).
    """
    base_leaves, treedef = _common.flatten(base)
    out = list(base_leaves)
    groups = [indices for indices, _, _ in _select.groups(task_leaves[0], scope)]
    # Shortest rows first: their thresholds weigh most against their entries (a row of
    # 32 entries has as many bytes of thresholds over 8 tasks as of entries), so the
    # thresholds still held shrink faster than the merged output grows.
    order = sorted(range(len(groups)),
                   key=lambda g: (jnp.shape(task_leaves[0][groups[g][0]]) or (1,))[-1])
    for g in order:
        i, = groups[g]
        sub = _shards.Layout(lay.mesh, (lay.specs[i],), (lay.shards[i],))
        xs = tuple([leaves[i]] for leaves in task_leaves)          # one-leaf trees
        thr = [[task[g]] for task in thresholds]
        for task in thresholds:
            task[g] = None
        specs = [lay.specs[i]]
        thr_specs = [_shards.threshold_specs(xs[0], sub, outliers, scope)] * len(xs)
        out[i], = _shards.run(_breadcrumbs_merge, sub, ([base_leaves[i]], xs, thr, alphas),
                              (specs, (specs,) * len(xs), thr_specs, P()), specs,
                              scope=scope, shards=sub.shards)
    return jax.tree.unflatten(treedef, out)


def _thresholds(task_vector, *, density, outliers, scope):
    """The band's thresholds of one task vector (:func:`_select.band_thresholds`)."""
    leaves, _ = _common.flatten(task_vector)
    return _select.band_thresholds(leaves, density, outliers, scope)


def _breadcrumbs_merge(base, task_vectors, thresholds, alphas, *, scope, shards=None):
    """``base + sum_t alpha_t * where(band_t, tau_t, 0)``, leaf by leaf.

    The sum runs in task order in at least float32 and is added to the base as
    :func:`~taskvec_jax.merging.arithmetic.add_weighted` does; all elementwise, so XLA
    fuses each leaf's masks and sum into one pass (no mask or banded copy is stored).
    """
    base_leaves, treedef = _common.flatten(base)
    task_leaves = []
    for tv, thr in zip(task_vectors, thresholds):
        leaves, _ = _common.flatten(tv)
        masks = _select.band_masks_at(leaves, thr, scope, shards)
        task_leaves.append((_select.keep_masked(leaves, masks), masks))
    out = []
    for i, b in enumerate(base_leaves):
        if not _common.is_param(b) or task_leaves[0][1][i] is None:
            out.append(b)
            continue
        adt = _common.accumulation_dtype(jnp.result_type(b))
        acc = jnp.zeros(jnp.shape(b), adt)
        for t, (leaves, _) in enumerate(task_leaves):
            acc = acc + alphas[t].astype(adt) * leaves[i].astype(adt)
        out.append(arithmetic.add_weighted(b, [acc]))
    return jax.tree.unflatten(treedef, out)


_breadcrumbs_merge_jit = jax.jit(_breadcrumbs_merge, static_argnames=("scope",))


@functools.partial(jax.jit, static_argnames=("density", "outliers", "scope"))
def _breadcrumbs_graph(base, task_vectors, alphas, *, density, outliers, scope):
    """Ranking and merge in one program (the path taken under an outer ``jax.jit``)."""
    thresholds = _common.map_tasks(
        lambda tv: _thresholds(tv, density=density, outliers=outliers, scope=scope),
        task_vectors)
    return _breadcrumbs_merge(base, task_vectors, thresholds, alphas, scope=scope)
