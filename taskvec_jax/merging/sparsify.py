"""Sparsifying merges: magnitude masks by scope, trim, TIES, DARE, Model Breadcrumbs.

Every choice that the PyTorch implementations make implicitly is an argument here.

Scope. ``scope`` says over which group of entries the "largest magnitudes" are ranked:

* ``"global"``: all float entries of the whole tree at once (leaves in ``jax.tree``
  flattening order, each leaf in row-major order). Leaves of different float dtypes are
  compared after an exact widening to their common dtype.
* ``"leaf"``: each leaf (tensor) separately.
* ``"row"``: each row of the last axis separately: a leaf of shape ``(a, b, c)`` has
  ``a * b`` rows of ``c`` entries; a 1-D leaf is one row; a scalar is one row of one.

Counts. A group of ``n`` entries keeps ``k = ceil(density * n)`` of them, where
``density`` is read as the decimal it was written as (``0.07`` is ``7/100``, so 7 of 100,
not the 8 that ``ceil(0.07 * 100.0)`` gives in floating point). Since
``0 < density <= 1``, ``1 <= k <= n``: a group never loses all its entries. The same rule
gives Breadcrumbs' number of dropped outliers, ``ceil(outliers * n)`` (0 for
``outliers=0``).

Ties. Entries are ranked by magnitude, largest first; equal magnitudes are ranked by
position (the earlier entry in the order above ranks first). The kept set is the first
``k`` of that ranking, so exactly ``k`` entries are kept whatever the ties. ``-0.0`` and
``0.0`` are equal; ``NaN`` ranks above ``inf``.

Algorithm. The ``k``-th largest magnitude of a group is found exactly by bisection on its
bit pattern (non-negative IEEE floats order like their unsigned-integer bits): 31 (float32)
or 63 (float64) counting passes over the group, each a compare-and-sum; no sort and no
quantile. Only if more entries tie at that
threshold than can be kept does a second bisection, over positions (``ceil(log2 n)``
passes), find where the kept ties end. Under ``"global"`` scope the counts are summed
across leaves, so the whole model is never concatenated.

Non-float leaves. ``None`` leaves (a task vector's non-float positions) and integer or
boolean leaves are not parameters: they are not counted, masks hold ``None`` there,
merged task vectors hold ``None`` there and merged models keep the base's value.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from taskvec_jax import task_vectors as tv_lib
from taskvec_jax.merging import _common

PyTree = Any

SCOPES = ("global", "leaf", "row")
TIES_MERGES = ("mean", "sum")

_UINT = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


# --------------------------------------------------------------------------- masks

def _check_scope(scope: Any) -> str:
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose one of {SCOPES}")
    return scope


def _real_dtype(x: jax.Array):
    return jnp.finfo(x.dtype).dtype


def _magnitude_bits(x: jax.Array, dtype) -> jax.Array:
    """``|x|`` in ``dtype`` seen as unsigned integers (same order as the magnitudes)."""
    mag = jnp.abs(x).astype(dtype)
    return lax.bitcast_convert_type(mag, _UINT[jnp.dtype(dtype).itemsize])


def _select(views: list[jax.Array], k: int, dtype, per_row: bool):
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
    udtype = _UINT[jnp.dtype(dtype).itemsize]
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
            u = _magnitude_bits(v, dtype)
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


def _selected(v, dtype, t, cut, offset):
    """The mask of :func:`_select`'s selection on one view (one fused elementwise op)."""
    u = _magnitude_bits(v, dtype)
    pos = lax.broadcasted_iota(cut.dtype, v.shape, 1) + offset
    return (u > t) | ((u == t) & (pos < cut))


def _band(views, n, density, outliers, dtype, per_row):
    """Ranks ``[ceil(outliers n), ceil(outliers n) + ceil(density n))`` (clipped to n)."""
    lo = _common.count_of(outliers, n) if outliers else 0
    hi = min(n, lo + _common.count_of(density, n))
    t_hi, cut_hi, offsets = _select(views, hi, dtype, per_row)
    masks = [_selected(v, dtype, t_hi, cut_hi, off) for v, off in zip(views, offsets)]
    if lo:
        t_lo, cut_lo, _ = _select(views, lo, dtype, per_row)
        masks = [m & ~_selected(v, dtype, t_lo, cut_lo, off)
                 for m, v, off in zip(masks, views, offsets)]
    return masks


