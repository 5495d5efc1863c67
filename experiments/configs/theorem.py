"""Theorems 1 and 2 of arXiv 2508.16082 on the embedded digits tasks.

Run it with::

    python -m experiments.theorem                     # this config, results/theorem
    python -m experiments.theorem --config=experiments/configs/theorem.py:quick
    python -m experiments.theorem --quick             # the same as the line above
    python -m experiments.theorem --workdir=/tmp/t --config.alpha=0.5

Every number the experiment writes follows from this file and the code: data, models,
step sizes, seeds.
"""

import ml_collections


def get_config(name: str = "default") -> ml_collections.ConfigDict:
    """The experiment's config; ``name="quick"``: the same experiment, smaller (tests and
    the notebook)."""
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Data: taskvec_jax.data.permuted_digits_tasks: scikit-learn's 8x8 digits (1797
    # images, shipped with scikit-learn), split into disjoint blocks of examples; task t
    # sees its block through a fixed pixel permutation (task 0: the identity). All 10
    # classes in every task.
    config.examples_per_task = 160

    # One entry per (network, number of tasks). Hidden layers have `width` units.
    config.runs = [
        dict(depth=1, width=0, activation="identity", num_tasks=3),
        dict(depth=2, width=32, activation="tanh", num_tasks=2),
        dict(depth=2, width=32, activation="softplus", num_tasks=5),
        dict(depth=3, width=16, activation="relu", num_tasks=3),
    ]
    config.loss = "cross_entropy"
    config.alpha = 0.8          # merge coefficient
    config.num_epochs = 5       # k = 1..5

    # Theorem 1: the step sizes of the sweep (log-spaced), the decade the slopes are
    # fitted over, and where the Hessians of C_k are evaluated (theta^(e) or theta^(e-1):
    # both must give the O(lr^3) residual).
    config.lr_min = 1e-3
    config.lr_max = 1e-1
    config.num_lrs = 9
    config.fit_lr_max = 1e-2    # fit over [lr_min, fit_lr_max]
    config.hessian_at = ("current", "previous")

    # Theorem 2: measured ||C_k||, its bound and the paper's stated form at this step.
    config.bound_lr = 0.05
    config.power_iteration_tol = 1e-8
    config.power_iteration_max_steps = 300

    # Beyond the theorem: minibatch SGD. The one-epoch gap as the batch shrinks, for the
    # first run's network, at these step sizes.
    config.sgd_batch_sizes = [160, 80, 40, 20, 10]
    config.sgd_lrs = [0.01, 0.05]

    if name == "quick":
        config.update(dict(
            examples_per_task=80,
            runs=[dict(depth=2, width=16, activation="tanh", num_tasks=2),
                  dict(depth=2, width=16, activation="relu", num_tasks=3)],
            num_lrs=4,
            lr_max=1e-2,
            sgd_batch_sizes=[80, 20],
            sgd_lrs=[0.05],
        ))
    elif name != "default":
        raise ValueError(f"unknown theorem config {name!r}; choose default or quick")
    return config
