"""Task vectors: ``tau = theta_finetuned - theta_base`` and ``theta = theta_base + alpha * tau``.

Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023) define a task vector as
the parameter difference between a finetuned model and the pretrained model it started
from. Every routine that combines trees calls :func:`check_compatible` first, so that a
mismatch is reported by leaf path, shape and dtype instead of surfacing as an opaque error
from inside ``jax.tree.map``.

Non-float leaves. A model tree may hold integer or boolean leaves (step counters, integer
buffers, masks). They are not parameters and are never differenced: the task vector holds
``None`` at those positions, and :func:`apply` keeps the base model's value there. ``None``
is an empty subtree in JAX, so task vectors add, scale and ravel without special cases.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from taskvec_jax import _checks
from taskvec_jax import tree as tree_lib

PyTree = Any

__all__ = ["apply", "check_compatible", "check_task_vectors", "task_vector"]


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
    return {tree_lib.path_str(p): leaf for p, leaf in flat}


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
            if leaf is None and allow_none and not tree_lib.is_float(ref):
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


def task_vector(finetuned: PyTree, base: PyTree) -> PyTree:
    """Returns the task vector ``tau = finetuned - base``.

    Float leaves are differenced; non-float leaves become ``None`` (never differenced).

    Args:
      finetuned: parameters after finetuning.
      base: the parameters finetuning started from; same structure, shapes and dtypes.

    Returns:
      A tree shaped like ``base``.

    Raises:
      ValueError: on a structure, shape or dtype mismatch, naming the leaf path.
    """
    check_compatible(finetuned, base, name="finetuned", reference_name="base",
                     allow_none=False)
    return jax.tree.map(lambda f, b: f - b if tree_lib.is_float(b) else None,
                        finetuned, base)


def apply(base: PyTree, task_vector: PyTree, alpha: float | jax.Array = 1.0) -> PyTree:
    """Returns ``base + alpha * task_vector``.

    ``task_vector`` may be a single task vector or any combination of them (a sum, a
    merge). Where it holds ``None`` (a non-float leaf of the model), the base value is
    kept.
    The result has the dtypes of ``base``.

    Raises:
      ValueError: on a structure, shape or dtype mismatch, naming the leaf path.
    """
    check_compatible(task_vector, base, name="task vector", reference_name="base")

    def add_leaf(t, b):
        if t is None:
            return b
        return (b + alpha * t).astype(jnp.result_type(b))

    return jax.tree.map(add_leaf, task_vector, base, is_leaf=lambda x: x is None)


def check_task_vectors(task_vectors: Sequence[PyTree], base: PyTree | None = None,
                       *, name: str = "task vector") -> None:
    """Checks a non-empty sequence of task vectors against ``base`` (or the first one).

    Raises:
      ValueError: on an empty sequence, or naming the task index and leaf path.
    """
    task_vectors = _checks.non_empty_sequence(task_vectors, "task_vectors", item=name)
    reference = base if base is not None else task_vectors[0]
    ref_name = "base" if base is not None else f"{name} 0"
    for i, tv in enumerate(task_vectors):
        check_compatible(tv, reference, name=f"{name} {i}", reference_name=ref_name)
