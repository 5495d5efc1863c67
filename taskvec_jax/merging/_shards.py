"""Merges of sharded trees, computed where the blocks live (private).

A task vector whose leaves are split over a mesh (``jax.sharding.NamedSharding``, e.g. a
model sharded over a TPU slice) is merged without gathering any leaf onto one device:
the ranking and merge programs of :mod:`taskvec_jax.merging` run inside
``jax.shard_map`` on each device's blocks. Elementwise steps need nothing more; the
selection kernel (:mod:`taskvec_jax.merging._select`) sums its histograms and counts over
the devices holding a leaf's other blocks (``lax.psum``, a few thousand integers per
pass) and ranks ties by the entries' positions in the whole leaf; DARE draws each entry
from the counter of its position in the whole leaf. Results therefore equal the
unsharded merge's exactly, and each device holds only its blocks of the ``T`` task
vectors, the base and the output, plus one leaf block's transients at a time.

Traced inputs (under an outer ``jax.jit``) take these programs too when their types
carry their sharding (mesh axes of type Explicit); the programs then run inside the
caller's. Left to the merges' ordinary programs (GSPMD partitions them; their selection
may gather leaves): trees with no leaf split over more than one device, traced inputs
under Auto mesh axes (the caller's program decides their layout later), and DARE with a
non-threefry key or a leaf of ``2**32`` entries or more.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from taskvec_jax.merging import _common, _select

__all__ = ["Layout", "Shards", "band", "group_ranks", "layout", "run", "threshold_specs",
           "thresholds", "tree_specs"]

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Shards:
    """How one leaf is split: its whole shape and, per dimension, the mesh axes that
    split it (major first), with the mesh's axis sizes. Hashable (a static argument)."""

    shape: tuple[int, ...]
    axes: tuple[tuple[str, ...], ...]
    axis_sizes: tuple[tuple[str, int], ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def _splits(self, d: int) -> int:
        sizes = dict(self.axis_sizes)
        return math.prod(sizes[a] for a in self.axes[d])

    @property
    def local_shape(self) -> tuple[int, ...]:
        return tuple(n // self._splits(d) for d, n in enumerate(self.shape))

    def _offset(self, d: int, dtype):
        """The first index along dimension ``d`` of this device's block (traced)."""
        if not self.axes[d]:
            return jnp.zeros((), dtype)
        sizes = dict(self.axis_sizes)
        index = jnp.zeros((), dtype)
        for a in self.axes[d]:
            index = index * sizes[a] + lax.axis_index(a).astype(dtype)
        return index * self.local_shape[d]

    def column_offset(self, dtype):
        """The block's first column in the whole leaf (its last dimension)."""
        return self._offset(len(self.shape) - 1, dtype) if self.shape else jnp.zeros((), dtype)

    def flat_position(self, a: jax.Array) -> jax.Array:
        """The row-major positions in the whole leaf of the block's entries whose
        row-major positions in the block are ``a``."""
        local, dims = self.local_shape, len(self.shape)
        strides = [math.prod(self.shape[d + 1:]) for d in range(dims)]
        split = [d for d in range(dims) if self.axes[d]]
        if not split:
            return a
        first = split[0]
        if split == [first] and math.prod(self.shape[:first]) == 1:
            # one contiguous block: shifted, no index arithmetic
            return a + self._offset(first, a.dtype) * strides[first]
        pos, rest = jnp.zeros_like(a), a
        for d in reversed(range(dims)):
            coord = rest % local[d] if d else rest
            rest = rest // local[d]
            pos = pos + (coord + self._offset(d, a.dtype)) * strides[d]
        return pos

    def reduce_axes(self, *, last_only: bool = False) -> tuple[str, ...]:
        """The mesh axes over which the leaf's other blocks lie (only those along its
        last dimension with ``last_only``: a row's other blocks), in mesh order."""
        dims = [len(self.shape) - 1] if last_only and self.shape else range(len(self.shape))
        names = {a for d in dims for a in self.axes[d]}
        return tuple(a for a, _ in self.axis_sizes if a in names)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The mesh of a tree's sharded leaves and, per flattened leaf (``None`` leaves
    included), its ``PartitionSpec`` and :class:`Shards` (``None`` at non-parameters)."""

    mesh: jax.sharding.Mesh
    specs: tuple[P, ...]
    shards: tuple[Shards | None, ...]


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


_UNKNOWN = object()


def _sharding(x: Any) -> Any:
    """A concrete array's sharding; a traced value's when its type carries one (mesh axes
    of type Explicit), else ``_UNKNOWN`` (under Auto axes the caller's program lays it out
    later)."""
    if not isinstance(x, jax.core.Tracer):
        return getattr(x, "sharding", None)
    sharding = jax.typeof(x).sharding
    if (isinstance(sharding, NamedSharding) and not sharding.mesh.empty
            and all(t == jax.sharding.AxisType.Explicit for t in sharding.mesh.axis_types)):
        return sharding
    return _UNKNOWN


def layout(tree: PyTree) -> Layout | None:
    """The :class:`Layout` of ``tree``, or ``None`` when it should be merged by the
    ordinary programs (see the module docstring).

    Raises:
      ValueError: leaves sharded over two different meshes (naming both leaves).
    """
    leaves, _ = _common.flatten(tree)
    paths = _common.leaf_paths(tree)
    mesh = mesh_path = None
    for path, x in zip(paths, leaves):
        if not _common.is_param(x):
            continue
        sharding = _sharding(x)
        if sharding is _UNKNOWN:
            return None
        if (isinstance(sharding, NamedSharding) and sharding.mesh.size > 1
                and not sharding.is_fully_replicated):
            if mesh is None:
                mesh, mesh_path = sharding.mesh, path
            elif sharding.mesh != mesh:
                raise ValueError(f"leaf '{path}' is sharded over a different mesh than leaf "
                                 f"'{mesh_path}' ({sharding.mesh} vs {mesh}); a merge needs "
                                 "every sharded leaf on one mesh")
    if mesh is None:
        return None
    sizes = tuple(mesh.shape.items())
    specs, shards = [], []
    for x in leaves:
        if not _common.is_param(x):
            specs.append(P())
            shards.append(None)
            continue
        sharding = _sharding(x)
        spec = (sharding.spec if isinstance(sharding, NamedSharding)
                and sharding.mesh == mesh else P())
        axes = tuple(_axes(e) for e in tuple(spec) + (None,) * (jnp.ndim(x) - len(spec)))
        s = Shards(tuple(jnp.shape(x)), axes, sizes)   # equal blocks: JAX requires them
        specs.append(P(*(None if not a else a[0] if len(a) == 1 else a for a in axes)))
        shards.append(s)
    return Layout(mesh, tuple(specs), tuple(shards))


class _Frozen:
    """A pytree of ``PartitionSpec``s, hashable (a static argument of :func:`_run`)."""

    def __init__(self, tree):
        self.leaves, self.treedef = jax.tree.flatten(
            tree, is_leaf=lambda x: isinstance(x, P) or x is None)
        self.leaves = tuple(self.leaves)

    def tree(self):
        return jax.tree.unflatten(self.treedef, self.leaves)

    def __hash__(self):
        return hash((self.leaves, self.treedef))

    def __eq__(self, other):
        return (isinstance(other, _Frozen) and self.leaves == other.leaves
                and self.treedef == other.treedef)


@functools.partial(jax.jit, static_argnames=("fn", "mesh", "in_specs", "out_specs", "static"))
def _run(args, *, fn, mesh, in_specs, out_specs, static):
    body = functools.partial(fn, **dict(static))
    # check_vma=False: the kernel's optimization barriers and loop carries hide from
    # shard_map's type check that every threshold is a function of psum-med integer
    # histograms and counts, hence equal on every device (replicated, as out_specs say).
    return jax.shard_map(lambda a: body(*a), mesh=mesh, in_specs=(in_specs.tree(),),
                         out_specs=out_specs.tree(), check_vma=False)(args)


def run(fn: Callable, lay: Layout, args: Sequence[Any], in_specs: Sequence[Any],
        out_specs: Any, **static) -> Any:
    """``fn(*args, **static)`` on every device's blocks (one compiled program per
    ``fn``, specs and static options); ``static`` values must be hashable."""
    return _run(tuple(args), fn=fn, mesh=lay.mesh, in_specs=_Frozen(tuple(in_specs)),
                out_specs=_Frozen(out_specs), static=tuple(sorted(static.items())))


def tree_specs(tree: PyTree, lay: Layout) -> PyTree:
    """``tree``'s structure with each leaf's spec (a tree shaped like the reference)."""
    _, treedef = _common.flatten(tree)
    return jax.tree.unflatten(treedef, list(lay.specs))


def _row_spec(spec: P, ndim: int) -> P:
    entries = tuple(spec) + (None,) * (ndim - len(spec))
    return P(*entries[:-1], None) if ndim else P()


def threshold_specs(leaves: list[Any], lay: Layout, outliers: float,
                    scope: str) -> list[tuple]:
    """The specs of :func:`thresholds`' output: replicated for the global and leaf
    scopes, split like the leaf's rows for the row scope."""
    out = []
    for indices, _, _ in _select.groups(leaves, scope):
        spec = P() if scope != "row" else _row_spec(lay.specs[indices[0]],
                                                    jnp.ndim(leaves[indices[0]]))
        out.append((spec, spec) + ((spec, spec) if outliers else (None, None)))
    return out


