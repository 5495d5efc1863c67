"""taskvec_jax: task vectors, model merging and the theory of task arithmetic, in JAX.

Reference implementation of Zhou et al., "On Task Vectors and Gradients"
(arXiv 2508.16082): a task vector from one epoch of full-batch gradient descent is
``-eta * grad L(theta_0)``, so task arithmetic after one epoch is one step of multitask
gradient descent; after ``k`` epochs they differ by ``eta^2 * C_k + O(eta^3)``.

The public surface::

    import taskvec_jax as tvj
    tau   = tvj.task_vector(finetuned, base)
    theta = tvj.apply(base, tau, alpha=1.0)
    traj  = tvj.finetune(loss_fn, params, data, optax.sgd(lr), num_epochs)
    trajs = tvj.finetune_tasks(loss_fn, params, task_datasets, optax.sgd(lr), num_epochs)
    mt    = tvj.multitask_finetune(loss_fn, params, task_datasets, optax.sgd(lr), k)
    tvj.merging.ties(base, task_vectors, density=0.2)
    tvj.theory.second_order_term(loss_fn, params, task_datasets, lr, alpha, k)
    tvj.tree.cosine(tau_1, tau_2)

Submodules: ``tree``, ``merging``, ``theory``, ``hessian``, ``analysis``, ``models``,
``data``, ``parallel``, ``checkpoint``, ``zeroshot``, ``plotting`` (imported on use).
"""

from taskvec_jax import (
    analysis,
    checkpoint,
    data,
    hessian,
    merging,
    models,
    parallel,
    theory,
    tree,
    zeroshot,
)
from taskvec_jax.hessian import hvp
from taskvec_jax.finetune import (
    Trajectory,
    finetune,
    finetune_tasks,
    mean_value_and_grad,
    multitask_finetune,
    num_examples,
)
from taskvec_jax.theory import (
    feedforward_bound,
    second_order_term,
    task_arithmetic_gap,
)
from taskvec_jax.task_vectors import (
    apply,
    check_compatible,
    check_task_vectors,
    task_vector,
)

__version__ = "0.1.0"

__all__ = [
    "Trajectory", "analysis", "apply", "check_compatible", "check_task_vectors",
    "checkpoint", "data", "feedforward_bound", "finetune", "finetune_tasks", "hessian",
    "hvp", "mean_value_and_grad", "merging", "models", "multitask_finetune",
    "num_examples", "parallel", "second_order_term", "task_arithmetic_gap",
    "task_vector", "theory", "tree", "zeroshot",
]

# Tangent space (issue 14): linearized models, empirical NTK, weight disentanglement.
from taskvec_jax import tangent  # noqa: E402
from taskvec_jax.tangent import linearize  # noqa: E402

__all__ += ["linearize", "tangent"]
