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


# The one structure/shape/dtype comparison lives in the lowest layer (``tree``), so that
# ``tree.cosine`` can name a mismatching leaf too; it is this module's public name.
check_compatible = tree_lib.check_compatible


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

    Args:
      base: the model.
      task_vector: a tree shaped like ``base`` (``None`` at non-float leaves).
      alpha: a real scalar (may be traced). One coefficient per task is a merge:
        :func:`taskvec_jax.merging.task_arithmetic` with ``alpha=[...]``.

    Raises:
      ValueError: on a structure, shape or dtype mismatch, naming the leaf path, or for
        an ``alpha`` that is not a scalar (naming its shape).
    """
    if jnp.ndim(alpha) != 0:
        raise ValueError(
            f"alpha must be a scalar, got shape {tuple(jnp.shape(alpha))}: apply adds one "
            "scaled task vector; for one coefficient per task use "
            "tvj.merging.task_arithmetic(base, task_vectors, alpha=[...])")
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