def _local_thresholds(*params, indices, density, outliers, scope, shards,
                      num_leaves):
    leaves = [None] * num_leaves
    for i, x in zip(indices, params):
        leaves[i] = x
    out = _select.band_thresholds(leaves, density, outliers, scope, shards=shards)
    if scope == "row":
        # each row threshold shaped like its leaf's rows, so that its blocks are the rows'
        out = [tuple(None if a is None else a.reshape(shards[g[0]].local_shape[:-1] + (1,))
                     for a in thr)
               for (g, _, _), thr in zip(_select.groups(leaves, scope), out)]
    return out


def thresholds(task_leaves: list[list[Any]], lay: Layout, density: float, outliers: float,
               scope: str) -> list[list[tuple]]:
    """:func:`taskvec_jax.merging._select.band_thresholds_eager` of each task's sharded
    leaves: one program per task for the global scope, one per task and leaf otherwise
    (only one leaf's transients at a time, as there).

    Each program is waited for before the next is dispatched. With several programs
    with collectives in flight, XLA:CPU's devices deadlocked (8 fake CPU devices, ViT
    shapes: 7 devices waiting in a program's all-reduce, the launch of the 8th blocked
    on its queue of later programs), even when each program took the previous one's
    output as an input; one wait per program costs microseconds against each ranking's
    milliseconds.
    """
    out = []
    for leaves in task_leaves:
        live = [i for i, x in enumerate(leaves) if _common.is_param(x)]
        batches = [live] if scope == "global" else [[i] for i in live if jnp.size(leaves[i])]
        task = []
        for indices in batches:
            sub = [leaves[i] if i in indices else None for i in range(len(leaves))]
            thr = run(_local_thresholds, lay, [leaves[i] for i in indices],
                      [lay.specs[i] for i in indices],
                      threshold_specs(sub, lay, outliers, scope),
                      indices=tuple(indices), density=density, outliers=outliers,
                      scope=scope, shards=lay.shards, num_leaves=len(leaves))
            task.extend(jax.block_until_ready(thr))
        out.append(task)
    return out


