"""Theorems 1 and 2 of "On Task Vectors and Gradients" (Zhou et al., arXiv 2508.16082).

* :mod:`~taskvec_jax.theory.theorem1` -- task arithmetic vs multitask GD: the measured gap
  (:func:`task_arithmetic_gap`), its ``eta^2`` coefficient ``C_k`` from Hessian-vector
  products (:func:`second_order_term`), the multitask trajectory (:func:`multitask_gd`)
  and the gradient / Hessian norms along it (:func:`trajectory_curvature`);
* :mod:`~taskvec_jax.theory.theorem2` -- the explicit feed-forward bound on ``||C_k||``
  (:func:`feedforward_bound`, :func:`second_order_bound`, the paper's stated form);
* :mod:`~taskvec_jax.theory.mlp_norms` -- the layer norms of an MLP parameter tree that the
  bound takes (:func:`mlp_weight_norms`).
"""

from taskvec_jax.theory import mlp_norms, theorem1, theorem2
from taskvec_jax.theory.mlp_norms import mlp_weight_norms
from taskvec_jax.theory.theorem1 import (
    HESSIAN_AT,
    TaskArithmeticGap,
    TrajectoryCurvature,
    multitask_gd,
    second_order_term,
    task_arithmetic_gap,
    trajectory_curvature,
)
from taskvec_jax.theory.theorem2 import (
    ACTIVATION_CONSTANTS,
    ActivationConstants,
    FeedforwardBound,
    feedforward_bound,
    paper_second_order_bound,
    second_order_bound,
)

__all__ = [
    "ACTIVATION_CONSTANTS", "ActivationConstants", "FeedforwardBound", "HESSIAN_AT",
    "TaskArithmeticGap", "TrajectoryCurvature", "feedforward_bound", "mlp_norms",
    "mlp_weight_norms", "multitask_gd", "paper_second_order_bound", "second_order_bound",
    "second_order_term", "task_arithmetic_gap", "theorem1", "theorem2",
    "trajectory_curvature",
]
