"""Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023)."""

from __future__ import annotations

from typing import Any, Sequence

import jax

from taskvec_jax.merging import _common

PyTree = Any


def task_arithmetic(base: PyTree, task_vectors: Sequence[PyTree],
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

    Returns:
      The merged model, shaped like ``base`` with its dtypes.

    Raises:
      ValueError: for an empty sequence, a task vector that does not match ``base``
        (naming the task index and leaf path), or ``alpha`` of the wrong shape.
    """
    _common.flatten_tasks(task_vectors, base)
    alphas = _common.per_task_alpha(alpha, len(task_vectors))
    return _task_arithmetic_jit(base, tuple(task_vectors), alphas)


@jax.jit
def _task_arithmetic_jit(base, task_vectors, alphas):
    base_leaves, treedef = _common.flatten(base)
    acc: list[Any] = [None] * len(base_leaves)
    for t, tau in enumerate(task_vectors):
        for i, x in enumerate(_common.flatten(tau)[0]):
            if not _common.is_param(x):
                continue
            adt = _common.accumulation_dtype(x.dtype)
            term = alphas[t].astype(adt) * x.astype(adt)
            acc[i] = term if acc[i] is None else acc[i] + term
    out = [b if a is None else (b + a).astype(b.dtype) for b, a in zip(base_leaves, acc)]
    return jax.tree.unflatten(treedef, out)
