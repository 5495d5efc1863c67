"""Theorem 1 of arXiv 2508.16082 in the tangent space: the gap in closed form.

For a model that is linear in its parameters -- a linearized model ``f_lin``
(:func:`taskvec_jax.linearize`) -- with the squared loss, every task loss is exactly
quadratic, ``L_t(theta) = L_t(theta_0) + g_t^T d + d^T H_t d / 2`` (``d = theta - theta_0``)
with the constant Gauss-Newton Hessian ``H_t = J_t^T H_l J_t``. Gradient descent is then
a linear recursion that sums in closed form (docs/theory.md, "Theorem 1 in the tangent
space"), and

    theta_TA^(k) - theta_MT^(k) = -alpha sum_{i=1}^{k-1} binom(k, i+1) (-eta)^i eta P_i,
    P_i = sum_t H_t^i g_t - alpha^i H^i g,   H = sum_t H_t,  g = sum_t g_t,

a polynomial in ``eta`` of degree ``k`` with no remainder. Its ``eta^2`` coefficient is
``alpha binom(k, 2) sum_t H_t r_t(theta_0)``, the ``eta -> 0`` limit of the paper's
``C_k``; for ``k = 2`` the gap is exactly ``eta^2 C_2``.

:func:`quadratic_gap` evaluates that closed form with ``2 T (K - 1)`` Hessian-vector
products (which ARE Gauss-Newton products here) and no finetuning run. For a loss that is
not quadratic in the parameters (cross-entropy on ``f_lin``), the result is only the
quadratic model of the gap at ``theta_0``; Theorem 1's ``O(eta^3)`` statement then holds
as in the nonlinear case, with ``H_t = J^T H_l(f_lin) J``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from taskvec_jax import _checks
from taskvec_jax import hessian as hessian_lib
from taskvec_jax import tree as tree_lib

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

__all__ = ["QuadraticGap", "quadratic_gap"]


class QuadraticGap(NamedTuple):
    """The closed-form Theorem 1 gap of a quadratic loss.

    Attributes:
      epochs: ``[1, ..., K]``.
      gap: leaves ``[K, ...]``; index ``k - 1`` is ``theta_TA^(k) - theta_MT^(k)``
        (index 0 is exactly zero).
      powers: leaves ``[K - 1, ...]``; index ``i - 1`` is ``P_i = sum_t H_t^i g_t -
        alpha^i H^i g`` (empty leading axis when ``K = 1``).
    """

    epochs: np.ndarray
    gap: PyTree
    powers: PyTree


def quadratic_gap(loss_fn: LossFn, params: PyTree, task_datasets: Sequence[PyTree],
                  learning_rate, alpha, num_epochs: int, *,
                  microbatch_size: int | None = None) -> QuadraticGap:
    """Theorem 1's gap ``theta_TA^(k) - theta_MT^(k)``, k = 1..K, in closed form.

    Exact (to rounding) when every ``L_t`` is quadratic in the parameters, e.g. the
    squared loss of a linearized model; see the module docstring for the formula. Same
    setting as :func:`taskvec_jax.theory.task_arithmetic_gap`: per-task full-batch GD with
    step ``learning_rate``, multitask GD on ``sum_t L_t`` with step
    ``alpha * learning_rate``.

    Cost: ``T`` gradients and ``2 T (K - 1)`` Hessian-vector products at ``params``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss, quadratic in ``params``.
      params: ``theta_0``.
      task_datasets: one dataset per task.
      learning_rate: the per-task step ``eta`` (may be traced).
      alpha: the merge coefficient (may be traced).
      num_epochs: ``K``.
      microbatch_size: gradients and HVPs in chunks of this many examples (memory only).

    Returns:
      A :class:`QuadraticGap`.
    """
    datasets = _checks.task_datasets(task_datasets)
    num_epochs = _checks.positive_int(num_epochs, "num_epochs")
    _checks.float_dtype(params, name="params", why="the theory differentiates every leaf")
    for t, d in enumerate(datasets):
        _checks.loss_is_scalar(loss_fn, params, d, _checks.num_examples(d), f"task {t}")

    gap, powers = _quadratic_gap(loss_fn, params, datasets, learning_rate, alpha,
                                 num_epochs, microbatch_size)
    return QuadraticGap(np.arange(1, num_epochs + 1), gap, powers)


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _quadratic_gap(loss_fn, params, datasets, learning_rate, alpha, num_epochs,
                   microbatch_size):
    def grad(d):
        return hessian_lib.mean_over_microbatches(
            lambda b: jax.grad(loss_fn)(params, b), d, microbatch_size)

    def hvp(d, v):
        return hessian_lib.hvp(loss_fn, params, d, v, microbatch_size=microbatch_size)

    g_t = [grad(d) for d in datasets]
    own = list(g_t)                       # H_t^i g_t
    joint = tree_lib.weighted_sum(g_t)    # H^i g
    powers = []
    for i in range(1, num_epochs):
        own = [hvp(d, u) for d, u in zip(datasets, own)]
        joint = tree_lib.weighted_sum([hvp(d, joint) for d in datasets])
        powers.append(tree_lib.weighted_sum([tree_lib.weighted_sum(own), joint],
                                            [1.0, -(alpha ** i)]))
    zeros = tree_lib.zeros_like(params)
    gaps = [zeros]
    for k in range(2, num_epochs + 1):
        weights = [-alpha * math.comb(k, i + 1) * (-learning_rate) ** i * learning_rate
                   for i in range(1, k)]
        gaps.append(tree_lib.weighted_sum(powers[:k - 1], weights))
    stacked_powers = (tree_lib.stack(powers) if powers else
                      jax.tree.map(lambda x: x[None][:0], zeros))
    return tree_lib.stack(gaps), stacked_powers
