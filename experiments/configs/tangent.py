"""Task arithmetic in the tangent space (arXiv 2305.12827) on the embedded offline suite.

    python -m experiments.tangent                  # default: < 5 min on 2 CPU cores
    python -m experiments.tangent --quick          # the same pipeline, tiny (< 30 s)

The base model, the frozen heads and the data come from the paper reproduction's config
(experiments/configs/reproduce.py, blocks data/model/pretrain/heads); the ``tangent`` block
is this experiment's own. Every number the run writes follows from this file and the code.
"""

from __future__ import annotations

import ml_collections

from experiments.configs.reproduce import get_config as reproduction_config


def get_config(name: str = "default") -> ml_collections.ConfigDict:
    if name not in ("default", "quick"):
        raise ValueError(f"unknown config {name!r}; choose default or quick")
    c = reproduction_config("quick" if name == "quick" else "default")
    c.name = f"tangent_{name}"
    # Four tasks of the embedded suite (the base is pretrained on embedded/source; the
    # reproduction itself runs on embedded_quadrants).
    c.data.suite = "embedded"
    c.data.tasks = ("embedded/rotate90", "embedded/invert", "embedded/permute",
                    "embedded/parity")
    c.data.max_train_examples = 800
    c.tangent = ml_collections.ConfigDict(dict(
        # Finetuning, identical for the nonlinear and the linearized model: minibatch Adam
        # (the optimizer of 2305.12827), the same key, epochs and batch size.
        learning_rate=1e-3, num_epochs=12, batch_size=64,
        # Task arithmetic: one alpha for the sum, chosen on validation from this grid.
        alphas=(0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0),
        # Weight disentanglement heatmaps: task pairs (indices into data.tasks), the grid
        # of each coefficient, examples per task.
        pairs=((0, 1), (0, 2), (1, 3)), grid=(-2.0, 3.0), grid_points=11,
        disentanglement_examples=200, distances=("prediction", "l2"),
        # Empirical NTK at theta_0 over the logits of each task's head.
        ntk_examples=24, ntk_chunk_size=120,
        # Linear paths theta_0 + lambda tau and the segment between the two merges.
        path_lambdas=(0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0), barrier_points=11,
    ))
    if name == "quick":
        c.data.tasks = ("embedded/rotate90", "embedded/invert")
        c.data.max_train_examples = 200
        c.pretrain.epochs = 6
        c.heads.steps = 100
        c.tangent.update(dict(num_epochs=3, batch_size=50, alphas=(0.3, 0.6, 1.0),
                              pairs=((0, 1),), grid_points=5, disentanglement_examples=60,
                              distances=("prediction",),
                              ntk_examples=8, ntk_chunk_size=80,
                              path_lambdas=(0.0, 0.5, 1.0), barrier_points=5))
    return c
