"""The exact k-th-magnitude kernel: which entries of a tree are its largest, per scope.

The private kernel of :mod:`taskvec_jax.merging` (trim, TIES, Breadcrumbs and every merge
that ranks magnitudes call it); the conventions it implements are documented once, here.

Scope. ``scope`` says over which group of entries the "largest magnitudes" are ranked:

* ``"global"``: all float entries of the whole tree at once (leaves in ``jax.tree``
  flattening order, each leaf in row-major order). Leaves of different float dtypes are
  compared after an exact widening to their common dtype.
* ``"leaf"``: each leaf (tensor) separately.
* ``"row"``: each row of the last axis separately: a leaf of shape ``(a, b, c)`` has
  ``a * b`` rows of ``c`` entries; a 1-D leaf is one row; a scalar is one row of one.

Counts. A group of ``n`` entries keeps ``k = count_of(density, n)`` of them (see
:func:`taskvec_jax.merging._common.count_of`: ``ceil(density * n)`` with ``density`` read
as the decimal it was written as, so ``0.07`` of 100 keeps 7, not the 8 that
``ceil(0.07 * 100.0)`` gives in floating point). Since ``0 < density <= 1``,
``1 <= k <= n``: a group never loses all its entries. The same rule gives Breadcrumbs'
number of dropped outliers, ``count_of(outliers, n)`` (0 for ``outliers=0``).

Ties. Entries are ranked by magnitude, largest first; equal magnitudes are ranked by
position (the earlier entry in the order above ranks first). The kept set is the first
``k`` of that ranking, so exactly ``k`` entries are kept whatever the ties. ``-0.0`` and
``0.0`` are equal; ``NaN`` ranks above ``inf``. Masks are exact for any input, but
:func:`keep_masked` (what trim, TIES and Breadcrumbs apply) keeps every non-finite entry
so that NaN/Inf propagate under ``jit``; called eagerly, merges reject them first
(:func:`taskvec_jax.merging._common.check_finite`).

Algorithm. The ``k``-th largest magnitude of a group is found exactly by bisection on its
bit pattern (non-negative IEEE floats order like their unsigned-integer bits): 31 (float32)
or 63 (float64) counting passes over the group, each a compare-and-sum; no sort and no
quantile. Only if more entries tie at that threshold than can be kept does a second
bisection, over positions (``ceil(log2 n)`` passes), find where the kept ties end. Under
``"global"`` scope the counts are summed across leaves, so the whole model is never
concatenated.

Non-float leaves. ``None`` leaves (a task vector's non-float positions) and integer or
boolean leaves are not parameters: they are not counted and masks hold ``None`` there.

This module is private: its functions carry no underscore so that the merging modules can
share them, but they are not part of the public API.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from taskvec_jax.merging import _common

__all__ = ["SCOPES", "band", "band_masks", "check_scope", "keep_masked", "kth_largest",
           "magnitude_bits", "real_dtype", "selected"]

SCOPES = ("global", "leaf", "row")

UINT = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


def check_scope(scope: Any) -> str:
    """Returns ``scope``; raises ``ValueError`` unless it is one of :data:`SCOPES`."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose one of {SCOPES}")
    return scope


def real_dtype(x: jax.Array):
    """The real float dtype magnitudes of ``x`` are compared in."""
    return jnp.finfo(x.dtype).dtype


def magnitude_bits(x: jax.Array, dtype) -> jax.Array:
    """``|x|`` in ``dtype`` seen as unsigned integers (same order as the magnitudes)."""
    mag = jnp.abs(x).astype(dtype)
    return lax.bitcast_convert_type(mag, UINT[jnp.dtype(dtype).itemsize])


