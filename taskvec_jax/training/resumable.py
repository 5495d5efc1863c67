"""Checkpointed, resumable finetuning: :func:`resumable_finetune` (orbax).

A run saves ``(params, opt_state)`` (and the model state of a ``model_state=`` run) and
its loss log every ``save_every`` epochs as one crash-safe
:func:`taskvec_jax.checkpoint.save` version (docs/durability.md) and continues from the
latest complete save when called again. Shuffles depend on the absolute epoch, so an interrupted and resumed
run ends bit for bit where the uninterrupted one ends.

A resumed run must be the same run. The JSON log beside the state holds a fingerprint
(:func:`run_fingerprint`) of the data (leaf shapes and dtypes, a SHA-256 of the contents),
the optimizer (its state's tree structure and the constants its functions close over: the
hyperparameters), the loss (its qualified name and a SHA-256 of its jaxpr on the data's
shapes, which includes the numbers it captures) and the configuration that changes the
result (``batch_size``, ``drop_remainder``); a resume whose fingerprint differs is
refused, naming what changed, before any state is read.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from taskvec_jax import _checks
from taskvec_jax import tree as tree_lib
from taskvec_jax.checkpoint import exists, restore, save
from taskvec_jax.training import finetune

PyTree = Any

__all__ = ["RunState", "resumable_finetune", "run_fingerprint"]


class RunState(NamedTuple):
    """What a finetune needs to continue: parameters, optimizer state, epochs done, and
    the model state (BatchNorm statistics) of a run with ``model_state=`` (else ``None``)."""

    params: PyTree
    opt_state: Any
    epoch: int
    model_state: Any = None


def _key_data(key):
    if key is None:
        return None
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(key))
    return np.asarray(key)


def _sha256_arrays(leaves) -> str:
    digest = hashlib.sha256()
    for x in leaves:
        x = np.asarray(jax.random.key_data(x) if jnp.issubdtype(jnp.result_type(x),
                                                               jax.dtypes.prng_key) else x)
        digest.update(f"{x.shape}{x.dtype}".encode())
        digest.update(np.ascontiguousarray(x).tobytes())
    return digest.hexdigest()


def _constants(obj: Any, depth: int = 0, seen: set | None = None) -> Any:
    """A JSON-able description of the numbers a function (or a tree of them) closes over.

    optax keeps a transformation's hyperparameters in the closures of its ``init`` and
    ``update`` functions (``chain`` closes over its parts, a schedule over its numbers);
    names and values are recorded, object identities never, so that ``optax.sgd(0.1)``
    made again in another process has the same description and ``optax.sgd(0.2)`` not.
    """
    seen = set() if seen is None else seen
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj if not isinstance(obj, float) or np.isfinite(obj) else repr(obj)
    if isinstance(obj, (np.ndarray, jax.Array, np.generic)):
        x = np.asarray(obj)
        if x.size <= 16 and x.dtype.kind in "biuf":
            return {"array": x.tolist(), "dtype": str(x.dtype)}
        return {"shape": list(x.shape), "dtype": str(x.dtype), "sha256": _sha256_arrays([x])}
    if depth > 8 or id(obj) in seen:
        return type(obj).__name__
    seen.add(id(obj))
    if isinstance(obj, (tuple, list)):
        return [_constants(x, depth + 1, seen) for x in obj]
    if isinstance(obj, dict):
        return {str(k): _constants(v, depth + 1, seen) for k, v in obj.items()}
    if isinstance(obj, optax.GradientTransformation):
        return {"init": _constants(obj.init, depth + 1, seen),
                "update": _constants(obj.update, depth + 1, seen)}
    if callable(obj):
        closure = getattr(obj, "__closure__", None) or ()
        names = getattr(getattr(obj, "__code__", None), "co_freevars", ())
        cells = {}
        for name, cell in zip(names, closure):
            try:
                cells[name] = _constants(cell.cell_contents, depth + 1, seen)
            except ValueError:          # an empty cell
                cells[name] = None
        for attr in ("func", "args", "keywords"):      # functools.partial
            if hasattr(obj, attr) and not hasattr(obj, "__code__"):
                cells[attr] = _constants(getattr(obj, attr), depth + 1, seen)
        return {"fn": getattr(obj, "__qualname__", type(obj).__name__), "closure": cells}
    return type(obj).__name__


def run_fingerprint(loss_fn: Callable, params: PyTree, data: PyTree,
                    optimizer: optax.GradientTransformation, *,
                    batch_size: int | None = None, drop_remainder: bool = False,
                    model_state: Any = None) -> dict:
    """What identifies a finetuning run, as JSON: ``{"data", "optimizer", "loss", "config"}``.

    * ``data``: every leaf's path, shape and dtype, and a SHA-256 of the contents (one
      pass over the data on the host);
    * ``optimizer``: the tree structure of ``optimizer.init(params)`` (by shape only) and
      the constants its functions close over (hyperparameters, schedules);
    * ``loss``: ``loss_fn``'s qualified name and a SHA-256 of its jaxpr on ``params`` and
      the data's shapes (captured numbers appear in it; the jaxpr's constants are hashed);
    * ``config``: ``batch_size`` and ``drop_remainder`` (``num_epochs`` may grow between
      calls, ``microbatch_size`` and ``save_every`` do not change the result; the PRNG
      key is checked on its own).

    With ``model_state`` (a stateful ``loss_fn(params, batch, state)``), the jaxpr is
    traced with the state's shapes, so a state of another structure changes ``loss``.
    """
    leaves = tree_lib.leaves_with_paths(data)
    shapes = [[path, list(np.shape(x)), str(jnp.result_type(x))] for path, x in leaves]
    opt_state = jax.eval_shape(optimizer.init, params)
    sample = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)),
                          data)
    closed = (jax.make_jaxpr(loss_fn)(params, sample) if model_state is None
              else jax.make_jaxpr(loss_fn)(params, sample, model_state))
    jaxpr_hash = hashlib.sha256(str(closed.jaxpr).encode())
    jaxpr_hash.update(_sha256_arrays([c for c in closed.consts
                                      if hasattr(c, "shape")]).encode())
    return {
        "data": {"leaves": shapes, "sha256": _sha256_arrays([x for _, x in leaves])},
        "optimizer": {"state": str(jax.tree.structure(opt_state)),
                      "state_shapes": [[list(x.shape), str(x.dtype)]
                                       for x in jax.tree.leaves(opt_state)],
                      "constants": _constants(optimizer)},
        "loss": {"name": getattr(loss_fn, "__qualname__", type(loss_fn).__name__),
                 "jaxpr_sha256": jaxpr_hash.hexdigest()},
        "config": {"batch_size": batch_size, "drop_remainder": bool(drop_remainder)},
    }


_WHAT = {"data": "the data", "optimizer": "the optimizer", "loss": "the loss function",
         "config": "the configuration"}


def _mismatch(saved: dict, now: dict) -> str | None:
    """A sentence naming what differs between two fingerprints (``None``: the same run)."""
    changed = []
    for part, what in _WHAT.items():
        a, b = saved.get(part), now.get(part)
        if a == b:
            continue
        if part == "data":
            detail = ("leaf shapes/dtypes differ" if a.get("leaves") != b.get("leaves")
                      else "same shapes, different contents")
        elif part == "optimizer":
            detail = ("its state has a different structure" if
                      (a.get("state"), a.get("state_shapes")) !=
                      (b.get("state"), b.get("state_shapes"))
                      else "different hyperparameters")
        elif part == "loss":
            detail = (f"{a.get('name')} -> {b.get('name')}" if a.get("name") != b.get("name")
                      else "same name, different computation or captured numbers")
        else:
            detail = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(b)
                               if a.get(k) != b.get(k))
        changed.append(f"{what} changed ({detail})")
    return "; ".join(changed) or None


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
    progress: bool | int | str = False,
    model_state: Any = None,
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
      model_state: as in ``finetune`` (a stateful ``loss_fn(params, batch, state)``); the
        state is saved with the parameters and a resume continues from the saved one,
        so an interrupted run ends with the uninterrupted run's state too.

    Returns:
      ``(RunState, losses)`` with the per-epoch losses of all epochs run so far
      (``RunState.model_state``: the state after the last epoch, ``None`` without one).

    Raises:
      ValueError: if the checkpoint is past ``num_epochs``, was made with another key, or
        by another run: different data, optimizer, loss or configuration (the message
        names which; see :func:`run_fingerprint`). Checkpoints written before
        fingerprints existed are resumed with the key check only.
    """
    _checks.positive_int(save_every, "save_every")
    _checks.positive_int(num_epochs, "num_epochs")
    directory = os.path.abspath(os.path.expanduser(os.fspath(directory)))
    key_data = _key_data(key)
    state = RunState(params, optimizer.init(params), 0, model_state)
    # Through a JSON round trip, so that it compares equal to what is read back.
    fingerprint = json.loads(json.dumps(run_fingerprint(
        loss_fn, params, data, optimizer, batch_size=batch_size,
        drop_remainder=drop_remainder, model_state=model_state)))

    def saved_tree(state: RunState) -> dict:
        tree = {"params": state.params, "opt_state": state.opt_state}
        if model_state is not None:  # runs without one keep the earlier layout
            tree["model_state"] = state.model_state
        return tree

    losses: list[float] = []
    old_steps = sorted(n for n in (os.listdir(directory) if os.path.isdir(directory) else ())
                       if n.isdigit())
    if old_steps and not exists(directory):
        raise ValueError(f"{directory} holds a run saved by an earlier taskvec_jax (orbax "
                         f"CheckpointManager steps {old_steps}); finish it with that version "
                         "or pass a new directory")
    if exists(directory):
        like = saved_tree(state)
        try:
            restored, log = restore(directory, like=like, return_metadata=True)
        except ValueError as err:
            # A different run (e.g. another optimizer) does not match this run's template:
            # read the log without one, so the message says what changed.
            try:
                _, log = restore(directory, return_metadata=True)
            except ValueError:
                raise err from None
            changed = (isinstance(log, dict) and "fingerprint" in log
                       and _mismatch(log["fingerprint"], fingerprint))
            if changed:
                raise ValueError(f"{directory} holds another run's checkpoint: {changed}. "
                                 "Resume with the same data, optimizer, loss and "
                                 "configuration, or use a new directory") from err
            raise
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
        changed = ("fingerprint" in log) and _mismatch(log["fingerprint"], fingerprint)
        if changed:
            raise ValueError(f"{directory} holds another run's checkpoint: {changed}. "
                             "Resume with the same data, optimizer, loss and "
                             "configuration, or use a new directory")
        state = RunState(restored["params"], restored["opt_state"], latest,
                         restored.get("model_state"))
        losses = list(log["losses"])
    while state.epoch < num_epochs:
        seg = min(save_every, num_epochs - state.epoch)
        traj = finetune(
            loss_fn, state.params, data, optimizer, seg, key=key,
            opt_state=state.opt_state, start_epoch=state.epoch, keep_epochs=[seg],
            record_gradients=False, batch_size=batch_size,
            microbatch_size=microbatch_size, drop_remainder=drop_remainder,
            progress=progress, model_state=state.model_state)
        state = RunState(traj.final_params, traj.opt_state, state.epoch + seg,
                         traj.final_model_state)
        losses.extend(np.asarray(traj.losses).tolist())
        save(directory, saved_tree(state),
             overwrite=True, max_to_keep=max_to_keep,
             metadata={"epoch": state.epoch, "losses": losses,
                       "key": None if key_data is None else key_data.tolist(),
                       "fingerprint": fingerprint})
    return state, np.asarray(losses)
