"""Finetuning as scanned gradient descent over any parameter pytree.

The paper's objects are trajectories of (full-batch) gradient descent:
``theta^(e+1) = theta^(e) - eta * grad L(theta^(e))``, and the task vector after ``k``
epochs is ``tau^(k) = theta^(k) - theta^(0)``. This package runs such trajectories as one
compiled program (``training/_engine.py``: an outer ``lax.scan`` over epochs, an inner
``lax.scan`` over steps or over microbatches of the full batch), for any
``loss_fn(params, batch) -> scalar mean loss`` and any optax ``GradientTransformation``.

Modules: :mod:`~taskvec_jax.training.microbatch` (the one microbatched mean),
:mod:`~taskvec_jax.training.sharded` (the ``(tasks, data)`` mesh, sharded drivers,
multi-host helpers), :mod:`~taskvec_jax.training.resumable` (checkpointed, resumable runs).

Conventions (shared by :func:`finetune`, :func:`finetune_tasks`, :func:`multitask_finetune`):

* ``data`` is a pytree of arrays whose leading axis is the example axis (``N`` examples).
* Full batch (``batch_size=None``): exactly one optimizer step per epoch, on the gradient of
  the mean loss over all ``N`` examples. ``microbatch_size=m`` computes that same gradient
  in chunks of ``m`` inside a ``lax.scan``; when ``m`` does not divide ``N`` the last,
  smaller chunk is weighted by its size, so the result equals the unsplit gradient.
* Minibatch (``batch_size=B``): every epoch draws a fresh permutation from
  ``jax.random.fold_in(key, epoch)`` (``epoch`` counted from 1, absolute across resumes)
  and takes ``N // B`` steps of ``B`` examples. If ``B`` does not divide ``N``, the
  ``N % B`` leftover examples form one smaller final step, so every example is used
  exactly once per epoch; ``drop_remainder=True`` skips that step instead.
* ``Trajectory.losses[e-1]`` is the training loss of epoch ``e``: for full batch the mean
  loss at ``theta^(e-1)`` (where the epoch's gradient is taken), for minibatches the mean
  of the step losses.
* ``Trajectory.epoch_gradients[e-1]`` is the sum of the gradients of epoch ``e``'s steps
  (for full batch, the one gradient), the quantity the paper's gradient analysis uses.
  For plain SGD it is derivable from kept snapshots, :func:`epoch_gradients`.

Memory (defaults): a :class:`Trajectory` keeps two parameter snapshots (the start and the
end) and no epoch gradients, so a run holds the model, the optimizer state, one gradient
and those two snapshots whatever ``num_epochs`` is. ``keep_epochs="all"`` keeps
``num_epochs + 1`` snapshots and ``record_gradients=True`` adds ``num_epochs`` gradients
(the paper's per-epoch analyses need both; :mod:`taskvec_jax.analysis` says which).

Compilation: the program is cached on STRUCTURE -- the code of ``loss_fn`` and of the
optimizer's ``update``, what their closures hold (recursively), shapes and configuration --
and the numbers they capture (Python floats, arrays) are arguments of the program. A sweep
``for lr in lrs: finetune(loss_fn, p, data, optax.adam(lr), E)`` with a new optimizer
object each time, or over new ``loss_fn`` closures differing only in captured numbers,
compiles once; ``jax.vmap`` over the learning rate works too. A function that branches in
Python on a captured number is compiled per value instead (automatic fallback). The number
of traces does not grow with the number of epochs.

Divergence: by default a run whose loss or parameters become non-finite raises
``FloatingPointError`` naming the first such epoch (and task) and the last finite loss
(``check_finite=False`` returns the raw trajectory).

Optimizers: any object with ``init(params)`` and ``update(updates, state, params)`` (optax
``GradientTransformation``, ``GradientTransformationExtraArgs``, ``optax.MultiSteps``).
Optimizers that take ``value``, ``grad`` and ``value_fn`` (``optax.lbfgs``) get them: the
loss at the current parameters, its gradient, and the loss of the step's batch (the whole
dataset in full-batch mode) as a function of the parameters.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from taskvec_jax import _checks
from taskvec_jax import tree as tree_lib
from taskvec_jax.training import _engine, microbatch, sharded
from taskvec_jax.training._engine import Trajectory
from taskvec_jax.training.microbatch import mean_value_and_grad

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

STEP_PROGRESS_MIN_STEPS = _engine.STEP_PROGRESS_MIN_STEPS
"""With ``progress=True``, an epoch of at least this many minibatch steps gets a bar over
steps instead of epochs."""

__all__ = ["STEP_PROGRESS_MIN_STEPS", "Trajectory", "epoch_gradients", "finetune", "finetune_tasks",
           "mean_value_and_grad", "microbatch", "multitask_finetune", "sharded"]


def finetune(
    loss_fn: LossFn,
    params: PyTree,
    data: PyTree,
    optimizer: optax.GradientTransformation,
    num_epochs: int,
    *,
    batch_size: int | None = None,
    microbatch_size: int | None = None,
    key: jax.Array | None = None,
    drop_remainder: bool = False,
    keep_epochs: Sequence[int] | str | None = None,
    record_gradients: bool = False,
    opt_state: Any = None,
    start_epoch: int = 0,
    progress: bool | int | str = False,
    check_finite: bool = True,
    model_state: Any = None,
) -> Trajectory:
    """Finetunes ``params`` on ``data`` for ``num_epochs`` epochs of (S)GD; one compiled scan.

    Full batch (``batch_size=None``) performs ``theta^(e) = theta^(e-1) + u(grad L(theta^(e-1)))``
    with ``u`` the optimizer's update; with ``optax.sgd(eta)`` this is
    ``theta^(e) = theta^(e-1) - eta * grad L(theta^(e-1))``, the paper's setting.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the MEAN loss over the batch.
      params: the starting parameters (any pytree of float arrays).
      data: pytree of arrays, leading axis = examples.
      optimizer: any optax ``GradientTransformation``.
      num_epochs: number of epochs (>= 1).
      batch_size: ``None`` for full-batch GD (one step per epoch), else the minibatch size.
      microbatch_size: compute each gradient in chunks of this many examples (memory only:
        the gradient is the same).
      key: PRNG key for shuffling (required with ``batch_size``). Epoch ``e`` uses
        ``jax.random.fold_in(key, e)``.
      drop_remainder: in minibatch mode, skip the ``N % B`` leftover examples each epoch.
      keep_epochs: which epochs (0..num_epochs, relative to this call) to keep in
        ``Trajectory.params``: ``None`` (default) keeps the start and the end, ``"all"``
        every epoch, a sequence those epochs. The last epoch is always kept. Memory:
        one model copy per kept epoch (default 2; ``"all"``: ``num_epochs + 1``).
      record_gradients: store every epoch's summed gradient in
        ``Trajectory.epoch_gradients`` (``num_epochs`` model copies; default ``False``).
        For full-batch ``optax.sgd(eta)`` it is derivable from kept snapshots:
        ``g_e = (theta^(e-1) - theta^(e)) / eta``.
      opt_state: resume from this optimizer state (default: ``optimizer.init(params)``).
      start_epoch: absolute index of the epoch ``params`` comes from, when resuming; it
        offsets shuffling keys and ``Trajectory.epochs`` so that a resumed run equals the
        uninterrupted one bit for bit.
      progress: a tqdm progress bar with the loss in it, advanced by callbacks from
        inside the compiled program: ``True`` over epochs, or over minibatch steps when
        an epoch has at least :data:`STEP_PROGRESS_MIN_STEPS` steps; ``"steps"`` over
        steps (with the epoch; at most ~100 reports per epoch), ``"epochs"`` over epochs,
        an int ``k`` every ``k`` epochs. ``False`` (the default) compiles no callback at
        all.
      check_finite: after the run, raise ``FloatingPointError`` naming the first epoch
        whose loss or parameters are not finite (and the last finite loss). Cost: one
        ``isfinite`` reduction over the parameters per epoch inside the program and one
        ``[num_epochs]`` bool read after it; ``False`` removes both and returns the raw
        (possibly NaN) trajectory.
      model_state: non-trainable model state (flax linen ``variables["batch_stats"]``, an
        nnx ``BatchStat`` state). When given, ``loss_fn(params, batch, state) -> (loss,
        new_state)``: the state is carried through the run (updated once per optimizer
        step, by that step's batch), never differentiated and never in ``params``.
        ``Trajectory.model_state`` holds it at every kept epoch, like ``params`` (one
        state copy per kept epoch); ``Trajectory.final_model_state`` is the last. With
        ``microbatch_size`` the state is threaded through the chunks in order (one
        update per chunk, the leftover chunk last) and each chunk's loss and gradient are
        taken at the state the previous chunks left: for BatchNorm in training mode, the
        gradient is that of "ghost" batch normalization over chunks, not the unsplit
        one (docs/training.md).

    Returns:
      A :class:`Trajectory`.

    Raises:
      ValueError: for non-float params, empty or inconsistent data, non-positive epochs or
        sizes, ``batch_size > N``, a missing key in minibatch mode, or a non-scalar loss.
      FloatingPointError: with ``check_finite``, when the run diverged (see above).
    """
    _checks.float_dtype(params, why="finetuning differentiates every leaf")
    n = _checks.num_examples(data)
    cfg, consts = _engine.make_config(
        loss_fn, optimizer, num_epochs, batch_size=batch_size,
        microbatch_size=microbatch_size, drop_remainder=drop_remainder,
        keep_epochs=keep_epochs, record_gradients=record_gradients, progress=progress,
        key=key, sizes=[n], names=["data"], check_finite=check_finite,
        stateful=model_state is not None)
    _engine.check_inputs(loss_fn, params, [data], cfg, ["data"], model_state)
    if opt_state is None:
        opt_state = optimizer.init(params)
    start = jnp.asarray(start_epoch)
    buffer, losses, grads, opt_state, finite, state = _dispatch(
        lambda c, k: _engine.run_jit(params, opt_state, (data,), None, key, start, k, c,
                                     model_state),
        cfg, consts, "finetune")
    _engine.check_finite(finite, losses, start_epoch, ["data"])
    return Trajectory(buffer, _engine.kept_epochs(keep_epochs, num_epochs, start_epoch),
                      losses, grads, opt_state, state)


def _dispatch(call, cfg, consts, labels):
    """Runs ``call(cfg, consts)`` (with the captured-number fallback) under the run's
    progress bars (one per label), if it has them."""
    with _engine.progress_bar(cfg, labels):
        return _engine.execute(call, cfg, consts)


def finetune_tasks(
    loss_fn: LossFn,
    params: PyTree,
    task_datasets: Sequence[PyTree],
    optimizer: optax.GradientTransformation,
    num_epochs: int,
    *,
    batch_size: int | None = None,
    microbatch_size: int | None = None,
    key: jax.Array | None = None,
    drop_remainder: bool = False,
    keep_epochs: Sequence[int] | str | None = None,
    record_gradients: bool = False,
    opt_state: Any = None,
    start_epoch: int = 0,
    progress: bool | int | str = False,
    check_finite: bool = True,
    model_state: Any = None,
    mesh: Any = None,
) -> list[Trajectory]:
    """Finetunes the same ``params`` separately on each task; one trajectory per task.

    Tasks whose data have the same tree structure, shapes and dtypes run together as one
    ``vmap``-ed compiled program; the others run one by one. Task ``t`` shuffles with
    ``jax.random.fold_in(key, t)``, so the result equals
    ``finetune(..., task_datasets[t], ..., key=jax.random.fold_in(key, t))``.
    Memory: a group of ``G`` vmapped tasks holds ``G`` copies of everything one run holds
    (and one stacked copy of the group's data).

    Args:
      loss_fn, params, optimizer, num_epochs: as in :func:`finetune`.
      task_datasets: a sequence of datasets, one per task.
      batch_size, microbatch_size, key, drop_remainder, keep_epochs, record_gradients,
        opt_state, start_epoch, progress, check_finite: as in :func:`finetune` (``key`` is
        folded with the task index; a diverged task is named in the error;
        ``progress`` shows one bar per task, labelled ``task t``, also in a vmapped group).
      model_state: as in :func:`finetune`; every task starts from it and its trajectory
        holds its own states (one state per task; not with ``mesh``, which has no one
        order of state updates).
      mesh: a ``(tasks, data)`` mesh from :func:`taskvec_jax.training.sharded.make_mesh`:
        tasks are spread over ``tasks`` (padded to a multiple of its size) and each
        full-batch gradient is split over ``data``. All tasks must then share data shapes.

    Returns:
      A list of :class:`Trajectory`, in task order.
    """
    options = dict(batch_size=batch_size, microbatch_size=microbatch_size, key=key,
                   drop_remainder=drop_remainder, keep_epochs=keep_epochs,
                   record_gradients=record_gradients, opt_state=opt_state,
                   start_epoch=start_epoch, progress=progress, check_finite=check_finite)
    if mesh is not None:
        if model_state is not None:
            raise ValueError(_engine.MESH_STATE_ERROR)
        return sharded.finetune_tasks_sharded(loss_fn, params, task_datasets, optimizer,
                                              num_epochs, mesh, **options)
    datasets = _checks.task_datasets(task_datasets)
    _checks.float_dtype(params, why="finetuning differentiates every leaf")
    names = [f"task {t}" for t in range(len(datasets))]
    sizes = [_checks.num_examples(d, name=name) for d, name in zip(datasets, names)]
    cfg, consts = _engine.make_config(
        loss_fn, optimizer, num_epochs, batch_size=batch_size,
        microbatch_size=microbatch_size, drop_remainder=drop_remainder,
        keep_epochs=keep_epochs, record_gradients=record_gradients, progress=progress,
        key=key, sizes=sizes, names=names, check_finite=check_finite,
        stateful=model_state is not None)
    groups = sharded.group_by_signature(datasets)
    # same shapes, same loss shape: check one task per group
    _engine.check_inputs(loss_fn, params, [datasets[g[0]] for g in groups], cfg,
                         [names[g[0]] for g in groups], model_state)
    if opt_state is None:
        opt_state = optimizer.init(params)
    epochs = _engine.kept_epochs(keep_epochs, num_epochs, start_epoch)
    start = jnp.asarray(start_epoch)
    out: list[Trajectory | None] = [None] * len(datasets)
    flags: list = [None] * len(datasets)
    for members in groups:
        keys = None if key is None else jnp.stack(
            [jax.random.fold_in(key, t) for t in members])
        if len(members) == 1:
            t = members[0]
            k0 = None if keys is None else keys[0]
            res = _dispatch(
                lambda c, k, t=t, k0=k0: _engine.run_jit(
                    params, opt_state, (datasets[t],), None, k0, start, k, c, model_state),
                cfg, consts, names[t])
            out[t] = Trajectory(res[0], epochs, res[1], res[2], res[3], res[5])
            flags[t] = res[4]
            continue
        stacked = tree_lib.stack([datasets[t] for t in members])
        res = _dispatch(
            lambda c, k, stacked=stacked, keys=keys: _engine.run_many(
                params, opt_state, (stacked,), None, keys, start, k, c, model_state),
            cfg, consts, [names[t] for t in members])  # one bar per task
        for t, (buffer, losses, grads, state, finite, mstate) in zip(
                members, _engine.split_leading(res, len(members))):
            out[t] = Trajectory(buffer, epochs, losses, grads, state, mstate)
            flags[t] = finite
    for t, traj in enumerate(out):  # in task order: the first diverged task is named
        _engine.check_finite(flags[t], traj.losses, start_epoch, [names[t]])
    return out  # type: ignore[return-value]


def multitask_finetune(
    loss_fn: LossFn,
    params: PyTree,
    task_datasets: Sequence[PyTree],
    optimizer: optax.GradientTransformation,
    num_epochs: int,
    *,
    weights: Sequence[float] | jax.Array | None = None,
    batch_size: int | None = None,
    microbatch_size: int | None = None,
    key: jax.Array | None = None,
    drop_remainder: bool = False,
    keep_epochs: Sequence[int] | str | None = None,
    record_gradients: bool = False,
    opt_state: Any = None,
    start_epoch: int = 0,
    progress: bool | int | str = False,
    check_finite: bool = True,
    model_state: Any = None,
    mesh: Any = None,
) -> Trajectory:
    """Gradient descent on the multitask loss ``L_MT = sum_t w_t L_t`` (``w_t = 1`` default).

    Each ``L_t`` is the mean loss over task ``t``'s own data, so tasks of different sizes
    count equally. Full batch: one optimizer step per epoch on ``grad L_MT``. Minibatch:
    each step takes ``batch_size`` examples from every task (``max_t N_t // B`` steps per
    epoch; smaller tasks cycle through their own permutation).

    The paper's Theorem 1 compares task arithmetic with coefficient ``alpha`` and step
    ``eta`` to this run with ``optax.sgd(alpha * eta)``.

    Args:
      loss_fn, params, optimizer, num_epochs: as in :func:`finetune`.
      task_datasets: a sequence of datasets, one per task (shapes may differ).
      weights: optional per-task weights ``w_t``.
      batch_size, microbatch_size, key, drop_remainder, keep_epochs, record_gradients,
        opt_state, start_epoch, progress, check_finite: as in :func:`finetune`.
      model_state: as in :func:`finetune`, ONE state shared by the tasks (the model is
        one model): every step threads it through the tasks in order, task 0's batch
        first (each task's loss and gradient are taken at the state the tasks before it
        left), which is what a Python loop calling the model on each task's batch does.
        Not with ``mesh`` (its tasks run side by side).
      mesh: a ``(tasks, data)`` mesh (full batch only): each device computes its tasks'
        gradients on its share of the examples, and ``psum`` assembles ``grad L_MT``.

    Returns:
      A :class:`Trajectory`.
    """
    if mesh is not None:
        if model_state is not None:
            raise ValueError(_engine.MESH_STATE_ERROR)
        # Sharded multitask is full batch (multitask_stacked rejects batch_size), which
        # never shuffles: `key` has nothing to do there.
        return sharded.multitask_sharded(
            loss_fn, params, task_datasets, optimizer, num_epochs, mesh, weights=weights,
            batch_size=batch_size, microbatch_size=microbatch_size,
            drop_remainder=drop_remainder, keep_epochs=keep_epochs,
            record_gradients=record_gradients, opt_state=opt_state,
            start_epoch=start_epoch, progress=progress, check_finite=check_finite)
    datasets = _checks.task_datasets(task_datasets)
    _checks.float_dtype(params, why="finetuning differentiates every leaf")
    names = [f"task {t}" for t in range(len(datasets))]
    sizes = [_checks.num_examples(d, name=name) for d, name in zip(datasets, names)]
    if weights is not None:
        weights = jnp.asarray(weights)
        if weights.shape != (len(datasets),):
            raise ValueError(f"weights must have one entry per task ({len(datasets)}),"
                             f" got shape {weights.shape}")
    cfg, consts = _engine.make_config(
        loss_fn, optimizer, num_epochs, batch_size=batch_size,
        microbatch_size=microbatch_size, drop_remainder=drop_remainder,
        keep_epochs=keep_epochs, record_gradients=record_gradients, progress=progress,
        key=key, sizes=sizes, names=names, check_finite=check_finite,
        stateful=model_state is not None)
    _engine.check_inputs(loss_fn, params, datasets, cfg, names, model_state)
    if opt_state is None:
        opt_state = optimizer.init(params)
    start = jnp.asarray(start_epoch)
    buffer, losses, grads, opt_state, finite, state = _dispatch(
        lambda c, k: _engine.run_jit(params, opt_state, datasets, weights, key, start, k, c,
                                     model_state),
        cfg, consts, "multitask")
    _engine.check_finite(finite, losses, start_epoch, ["multitask"])
    return Trajectory(buffer, _engine.kept_epochs(keep_epochs, num_epochs, start_epoch),
                      losses, grads, opt_state, state)


def _sgd_learning_rate(optimizer, params: PyTree, opt_state: Any) -> tuple[float | None, str]:
    """``(eta, "")`` if ``optimizer`` acts as plain SGD, ``u = -eta g``, else ``(None, why)``.
    ``opt_state`` is the run's final optimizer state (it too must be empty).

    Plain SGD has no state and maps every gradient to ``-eta`` times itself, whatever the
    gradient's scale and the parameters: probed with a random gradient at two scales
    (1 and 1e4: a clip would show) and at two parameter points (weight decay would show).
    """
    state = optimizer.init(params)
    if jax.tree.leaves(opt_state) or jax.tree.leaves(state):
        return None, ("its state is not empty (momentum, a schedule's step count, "
                      "adaptive moments, MultiSteps' accumulator)")
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(0)
    probe = [np.asarray(rng.normal(size=np.shape(x)) + 0.5, jnp.result_type(x))
             for x in leaves]
    eta = None
    for scale, shift in ((1.0, 0.0), (1e4, 1.0)):
        g = jax.tree.unflatten(treedef, [jnp.asarray(scale * x, x.dtype) for x in probe])
        p = jax.tree.map(lambda x: x + shift, params)
        try:
            u, _ = optimizer.update(g, state, p)
        except (TypeError, ValueError) as e:  # needs value= / value_fn= (lbfgs)
            return None, f"update(grad, state, params) fails: {type(e).__name__}: {e}"
        for gl, ul in zip(jax.tree.leaves(g), jax.tree.leaves(u)):
            gl, ul = np.asarray(gl, np.float64), np.asarray(ul, np.float64)
            if eta is None:
                eta = float(-ul.reshape(-1)[0] / gl.reshape(-1)[0])
            tol = 16 * float(jnp.finfo(jnp.result_type(leaves[0])).eps)
            if not (eta > 0 and np.allclose(ul, -eta * gl, rtol=tol, atol=0)):
                return None, ("its update is not -learning_rate * gradient for every "
                              "gradient and parameters (clipping, weight decay, a "
                              "normalization or a sign)")
    return eta, ""


def epoch_gradients(trajectory: Trajectory, optimizer: optax.GradientTransformation
                    ) -> PyTree:
    """The epoch gradients of a plain-SGD run, derived from its kept parameters.

    Plain SGD (``optax.sgd(eta)``: no momentum, no schedule, nothing chained) steps
    ``theta <- theta - eta * g``, so an epoch moves the parameters by ``-eta`` times the
    sum of its step gradients and

        ``g_e = (theta^(e-1) - theta^(e)) / eta``,

    which is ``Trajectory.epoch_gradients[e-1]`` of the same run with
    ``record_gradients=True`` (full batch: the epoch's one gradient; minibatch or
    microbatch: the sum of the step gradients), up to the rounding of the parameter
    updates (about ``eps * |theta| / eta`` per entry; in float64 below 1e-12 for
    ``|theta| / eta`` up to ~1e3). The paper's gradient analyses can thus run on a
    ``keep_epochs="all"`` trajectory without the ``num_epochs`` gradient copies of
    ``record_gradients=True``.

    Args:
      trajectory: a single run's :class:`Trajectory` (not a task-stacked one from
        :func:`taskvec_jax.training.sharded.finetune_stacked`) whose kept epochs are
        consecutive, e.g. from ``keep_epochs="all"``.
      optimizer: the optimizer the run used; it is checked to act as plain SGD (no
        state; ``update(g) = -eta * g`` for probe gradients at two scales and two
        parameter points), and ``eta`` is read from it.

    Returns:
      A tree like the parameters whose leaves have a leading axis of
      ``len(trajectory.epochs) - 1``: entry ``i`` is the gradient of epoch
      ``trajectory.epochs[i + 1]``.

    Raises:
      ValueError: if the kept epochs are fewer than two or not consecutive, or if the
        optimizer is not plain SGD (the message says why), pointing to
        ``record_gradients=True``.
    """
    epochs = np.asarray(trajectory.epochs)
    if epochs.size < 2 or not np.all(np.diff(epochs) == 1):
        raise ValueError(
            "epoch_gradients needs consecutive kept epochs (finetune with "
            f"keep_epochs='all'); this trajectory kept epochs {epochs.tolist()}. Or "
            "finetune with record_gradients=True")
    first = trajectory.at(int(epochs[0]))
    eta, why = _sgd_learning_rate(optimizer, first, trajectory.opt_state)
    if eta is None:
        raise ValueError(
            "epoch_gradients derives gradients from parameter differences, which is exact "
            "only for plain SGD (optax.sgd(learning_rate) with momentum=None and a "
            f"constant learning rate): this optimizer is not, {why}. Finetune with "
            "record_gradients=True to record the epoch gradients instead")
    return jax.tree.map(lambda x: (x[:-1] - x[1:]) / jnp.asarray(eta, x.dtype),
                        trajectory.params)
