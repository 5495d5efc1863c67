"""Finetuning as scanned gradient descent over any parameter pytree.

The paper's objects are trajectories of (full-batch) gradient descent:
``theta^(e+1) = theta^(e) - eta * grad L(theta^(e))``, and the task vector after ``k``
epochs is ``tau^(k) = theta^(k) - theta^(0)``. This module runs such trajectories as one
compiled program: an outer ``lax.scan`` over epochs, an inner ``lax.scan`` over steps (or
over microbatches of the full batch), for any ``loss_fn(params, batch) -> scalar mean loss``
and any optax ``GradientTransformation``.

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

Compilation: the program is cached on (``loss_fn``, ``optimizer``, shapes, configuration),
so calling again with the same objects and shapes does not retrace, and the number of
traces does not grow with the number of epochs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from taskvec_jax import tree as tree_lib

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]


class Trajectory(NamedTuple):
    """The result of a finetuning run.

    Attributes:
      params: parameter snapshots; every leaf has a leading axis of length
        ``len(epochs)``; ``params[i]`` is the model after epoch ``epochs[i]``
        (epoch 0 = the starting point).
      epochs: int numpy array of the absolute epoch index of each snapshot.
      losses: ``[num_epochs]`` training loss of each epoch (see module docstring).
      epoch_gradients: every leaf ``[num_epochs, ...]``, the sum of each epoch's step
        gradients; ``None`` when ``record_gradients=False``.
      opt_state: the optimizer state after the last epoch (resume from it).
    """

    params: PyTree
    epochs: np.ndarray
    losses: jax.Array
    epoch_gradients: PyTree | None
    opt_state: Any

    @property
    def final_params(self) -> PyTree:
        """The parameters after the last epoch (always kept)."""
        return jax.tree.map(lambda x: x[-1], self.params)

    def at(self, epoch: int) -> PyTree:
        """The parameters after absolute epoch ``epoch`` (must be a kept epoch)."""
        matches = np.nonzero(np.asarray(self.epochs) == epoch)[0]
        if matches.size == 0:
            raise ValueError(f"epoch {epoch} was not kept; kept epochs are "
                             f"{np.asarray(self.epochs).tolist()}")
        i = int(matches[0])
        return jax.tree.map(lambda x: x[i], self.params)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about a run; hashable, so it keys the compilation cache."""

    loss_fn: LossFn
    optimizer: optax.GradientTransformation
    num_epochs: int
    batch_size: int | None
    microbatch_size: int | None
    drop_remainder: bool
    slots: tuple[int, ...]          # slot written after relative epoch e (index e-1)
    num_slots: int
    keep_start: bool                # relative epoch 0 is kept (in slot 0)
    record_gradients: bool
    progress: int                   # print every `progress` epochs; 0 = off
    # Set only inside taskvec_jax.parallel's shard_map: the mesh axis over which each
    # full-batch gradient is split (datasets are then (body, tail) pairs, see
    # `_dataset_value_and_grad`), and the axis over which a multitask loss is summed.
    data_axis: str | None = None
    multitask_axis: str | None = None


# --------------------------------------------------------------------------- validation

def num_examples(data: PyTree, *, name: str = "data") -> int:
    """Returns ``N``, the common leading-axis size of ``data``'s leaves.

    Raises:
      ValueError: if ``data`` has no leaves, a scalar leaf, zero examples, or leaves that
        disagree on ``N`` (naming both leaf paths).
    """
    leaves = tree_lib.leaves_with_paths(data)
    if not leaves:
        raise ValueError(f"{name} is empty: it has no array leaves")
    first_path, first = leaves[0]
    for path, leaf in leaves:
        if jnp.ndim(leaf) == 0:
            raise ValueError(f"{name}: leaf '{path}' is a scalar; every leaf needs a "
                             "leading example axis")
        if jnp.shape(leaf)[0] != jnp.shape(first)[0]:
            raise ValueError(f"{name}: leaf '{path}' has {jnp.shape(leaf)[0]} examples, "
                             f"leaf '{first_path}' has {jnp.shape(first)[0]}")
    n = int(jnp.shape(first)[0])
    if n == 0:
        raise ValueError(f"{name} is empty: leaf '{first_path}' has 0 examples")
    return n


