"""Magnitude sparsification of one task vector: :func:`magnitude_mask` and :func:`trim`.

Both rank magnitudes with the exact kernel of :mod:`taskvec_jax.merging._select`, whose
docstring fixes every choice the PyTorch implementations make implicitly: the scope
(``"global"``, ``"leaf"``, ``"row"``), the count ``ceil(density * n)`` on the decimal
density, ties in magnitude going to the earlier position, and ``None`` / non-float leaves
being skipped.

The merges that used to live here have their own modules:
:mod:`~taskvec_jax.merging.ties_merging`, :mod:`~taskvec_jax.merging.drop_and_rescale`,
:mod:`~taskvec_jax.merging.model_breadcrumbs` (importing them from here still works for
one release, with a ``DeprecationWarning``). The modules are not named after their
functions so that ``taskvec_jax.merging.ties`` is always the function, never a module.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from typing import Any

import jax

from taskvec_jax.merging import _common, _select, _shards
from taskvec_jax.merging._select import SCOPES

PyTree = Any

__all__ = ["SCOPES", "magnitude_mask", "trim"]

# Names that moved out of this module in the redesign: name -> module now holding it.
_MOVED = {"ties": "ties_merging", "ties_merge": "ties_merging",
          "ties_task_vector": "ties_merging", "TIES_MERGES": "ties_merging",
          "dare": "drop_and_rescale", "breadcrumbs": "model_breadcrumbs"}


def magnitude_mask(task_vector: PyTree, *, density: float, outliers: float = 0.0,
                   scope: str = "global") -> PyTree:
    """Boolean mask of the largest magnitudes of a tree, per ``scope``.

    In each group of ``n`` entries (see :mod:`taskvec_jax.merging._select` for scopes,
    ranking and ties) the mask is true on ranks ``r`` with ``lo <= r < hi``, where
    ``lo = ceil(outliers * n)``
    (``0`` when ``outliers == 0``) and ``hi = min(n, lo + ceil(density * n))``. With
    ``outliers=0`` that is the ``ceil(density * n)`` largest magnitudes (TIES' trim);
    with ``outliers > 0`` the largest ``lo`` are excluded first (Model Breadcrumbs).

    Memory: the output masks (one byte per parameter) and the ranking passes'
    transients: no sort and no concatenated copy; XLA materializes a histogram pass's
    indices (blocks of ``2**18`` entries) and, for the row scope on CPU, each counting
    reduction's input (about two model-sized 32-bit buffers, reused across passes).

    Args:
      task_vector: a pytree of arrays (``None`` and non-float leaves are skipped).
      density: fraction of each group kept, in ``(0, 1]`` (a concrete Python number).
      outliers: fraction of each group's largest magnitudes excluded first, in
        ``[0, 1)``, with ``outliers + density <= 1``.
      scope: ``"global"``, ``"leaf"`` or ``"row"``.

    Returns:
      A tree shaped like ``task_vector`` with boolean leaves (``None`` at non-float leaves).

    Raises:
      ValueError: for a density or outliers fraction out of range or traced, an
        unknown scope, or a NaN/Inf entry (naming the leaf).
    """
    density = _common.check_density(density)
    outliers = _common.check_outliers(outliers, density)
    scope = _select.check_scope(scope)
    lay = _shards.layout(task_vector)
    _common.check_finite([task_vector], names=["task_vector"])
    if lay is not None:     # each device ranks and masks its blocks (see _shards)
        return _shards.band(task_vector, lay, density, outliers, scope, masks_only=True)
    return _magnitude_mask_jit(task_vector, density=density, outliers=outliers, scope=scope)


@functools.partial(jax.jit, static_argnames=("density", "outliers", "scope"))
def _magnitude_mask_jit(task_vector, *, density, outliers, scope):
    leaves, treedef = _common.flatten(task_vector)
    return jax.tree.unflatten(treedef, _select.band_masks(leaves, density, outliers, scope))


def trim(task_vector: PyTree, *, density: float, scope: str = "global",
         outliers: float = 0.0) -> PyTree:
    """Keeps the ``density`` fraction of largest magnitudes per ``scope``, zeroes the rest.

    ``out = where(mask, tau, 0)`` with ``mask = magnitude_mask(tau, density=density,
    outliers=outliers, scope=scope)``: each group of ``n`` entries keeps exactly
    ``ceil(density * n)`` of them (ties in magnitude go to the earlier position). This is
    the "trim" step of TIES-merging (Yadav et al., 2023); ``outliers > 0`` first skips the
    largest ``ceil(outliers * n)`` (the Breadcrumbs band).

    Memory: the output tree and the transients of :func:`magnitude_mask` (the mask
    itself is fused into the output).

    Args:
      task_vector: a pytree of arrays; ``None`` and non-float leaves are returned as is.
      density: fraction kept per group, in ``(0, 1]`` (a concrete Python number).
      scope: ``"global"``, ``"leaf"`` or ``"row"`` (see :data:`SCOPES`).
      outliers: fraction of largest magnitudes skipped first, in ``[0, 1)``.

    Returns:
      A tree shaped like ``task_vector`` with the same dtypes.

    Raises:
      ValueError: for a density out of ``(0, 1]``, bad outliers, an unknown scope, or a
        NaN/Inf entry (naming the leaf; under ``jit`` non-finite entries are kept).
    """
    density = _common.check_density(density)
    outliers = _common.check_outliers(outliers, density)
    scope = _select.check_scope(scope)
    lay = _shards.layout(task_vector)
    _common.check_finite([task_vector], names=["task_vector"])
    if lay is not None:
        return _shards.band(task_vector, lay, density, outliers, scope, masks_only=False)
    return _trim_jit(task_vector, density=density, outliers=outliers, scope=scope)


@functools.partial(jax.jit, static_argnames=("density", "outliers", "scope"))
def _trim_jit(task_vector, *, density, outliers, scope):
    leaves, treedef = _common.flatten(task_vector)
    masks = _select.band_masks(leaves, density, outliers, scope)
    return jax.tree.unflatten(treedef, _select.keep_masked(leaves, masks))


def __getattr__(name: str) -> Any:
    # Deprecated: the merges moved to their own modules (see CHANGELOG.md).
    if name in _MOVED:
        module = f"taskvec_jax.merging.{_MOVED[name]}"
        warnings.warn(f"taskvec_jax.merging.sparsify.{name} moved to {module}.{name} "
                      f"(or taskvec_jax.merging.{name}); the old path goes in the next "
                      "release", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