def _band_masks(leaves: list[Any], density: float, outliers: float,
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
        dtype = jnp.result_type(*[_real_dtype(a) for a in arrays])
        n = sum(a.size for a in arrays)
        masks = _band([a.reshape(1, -1) for a in arrays], n, density, outliers, dtype,
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
        (m,) = _band([view], view.shape[-1], density, outliers, _real_dtype(a),
                     per_row=True)
        out[i] = m.reshape(a.shape)
    return out


def magnitude_mask(task_vector: PyTree, *, density: float, outliers: float = 0.0,
                   scope: str = "global") -> PyTree:
    """Boolean mask of the largest magnitudes of a tree, per ``scope``.

    In each group of ``n`` entries (see the module docstring for scopes, ranking and ties)
    the mask is true on ranks ``r`` with ``lo <= r < hi``, where ``lo = ceil(outliers * n)``
    (``0`` when ``outliers == 0``) and ``hi = min(n, lo + ceil(density * n))``. With
    ``outliers=0`` that is the ``ceil(density * n)`` largest magnitudes (TIES' trim);
    with ``outliers > 0`` the largest ``lo`` are excluded first (Model Breadcrumbs).

    Memory: the output masks (one byte per parameter) and the counting passes'
    transients: no sort and no concatenated copy, but on CPU XLA materializes each
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
      ValueError: for a density or outliers fraction out of range or traced, or an
        unknown scope.
    """
    density = _common.check_density(density)
    outliers = _common.check_outliers(outliers, density)
    scope = _check_scope(scope)
    return _magnitude_mask_jit(task_vector, density=density, outliers=outliers, scope=scope)


@functools.partial(jax.jit, static_argnames=("density", "outliers", "scope"))
def _magnitude_mask_jit(task_vector, *, density, outliers, scope):
    leaves, treedef = _common.flatten(task_vector)
    return jax.tree.unflatten(treedef, _band_masks(leaves, density, outliers, scope))


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
      scope: ``"global"``, ``"leaf"`` or ``"row"`` (see the module docstring).
      outliers: fraction of largest magnitudes skipped first, in ``[0, 1)``.

    Returns:
      A tree shaped like ``task_vector`` with the same dtypes.

    Raises:
      ValueError: for a density out of ``(0, 1]``, bad outliers, or an unknown scope.
    """
    density = _common.check_density(density)
    outliers = _common.check_outliers(outliers, density)
    scope = _check_scope(scope)
    return _trim_jit(task_vector, density=density, outliers=outliers, scope=scope)


@functools.partial(jax.jit, static_argnames=("density", "outliers", "scope"))
def _trim_jit(task_vector, *, density, outliers, scope):
    leaves, treedef = _common.flatten(task_vector)
    masks = _band_masks(leaves, density, outliers, scope)
    out = [x if m is None else jnp.where(m, x, jnp.zeros((), x.dtype))
           for x, m in zip(leaves, masks)]
    return jax.tree.unflatten(treedef, out)


# --------------------------------------------------------------------------- TIES

def _check_real(task_leaves: list[list[Any]], paths: list[str], what: str) -> None:
    for t, leaves in enumerate(task_leaves):
        for path, x in zip(paths, leaves):
            if _common.is_param(x) and jnp.issubdtype(jnp.result_type(x),
                                                       jnp.complexfloating):
                raise ValueError(f"task vector {t}: leaf '{path}' is complex "
                                 f"({jnp.result_type(x)}); {what} elects signs and needs "
                                 "real values")


def ties_merge(task_vectors: Sequence[PyTree], *, density: float = 0.2,
               scope: str = "global", merge: str = "mean") -> PyTree:
    """The TIES-merged task vector: trim, elect signs, disjoint merge (Yadav et al., 2023).

    For each task ``t``: ``hat_t = trim(tau_t, density, scope)``. Per parameter, with
    ``P = sum_t max(hat_t, 0)`` and ``N = sum_t min(hat_t, 0)``, the elected sign is
    ``s = sign(P + N)`` (the sign of the summed trimmed values, TIES' "mass" election).
    The merge keeps only the trimmed values that agree with ``s`` (strictly same sign;
    zeros never agree):

    * ``merge="mean"``: ``P / #{t: hat_t > 0}`` where ``s > 0``,
      ``N / #{t: hat_t < 0}`` where ``s < 0``;
    * ``merge="sum"``: ``P`` where ``s > 0``, ``N`` where ``s < 0``;

    and ``0`` where ``s = 0`` (no value agrees).

    Memory: one pass over the tasks, holding two model-sized float accumulators (``P``,
    ``N``, in at least float32) and, for ``"mean"``, two one-byte-per-parameter counters
    (``T < 256``; int32 otherwise), plus the output. The ``T`` trimmed task vectors are
    never held at once: called eagerly, each task is one compiled step that updates the
    donated accumulators in place, so only one task's transients exist at a time (on
    CPU, XLA materializes the inputs of the counting reductions: about two model-sized
    32-bit buffers for ``density < 1``, none for ``density == 1``). Under an outer
    ``jax.jit`` the tasks run one after the other in a ``lax.fori_loop`` (each fetched
    by ``lax.switch``: one more model-sized copy); measured on CPU, the temporaries do
    not grow with ``T`` either way (see docs/merging.md).

    Args:
      task_vectors: a non-empty sequence of task vectors with equal structure.
      density: fraction kept by the trim, in ``(0, 1]``; ``1.0`` skips trimming (use it
        after :func:`dare` for DARE-TIES).
      scope: the trim's scope: ``"global"``, ``"leaf"`` or ``"row"``.
      merge: ``"mean"`` or ``"sum"``.

    Returns:
      A tree shaped like the task vectors (``None`` at non-float leaves).

    Raises:
      ValueError: empty input, mismatched trees (naming task and leaf path), complex
        leaves, a density outside ``(0, 1]``, an unknown scope or merge.
    """
    density = _common.check_density(density)
    scope = _check_scope(scope)
    if merge not in TIES_MERGES:
        raise ValueError(f"unknown merge {merge!r}; choose one of {TIES_MERGES}")
    _, task_leaves = _common.flatten_tasks(task_vectors)
    _check_real(task_leaves, _common.leaf_paths(task_vectors[0]), "TIES")
    if _common.is_traced(task_vectors):
        return _ties_merge_graph(tuple(task_vectors), density=density, scope=scope,
                                 merge=merge)
    # Called eagerly: one compiled step per task, its accumulators donated, so that only
    # one task's transient buffers ever exist. (One program with a Python loop over the
    # tasks let XLA overlap them: on CPU, 15 model-sized temporaries for 8 tasks.)
    state = _ties_init(task_vectors[0], len(task_vectors), merge)
    for tau in task_vectors:
        state = _ties_step_jit(state, tau, density=density, scope=scope, merge=merge)
    return _ties_finish_jit(state, task_vectors[0], merge=merge)


def _ties_init(like, num_tasks, merge):
    """Zero accumulators ``(P, N, #pos, #neg)`` (``None`` at non-parameters)."""
    leaves, _ = _common.flatten(like)
    cdtype = jnp.uint8 if num_tasks < 256 else jnp.int32
    zeros = lambda dtype: [jnp.zeros(jnp.shape(x), dtype(x)) if _common.is_param(x)
                           else None for x in leaves]
    sums = lambda x: _common.accumulation_dtype(jnp.result_type(x))
    counts = (zeros(lambda x: cdtype), zeros(lambda x: cdtype)) if merge == "mean" else (
        None, None)
    return (zeros(sums), zeros(sums)) + counts


def _ties_step(state, tau, *, density, scope, merge):
    """Adds one task's trimmed values to ``(P, N, #pos, #neg)``."""
    pos, neg, pos_n, neg_n = state
    leaves, _ = _common.flatten(tau)
    if density < 1.0:
        masks = _band_masks(leaves, density, 0.0, scope)
        leaves = [x if m is None else jnp.where(m, x, jnp.zeros((), x.dtype))
                  for x, m in zip(leaves, masks)]
    pos, neg = list(pos), list(neg)
    if merge == "mean":
        pos_n, neg_n = list(pos_n), list(neg_n)
    for i, x in enumerate(leaves):
        if pos[i] is None:
            continue
        pos[i] = pos[i] + jnp.maximum(x, 0).astype(pos[i].dtype)
        neg[i] = neg[i] + jnp.minimum(x, 0).astype(neg[i].dtype)
        if merge == "mean":
            pos_n[i] = pos_n[i] + (x > 0).astype(pos_n[i].dtype)
            neg_n[i] = neg_n[i] + (x < 0).astype(neg_n[i].dtype)
    return pos, neg, pos_n, neg_n


def _ties_finish(state, like, *, merge):
    """Elects ``s = sign(P + N)`` and returns the disjoint mean or sum."""
    pos, neg, pos_n, neg_n = state
    leaves, treedef = _common.flatten(like)
    out = []
    for i, x in enumerate(leaves):
        if pos[i] is None:
            out.append(None)
            continue
        p, q = pos[i], neg[i]
        if merge == "mean":
            p = p / jnp.maximum(pos_n[i], 1).astype(p.dtype)
            q = q / jnp.maximum(neg_n[i], 1).astype(q.dtype)
        elected = pos[i] + neg[i]
        merged = jnp.where(elected > 0, p, jnp.where(elected < 0, q, jnp.zeros((), p.dtype)))
        out.append(merged.astype(x.dtype))
    return jax.tree.unflatten(treedef, out)


_ties_step_jit = jax.jit(_ties_step, static_argnames=("density", "scope", "merge"),
                         donate_argnums=0)
_ties_finish_jit = jax.jit(_ties_finish, static_argnames=("merge",))


@functools.partial(jax.jit, static_argnames=("density", "scope", "merge"))
def _ties_merge_graph(task_vectors, *, density, scope, merge):
    """All tasks in one program (the path taken under an outer ``jax.jit``)."""
    state = _ties_init(task_vectors[0], len(task_vectors), merge)
    state = _common.fold_tasks(
        lambda state, tau: _ties_step(state, tau, density=density, scope=scope,
                                      merge=merge), state, task_vectors)
    return _ties_finish(state, task_vectors[0], merge=merge)


def ties(base: PyTree, task_vectors: Sequence[PyTree], *, density: float = 0.2,
         alpha: float | jax.Array = 1.0, scope: str = "global",
         merge: str = "mean") -> PyTree:
    """TIES-merging (Yadav et al., 2023): ``base + alpha * ties_merge(task_vectors)``.

    See :func:`ties_merge` for the trim / elect / disjoint-merge steps and their memory.
    DARE-TIES is ``ties(base, [dare(tau_t, ...) for t], density=1.0)`` (or any density to
    trim after dropping).

    Args:
      base: the pretrained model the task vectors start from.
      task_vectors: a non-empty sequence of task vectors shaped like ``base``.
      density: fraction kept by the trim, in ``(0, 1]``.
      alpha: scalar scaling of the merged task vector (may be traced).
      scope: the trim's scope, ``"global"``, ``"leaf"`` or ``"row"``.
      merge: ``"mean"`` or ``"sum"``.

    Returns:
      The merged model, shaped like ``base`` with its dtypes; non-float leaves of
      ``base`` are kept.

    Raises:
      ValueError: as :func:`ties_merge`, and for a task vector that does not match
        ``base`` (naming the task index and leaf path) or a non-scalar alpha.
    """
    _common.flatten_tasks(task_vectors, base)
    alpha = _common.scalar_alpha(alpha)
    return tv_lib.apply(base, ties_merge(task_vectors, density=density, scope=scope,
                                         merge=merge), alpha)


# --------------------------------------------------------------------------- DARE

def dare(task_vector: PyTree, *, drop_rate: float | jax.Array, key: jax.Array,
         rescale: bool = True) -> PyTree:
    """DARE, Drop And REscale (Yu et al., 2024).

    Each entry is dropped independently with probability ``p = drop_rate``; survivors
    are divided by ``1 - p`` (``rescale=True``), so ``E[dare(tau)] = tau``:
    ``out = where(keep, tau / (1 - p), 0)`` with ``keep ~ Bernoulli(1 - p)``. With
    ``p = 0`` every entry survives and ``out == tau`` exactly.

    Randomness: the leaf at flattening position ``i`` (``None`` leaves counted) draws
    from ``jax.random.fold_in(key, i)``, so a leaf's mask does not depend on the others.

    Memory: the output tree plus one leaf's transient random bits.

    Args:
      task_vector: a pytree of arrays; ``None`` and non-float leaves are returned as is.
      drop_rate: ``p`` in ``[0, 1)``; may be traced (then it is not range-checked).
      key: a PRNG key.
      rescale: divide survivors by ``1 - p``.

    Returns:
      A tree shaped like ``task_vector`` with the same dtypes.

    Raises:
      ValueError: for a concrete drop_rate outside ``[0, 1)`` or a non-scalar one.
    """
    if not isinstance(drop_rate, jax.core.Tracer):
        p = _common.static_number(drop_rate, "drop_rate")
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop_rate must lie in [0, 1), got {drop_rate!r}")
    elif jnp.ndim(drop_rate) != 0:
        raise ValueError(f"drop_rate must be a scalar, got shape {jnp.shape(drop_rate)}")
    return _dare_jit(task_vector, drop_rate, key, rescale=bool(rescale))


@functools.partial(jax.jit, static_argnames=("rescale",))
def _dare_jit(task_vector, drop_rate, key, *, rescale):
    leaves, treedef = _common.flatten(task_vector)
    out = []
    for i, x in enumerate(leaves):
        if not _common.is_param(x):
            out.append(x)
            continue
        keep = jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - drop_rate,
                                    jnp.shape(x))
        if rescale:
            # A per-entry divisor: XLA on CPU turns division by a broadcast scalar into
            # multiplication by its reciprocal, which is off by an ulp; this way every
            # survivor is the correctly rounded x / (1 - p).
            one = jnp.ones((), x.dtype)
            x = x / jnp.where(keep, (1 - drop_rate).astype(x.dtype), one)
        out.append(jnp.where(keep, x, jnp.zeros((), x.dtype)))
    return jax.tree.unflatten(treedef, out)


# --------------------------------------------------------------------------- Breadcrumbs

def breadcrumbs(base: PyTree, task_vectors: Sequence[PyTree], *, density: float = 0.15,
                outliers: float = 0.006, alpha: float | jax.Array = 1.0,
                scope: str = "row") -> PyTree:
    """Model Breadcrumbs (Davari & Belilovsky, 2024).

    ``out = base + sum_t alpha_t * where(band_t, tau_t, 0)`` where ``band_t`` masks, in
    each ``scope`` group of ``n`` entries of ``tau_t``, the magnitude ranks ``r`` with
    ``lo <= r < hi``, ``lo = ceil(outliers * n)`` and ``hi = min(n, lo + ceil(density * n))``:
    the largest ``lo`` entries (outliers) are dropped, the next ``ceil(density * n)`` kept,
    the small rest dropped (see :func:`magnitude_mask`).

    Memory: one model-sized accumulator (at least float32) plus the output; the ``T``
    sparsified task vectors are never held at once. Called eagerly, each task is one
    compiled step on the donated accumulator (on CPU its transients are about four
    model-sized 32-bit buffers: two selections); under an outer ``jax.jit`` the tasks
    run in a ``lax.fori_loop`` (see :func:`ties_merge`).

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
      ValueError: empty input, mismatched trees (naming task and leaf path), fractions
        out of range, an unknown scope, or alpha of the wrong shape.
    """
    density = _common.check_density(density)
    outliers = _common.check_outliers(outliers, density)
    scope = _check_scope(scope)
    _common.flatten_tasks(task_vectors, base)
    alphas = _common.per_task_alpha(alpha, len(task_vectors))
    if _common.is_traced((base, task_vectors, alphas)):
        return _breadcrumbs_graph(base, tuple(task_vectors), alphas, density=density,
                                  outliers=outliers, scope=scope)
    # Eagerly: one compiled step per task with the accumulator donated (see ties_merge).
    acc = _breadcrumbs_init(base)
    for t, tau in enumerate(task_vectors):
        acc = _breadcrumbs_step_jit(acc, tau, alphas[t], density=density,
                                    outliers=outliers, scope=scope)
    return _add_to_base_jit(base, acc)


def _breadcrumbs_init(base):
    leaves, _ = _common.flatten(base)
    return [jnp.zeros(jnp.shape(b), _common.accumulation_dtype(jnp.result_type(b)))
            if _common.is_param(b) else None for b in leaves]


def _breadcrumbs_step(acc, tau, alpha, *, density, outliers, scope):
    """``acc + alpha * where(band(tau), tau, 0)``."""
    leaves, _ = _common.flatten(tau)
    masks = _band_masks(leaves, density, outliers, scope)
    out = list(acc)
    for i, (x, m) in enumerate(zip(leaves, masks)):
        if m is None or acc[i] is None:
            continue
        kept = jnp.where(m, x, jnp.zeros((), x.dtype)).astype(acc[i].dtype)
        out[i] = acc[i] + alpha.astype(acc[i].dtype) * kept
    return out


def _add_to_base(base, acc):
    leaves, treedef = _common.flatten(base)
    return jax.tree.unflatten(treedef, [b if a is None else (b + a).astype(b.dtype)
                                        for b, a in zip(leaves, acc)])


_breadcrumbs_step_jit = jax.jit(_breadcrumbs_step,
                                static_argnames=("density", "outliers", "scope"),
                                donate_argnums=0)
_add_to_base_jit = jax.jit(_add_to_base)


@functools.partial(jax.jit, static_argnames=("density", "outliers", "scope"))
def _breadcrumbs_graph(base, task_vectors, alphas, *, density, outliers, scope):
    """All tasks in one program (the path taken under an outer ``jax.jit``)."""
    acc = _common.fold_tasks(
        lambda acc, tau_alpha: _breadcrumbs_step(acc, *tau_alpha, density=density,
                                                 outliers=outliers, scope=scope),
        _breadcrumbs_init(base), [(tau, alphas[t]) for t, tau in enumerate(task_vectors)])
    return _add_to_base(base, acc)
