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

Algorithm. The ``k``-th largest magnitude of a group is found exactly on its bit pattern
(non-negative IEEE floats order like their unsigned-integer bits), with no sort and no
quantile, by a radix select: one histogram pass per digit, most significant first (2
passes of 15 + 16 bits for float32 under the global and leaf scopes), each counting only
the entries whose higher digits match. Only if more entries tie at that threshold than
can be kept does a second radix select, over the tied entries' positions, find where the
kept ties end. Under ``"global"`` scope the histograms are summed across leaves, so the
whole model is never concatenated. The row scope on CPU keeps the bisection on the bits
(31 compare-and-count passes), measured faster there than per-row histograms
(:func:`_bisect_rows`).

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

__all__ = ["SCOPES", "band_masks", "band_masks_at", "band_thresholds", "band_thresholds_eager",
           "check_scope", "group_size", "groups", "position_fn",
           "keep_masked", "kth_largest", "magnitude_bits", "real_dtype", "selected"]

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


def _digit_widths(nbits: int, groups: int) -> list[int]:
    """Digit widths, most significant first, for a radix select over ``nbits``-bit keys.

    Each pass histograms one digit into ``groups * 2**w`` bins. On CPU a scatter-add
    into a histogram that leaves the cache is slow (measured, 17M entries in rows of
    32-3072: 8-bit digits 1.7 s, 11-bit 12 s, 4-bit 0.9 s per band), so ``w`` is the
    largest width <= 16 whose histogram has at most ``2**17`` bins (at least 3 bits):
    2 passes for float32 under the global and leaf scopes, 5-11 for rows.
    """
    w = 16
    while w > 3 and groups * 2 ** w > 2 ** 17:
        w -= 1
    passes = -(-nbits // w)
    first = nbits - w * (passes - 1)
    return [first] + [w] * (passes - 1)


CHUNK = 2 ** 18
# The blocks of a sharded leaf (merging._shards) are histogrammed in smaller pieces: a
# device's blocks of a ViT-B/32 leaf (1/8 of it) are mostly under CHUNK, so each would
# be materialized whole, and the global scope ranks every leaf's block in one program,
# where XLA kept several alive at once (1.73 models / D of temporaries at ViT-B/32 on 8
# devices; 0.51 with this chunk, under the merge pass's one model: benchmarks/NOTES.md).
# The unsharded ranking takes the same time with either chunk (TIES, global, T = 8).
SHARDED_CHUNK = 2 ** 15


def _chunked_bincount(v, index, length, chunk=None):
    """``bincount`` of ``index(block, r0, c0, rows_of)`` over ``v`` in blocks of about
    ``chunk`` (default :data:`CHUNK`) entries.

    XLA materializes a scatter's indices and updates (on CPU: two 32-bit buffers the size
    of its input), so the histogram of a large view is summed over blocks of about
    ``CHUNK`` entries in a ``fori_loop`` (each block a ``dynamic_slice``, fused into its
    index computation): the transients are two blocks, not two views. ``block`` starts
    at row ``r0``, column ``c0`` of ``v``.
    """
    chunk = CHUNK if chunk is None else chunk
    g, m = v.shape

    def hist(block, r0, c0):
        rows_of = ((lambda a: a) if g == 1 else
                   (lambda a: lax.dynamic_slice_in_dim(a, r0, block.shape[0], 0)))
        return jnp.bincount(index(block, r0, c0, rows_of).reshape(-1),
                            length=length).astype(jnp.int32)     # groups < 2**31

    if g == 1:
        size, axis, extent = min(m, chunk), 1, m
    else:
        size, axis, extent = min(g, max(1, chunk // m)), 0, g
    nblocks = extent // size
    bshape = (1, size) if axis else (size, m)
    if nblocks == 1:
        total = hist(lax.slice_in_dim(v, 0, size, axis=axis), 0, 0)
    else:
        def body(i, total):
            start = i * size
            r0, c0 = (0, start) if axis else (start, 0)
            block = lax.dynamic_slice(v, (r0, c0), bshape)
            return total + hist(block, r0, c0)
        total = lax.fori_loop(0, nblocks, body, jnp.zeros(length, jnp.int32))
    done = nblocks * size
    if done < extent:
        r0, c0 = (0, done) if axis else (done, 0)
        total = total + hist(lax.slice_in_dim(v, done, extent, axis=axis), r0, c0)
    return total


def _radix_kth(views, keys, valid, k, nbits, udtype, shape, widths, reduces=None):
    """The ``k``-th largest ``key`` per group, by one histogram pass per digit.

    ``keys(block, j, c0, rows_of)`` gives the unsigned keys of a block of view ``j``
    (``[g', m']``, its first column ``c0`` of the view; ``rows_of`` slices a ``[g, 1]``
    array to the block's rows), ``valid`` (same arguments) which entries count
    (``None``: all). Pass ``p`` histograms digit ``p`` of the entries whose
    higher digits equal the prefix found so far and picks the digit holding the
    ``k``-th largest; entries that do not match go to one extra bin that is never read.

    ``reduces[j]`` (default: none): the mesh axes over which view ``j``'s histogram is
    completed (a sharded leaf's other blocks, :mod:`._shards`); views with the same axes
    are summed first, so each pass makes one collective per distinct set of axes, and
    the blocks are histogrammed in pieces of :data:`SHARDED_CHUNK`.

    Returns ``(t, need, num_eq)``, each shaped ``shape``: the key of the ``k``-th largest
    entry, how many entries equal to ``t`` the first ``k`` contain, and how many equal it.
    """
    g = shape[0]
    prefix = jnp.zeros(shape, udtype)
    remaining = jnp.broadcast_to(jnp.asarray(k, jnp.int32), shape)   # groups < 2**31
    shift = nbits
    hist = None
    for p, w in enumerate(widths):
        shift -= w
        bins = 2 ** w
        total = None
        if p:
            # Ties this pass's inputs to the previous pass's result, so that XLA neither
            # computes the keys of every pass at once nor shares (stores) them.
            views, prefix = lax.optimization_barrier((views, prefix))
        partial = {}
        for j, v in enumerate(views):
            def index(block, r0, c0, rows_of, j=j, p=p, w=w, shift=shift, bins=bins,
                      prefix=prefix):
                key = keys(block, j, c0, rows_of)
                digit = (jnp.right_shift(key, udtype(shift))
                         & udtype(bins - 1)).astype(jnp.int32)
                ok = None if valid is None else valid(block, j, c0, rows_of)
                if p:
                    match = jnp.right_shift(key, udtype(shift + w)) == rows_of(prefix)
                    ok = match if ok is None else ok & match
                if ok is not None:
                    digit = jnp.where(ok, digit, bins)
                if g > 1:
                    digit = digit + (lax.broadcasted_iota(jnp.int32, (block.shape[0], 1), 0)
                                     + r0) * (bins + 1)
                return digit
            h = _chunked_bincount(v, index, g * (bins + 1),
                                  None if reduces is None else SHARDED_CHUNK)
            if reduces is not None:
                partial[reduces[j]] = h if reduces[j] not in partial else partial[reduces[j]] + h
                continue
            total = h if total is None else total + h
        total = _completed(total, partial)
        hist = total.reshape(g, bins + 1)[:, :bins].astype(remaining.dtype)
        # suffix[b] = #{digit >= b}: non-increasing, so the chosen digit is the number of
        # b >= 1 with suffix[b] >= remaining.
        suffix = jnp.flip(jnp.cumsum(jnp.flip(hist, 1), axis=1), 1)
        d = jnp.sum(suffix[:, 1:] >= remaining, axis=1, keepdims=True, dtype=jnp.int32)
        at = jnp.take_along_axis(hist, d, axis=1)
        above = jnp.take_along_axis(suffix, d, axis=1) - at
        remaining = remaining - above
        prefix = jnp.left_shift(prefix, udtype(w)) | d.astype(udtype)
        num_eq = at
    return prefix.reshape(shape), remaining.reshape(shape), num_eq.reshape(shape)


def _completed(total, partial):
    """``total`` plus each ``partial[axes]`` summed over the mesh ``axes`` (one
    ``lax.psum`` per set of axes, in a fixed order; ``()``: no collective)."""
    for axes in sorted(partial):
        part = lax.psum(partial[axes], axes) if axes else partial[axes]
        total = part if total is None else total + part
    return total


def _bisect_kth(views, k, dtype, per_row, n, udtype, cdtype, shape, positions, reduces):
    """``(t, cut)`` by bisection on the bits: 31 (float32) compare-and-count passes.

    The greedy MSB-first search for the largest ``t`` with ``#{u >= t} >= k``; then, if
    more than ``need`` entries tie at ``t``, a bisection over positions. Used for the
    row scope on CPU, where it beats the radix select (see :func:`kth_largest`).
    """
    def count(pred):
        # Bits and positions are recomputed inside every pass rather than stored, so
        # that where XLA fuses a reduction with its input no model-sized copy exists.
        # A row's count sums 0/1 in float32 when the row has < 2**24 entries (every
        # partial sum is then an integer below 2**24, exact in any order): XLA:CPU
        # vectorizes that reduction better than an int32 one (0.82 against 1.25 ns per
        # entry and pass on [24576, 768] float32; the row scope's thresholds of a
        # ViT-B/32-sized tree, one selection: 1.08-1.14 s against 1.33-1.37 s).
        total, partial = None, {}
        for v, position, axes in zip(views, positions, reduces):
            u = magnitude_bits(v, dtype)
            pos = position(lax.broadcasted_iota(cdtype, v.shape, 1))
            if per_row and v.shape[-1] < 2**24:
                c = jnp.sum(pred(u, pos).astype(jnp.float32), axis=-1,
                            keepdims=True).astype(cdtype)
            elif per_row:
                c = jnp.sum(pred(u, pos), axis=-1, keepdims=True, dtype=cdtype)
            else:
                c = jnp.sum(pred(u, pos), dtype=cdtype)
            if axes is not None:
                partial[axes] = c if axes not in partial else partial[axes] + c
                continue
            total = c if total is None else total + c
        return jnp.reshape(_completed(total, partial), shape)

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
    return t, cut


def _bisect_rows() -> bool:
    """Whether many-row groups (the row scope) use the bisection: on CPU, yes.

    Measured on CPU (17M float32 entries in ViT-B/32 rows of 32-3072, band of
    Breadcrumbs): the per-row radix select, whose histograms hold ``rows * 2**w`` bins,
    took 1.3-1.5x the bisection's time for every digit width tried (3-11 bits); the
    scatter-adds into many small per-row histograms are slower than 31 fused
    compare-and-count passes. On accelerators, whose scatter-adds are fast, the radix
    select is used for rows as well (not measured here: no accelerator was available).
    """
    return jax.default_backend() == "cpu"


def kth_largest(views: list[jax.Array], k: int, dtype, per_row: bool, shards=None,
                rows: bool | None = None):
    """Finds the ``k`` largest magnitudes per group (ties: earlier position first).

    The selection is described by ``(t, cut)``: an entry with magnitude bits ``u`` at
    position ``pos`` (within its row, or within the whole model for the global scope) is
    selected iff ``u > t or (u == t and pos < cut)``. ``t`` is the bit pattern of the
    ``k``-th largest magnitude (non-negative floats order like their unsigned bits),
    found by a radix select: one histogram pass per digit of the bits, most significant
    first (:func:`_digit_widths`), each keeping only the entries whose higher digits
    match. ``cut`` keeps the first ``need = k - #{u > t}`` entries equal to ``t``; it is
    ``n`` unless more than ``need`` entries tie at ``t``, in which case the ``need``-th
    earliest tied entry is found: for one unsharded group of more than
    ``2**POSITION_BINS_LOG2`` positions (global and leaf scopes) by one histogram pass
    over blocks of positions and a scan of the one block holding it
    (:func:`_earliest_tied_cut`), otherwise by a second radix select over the tied
    entries' positions. No sort; exact and deterministic (integer histograms).

    Args:
      views: ``[g, m]`` arrays. With ``per_row`` there is one view and each of its ``g``
        rows is a group of ``m``; otherwise every view is ``[1, size]`` and all views,
        one after the other, form one group (the global scope).
      k: entries selected per group, ``k >= 0``.
      dtype: the float dtype magnitudes are compared in.
      per_row: see ``views``.
      shards: ``None``, or (inside ``jax.shard_map``) one
        :class:`~taskvec_jax.merging._shards.Shards` per view: the views are then the
        local blocks of sharded leaves, counts are summed over the devices holding the
        other blocks and positions are the entries' positions in the whole leaves.
      rows: whether the views' rows are their leaves' rows (default: ``per_row``); the
        leaf scope's one-row views are not (it matters only for sharded blocks).

    Returns:
      ``(t, cut, offsets)``: ``t`` and ``cut`` are ``[g, 1]`` (per row) or ``[1, 1]``;
      ``offsets[j]`` is the position of view ``j``'s first entry in the group.
    """
    rows = per_row if rows is None else rows
    n = group_size(views, per_row, shards, rows)
    udtype = UINT[jnp.dtype(dtype).itemsize]
    cdtype = jnp.int32 if n < 2**31 else jnp.int64
    shape = (views[0].shape[0], 1) if per_row else (1, 1)
    offsets = [0] * len(views)
    if not per_row:
        sizes = [v.size for v in views] if shards is None else [s.size for s in shards]
        offsets = [sum(sizes[:j]) for j in range(len(views))]
    positions = [position_fn(o, None if shards is None else shards[j], rows)
                 for j, o in enumerate(offsets)]
    reduces = None if shards is None else [s.reduce_axes(last_only=rows) for s in shards]
    if k <= 0:    # nothing: no magnitude (NaN included, its sign bit is 0) exceeds t
        return (jnp.full(shape, jnp.iinfo(udtype).max, udtype), jnp.zeros(shape, cdtype),
                offsets)
    if k >= n:    # everything
        return jnp.zeros(shape, udtype), jnp.full(shape, n, cdtype), offsets

    g = shape[0]
    if g > 1 and _bisect_rows():
        t, cut = _bisect_kth(views, k, dtype, per_row, n, udtype, cdtype, shape, positions,
                             reduces or [None] * len(views))
        return t, cut, offsets
    nbits = 8 * jnp.dtype(udtype).itemsize - 1          # the sign bit of |x| is 0
    # Bits (and positions) are recomputed inside every pass rather than stored, so that
    # where XLA fuses a histogram with its input no model-sized copy exists.
    t, need, num_eq = _radix_kth(views, lambda v, j, c0, rows_of: magnitude_bits(v, dtype),
                                 None, k,
                                 nbits, udtype, shape, _digit_widths(nbits, g), reduces)
    pbits = max(1, (n - 1).bit_length())
    pdtype = jnp.uint32 if pbits <= 32 else jnp.uint64

    def position_cut():
        if g == 1 and reduces is None and pbits > POSITION_BINS_LOG2:
            return _earliest_tied_cut(views, t, need, dtype, offsets, n, pbits, cdtype)
        # The need-th earliest tied entry is the need-th largest of n - 1 - pos among
        # them; cut is one past its position.
        def pkeys(v, j, c0, rows_of):
            pos = positions[j](lax.broadcasted_iota(cdtype, v.shape, 1) + c0)
            return (n - 1 - pos).astype(pdtype)

        def tied(v, j, c0, rows_of):
            return magnitude_bits(v, dtype) == rows_of(t)
        r, _, _ = _radix_kth(views, pkeys, tied,
                             need, pbits, pdtype, shape, _digit_widths(pbits, g), reduces)
        return (n - r.astype(cdtype)).astype(cdtype)

    cut = lax.cond(jnp.all(num_eq == need), lambda: jnp.full(shape, n, cdtype), position_cut)
    return t, cut, offsets


POSITION_BINS_LOG2 = 16


def _earliest_tied_cut(views, t, need, dtype, offsets, n, pbits, cdtype):
    """One past the position of the ``need``-th earliest entry whose magnitude bits equal
    ``t``, over the views of one group (``[1, m]`` each, unsharded), as ``[1, 1]``.

    One pass over the views histograms the tied entries by block of ``2**s`` positions
    (``2**POSITION_BINS_LOG2`` blocks, ``s`` the remaining position bits); the block
    holding the ``need``-th is then read alone (a window of at most ``2**s`` entries per
    view) and its tied entries, in position order (the views follow each other), are
    counted to the ``need``-th. The radix select over positions it replaces made two
    full passes for a group of ``2**17`` entries or more.
    """
    s = pbits - POSITION_BINS_LOG2
    width = 2 ** s
    nblocks = -(-n // width)
    total = None
    for v, off in zip(views, offsets):
        def index(block, r0, c0, rows_of, off=off):
            pos = lax.broadcasted_iota(cdtype, block.shape, 1) + (c0 + off)
            tied = magnitude_bits(block, dtype) == t
            return jnp.where(tied, pos >> s, nblocks).astype(jnp.int32)
        h = _chunked_bincount(v, index, nblocks + 1)
        total = h if total is None else total + h
    counts = total[:nblocks].astype(cdtype)
    upto = jnp.cumsum(counts)                                 # tied entries up to each block
    b = jnp.sum(upto < need[0, 0], dtype=cdtype)              # the block of the need-th
    rest = need[0, 0] - (jnp.take(upto, b) - jnp.take(counts, b))   # its rank inside it
    start = b * width
    found = []
    for v, off in zip(views, offsets):
        m = v.shape[1]
        size = min(m, width)
        first = jnp.clip(start - off, 0, m - size).astype(cdtype)
        win = lax.dynamic_slice_in_dim(v[0], first, size)
        pos = lax.iota(cdtype, size) + first + off
        found.append(jnp.where((magnitude_bits(win, dtype) == t[0, 0]) & (pos >= start)
                               & (pos < start + width), pos, -1))
    cand = jnp.concatenate(found)                  # tied positions of the block, in order
    rank = jnp.cumsum((cand >= 0).astype(cdtype))
    at = jnp.argmax(rank >= rest)
    return (jnp.take(cand, at) + 1).astype(cdtype).reshape(1, 1)


def group_size(views, per_row: bool, shards=None, rows: bool | None = None) -> int:
    """Entries per selection group: a row's, or all views' together (whole leaves' when
    the views are sharded blocks; ``rows`` as in :func:`kth_largest`)."""
    if shards is None:
        return views[0].shape[-1] if per_row else sum(v.size for v in views)
    if per_row if rows is None else rows:
        return shards[0].shape[-1] if shards[0].shape else 1
    return sum(s.size for s in shards)


def position_fn(offset: int, shards, per_row: bool):
    """Maps a view's column indices (``iota`` along its last axis, plus the block's first
    column) to the entries' positions in their group: ``+ offset`` for whole leaves; for
    the local block of a sharded leaf, its column in the whole row (``per_row``) or its
    row-major index in the whole leaf, plus ``offset``."""
    if shards is None:
        return lambda a: a + offset
    if per_row:
        return lambda a: a + shards.column_offset(a.dtype)
    return lambda a: shards.flat_position(a) + offset


def selected(v, dtype, t, cut, position):
    """The mask of :func:`kth_largest`'s selection on one view (one fused elementwise op).

    ``position``: an offset, or a :func:`position_fn` (sharded blocks)."""
    u = magnitude_bits(v, dtype)
    pos = lax.broadcasted_iota(cut.dtype, v.shape, 1)
    pos = position(pos) if callable(position) else pos + position
    return (u > t) | ((u == t) & (pos < cut))


def groups(leaves: list[Any], scope: str):
    """The selection groups of a flat leaf list: ``[(indices, dtype, per_row)]``.

    ``"global"``: one group of every non-empty parameter leaf (compared in their common
    dtype); otherwise one per non-empty parameter leaf. Static (shapes and dtypes only).
    """
    live = [i for i, x in enumerate(leaves) if _common.is_param(x) and jnp.size(x)]
    if scope == "global":
        if not live:
            return []
        return [(live, jnp.result_type(*[real_dtype(jnp.asarray(leaves[i])) for i in live]),
                 False)]
    return [([i], real_dtype(jnp.asarray(leaves[i])), True) for i in live]


def _views(leaves, indices, scope):
    if scope == "global":
        return [jnp.asarray(leaves[i]).reshape(1, -1) for i in indices]
    a = jnp.asarray(leaves[indices[0]])
    if scope == "leaf":
        return [a.reshape(1, -1)]
    return [a.reshape(-1, a.shape[-1] if a.ndim else 1)]


def band_thresholds(leaves: list[Any], density: float, outliers: float, scope: str,
                    shards=None):
    """The rank band of :func:`band_masks` as thresholds: a small pytree of arrays.

    One ``(t_hi, cut_hi, t_lo, cut_lo)`` per selection group (``t_lo, cut_lo`` are
    ``None`` without outliers); :func:`band_masks_at` turns them into masks with one
    elementwise pass. Splitting the two lets a merge rank each task once and apply all
    tasks' masks inside one fused pass per leaf (no mask or trimmed copy is stored).
    ``shards``: ``None``, or inside ``jax.shard_map`` one
    :class:`~taskvec_jax.merging._shards.Shards` per leaf (``None`` at non-parameters),
    the leaves being local blocks (see :func:`kth_largest`).
    """
    out = []
    done = jnp.zeros((), jnp.int32)
    for indices, dtype, per_row in groups(leaves, scope):
        views = _views(leaves, indices, scope)
        group = None if shards is None else [shards[i] for i in indices]
        n = group_size(views, per_row, group, scope == "row")
        lo = _common.count_of(outliers, n) if outliers else 0
        hi = min(n, lo + _common.count_of(density, n))
        # Each selection's inputs are tied to the previous one's result, so that XLA runs
        # them one after the other and their transients (on CPU: the bit patterns and a
        # reduction's input, for the largest leaf) are never alive together.
        views, done = lax.optimization_barrier((views, done))
        t_hi, cut_hi, _ = kth_largest(views, hi, dtype, per_row, group, scope == "row")
        t_lo = cut_lo = None
        if lo:
            views, t_hi = lax.optimization_barrier((views, t_hi))
            t_lo, cut_lo, _ = kth_largest(views, lo, dtype, per_row, group, scope == "row")
        done = jnp.sum(cut_hi, dtype=jnp.int32)
        out.append((t_hi, cut_hi, t_lo, cut_lo))
    return out


_band_thresholds_jit = jax.jit(band_thresholds, static_argnums=(1, 2, 3))


def band_thresholds_eager(leaves: list[Any], density: float, outliers: float, scope: str):
    """:func:`band_thresholds` for concrete leaves, in the fewest-transients way.

    Under the ``"leaf"`` and ``"row"`` scopes each leaf is ranked by its own compiled
    program, so that only one leaf's transients exist at a time (in one program for the
    whole tree, XLA:CPU kept them alive together: measured 1.9 model sizes for a
    ViT-B/32-shaped tree under the row scope, against 0.05 leaf by leaf); the global
    scope is one program (its histogram passes are blocked, see
    :func:`_chunked_bincount`).
    """
    if scope == "global":
        return _band_thresholds_jit(leaves, density, outliers, scope)
    out = []
    for indices, _, _ in groups(leaves, scope):
        out.extend(_band_thresholds_jit([leaves[indices[0]]], density, outliers, scope))
    return out


def band_masks_at(leaves: list[Any], thresholds, scope: str,
                  shards=None) -> list[jax.Array | None]:
    """The masks of :func:`band_thresholds`' selection (``None`` at non-parameters).

    ``shards`` as in :func:`band_thresholds`; a row threshold may also come shaped like
    its leaf's rows (``leaf.shape[:-1] + (1,)``, as :mod:`._shards` passes it on)."""
    out: list[jax.Array | None] = [None if not _common.is_param(x)
                                   else jnp.zeros(jnp.shape(x), bool) for x in leaves]
    for (indices, dtype, per_row), thr in zip(groups(leaves, scope), thresholds):
        t_hi, cut_hi, t_lo, cut_lo = [None if a is None else jnp.reshape(a, (-1, 1))
                                      for a in thr]
        views = _views(leaves, indices, scope)
        offset = 0
        for i, v in zip(indices, views):
            off = offset if scope == "global" else 0
            position = (off if shards is None else
                        position_fn(off, shards[i], scope == "row"))
            m = selected(v, dtype, t_hi, cut_hi, position)
            if t_lo is not None:
                m = m & ~selected(v, dtype, t_lo, cut_lo, position)
            out[i] = m.reshape(jnp.shape(leaves[i]))
            offset += v.size if shards is None else shards[i].size
    return out


def band_masks(leaves: list[Any], density: float, outliers: float,
               scope: str) -> list[jax.Array | None]:
    """Flat list of boolean masks of the rank band ``[lo, hi)`` per group (``None`` at
    non-parameter leaves): ``lo = ceil(outliers n)`` (0 without outliers),
    ``hi = min(n, lo + ceil(density n))``."""
    return band_masks_at(leaves, band_thresholds(leaves, density, outliers, scope), scope)


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
