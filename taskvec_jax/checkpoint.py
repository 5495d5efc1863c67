"""Saving and restoring parameters, trajectories and resumable runs with orbax.

Every write goes through a closed orbax checkpointer (orbax saves asynchronously; a
process that exits before the save finishes writes nothing), with absolute paths, and
never destroys what is already on disk: :func:`save` refuses an existing path unless
``overwrite=True``, and then writes the new checkpoint beside the old one and swaps them
only once the new one is complete.
"""

from __future__ import annotations

import os
import shutil
import uuid
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from taskvec_jax.finetune import _check_positive_int, finetune

PyTree = Any


def _abs(path: str | os.PathLike) -> str:
    return os.path.abspath(os.fspath(path))


def save(path: str | os.PathLike, tree: PyTree, *, overwrite: bool = False) -> str:
    """Saves a pytree of arrays (params, a Trajectory, an optimizer state) to ``path``.

    Args:
      path: a directory to create (made absolute).
      tree: any pytree of arrays; ``None`` leaves are kept.
      overwrite: replace an existing checkpoint; the old one is removed only after the
        new one is completely written.

    Returns:
      The absolute path written.

    Raises:
      ValueError: if ``path`` exists and ``overwrite`` is false.
    """
    path = _abs(path)
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"checkpoint path {path} already exists; pass overwrite=True to "
                         "replace it")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(path)}.saving-{uuid.uuid4().hex}")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(staging, tree)
            ckptr.wait_until_finished()
        if os.path.exists(path):
            old = os.path.join(parent, f".{os.path.basename(path)}.old-{uuid.uuid4().hex}")
            os.rename(path, old)
            os.rename(staging, path)
            shutil.rmtree(old)
        else:
            os.rename(staging, path)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)
    return path


def restore(path: str | os.PathLike, like: PyTree | None = None) -> PyTree:
    """Restores a pytree saved by :func:`save`.

    Args:
      path: the checkpoint directory.
      like: a tree with the structure, shapes and dtypes to restore into (arrays or
        ``jax.ShapeDtypeStruct``; shardings are honoured). Without it, containers come
        back as dicts and lists.

    Raises:
      ValueError: if ``path`` holds no checkpoint.
    """
    path = _abs(path)
    if not os.path.isdir(path):
        raise ValueError(f"no checkpoint at {path}")
    target = None if like is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, target)


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
    **finetune_kwargs,
) -> tuple[RunState, np.ndarray]:
    """:func:`taskvec_jax.finetune` that checkpoints every ``save_every`` epochs and resumes.

    If ``directory`` already holds a checkpoint of this run, training continues from its
    latest epoch; a run interrupted after epoch ``j`` and called again ends bit for bit
    where the uninterrupted run ends (shuffles depend on the absolute epoch). Calling
    again with a larger ``num_epochs`` extends a finished run.

    Args:
      loss_fn, params, data, optimizer, num_epochs, key: as in ``finetune``.
      directory: where checkpoints go (one sub-directory per saved epoch).
      save_every: epochs between checkpoints.
      max_to_keep: how many checkpoints to keep (``None``: all).
      **finetune_kwargs: ``batch_size``, ``microbatch_size``, ``drop_remainder``,
        ``progress``.

    Returns:
      ``(RunState, losses)`` with the per-epoch losses of all epochs run so far.

    Raises:
      ValueError: if the checkpoint is past ``num_epochs`` or was made with another key.
    """
    _check_positive_int(save_every, "save_every")
    _check_positive_int(num_epochs, "num_epochs")
    for name in ("keep_epochs", "record_gradients", "opt_state", "start_epoch"):
        if name in finetune_kwargs:
            raise ValueError(f"resumable_finetune manages {name} itself")
    directory = _abs(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    key_data = _key_data(key)
    state = RunState(params, optimizer.init(params), 0)
    losses: list[float] = []
    with ocp.CheckpointManager(directory, options=options,
                               item_names=("state", "log")) as manager:
        latest = manager.latest_step()
        if latest is not None:
            if latest > num_epochs:
                raise ValueError(f"{directory} holds a checkpoint at epoch {latest}, "
                                 f"beyond num_epochs={num_epochs}")
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                    {"params": state.params, "opt_state": state.opt_state})
            restored = manager.restore(latest, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), log=ocp.args.JsonRestore()))
            log = restored["log"]
            saved_key = None if log["key"] is None else np.asarray(log["key"], np.uint32)
            if (saved_key is None) != (key_data is None) or (
                    saved_key is not None and not np.array_equal(saved_key, key_data)):
                raise ValueError(f"{directory} was written with a different PRNG key; "
                                 "resuming with another key would change the shuffles")
            state = RunState(restored["state"]["params"], restored["state"]["opt_state"],
                             latest)
            losses = list(log["losses"])
        while state.epoch < num_epochs:
            seg = min(save_every, num_epochs - state.epoch)
            traj = finetune(
                loss_fn, state.params, data, optimizer, seg, key=key,
                opt_state=state.opt_state, start_epoch=state.epoch, keep_epochs=[seg],
                record_gradients=False, **finetune_kwargs)
            state = RunState(traj.final_params, traj.opt_state, state.epoch + seg)
            losses.extend(np.asarray(traj.losses).tolist())
            manager.save(state.epoch, args=ocp.args.Composite(
                state=ocp.args.StandardSave({"params": state.params,
                                             "opt_state": state.opt_state}),
                log=ocp.args.JsonSave({"losses": losses,
                                       "key": None if key_data is None
                                       else key_data.tolist()})))
        manager.wait_until_finished()
    return state, np.asarray(losses)
