"""TIES-merging: trim, elect signs, disjoint merge (Yadav et al., NeurIPS 2023).

:func:`ties_task_vector` returns the merged task vector, :func:`ties` the merged model.
The trim ranks magnitudes with the exact kernel of :mod:`taskvec_jax.merging._select`
(scopes, the ``ceil(density * n)`` count and ties in magnitude are documented there).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jax.sharding import PartitionSpec as P

from taskvec_jax.merging import _common, _select, _shards

PyTree = Any

__all__ = ["CONSENSUS", "TIES_MERGES", "ties", "ties_merge", "ties_task_vector"]

TIES_MERGES = ("mean", "sum")
CONSENSUS = ("mass", "count")


def _check_real(task_leaves: list[list[Any]], paths: list[str], what: str) -> None:
    for t, leaves in enumerate(task_leaves):
        for path, x in zip(paths, leaves):
            if _common.is_param(x) and jnp.issubdtype(jnp.result_type(x),
                                                       jnp.complexfloating):
                raise ValueError(f"task vector {t}: leaf '{path}' is complex "
                                 f"({jnp.result_type(x)}); {what} elects signs and needs "
                                 "real values")


def _check_options(task_vectors, density, scope, merge, consensus):
    """The checks of :func:`ties_task_vector` and :func:`ties`; returns density, scope."""
    density = _common.check_density(density)
    scope = _select.check_scope(scope)
    if merge not in TIES_MERGES:
        raise ValueError(f"unknown merge {merge!r}; choose one of {TIES_MERGES}")
    if consensus not in CONSENSUS:
        raise ValueError(f"unknown consensus {consensus!r}; choose one of {CONSENSUS}")
    _, task_leaves = _common.flatten_tasks(task_vectors)
    _check_real(task_leaves, _common.leaf_paths(task_vectors[0]), "TIES")
    _common.check_finite(task_vectors)
    return density, scope


def ties_task_vector(task_vectors: Sequence[PyTree], *, density: float = 0.2,
                     scope: str = "global", merge: str = "mean", consensus: str = "mass",
                     alpha: float | Sequence[float] | jax.Array | None = None) -> PyTree:
    """The TIES-merged task vector: trim, elect signs, disjoint merge (Yadav et al., 2023).

    For each task ``t``: ``hat_t = alpha_t * trim(tau_t, density, scope)`` (``alpha_t = 1``
    by default; the trim ranks ``|tau_t|``, the same ranks as ``|alpha_t tau_t|``). Per
    parameter, with ``P = sum_t max(hat_t, 0)`` and ``N = sum_t min(hat_t, 0)``, the
    elected sign ``s`` is

    * ``consensus="mass"``: ``sign(P + N)``, the sign of the summed trimmed values (TIES'
      election; mergekit's ``consensus_method: sum``);
    * ``consensus="count"``: ``sign(#{t: hat_t > 0} - #{t: hat_t < 0})``, a majority vote
      of the signs (mergekit's ``consensus_method: count``).

    The merge keeps only the trimmed values that agree with ``s`` (strictly same sign;
    zeros never agree):

    * ``merge="mean"``: ``P / #{t: hat_t > 0}`` where ``s > 0``,
      ``N / #{t: hat_t < 0}`` where ``s < 0``;
    * ``merge="sum"``: ``P`` where ``s > 0``, ``N`` where ``s < 0``;

    and ``0`` where ``s = 0`` (no sign is elected; mergekit elects ``+`` there).

    Memory: besides the inputs and the output, one task's ranking transients at a time.
    Each task is ranked first (eagerly one compiled program per task, per leaf under the
    leaf and row scopes), keeping only its thresholds; then every output leaf is one
    fused elementwise pass over the ``T`` task leaves (masks, ``P``, ``N`` in at least
    float32, the counts and the disjoint merge stay in registers), so no trimmed copy,
    mask or accumulator is stored. Under an outer ``jax.jit`` the rankings run one after
    the other in a ``lax.fori_loop`` (each task fetched by ``lax.switch``: one more
    model-sized copy); their temporaries do not grow with ``T`` (see docs/merging.md).

    Args:
      task_vectors: a non-empty sequence of task vectors with equal structure.
      density: fraction kept by the trim, in ``(0, 1]``; ``1.0`` skips trimming (use it
        after :func:`~taskvec_jax.merging.dare` for DARE-TIES).
      scope: the trim's scope: ``"global"``, ``"leaf"`` or ``"row"``.
      merge: ``"mean"`` or ``"sum"``.
      consensus: the sign election, ``"mass"`` or ``"count"``.
      alpha: ``None`` (no scaling), a scalar or one coefficient per task, applied to each
        task vector before the election (may be traced).

    Returns:
      A tree shaped like the task vectors (``None`` at non-float leaves).

    Raises:
      ValueError: empty input, mismatched trees (naming task and leaf path), complex
        leaves, a NaN/Inf entry (naming task and leaf; under ``jit`` it propagates to the
        output instead), a density outside ``(0, 1]``, an unknown scope, merge or
        consensus, or alpha of the wrong shape.
    """
    density, scope = _check_options(task_vectors, density, scope, merge, consensus)
    alphas = None if alpha is None else _common.per_task_alpha(alpha, len(task_vectors))
    return _ties(tuple(task_vectors), alphas, None, None, density=density, scope=scope,
                 merge=merge, consensus=consensus)


def _ties(task_vectors, alphas, base, scale, *, density, scope, merge, consensus):
    """Ranks each task once, then merges leaf by leaf (``base + scale * merged`` if given).

    Called eagerly, the ranking of task ``t`` is one compiled program returning only its
    thresholds (a few scalars per group), and the merge one program whose every output
    leaf is one fused elementwise pass over the ``T`` task leaves (masks, ``P``, ``N``,
    counts and the disjoint mean live in registers): no trimmed copy, mask or
    accumulator is stored. Under an outer ``jax.jit`` both run in the caller's program.
    """
    options = dict(density=density, scope=scope, merge=merge, consensus=consensus)
    lay = _shards.layout(task_vectors[0])
    if lay is None and _common.is_traced((task_vectors, alphas, base, scale)):
        return _ties_graph(task_vectors, alphas, base, scale, **options)
    if lay is not None:     # each device merges its blocks (see _shards)
        thresholds = thr_specs = None
        if density < 1.0:
            thresholds = _shards.thresholds([_common.flatten(tv)[0] for tv in task_vectors],
                                            lay, density, 0.0, scope)
            thr_specs = [_shards.threshold_specs(_common.flatten(task_vectors[0])[0], lay,
                                                 0.0, scope)] * len(task_vectors)
        specs = _shards.tree_specs(task_vectors[0], lay)
        return _shards.run(_ties_merge, lay, (task_vectors, thresholds, alphas, base, scale),
                           ((specs,) * len(task_vectors), thr_specs, P(),
                            None if base is None else specs, P()),
                           specs, shards=lay.shards, **options)
    thresholds = None
    if density < 1.0:
        thresholds = [_select.band_thresholds_eager(_common.flatten(tv)[0], density, 0.0,
                                                    scope) for tv in task_vectors]
    return _ties_merge_jit(task_vectors, thresholds, alphas, base, scale, **options)


def ties_merge(task_vectors: Sequence[PyTree], *, density: float = 0.2,
               scope: str = "global", merge: str = "mean") -> PyTree:
    """Deprecated alias of :func:`ties_task_vector` (removed in the next release)."""
    warnings.warn("ties_merge is deprecated: use ties_task_vector (the merged task vector) "
                  "or ties (the merged model)", DeprecationWarning, stacklevel=2)
    return ties_task_vector(task_vectors, density=density, scope=scope, merge=merge)


def _needs_counts(merge: str, consensus: str) -> bool:
    return merge == "mean" or consensus == "count"


def _thresholds(task_vector, *, density, scope):
    """The trim's thresholds of one task vector (:func:`_select.band_thresholds`)."""
    leaves, _ = _common.flatten(task_vector)
    return _select.band_thresholds(leaves, density, 0.0, scope)


def _ties_merge(task_vectors, thresholds, alphas, base, scale, *, density, scope, merge,
                consensus, shards=None):
    """Elects ``s`` (by mass or count) and returns the disjoint mean or sum, per leaf.

    Per leaf and in task order: ``hat_t = alpha_t * where(trim mask_t, tau_t, 0)`` in at
    least float32, ``P += max(hat_t, 0)``, ``N += min(hat_t, 0)`` and the counts of
    positive and negative entries (``T < 256``: uint8); everything is elementwise, so
    XLA fuses a leaf's whole computation over the ``T`` tasks into one pass.
    """
    task_leaves = [_common.flatten(tv)[0] for tv in task_vectors]
    if thresholds is not None:
        task_leaves = [_select.keep_masked(leaves,
                                           _select.band_masks_at(leaves, thr, scope, shards))
                       for leaves, thr in zip(task_leaves, thresholds)]
    like, treedef = _common.flatten(task_vectors[0])
    base_leaves = None if base is None else _common.flatten(base)[0]
    counted = _needs_counts(merge, consensus)
    cdtype = jnp.uint8 if len(task_vectors) < 256 else jnp.int32
    out = []
    for i, x0 in enumerate(like):
        if not _common.is_param(x0):
            out.append(None if base_leaves is None else base_leaves[i])
            continue
        sdtype = _common.accumulation_dtype(jnp.result_type(x0))
        pos = neg = jnp.zeros(jnp.shape(x0), sdtype)
        pos_n = neg_n = jnp.zeros(jnp.shape(x0), cdtype) if counted else None
        for t, leaves in enumerate(task_leaves):
            x = leaves[i]
            if alphas is not None:
                x = alphas[t].astype(sdtype) * x.astype(sdtype)
            pos = pos + jnp.maximum(x, 0).astype(sdtype)
            neg = neg + jnp.minimum(x, 0).astype(sdtype)
            if counted:
                pos_n = pos_n + (x > 0).astype(cdtype)
                neg_n = neg_n + (x < 0).astype(cdtype)
        p, q = pos, neg
        if merge == "mean":
            p = p / jnp.maximum(pos_n, 1).astype(p.dtype)
            q = q / jnp.maximum(neg_n, 1).astype(q.dtype)
        if consensus == "mass":
            elected = pos + neg
            up, down = elected > 0, elected < 0
        else:    # compare the unsigned counts directly: no subtraction to wrap around
            up, down = pos_n > neg_n, pos_n < neg_n
        merged = jnp.where(up, p, jnp.where(down, q, jnp.zeros((), p.dtype)))
        # A NaN (or +Inf meeting -Inf) elects no sign; propagate it, never hide it.
        merged = jnp.where(jnp.isnan(pos + neg), jnp.nan, merged).astype(x0.dtype)
        if base_leaves is not None:     # tvj.apply's formula, fused into the same pass
            b = base_leaves[i]
            merged = (b + (merged if scale is None else scale * merged)).astype(
                jnp.result_type(b))
        out.append(merged)
    return jax.tree.unflatten(treedef, out)


_STATIC = ("density", "scope", "merge", "consensus")
_ties_merge_jit = jax.jit(_ties_merge, static_argnames=_STATIC)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _ties_graph(task_vectors, alphas, base, scale, *, density, scope, merge, consensus):
    """Ranking and merge in one program (the path taken under an outer ``jax.jit``)."""
    thresholds = None
    if density < 1.0:
        thresholds = _common.map_tasks(
            lambda tv: _thresholds(tv, density=density, scope=scope), task_vectors)
    return _ties_merge(task_vectors, thresholds, alphas, base, scale, density=density,
                       scope=scope, merge=merge, consensus=consensus)


def ties(base: PyTree, task_vectors: Sequence[PyTree], *,
         alpha: float | Sequence[float] | jax.Array = 1.0, density: float = 0.2,
         scope: str = "global", merge: str = "mean", consensus: str = "mass") -> PyTree:
    """TIES-merging (Yadav et al., 2023): ``base + ties_task_vector([alpha_t * tau_t])``.

    Per-task ``alpha_t`` scales task vector ``t`` before the trim / elect / disjoint-merge
    steps (as mergekit weights its deltas). For one scalar ``alpha`` that is
    ``base + alpha * ties_task_vector(task_vectors)`` (the election and the disjoint mean
    commute with a common scale of either sign), which is how it is computed then. See
    :func:`ties_task_vector` for the steps and their memory. DARE-TIES is
    ``ties(base, [dare(tau_t, ...) for t], density=1.0)`` (or any density to trim after
    dropping).

    Args:
      base: the pretrained model the task vectors start from.
      task_vectors: a non-empty sequence of task vectors shaped like ``base``.
      alpha: a scalar or one coefficient per task (``[T]``); may be traced.
      density: fraction kept by the trim, in ``(0, 1]``.
      scope: the trim's scope, ``"global"``, ``"leaf"`` or ``"row"``.
      merge: ``"mean"`` or ``"sum"``.
      consensus: the sign election, ``"mass"`` (TIES) or ``"count"``.

    Returns:
      The merged model, shaped like ``base`` with its dtypes; non-float leaves of
      ``base`` are kept.

    Raises:
      ValueError: as :func:`ties_task_vector`, and for a task vector that does not match
        ``base`` (naming the task index and leaf path) or alpha of the wrong shape.
    """
    _common.flatten_tasks(task_vectors, base)
    alphas = _common.per_task_alpha(alpha, len(task_vectors))
    density, scope = _check_options(task_vectors, density, scope, merge, consensus)
    options = dict(density=density, scope=scope, merge=merge, consensus=consensus)
    alpha = jnp.asarray(alpha)
    # base + merged is fused into the merge's pass (tvj.apply's formula), so no merged
    # task vector is stored besides the output.
    if alpha.ndim == 0:
        return _ties(tuple(task_vectors), None, base, alpha, **options)
    return _ties(tuple(task_vectors), alphas, base, None, **options)
