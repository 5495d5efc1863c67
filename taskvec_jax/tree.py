"""Pytree algebra for parameters and task vectors.

The arithmetic comes from :mod:`optax.tree` (``add``, ``sub``, ``scale``, ``add_scale``,
``vdot``, ``norm``, ...), re-exported here unchanged so that one namespace holds
everything a merging or theory routine needs. This module adds only what optax lacks:

* :func:`cosine` -- ``<x, y> / (||x|| ||y||)`` over whole trees;
* :func:`ravel` -- flatten a tree into one vector and get the inverse map back;
* :func:`path_str` / :func:`leaves_with_paths` -- human-readable leaf names
  (``'params/Dense_0/kernel'``) for error messages and per-layer reports;
* :func:`is_float` -- which leaves are differentiable parameters;
* :func:`check_compatible` -- two trees leaf by leaf, the mismatch named by path (also
  :func:`taskvec_jax.check_compatible`).

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
    "add", "add_scale", "cast", "check_compatible", "cosine", "div", "full_like", "is_float",
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

    Raises:
      ValueError: if the trees differ in structure or shapes (e.g. two architectures),
        naming the first mismatching leaf path (:func:`check_compatible`; dtypes may
        differ).
    """
    check_compatible(tree_y, tree_x, name="tree_y", reference_name="tree_x",
                     check_dtype=False)
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


def _describe(x: Any) -> str:
    if x is None:
        return "None"
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None:
        return f"{type(x).__name__}"
    return f"shape {tuple(shape)} dtype {dtype}"


def _leaf_map(tree: PyTree) -> dict[str, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
    return {path_str(p): leaf for p, leaf in flat}


def check_compatible(
    tree: PyTree,
    reference: PyTree,
    *,
    name: str = "tree",
    reference_name: str = "base",
    check_dtype: bool = True,
    allow_none: bool = True,
) -> None:
    """Raises ``ValueError`` unless ``tree`` matches ``reference`` leaf by leaf.

    Checks, in order: the same leaf paths, then equal shapes, then (optionally) equal
    dtypes. A ``None`` leaf in ``tree`` (a task vector's non-float position) matches a
    non-float leaf of ``reference`` when ``allow_none`` is true.

    Args:
      tree: the tree to check (a finetuned model or a task vector).
      reference: the tree it must match (usually the base model).
      name: how ``tree`` is named in the message, e.g. ``"task vector 3"``.
      reference_name: how ``reference`` is named in the message.
      check_dtype: also require equal dtypes.
      allow_none: accept ``None`` in ``tree`` where ``reference`` has a non-float leaf.

    Raises:
      ValueError: naming the first offending leaf path and both shapes/dtypes.
    """
    leaves = _leaf_map(tree)
    ref_leaves = _leaf_map(reference)
    if list(leaves) != list(ref_leaves):
        missing = [p for p in ref_leaves if p not in leaves]
        extra = [p for p in leaves if p not in ref_leaves]
        parts = []
        if missing:
            parts.append(f"missing leaf '{missing[0]}' (present in {reference_name})"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        if extra:
            parts.append(f"unexpected leaf '{extra[0]}' (absent from {reference_name})"
                         + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
        if not parts:
            parts.append("leaves are in a different order or container type")
        raise ValueError(f"{name}: tree structure differs from {reference_name}: "
                         + "; ".join(parts))
    for path, leaf in leaves.items():
        ref = ref_leaves[path]
        if leaf is None or ref is None:
            if leaf is None and ref is None:
                continue
            if leaf is None and allow_none and not is_float(ref):
                continue
            raise ValueError(f"{name}: leaf '{path}' is {_describe(leaf)}, "
                             f"{reference_name} has {_describe(ref)}")
        shape, ref_shape = jnp.shape(leaf), jnp.shape(ref)
        if shape != ref_shape:
            raise ValueError(f"{name}: leaf '{path}' has shape {shape}, "
                             f"{reference_name} has {ref_shape}")
        if check_dtype:
            dtype, ref_dtype = jnp.result_type(leaf), jnp.result_type(ref)
            if dtype != ref_dtype:
                raise ValueError(f"{name}: leaf '{path}' has dtype {dtype}, "
                                 f"{reference_name} has {ref_dtype}")
