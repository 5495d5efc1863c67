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

from taskvec_jax.merging import _common, _select, arithmetic

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

    Memory: one model-sized accumulator (at least float32) plus the output; the ``T``
    sparsified task vectors are never held at once. Called eagerly, each task is one
    compiled step on the donated accumulator (on CPU its transients are about four
    model-sized 32-bit buffers: two selections); under an outer ``jax.jit`` the tasks
    run in a ``lax.fori_loop`` (see :func:`~taskvec_jax.merging.ties_task_vector`).

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
    if _common.is_traced((base, task_vectors, alphas)):
        return _breadcrumbs_graph(base, tuple(task_vectors), alphas, density=density,
                                  outliers=outliers, scope=scope)
    # Eagerly: one compiled step per task with the accumulator donated (as in TIES).
    acc = _breadcrumbs_init(base)
    for t, task_vector in enumerate(task_vectors):
        acc = _breadcrumbs_step_jit(acc, task_vector, alphas[t], density=density,
                                    outliers=outliers, scope=scope)
    return _add_to_base_jit(base, acc)


def _breadcrumbs_init(base):
    leaves, _ = _common.flatten(base)
    return [jnp.zeros(jnp.shape(b), _common.accumulation_dtype(jnp.result_type(b)))
            if _common.is_param(b) else None for b in leaves]


def _breadcrumbs_step(acc, task_vector, alpha, *, density, outliers, scope):
    """``acc + alpha * where(band(tau), tau, 0)``."""
    leaves, _ = _common.flatten(task_vector)
    masks = _select.band_masks(leaves, density, outliers, scope)
    out = list(acc)
    for i, (x, m) in enumerate(zip(_select.keep_masked(leaves, masks), masks)):
        if m is None or acc[i] is None:
            continue
        out[i] = acc[i] + alpha.astype(acc[i].dtype) * x.astype(acc[i].dtype)
    return out


_breadcrumbs_step_jit = jax.jit(_breadcrumbs_step,
                                static_argnames=("density", "outliers", "scope"),
                                donate_argnums=0)
_add_to_base_jit = jax.jit(lambda base, acc: arithmetic.add_weighted(base, [acc]))


@functools.partial(jax.jit, static_argnames=("density", "outliers", "scope"))
def _breadcrumbs_graph(base, task_vectors, alphas, *, density, outliers, scope):
    """All tasks in one program (the path taken under an outer ``jax.jit``)."""
    acc = _common.fold_tasks(
        lambda acc, tau_alpha: _breadcrumbs_step(acc, *tau_alpha, density=density,
                                                 outliers=outliers, scope=scope),
        _breadcrumbs_init(base), [(tv, alphas[t]) for t, tv in enumerate(task_vectors)])
    return arithmetic.add_weighted(base, [acc])