def _band(task_vector, thr, *, scope, shards, masks_only):
    leaves, treedef = _common.flatten(task_vector)
    masks = _select.band_masks_at(leaves, thr, scope, shards)
    return jax.tree.unflatten(treedef, masks if masks_only
                              else _select.keep_masked(leaves, masks))


def band(task_vector: PyTree, lay: Layout, density: float, outliers: float, scope: str, *,
         masks_only: bool) -> PyTree:
    """:func:`~taskvec_jax.merging.magnitude_mask` (``masks_only``) or
    :func:`~taskvec_jax.merging.trim` of a sharded tree, blocks kept where they are."""
    leaves = _common.flatten(task_vector)[0]
    thr, = thresholds([leaves], lay, density, outliers, scope)
    specs = tree_specs(task_vector, lay)
    return run(_band, lay, (task_vector, thr),
               (specs, threshold_specs(leaves, lay, outliers, scope)), specs,
               scope=scope, shards=lay.shards, masks_only=masks_only)


# --------------------------------------------------------------------------- ranks

def _count_below(smag, spos, qmag, qpos):
    """Per row, how many of the sorted pairs ``(smag, spos)`` (``[c, m]``, ascending in
    the lexicographic order) lie below each query pair (``[c, q]``): a binary search,
    vectorized over the queries (``m.bit_length()`` halvings, one loop body)."""
    m = smag.shape[1]

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) // 2
        at = jnp.minimum(mid, m - 1)
        am = jnp.take_along_axis(smag, at, axis=1)
        ap = jnp.take_along_axis(spos, at, axis=1)
        below = (am < qmag) | ((am == qmag) & (ap < qpos))
        open_ = mid < hi
        return (jnp.where(open_ & below, mid + 1, lo), jnp.where(open_ & ~below, mid, hi))

    bounds = (jnp.zeros(qmag.shape, jnp.int32), jnp.full(qmag.shape, m, jnp.int32))
    return lax.fori_loop(0, m.bit_length(), halve, bounds)[0]


