"""Flax models and the helpers that turn them into ``loss_fn(params, batch)``.

CLIP lives in its own package, :mod:`taskvec_jax.clip`.
"""

from taskvec_jax.models.cnn import CNN
from taskvec_jax.models.heads import (
    TaskHeads,
    fit_linear_head,
    multihead_accuracy,
    multihead_loss_fn,
    stack_heads,
    with_task_ids,
)
from taskvec_jax.models.losses import (
    LOSSES,
    accuracy,
    apply_fn_of,
    cross_entropy,
    make_loss_fn,
    mse,
)
from taskvec_jax.models.mlp import ACTIVATIONS, MLP, get_activation
from taskvec_jax.models.vit import ViT

__all__ = ["ACTIVATIONS", "CNN", "LOSSES", "MLP", "TaskHeads", "ViT", "accuracy",
           "apply_fn_of", "cross_entropy", "fit_linear_head", "get_activation",
           "make_loss_fn", "mse", "multihead_accuracy", "multihead_loss_fn", "stack_heads",
           "with_task_ids"]
