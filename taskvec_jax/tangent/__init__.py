"""Task arithmetic in the tangent space: linearized models, kernels, disentanglement.

The line of work that explains task arithmetic by linearization (Ortiz-Jimenez et al.,
*Task Arithmetic in the Tangent Space*, arXiv 2305.12827), as pure functions over
parameter pytrees:

* :func:`linearize` -- ``f_lin(params) = f(params0) + J(params0)(params - params0)`` via
  one ``jax.jvp``; finetune it with :func:`taskvec_jax.finetune` like any model;
  :func:`merged_outputs` evaluates merges nonlinearly or in the tangent space;
* :func:`quadratic_gap` -- Theorem 1 of arXiv 2508.16082 in closed form for a linearized
  model with the squared loss (constant Gauss-Newton Hessian);
* :func:`disentanglement_error` -- the weight disentanglement error ``xi(alpha)`` of
  2305.12827 eq. 4 on a grid of coefficients;
* :func:`empirical_ntk`, :func:`kernel_alignment`, :func:`cross_task_kernel` -- empirical
  NTK Grams from jvp/vjp (chunked), and how tasks' kernels overlap;
* :func:`linear_path`, :func:`interpolation_barrier`, :func:`layer_table` -- linear-path
  diagnostics of task vectors.

docs/tangent.md gives the formulas and sources.
"""

from taskvec_jax.tangent.diagnostics import (
    Barrier,
    LayerTable,
    interpolation_barrier,
    interpolation_path,
    layer_table,
    linear_path,
)
from taskvec_jax.tangent.disentanglement import (
    DISTANCES,
    alpha_grid,
    disentanglement_error,
    output_distance,
)
from taskvec_jax.tangent.linearize import (
    linear_term,
    linearize,
    linearized_apply,
    merged_outputs,
)
from taskvec_jax.tangent.ntk import (
    cross_task_kernel,
    empirical_ntk,
    kernel_alignment,
    kernel_target_alignment,
)
from taskvec_jax.tangent.theorem import QuadraticGap, quadratic_gap

__all__ = [
    "Barrier", "DISTANCES", "LayerTable", "QuadraticGap", "alpha_grid",
    "cross_task_kernel", "disentanglement_error", "empirical_ntk", "interpolation_barrier",
    "interpolation_path", "kernel_alignment", "kernel_target_alignment", "layer_table",
    "linear_path", "linear_term", "linearize", "linearized_apply", "merged_outputs",
    "output_distance", "quadratic_gap",
]
