"""Checkpointed, resumable finetuning: :func:`resumable_finetune` (orbax).

A run saves ``(params, opt_state)`` and its loss log every ``save_every`` epochs as one
crash-safe :func:`taskvec_jax.checkpoint.save` version (docs/durability.md) and continues
from the latest complete save when called again. Shuffles depend on the absolute epoch, so an interrupted and resumed
run ends bit for bit where the uninterrupted one ends.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from taskvec_jax import _checks
from taskvec_jax.checkpoint import exists, restore, save
from taskvec_jax.training import finetune

PyTree = Any

__all__ = ["RunState", "resumable_finetune"]


class RunState(NamedTuple):
    """What a finetune needs to continue: parameters, optimizer state, epochs done."""

    params: PyTree
    opt_state: Any
    epoch: int


def _key_data(key):
    if key is None:
        return None
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(key))
    return np.asarray(key)


def resumable_finetune(
    loss_fn,
    params: PyTree,
    data: PyTree,
    optimizer: optax.GradientTransformation,
    num_epochs: int,
    directory: str | os.PathLike,
    *,
    save_every: int = 1,
    max_to_keep: int | None = 2,
    key: jax.Array | None = None,
    batch_size: int | None = None,
    microbatch_size: int | None = None,
    drop_remainder: bool = False,
    progress: bool | int = False,
) -> tuple[RunState, np.ndarray]:
    """:func:`taskvec_jax.finetune` that checkpoints every ``save_every`` epochs and resumes.

    If ``directory`` already holds a checkpoint of this run, training continues from its
    latest epoch; a run interrupted after epoch ``j`` and called again ends bit for bit
    where the uninterrupted run ends (shuffles depend on the absolute epoch). Calling
    again with a larger ``num_epochs`` extends a finished run.

    Args:
      loss_fn, params, data, optimizer, num_epochs, key: as in ``finetune``.
      directory: where checkpoints go: a :func:`taskvec_jax.checkpoint.save` checkpoint,
        one crash-safe version per saved epoch (a run killed at any moment resumes from
        its last complete save).
      save_every: epochs between checkpoints.
      max_to_keep: how many saved epochs to keep (``None``: all).
      batch_size, microbatch_size, drop_remainder, progress: as in ``finetune``.

    Returns:
      ``(RunState, losses)`` with the per-epoch losses of all epochs run so far.

    Raises:
      ValueError: if the checkpoint is past ``num_epochs`` or was made with another key.
    """
    _checks.positive_int(save_every, "save_every")
    _checks.positive_int(num_epochs, "num_epochs")
    directory = os.path.abspath(os.path.expanduser(os.fspath(directory)))
    key_data = _key_data(key)
    state = RunState(params, optimizer.init(params), 0)
    losses: list[float] = []
    old_steps = sorted(n for n in (os.listdir(directory) if os.path.isdir(directory) else ())
                       if n.isdigit())
    if old_steps and not exists(directory):
        raise ValueError(f"{directory} holds a run saved by an earlier taskvec_jax (orbax "
                         f"CheckpointManager steps {old_steps}); finish it with that version "
                         "or pass a new directory")
    if exists(directory):
        restored, log = restore(directory, like={"params": state.params,
                                                 "opt_state": state.opt_state},
                                return_metadata=True)
        if not isinstance(log, dict) or "epoch" not in log:
            raise ValueError(f"{directory} holds a checkpoint not written by "
                             "resumable_finetune; pass another directory")
        latest = log["epoch"]
        if latest > num_epochs:
            raise ValueError(f"{directory} holds a checkpoint at epoch {latest}, "
                             f"beyond num_epochs={num_epochs}")
        saved_key = None if log["key"] is None else np.asarray(log["key"], np.uint32)
        if (saved_key is None) != (key_data is None) or (
                saved_key is not None and not np.array_equal(saved_key, key_data)):
            raise ValueError(f"{directory} was written with a different PRNG key; "
                             "resuming with another key would change the shuffles")
        state = RunState(restored["params"], restored["opt_state"], latest)
        losses = list(log["losses"])
    while state.epoch < num_epochs:
        seg = min(save_every, num_epochs - state.epoch)
        traj = finetune(
            loss_fn, state.params, data, optimizer, seg, key=key,
            opt_state=state.opt_state, start_epoch=state.epoch, keep_epochs=[seg],
            record_gradients=False, batch_size=batch_size,
            microbatch_size=microbatch_size, drop_remainder=drop_remainder,
            progress=progress)
        state = RunState(traj.final_params, traj.opt_state, state.epoch + seg)
        losses.extend(np.asarray(traj.losses).tolist())
        save(directory, {"params": state.params, "opt_state": state.opt_state},
             overwrite=True, max_to_keep=max_to_keep,
             metadata={"epoch": state.epoch, "losses": losses,
                       "key": None if key_data is None else key_data.tolist()})
    return state, np.asarray(losses)
