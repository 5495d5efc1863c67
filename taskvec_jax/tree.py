"""Pytree algebra for parameters and task vectors.

The arithmetic comes from :mod:`optax.tree` (``add``, ``sub``, ``scale``, ``add_scale``,
``vdot``, ``norm``, ...), re-exported here unchanged so that one namespace holds
everything a merging or theory routine needs. This module adds only what optax lacks:

* :func:`cosine` -- ``<x, y> / (||x|| ||y||)`` over whole trees;
* :func:`ravel` -- flatten a tree into one vector and get the inverse map back;
* :func:`path_str` / :func:`leaves_with_paths` -- human-readable leaf names
  (``'params/Dense_0/kernel'``) for error messages and per-layer reports;
* :func:`is_float` -- which leaves are differentiable parameters.

Task vectors may hold ``None`` where the model holds a non-float leaf (a step counter,
an integer buffer; see :func:`taskvec_jax.task_vector`). ``None`` is an empty subtree in
JAX, so every function here skips it naturally.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from optax.tree import (  # noqa: F401  (re-exported public surface)
    add,
    add_scale,
    cast,
    div,
    full_like,
    max,
    min,
    mul,
    norm,
    ones_like,
    scale,
    size,
    sub,
    sum,
    vdot,
    where,
    zeros_like,
)

PyTree = Any

__all__ = [
    "add", "add_scale", "cast", "cosine", "div", "full_like", "is_float",
    "leaves_with_paths", "max", "min", "mul", "norm", "ones_like", "path_str",
    "ravel", "scale", "size", "stack", "sub", "sum", "unstack", "vdot", "weighted_sum",
    "where", "zeros_like",
]


def cosine(tree_x: PyTree, tree_y: PyTree, eps: float = 0.0) -> jax.Array:
    """Cosine similarity of two trees seen as flat vectors.

    Computes ``<x, y> / max(||x|| * ||y||, eps)``. With ``eps=0`` a zero tree gives NaN,
    which is the honest answer (the angle is undefined).

    Args:
      tree_x: a pytree of arrays.
      tree_y: a pytree with the same structure and shapes.
      eps: lower bound on the denominator.

    Returns:
      A scalar array.
    """
    denom = norm(tree_x) * norm(tree_y)
    return vdot(tree_x, tree_y) / jnp.maximum(denom, eps)


def ravel(tree: PyTree) -> tuple[jax.Array, Callable[[jax.Array], PyTree]]:
    """Flattens a tree into one 1-D vector; returns it and the inverse map.

    ``vec, unravel = ravel(tree)``; ``unravel(vec)`` rebuilds ``tree``. Leaves of
    different float dtypes are promoted to a common dtype in ``vec`` and cast back by
    ``unravel`` (this is :func:`jax.flatten_util.ravel_pytree`).
    """
    return ravel_pytree(tree)


def stack(trees: list[PyTree] | tuple[PyTree, ...]) -> PyTree:
    """Stacks same-shaped trees along a new leading axis: ``out[i] = trees[i]``."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: PyTree) -> list[PyTree]:
    """Inverse of :func:`stack`: splits every leaf along its leading axis."""
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return []
    n = leaves[0].shape[0]
    return [jax.tree.unflatten(treedef, [leaf[i] for leaf in leaves]) for i in range(n)]


def path_str(path: tuple) -> str:
    """Renders a JAX key path as ``'params/Dense_0/kernel'`` (``'<root>'`` if empty)."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    return "/".join(parts) if parts else "<root>"


def leaves_with_paths(tree: PyTree, is_leaf=None) -> list[tuple[str, Any]]:
    """Returns ``[(path_str, leaf), ...]`` in flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(p), leaf) for p, leaf in flat]


def is_float(x: Any) -> bool:
    """True for leaves that are real or complex floating point arrays (or Python floats)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return isinstance(x, (float, complex))
    return bool(jnp.issubdtype(dtype, jnp.inexact))


def accumulation_dtype(dtype: Any) -> Any:
    """The dtype sums over tasks or models run in: at least float32 (bfloat16 sums lose
    too much), the input's own dtype when it is wider."""
    return jnp.promote_types(dtype, jnp.float32)


def weighted_sum(trees, weights=None, *, start: PyTree | None = None) -> PyTree:
    """Computes ``start + sum_t weights[t] * trees[t]`` leaf by leaf, accumulating in float32+.

    This is THE weighted tree sum of the library (task arithmetic, multitask gradients,
    ATM rounds, Theorem 1's ``theta_TA``). ``weights=None`` means all ones; ``weights`` may
    be a traced ``[T]`` array. Leaves that are ``None`` or not floating point in
    ``trees[0]`` are skipped: the output keeps ``start``'s value there (or ``None``
    without ``start``). Each sum is accumulated in :func:`accumulation_dtype` and cast
    back to ``start``'s dtype (or the trees' dtype), and the trees are read one at a time,
    never stacked: memory is one accumulator per leaf.

    Args:
      trees: a non-empty sequence of trees with one structure (``None`` leaves allowed).
      weights: ``None`` or ``T`` scalars (a sequence or a ``[T]`` array).
      start: an optional tree of the same structure added to the sum (e.g. the base model).

    Returns:
      A tree shaped like ``start`` (or ``trees[0]``), in its dtypes.
    """
    is_none = lambda x: x is None  # noqa: E731
    ref = trees[0] if start is None else start
    ref_leaves, treedef = jax.tree.flatten(ref, is_leaf=is_none)
    acc: list[Any] = [None] * len(ref_leaves)
    for t, tree in enumerate(trees):
        leaves = jax.tree.flatten(tree, is_leaf=is_none)[0]
        for i, x in enumerate(leaves):
            if x is None or not is_float(x):
                continue
            adt = accumulation_dtype(jnp.result_type(x))
            term = jnp.asarray(x).astype(adt)
            if weights is not None:
                term = jnp.asarray(weights[t]).astype(adt) * term
            acc[i] = term if acc[i] is None else acc[i] + term
    out = []
    for r, a in zip(ref_leaves, acc):
        if a is None:
            out.append(r if start is not None else None)
        elif start is None:
            out.append(a.astype(jnp.result_type(r)))
        else:
            out.append((r + a).astype(jnp.result_type(r)))
    return jax.tree.unflatten(treedef, out)