def kth_largest(views: list[jax.Array], k: int, dtype, per_row: bool):
    """Finds the ``k`` largest magnitudes per group (ties: earlier position first).

    The selection is described by ``(t, cut)``: an entry with magnitude bits ``u`` at
    position ``pos`` (within its row, or within the whole model for the global scope) is
    selected iff ``u > t or (u == t and pos < cut)``. ``t`` is the bit pattern of the
    ``k``-th largest magnitude, found by bisection over its bits (non-negative floats order
    like their unsigned bits): the greedy MSB-first search for the largest ``t`` with
    ``#{u >= t} >= k``. ``cut`` keeps the first ``need = k - #{u > t}`` entries equal to
    ``t``; it is ``n`` unless more than ``need`` entries tie at ``t``, in which case a
    second bisection, over positions, finds it. Every pass is a compare-and-count: no
    sort, no cumulative sum.

    Args:
      views: ``[g, m]`` arrays. With ``per_row`` there is one view and each of its ``g``
        rows is a group of ``m``; otherwise every view is ``[1, size]`` and all views,
        one after the other, form one group (the global scope).
      k: entries selected per group, ``k >= 0``.
      dtype: the float dtype magnitudes are compared in.
      per_row: see ``views``.

    Returns:
      ``(t, cut, offsets)``: ``t`` and ``cut`` are ``[g, 1]`` (per row) or ``[1, 1]``;
      ``offsets[j]`` is the position of view ``j``'s first entry in the group.
    """
    n = views[0].shape[-1] if per_row else sum(v.size for v in views)
    udtype = UINT[jnp.dtype(dtype).itemsize]
    cdtype = jnp.int32 if n < 2**31 else jnp.int64
    shape = (views[0].shape[0], 1) if per_row else (1, 1)
    offsets = [0] * len(views)
    if not per_row:
        offsets = [sum(v.size for v in views[:j]) for j in range(len(views))]
    if k <= 0:    # nothing: no magnitude (NaN included, its sign bit is 0) exceeds t
        return (jnp.full(shape, jnp.iinfo(udtype).max, udtype), jnp.zeros(shape, cdtype),
                offsets)
    if k >= n:    # everything
        return jnp.zeros(shape, udtype), jnp.full(shape, n, cdtype), offsets

    def count(pred):
        # Bits and positions are recomputed inside every pass rather than stored, so
        # that where XLA fuses a reduction with its input no model-sized copy exists.
        total = None
        for v, offset in zip(views, offsets):
            u = magnitude_bits(v, dtype)
            pos = lax.broadcasted_iota(cdtype, v.shape, 1) + offset
            c = (jnp.sum(pred(u, pos), axis=-1, keepdims=True, dtype=cdtype) if per_row
                 else jnp.sum(pred(u, pos), dtype=cdtype))
            total = c if total is None else total + c
        return jnp.reshape(total, shape)

    nbits = 8 * jnp.dtype(udtype).itemsize - 1          # the sign bit of |x| is 0

    def bisect_value(i, t):
        cand = t | jnp.left_shift(jnp.ones((), udtype), (nbits - 1 - i).astype(udtype))
        return jnp.where(count(lambda u, _: u >= cand) >= k, cand, t)

    t = lax.fori_loop(0, nbits, bisect_value, jnp.zeros(shape, udtype))
    need = k - count(lambda u, _: u > t)                 # >= 1 entries equal to t to keep
    num_eq = count(lambda u, _: u == t)
    pbits = int(n).bit_length()

    def bisect_position(i, cut):
        # Largest cut <= n with #{u == t, pos < cut} <= need; then that count == need.
        cand = cut | jnp.left_shift(jnp.ones((), cdtype), (pbits - 1 - i).astype(cdtype))
        ok = (cand <= n) & (count(lambda u, pos: (u == t) & (pos < cand)) <= need)
        return jnp.where(ok, cand, cut)

    cut = lax.cond(jnp.all(num_eq == need),
                   lambda: jnp.full(shape, n, cdtype),
                   lambda: lax.fori_loop(0, pbits, bisect_position,
                                         jnp.zeros(shape, cdtype)))
    return t, cut, offsets


def selected(v, dtype, t, cut, offset):
    """The mask of :func:`kth_largest`'s selection on one view (one fused elementwise op)."""
    u = magnitude_bits(v, dtype)
    pos = lax.broadcasted_iota(cut.dtype, v.shape, 1) + offset
    return (u > t) | ((u == t) & (pos < cut))


def band(views, n, density, outliers, dtype, per_row):
    """Ranks ``[ceil(outliers n), ceil(outliers n) + ceil(density n))`` (clipped to n)."""
    lo = _common.count_of(outliers, n) if outliers else 0
    hi = min(n, lo + _common.count_of(density, n))
    t_hi, cut_hi, offsets = kth_largest(views, hi, dtype, per_row)
    masks = [selected(v, dtype, t_hi, cut_hi, off) for v, off in zip(views, offsets)]
    if lo:
        t_lo, cut_lo, _ = kth_largest(views, lo, dtype, per_row)
        masks = [m & ~selected(v, dtype, t_lo, cut_lo, off)
                 for m, v, off in zip(masks, views, offsets)]
    return masks


def band_masks(leaves: list[Any], density: float, outliers: float,
                scope: str) -> list[jax.Array | None]:
    """Flat list of boolean masks (``None`` at non-parameter leaves)."""
    idx = [i for i, x in enumerate(leaves) if _common.is_param(x)]
    out: list[jax.Array | None] = [None] * len(leaves)
    if scope == "global":
        arrays = [jnp.asarray(leaves[i]) for i in idx if jnp.size(leaves[i])]
        live = [i for i in idx if jnp.size(leaves[i])]
        for i in idx:
            out[i] = jnp.zeros(jnp.shape(leaves[i]), bool)
        if not arrays:
            return out
        dtype = jnp.result_type(*[real_dtype(a) for a in arrays])
        n = sum(a.size for a in arrays)
        masks = band([a.reshape(1, -1) for a in arrays], n, density, outliers, dtype,
                      per_row=False)
        for i, a, m in zip(live, arrays, masks):
            out[i] = m.reshape(a.shape)
        return out
    for i in idx:
        a = jnp.asarray(leaves[i])
        if a.size == 0:
            out[i] = jnp.zeros(a.shape, bool)
            continue
        if scope == "leaf":
            view = a.reshape(1, -1)
        else:
            view = a.reshape(-1, a.shape[-1] if a.ndim else 1)
        (m,) = band([view], view.shape[-1], density, outliers, real_dtype(a),
                     per_row=True)
        out[i] = m.reshape(a.shape)
    return out


def keep_masked(leaves: list[Any], masks: list[jax.Array | None]) -> list[Any]:
    """``where(mask | ~isfinite(x), x, 0)`` leaf by leaf; ``None`` masks keep the leaf.

    Non-finite entries are always kept, whatever the mask, so that a NaN or Inf that
    reaches a merge under ``jit`` (where :func:`taskvec_jax.merging._common.check_finite`
    cannot raise) propagates to the output instead of being trimmed away (Breadcrumbs,
    for one, drops the largest magnitudes, and NaN ranks largest). For finite inputs this
    is ``where(mask, x, 0)``.
    """
    return [x if m is None else jnp.where(m | ~jnp.isfinite(x), x, jnp.zeros((), x.dtype))
            for x, m in zip(leaves, masks)]
