"""Task arithmetic: THE one ``base + sum_t alpha_t * tau_t`` of the merging package.

Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023. :func:`add_weighted` is
the unchecked, jittable sum (over :func:`taskvec_jax.tree.weighted_sum`, float32+
accumulation) that every merge adding task vectors to a base calls: task arithmetic,
DARE + task arithmetic, Breadcrumbs, the rounds of ATM.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import jax

from taskvec_jax import tree as tree_lib
from taskvec_jax.merging import _common

PyTree = Any

__all__ = ["add_weighted", "task_arithmetic"]


def add_weighted(base: PyTree, task_vectors: Sequence[PyTree],
                 alphas: jax.Array | Sequence[Any] | None = None) -> PyTree:
    """``base + sum_t alphas[t] * task_vectors[t]``, unchecked (the kernel of every merge).

    Sums run in at least float32 (:func:`taskvec_jax.tree.accumulation_dtype`) and are
    cast back to the base's dtypes; where a task vector holds ``None`` or a non-float leaf
    the base value is kept. The task vectors are read one at a time, never stacked.

    Args:
      base: the model the task vectors are added to.
      task_vectors: a non-empty sequence of trees shaped like ``base`` (not checked).
      alphas: ``None`` (all ones) or ``T`` coefficients (may be traced).

    Returns:
      A tree shaped like ``base``, in its dtypes.
    """
    return tree_lib.weighted_sum(task_vectors, alphas, start=base)


def task_arithmetic(base: PyTree, task_vectors: Sequence[PyTree], *args,
                    alpha: float | Sequence[float] | jax.Array = 1.0) -> PyTree:
    """Task arithmetic: ``theta = base + sum_t alpha_t * tau_t``.

    ``alpha`` is one coefficient for every task (``base + alpha * sum_t tau_t``, the
    paper's ``theta_TA``) or one per task. A negative coefficient subtracts a task
    vector ("forgetting" in Ilharco et al.). The map is linear in ``(tau_1, ..., tau_T)``
    for fixed ``alpha`` and linear in ``alpha`` for fixed task vectors.

    Memory: one model-sized accumulator (in at least float32) and the output; the task
    vectors are read one at a time, never stacked.

    Args:
      base: the pretrained model.
      task_vectors: a non-empty sequence of task vectors shaped like ``base``
        (``None`` at non-float leaves, where the base value is kept).
      alpha: a scalar or a ``[T]`` sequence/array of coefficients; may be traced.
        Keyword-only; passing it positionally is deprecated (one release).

    Returns:
      The merged model, shaped like ``base`` with its dtypes.

    Raises:
      ValueError: for an empty sequence, a task vector that does not match ``base``
        (naming the task index and leaf path), a NaN/Inf entry (naming task and leaf;
        under ``jit`` it propagates), or ``alpha`` of the wrong shape.
    """
    if args:
        if len(args) > 1:
            raise TypeError("task_arithmetic takes base, task_vectors and the keyword "
                            f"alpha; got {len(args)} more positional arguments")
        warnings.warn("task_arithmetic(base, task_vectors, alpha) is deprecated: pass "
                      "alpha by keyword, task_arithmetic(base, task_vectors, alpha=...)",
                      DeprecationWarning, stacklevel=2)
        (alpha,) = args
    _common.flatten_tasks(task_vectors, base)
    _common.check_finite(task_vectors)
    alphas = _common.per_task_alpha(alpha, len(task_vectors))
    return _add_weighted_jit(base, tuple(task_vectors), alphas)


_add_weighted_jit = jax.jit(add_weighted)
