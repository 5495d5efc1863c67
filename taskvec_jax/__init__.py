"""taskvec_jax: task vectors, model merging and the theory of task arithmetic, in JAX.

Reference implementation of Zhou et al., "On Task Vectors and Gradients"
(arXiv 2508.16082): a task vector from one epoch of full-batch gradient descent is
``-eta * grad L(theta_0)``, so task arithmetic after one epoch is one step of multitask
gradient descent; after ``k`` epochs they differ by ``eta^2 * C_k + O(eta^3)``.

The public surface::

    import taskvec_jax as tvj
    tau   = tvj.task_vector(finetuned, base)
    theta = tvj.apply(base, tau, alpha=1.0)
    traj  = tvj.finetune(loss_fn, params, data, optax.sgd(learning_rate), num_epochs)
    trajs = tvj.finetune_tasks(loss_fn, params, task_datasets, optax.sgd(learning_rate), num_epochs)
    mt    = tvj.multitask_finetune(loss_fn, params, task_datasets, optax.sgd(learning_rate), k)
    tvj.merging.ties(base, task_vectors, density=0.2)
    tvj.theory.second_order_term(loss_fn, params, task_datasets, learning_rate, alpha, k)
    tvj.tree.cosine(tau_1, tau_2)

Submodules: ``tree``, ``training`` (engine; ``training.sharded`` meshes and multi-host,
``training.microbatch``, ``training.resumable``), ``hessian``, ``theory`` (``theorem1``,
``theorem2``), ``merging``, ``analysis``, ``checkpoint``, ``models``, ``data``, ``clip``,
``plotting`` (imported on use). ``tvj.parallel`` is a deprecated alias of
``tvj.training.sharded`` (one release).
"""

from taskvec_jax import (
    analysis,
    checkpoint,
    clip,
    data,
    hessian,
    merging,
    models,
    theory,
    training,
    tree,
)
from taskvec_jax._checks import num_examples
from taskvec_jax.hessian import hvp
from taskvec_jax.task_vectors import (
    apply,
    check_compatible,
    check_task_vectors,
    task_vector,
)
from taskvec_jax.theory import (
    feedforward_bound,
    second_order_term,
    task_arithmetic_gap,
)
from taskvec_jax.training import (
    Trajectory,
    finetune,
    finetune_tasks,
    mean_value_and_grad,
    multitask_finetune,
)
import taskvec_jax.training.resumable  # noqa: E402,F401  (tvj.training.resumable)

parallel = training.sharded  # deprecated alias (one release): taskvec_jax.training.sharded

__version__ = "0.1.0"

__all__ = [
    "Trajectory", "analysis", "apply", "check_compatible", "check_task_vectors",
    "checkpoint", "clip", "data", "feedforward_bound", "finetune", "finetune_tasks", "hessian",
    "hvp", "mean_value_and_grad", "merging", "models", "multitask_finetune",
    "num_examples", "parallel", "second_order_term", "task_arithmetic_gap",
    "task_vector", "theory", "training", "tree",
]

# Tangent space (issue 14): linearized models, empirical NTK, weight disentanglement.
from taskvec_jax import tangent  # noqa: E402
from taskvec_jax.tangent import linearize  # noqa: E402

__all__ += ["linearize", "tangent"]