def _check_params(params: PyTree) -> None:
    leaves = tree_lib.leaves_with_paths(params)
    if not leaves:
        raise ValueError("params is empty: it has no array leaves")
    for path, leaf in leaves:
        if not tree_lib.is_float(leaf):
            raise ValueError(
                f"params: leaf '{path}' has dtype {jnp.result_type(leaf)}; finetuning "
                "differentiates every leaf, so all must be floating point (keep "
                "non-trainable state in the batch or a closure)")


def _check_positive_int(value: Any, name: str, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_loss_fn(loss_fn: LossFn, params: PyTree, data: PyTree, size: int,
                   name: str) -> None:
    sample = jax.tree.map(lambda x: jax.ShapeDtypeStruct((size,) + x.shape[1:], x.dtype),
                          data)
    out = jax.eval_shape(loss_fn, params, sample)
    if not hasattr(out, "shape") or out.shape != ():
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(f"loss_fn must return a scalar mean loss; on {name} it returned "
                         f"shape {shape}")


def _keep_plan(keep_epochs: Sequence[int] | None, num_epochs: int):
    """Maps each relative epoch 1..E to a snapshot slot; the last epoch is always kept.

    An epoch that is not kept writes into the slot of the next kept epoch, which that
    epoch overwrites later, so the buffer holds exactly the kept snapshots and no
    slicing copy is needed at the end.
    """
    if keep_epochs is None:
        kept = list(range(num_epochs + 1))
    else:
        kept = sorted({int(e) for e in keep_epochs} | {num_epochs})
        bad = [e for e in kept if e < 0 or e > num_epochs]
        if bad:
            raise ValueError(f"keep_epochs must lie in [0, num_epochs={num_epochs}], "
                             f"got {bad}")
    keep_start = kept[0] == 0
    slots = []
    j = 1 if keep_start else 0
    for e in range(1, num_epochs + 1):
        slots.append(j)
        if e in kept:
            j += 1
    return tuple(kept), tuple(slots), len(kept), keep_start


# --------------------------------------------------------------------------- gradients

def mean_value_and_grad(loss_fn: LossFn, params: PyTree, data: PyTree,
                        microbatch_size: int | None = None) -> tuple[jax.Array, PyTree]:
    """Mean loss over all of ``data`` and its gradient, optionally in microbatches.

    With ``microbatch_size=m`` the ``N // m`` full chunks are scanned and the ``N % m``
    leftover examples form one more chunk; chunk ``c`` of size ``n_c`` contributes
    ``(n_c / N) * grad mean_c``, which sums to the gradient of the mean over all ``N``.
    Peak memory is that of one chunk's backward pass plus one gradient accumulator.
    """
    n = num_examples(data)
    vg = jax.value_and_grad(loss_fn)
    if microbatch_size is None or microbatch_size >= n:
        return vg(params, data)
    m = microbatch_size
    full = n // m
    rest = n - full * m
    chunks = jax.tree.map(lambda x: x[:full * m].reshape((full, m) + x.shape[1:]), data)

    def body(acc, chunk):
        loss, grad = vg(params, chunk)
        return (acc[0] + loss, tree_lib.add(acc[1], grad)), None

    loss0 = jnp.zeros((), jax.eval_shape(loss_fn, params,
                                         jax.tree.map(lambda x: x[0], chunks)).dtype)
    (loss_sum, grad_sum), _ = jax.lax.scan(body, (loss0, tree_lib.zeros_like(params)),
                                           chunks)
    loss = loss_sum * (m / n)
    grad = tree_lib.scale(m / n, grad_sum)
    if rest:
        tail = jax.tree.map(lambda x: x[full * m:], data)
        tail_loss, tail_grad = vg(params, tail)
        loss = loss + tail_loss * (rest / n)
        grad = tree_lib.add_scale(grad, rest / n, tail_grad)
    return loss, grad


def _weighted(values: Sequence[Any], weights: jax.Array | None):
    """``sum_t w_t * values[t]`` for scalars or trees; ``w_t = 1`` when weights is None."""
    out = None
    for t, v in enumerate(values):
        term = v if weights is None else jax.tree.map(lambda x: weights[t] * x, v)
        out = term if out is None else jax.tree.map(jnp.add, out, term)
    return out


# --------------------------------------------------------------------------- epochs

def _optimizer_step(cfg: _Config, params, opt_state, grad):
    updates, opt_state = cfg.optimizer.update(grad, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def _dataset_value_and_grad(cfg: _Config, params, data):
    """Mean loss and gradient over one dataset, split across ``cfg.data_axis`` if set.

    Data-parallel form: ``data = (body, tail)`` where each device holds ``m`` rows of the
    body and every device holds the same ``r`` tail rows (``N = m * D + r``). Then
    ``grad = psum((m / N) * grad mean_body) + (r / N) * grad mean_tail``, which equals the
    gradient of the mean over all ``N`` examples for any ``N``.
    """
    if cfg.data_axis is None:
        return mean_value_and_grad(cfg.loss_fn, params, data, cfg.microbatch_size)
    body, tail = data
    m = jax.tree.leaves(body)[0].shape[0]
    r = jax.tree.leaves(tail)[0].shape[0]
    n = m * jax.lax.axis_size(cfg.data_axis) + r
    parts = []
    if m:
        loss, grad = mean_value_and_grad(cfg.loss_fn, params, body, cfg.microbatch_size)
        parts.append(jax.lax.psum((loss * (m / n), tree_lib.scale(m / n, grad)),
                                  cfg.data_axis))
    if r:
        loss, grad = mean_value_and_grad(cfg.loss_fn, params, tail, cfg.microbatch_size)
        parts.append((loss * (r / n), tree_lib.scale(r / n, grad)))
    return jax.tree.map(jnp.add, *parts) if len(parts) == 2 else parts[0]


def _full_batch_epoch(cfg: _Config, params, opt_state, datasets, weights, epoch_key):
    del epoch_key  # full-batch GD is deterministic
    if cfg.multitask_axis is None:
        results = [_dataset_value_and_grad(cfg, params, d) for d in datasets]
        loss = _weighted([r[0] for r in results], weights)
        grad = _weighted([r[1] for r in results], weights)
    else:
        # Sharded multitask: this device's tasks are stacked along axis 0 of datasets[0]
        # and weighted by the local slice of `weights` (0 for padding tasks).
        losses, grads = jax.vmap(lambda d: _dataset_value_and_grad(cfg, params, d))(
            datasets[0])
        loss, grad = jax.lax.psum(
            (jnp.tensordot(weights, losses, 1),
             jax.tree.map(lambda g: jnp.tensordot(weights, g, 1), grads)),
            cfg.multitask_axis)
    params, opt_state = _optimizer_step(cfg, params, opt_state, grad)
    return params, opt_state, loss, grad


def _minibatch_epoch(cfg: _Config, params, opt_state, datasets, weights, epoch_key):
    """One epoch of minibatch steps over one or several datasets.

    With several datasets (multitask), every step takes ``B`` examples from each task;
    the epoch has ``max_t N_t // B`` steps and a smaller task continues cyclically
    through its own permutation (``index mod N_t``), so the largest task sees each of its
    examples at most once per epoch and the others are revisited.
    """
    b = cfg.batch_size
    sizes = [num_examples(d) for d in datasets]
    steps = max(n // b for n in sizes)
    perms = [jax.random.permutation(jax.random.fold_in(epoch_key, t), n)
             for t, n in enumerate(sizes)]
    idx = tuple(p[jnp.arange(steps * b) % n].reshape(steps, b)
                for p, n in zip(perms, sizes))

    def step_loss(p, batches):
        return _weighted([cfg.loss_fn(p, bt) for bt in batches], weights)

    def step(carry, step_idx):
        params, opt_state, grad_sum, loss_sum = carry
        batches = [jax.tree.map(lambda x: jnp.take(x, i, axis=0), d)
                   for d, i in zip(datasets, step_idx)]
        if cfg.microbatch_size is None:
            loss, grad = jax.value_and_grad(step_loss)(params, batches)
        else:
            results = [mean_value_and_grad(cfg.loss_fn, params, bt, cfg.microbatch_size)
                       for bt in batches]
            loss = _weighted([r[0] for r in results], weights)
            grad = _weighted([r[1] for r in results], weights)
        params, opt_state = _optimizer_step(cfg, params, opt_state, grad)
        return (params, opt_state, tree_lib.add(grad_sum, grad), loss_sum + loss), None

    loss_dtype = jax.eval_shape(
        step_loss, params,
        [jax.tree.map(lambda x: x[:b], d) for d in datasets]).dtype
    carry = (params, opt_state, tree_lib.zeros_like(params), jnp.zeros((), loss_dtype))
    carry, _ = jax.lax.scan(step, carry, idx)
    num_steps = steps
    rest = sizes[0] - steps * b
    if len(datasets) == 1 and rest and not cfg.drop_remainder:
        carry, _ = step(carry, (perms[0][steps * b:],))
        num_steps += 1
    params, opt_state, grad_sum, loss_sum = carry
    return params, opt_state, loss_sum / num_steps, grad_sum


def _print_progress(epoch, last_epoch, loss, *, every: int):
    if int(epoch) % every and int(epoch) != int(last_epoch):
        return
    loss = np.asarray(loss)
    shown = f"{float(loss):.6g}" if loss.ndim == 0 else np.array2string(
        loss, precision=5, max_line_width=120)
    print(f"epoch {int(epoch)}/{int(last_epoch)}  loss {shown}", flush=True)


def _run(params, opt_state, datasets, weights, key, start_epoch, cfg: _Config):
    """The whole run: an outer scan over epochs writing snapshots into a buffer."""
    epoch_fn = _full_batch_epoch if cfg.batch_size is None else _minibatch_epoch
    buffer = jax.tree.map(lambda x: jnp.broadcast_to(x, (cfg.num_slots,) + x.shape)
                          .astype(x.dtype), params)
    last_epoch = start_epoch + cfg.num_epochs

    def body(carry, xs):
        params, opt_state, buffer = carry
        rel_epoch, slot = xs
        epoch = start_epoch + rel_epoch
        epoch_key = None if key is None else jax.random.fold_in(key, epoch)
        params, opt_state, loss, grad = epoch_fn(cfg, params, opt_state, datasets,
                                                 weights, epoch_key)
        if cfg.progress:
            jax.debug.callback(functools.partial(_print_progress, every=cfg.progress),
                               epoch, last_epoch, loss)
        buffer = jax.tree.map(lambda b, p: jax.lax.dynamic_update_index_in_dim(
            b, p, slot, 0), buffer, params)
        ys = (loss, grad if cfg.record_gradients else None)
        return (params, opt_state, buffer), ys

    xs = (jnp.arange(1, cfg.num_epochs + 1), jnp.asarray(cfg.slots, jnp.int32))
    (_, opt_state, buffer), (losses, grads) = jax.lax.scan(
        body, (params, opt_state, buffer), xs)
    return buffer, losses, grads, opt_state


_run_jit = jax.jit(_run, static_argnames=("cfg",))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _run_many(params, opt_state, datasets, weights, keys, start_epoch, cfg):
    """``_run`` vmapped over tasks that share data shapes (one compiled program)."""
    return jax.vmap(lambda d, k: _run(params, opt_state, d, weights, k, start_epoch, cfg),
                    in_axes=(0, None if keys is None else 0))(datasets, keys)


# --------------------------------------------------------------------------- public API

def _make_config(loss_fn, optimizer, num_epochs, batch_size, microbatch_size,
                 drop_remainder, keep_epochs, record_gradients, progress, key,
                 sizes: Sequence[int], names: Sequence[str]):
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if not isinstance(optimizer, optax.GradientTransformation):
        raise ValueError("optimizer must be an optax.GradientTransformation, got "
                         f"{type(optimizer).__name__}")
    _check_positive_int(num_epochs, "num_epochs")
    _check_positive_int(batch_size, "batch_size", allow_none=True)
    _check_positive_int(microbatch_size, "microbatch_size", allow_none=True)
    if batch_size is not None:
        for n, name in zip(sizes, names):
            if batch_size > n:
                raise ValueError(f"batch_size {batch_size} exceeds the {n} examples of "
                                 f"{name}")
        if key is None:
            raise ValueError(f"batch_size={batch_size} shuffles the data every epoch and "
                             "needs a PRNG key: pass key=jax.random.key(0)")
    _, slots, num_slots, keep_start = _keep_plan(keep_epochs, num_epochs)
    every = int(progress) if progress else 0
    return _Config(loss_fn=loss_fn, optimizer=optimizer, num_epochs=int(num_epochs),
                   batch_size=batch_size, microbatch_size=microbatch_size,
                   drop_remainder=bool(drop_remainder), slots=slots, num_slots=num_slots,
                   keep_start=keep_start, record_gradients=bool(record_gradients),
                   progress=every)


def _kept_epochs(keep_epochs, num_epochs, start_epoch) -> np.ndarray:
    kept, _, _, _ = _keep_plan(keep_epochs, num_epochs)
    return np.asarray(kept, dtype=np.int64) + int(start_epoch)


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
    keep_epochs: Sequence[int] | None = None,
    record_gradients: bool = True,
    opt_state: Any = None,
    start_epoch: int = 0,
    progress: bool | int = False,
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
        ``Trajectory.params``; ``None`` keeps all. The last epoch is always kept. Memory:
        ``len(keep_epochs)`` model copies.
      record_gradients: store every epoch's summed gradient (``num_epochs`` model copies).
      opt_state: resume from this optimizer state (default: ``optimizer.init(params)``).
      start_epoch: absolute index of the epoch ``params`` comes from, when resuming; it
        offsets shuffling keys and ``Trajectory.epochs`` so that a resumed run equals the
        uninterrupted one bit for bit.
      progress: print ``epoch, loss`` every ``progress`` epochs (``True`` = every epoch)
        from inside the compiled program; ``False`` adds nothing to it.

    Returns:
      A :class:`Trajectory`.

    Raises:
      ValueError: for non-float params, empty or inconsistent data, non-positive epochs or
        sizes, ``batch_size > N``, a missing key in minibatch mode, or a non-scalar loss.
    """
    _check_params(params)
    n = num_examples(data)
    cfg = _make_config(loss_fn, optimizer, num_epochs, batch_size, microbatch_size,
                       drop_remainder, keep_epochs, record_gradients, progress, key,
                       [n], ["data"])
    _check_loss_fn(loss_fn, params, data, min(n, batch_size or n), "data")
    if opt_state is None:
        opt_state = optimizer.init(params)
    buffer, losses, grads, opt_state = _run_jit(params, opt_state, (data,), None, key,
                                                jnp.asarray(start_epoch), cfg)
    return Trajectory(buffer, _kept_epochs(keep_epochs, num_epochs, start_epoch), losses,
                      grads, opt_state)


def check_task_datasets(task_datasets) -> tuple:
    """Validates a non-empty sequence of per-task datasets; returns it as a tuple.

    Raises:
      ValueError: for a non-sequence, an empty sequence, or a task whose data is empty or
        inconsistent (naming the task and leaf).
    """
    if isinstance(task_datasets, dict) or not isinstance(task_datasets, Sequence):
        raise ValueError("task_datasets must be a sequence of datasets (one per task), "
                         f"got {type(task_datasets).__name__}")
    if len(task_datasets) == 0:
        raise ValueError("task_datasets is empty: pass at least one task's data")
    for t, d in enumerate(task_datasets):
        num_examples(d, name=f"task {t}")
    return tuple(task_datasets)


def _signature(data: PyTree):
    leaves, treedef = jax.tree.flatten(data)
    return treedef, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves)


def finetune_tasks(
    loss_fn: LossFn,
    params: PyTree,
    task_datasets: Sequence[PyTree],
    optimizer: optax.GradientTransformation,
    num_epochs: int,
    *,
    key: jax.Array | None = None,
    mesh: Any = None,
    **kwargs,
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
      key: PRNG key for minibatch shuffling.
      mesh: a ``(tasks, data)`` mesh from :func:`taskvec_jax.parallel.make_mesh`: tasks
        are spread over ``tasks`` (padded to a multiple of its size) and each full-batch
        gradient is split over ``data``. All tasks must then share data shapes.
      **kwargs: any other keyword argument of :func:`finetune`.

    Returns:
      A list of :class:`Trajectory`, in task order.
    """
    if mesh is not None:
        from taskvec_jax import parallel
        check_task_datasets(task_datasets)
        stacked, t = parallel.stack_tasks(task_datasets, parallel._check_mesh(mesh)[0])
        traj = parallel.finetune_stacked(loss_fn, params, stacked, optimizer, num_epochs,
                                         mesh, key=key, **kwargs)
        return parallel.unstack_trajectory(traj, t)
    check_task_datasets(task_datasets)
    _check_params(params)
    sizes = [num_examples(d, name=f"task {t}") for t, d in enumerate(task_datasets)]
    names = [f"task {t}" for t in range(len(task_datasets))]
    start_epoch = kwargs.pop("start_epoch", 0)
    opt_state = kwargs.pop("opt_state", None)
    keep_epochs = kwargs.get("keep_epochs")
    cfg = _make_config(loss_fn, optimizer, num_epochs, kwargs.pop("batch_size", None),
                       kwargs.pop("microbatch_size", None),
                       kwargs.pop("drop_remainder", False), kwargs.pop("keep_epochs", None),
                       kwargs.pop("record_gradients", True), kwargs.pop("progress", False),
                       key, sizes, names)
    if kwargs:
        raise TypeError(f"finetune_tasks got unexpected arguments {sorted(kwargs)}")
    if opt_state is None:
        opt_state = optimizer.init(params)
    epochs = _kept_epochs(keep_epochs, num_epochs, start_epoch)
    start = jnp.asarray(start_epoch)

    groups: dict[Any, list[int]] = {}
    for t, d in enumerate(task_datasets):
        groups.setdefault(_signature(d), []).append(t)
    for members in groups.values():  # same shapes, same loss shape: check one per group
        t = members[0]
        _check_loss_fn(loss_fn, params, task_datasets[t],
                       min(sizes[t], cfg.batch_size or sizes[t]), f"task {t}")
    out: list[Trajectory | None] = [None] * len(task_datasets)
    for members in groups.values():
        keys = None if key is None else jnp.stack(
            [jax.random.fold_in(key, t) for t in members])
        if len(members) == 1:
            t = members[0]
            res = _run_jit(params, opt_state, (task_datasets[t],), None,
                           None if keys is None else keys[0], start, cfg)
            out[t] = Trajectory(res[0], epochs, res[1], res[2], res[3])
            continue
        stacked = tree_lib.stack([task_datasets[t] for t in members])
        res = _run_many(params, opt_state, (stacked,), None, keys, start, cfg)
        for t, (buffer, losses, grads, state) in zip(members, split_leading(res, len(members))):
            out[t] = Trajectory(buffer, epochs, losses, grads, state)
    return out  # type: ignore[return-value]


@functools.partial(jax.jit, static_argnums=1)
def split_leading(tree: PyTree, n: int) -> list[PyTree]:
    """``[tree[0], ..., tree[n-1]]`` along every leaf's leading axis, in ONE dispatch.

    Slicing a stacked result task by task eagerly costs one dispatch per leaf and task,
    which dominated ``finetune_tasks`` for small models (measured: 90% of the call).
    """
    return [jax.tree.map(lambda x: x[i], tree) for i in range(n)]


def multitask_finetune(
    loss_fn: LossFn,
    params: PyTree,
    task_datasets: Sequence[PyTree],
    optimizer: optax.GradientTransformation,
    num_epochs: int,
    *,
    weights: Sequence[float] | jax.Array | None = None,
    mesh: Any = None,
    **kwargs,
) -> Trajectory:
    """Gradient descent on the multitask loss ``L_MT = sum_t w_t L_t`` (``w_t = 1`` default).

    Each ``L_t`` is the mean loss over task ``t``'s own data, so tasks of different sizes
    count equally. Full batch: one optimizer step per epoch on ``grad L_MT``. Minibatch:
    each step takes ``batch_size`` examples from every task (see ``_minibatch_epoch``:
    ``max_t N_t // B`` steps per epoch, smaller tasks cycle through their permutation).

    The paper's Theorem 1 compares task arithmetic with coefficient ``alpha`` and step
    ``eta`` to this run with ``optax.sgd(alpha * eta)``.

    Args:
      loss_fn, params, optimizer, num_epochs: as in :func:`finetune`.
      task_datasets: a sequence of datasets, one per task (shapes may differ).
      weights: optional per-task weights ``w_t``.
      mesh: a ``(tasks, data)`` mesh (full batch only): each device computes its tasks'
        gradients on its share of the examples, and ``psum`` assembles ``grad L_MT``.
      **kwargs: any other keyword argument of :func:`finetune`.

    Returns:
      A :class:`Trajectory`.
    """
    if mesh is not None:
        from taskvec_jax import parallel
        check_task_datasets(task_datasets)
        nt, _ = parallel._check_mesh(mesh)
        stacked, t = parallel.stack_tasks(task_datasets, nt)
        w = jnp.ones(t) if weights is None else jnp.asarray(weights)
        if w.shape != (t,):
            raise ValueError(f"weights must have one entry per task ({t}), got shape "
                             f"{w.shape}")
        w = jnp.concatenate([w, jnp.zeros(-t % nt, w.dtype)])
        return parallel.multitask_stacked(loss_fn, params, stacked, optimizer, num_epochs,
                                          mesh, weights=w, **kwargs)
    check_task_datasets(task_datasets)
    _check_params(params)
    sizes = [num_examples(d, name=f"task {t}") for t, d in enumerate(task_datasets)]
    names = [f"task {t}" for t in range(len(task_datasets))]
    if weights is not None:
        weights = jnp.asarray(weights)
        if weights.shape != (len(task_datasets),):
            raise ValueError(f"weights must have one entry per task ({len(task_datasets)}),"
                             f" got shape {weights.shape}")
    key = kwargs.pop("key", None)
    start_epoch = kwargs.pop("start_epoch", 0)
    opt_state = kwargs.pop("opt_state", None)
    keep_epochs = kwargs.get("keep_epochs")
    cfg = _make_config(loss_fn, optimizer, num_epochs, kwargs.pop("batch_size", None),
                       kwargs.pop("microbatch_size", None),
                       kwargs.pop("drop_remainder", False), kwargs.pop("keep_epochs", None),
                       kwargs.pop("record_gradients", True), kwargs.pop("progress", False),
                       key, sizes, names)
    if kwargs:
        raise TypeError(f"multitask_finetune got unexpected arguments {sorted(kwargs)}")
    for t, d in enumerate(task_datasets):
        _check_loss_fn(loss_fn, params, d, min(sizes[t], cfg.batch_size or sizes[t]),
                       f"task {t}")
    if opt_state is None:
        opt_state = optimizer.init(params)
    buffer, losses, grads, opt_state = _run_jit(params, opt_state, tuple(task_datasets),
                                                weights, key, jnp.asarray(start_epoch), cfg)
    return Trajectory(buffer, _kept_epochs(keep_epochs, num_epochs, start_epoch), losses,
                      grads, opt_state)
