"""Finetuning engine (transitional shim: the redesign moves finetune.py and parallel.py here)."""

from taskvec_jax.finetune import (  # noqa: F401
    Trajectory,
    finetune,
    finetune_tasks,
    mean_value_and_grad,
    multitask_finetune,
)

__all__ = ["Trajectory", "finetune", "finetune_tasks", "mean_value_and_grad",
           "multitask_finetune"]