def _group_ranks_block(xb, *, shards, split):
    """The body of :func:`group_ranks` on one device's block."""
    dims = len(shards.shape)
    rdims = list(range(dims if split is None else split))
    local = shards.local_shape
    rows = math.prod(local[d] for d in rdims)
    v = xb.reshape(rows, -1)
    # the position of each local row in its group: its row-major index over the leaf's
    # row dimensions (all of them for a whole-leaf group)
    row_shards = Shards(shards.shape[:len(rdims)], shards.axes[:len(rdims)],
                        shards.axis_sizes)
    pos = row_shards.flat_position(jnp.arange(rows, dtype=jnp.int32))
    vt = v.T                                 # groups as rows: sorts run along the last axis
    bits = jnp.dtype(f"int{8 * vt.dtype.itemsize}")
    mag = lax.bitcast_convert_type(jnp.abs(vt), bits)
    pos = jnp.broadcast_to(pos[None, :], vt.shape)
    smag, spos = lax.sort((mag, pos), dimension=1, num_keys=2, is_stable=False)
    rank = _count_below(smag, spos, mag, pos)
    axes = row_shards.reduce_axes()          # the devices holding the group's other blocks
    ring = math.prod(dict(shards.axis_sizes)[a] for a in axes)
    perm = [(i, (i + 1) % ring) for i in range(ring)]

    def visit(_, carry):                     # the group's other blocks visit in turn
        smag, spos, rank = carry
        smag, spos = lax.ppermute((smag, spos), axes, perm)
        return smag, spos, rank + _count_below(smag, spos, mag, pos)

    if ring > 1:
        rank = lax.fori_loop(0, ring - 1, visit, (smag, spos, rank))[2]
    return rank.T.reshape(local)


def group_ranks(x: jax.Array, split: int | None) -> jax.Array | None:
    """Inside a traced program: each entry's rank (int32, 0 = the smallest) in its group,
    ordered by ``(|x|, position)`` as a stable argsort of the magnitudes, laid out like
    ``x`` and computed on its blocks; ``None`` when ``x``'s type carries no split over an
    Explicit mesh axis (the caller then ranks the whole leaf).

    Groups: the columns of ``as_matrix(x, split)`` (positions = rows), or the whole leaf
    for ``split=None`` (positions = row-major). Each device sorts its block's pairs of
    magnitude bits and positions, then the blocks of a group's other devices pass by in
    a ring (``lax.ppermute`` of those integer pairs, one block at a time) and each device
    counts by binary search the pairs below each of its entries: the ranks are exact,
    and a device holds its block and one visiting block, never the whole leaf.
    """
    sharding = _sharding(x)
    if (sharding is _UNKNOWN or not isinstance(sharding, NamedSharding)
            or all(e is None for e in sharding.spec)
            or jnp.size(x) >= 2 ** 31):
        return None
    spec = tuple(sharding.spec) + (None,) * (jnp.ndim(x) - len(sharding.spec))
    shards = Shards(tuple(jnp.shape(x)), tuple(_axes(e) for e in spec),
                    tuple(sharding.mesh.shape.items()))
    pspec = P(*spec)
    body = functools.partial(_group_ranks_block, shards=shards, split=split)
    return jax.shard_map(body, mesh=sharding.mesh, in_specs=pspec, out_specs=pspec,
                         check_vma=False)(x)
