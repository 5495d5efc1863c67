"""Tasks and data across devices and hosts: the one ``(tasks, data)`` mesh of the library.

The natural parallelism of task-vector research is two-dimensional: ``T`` finetunes that
never talk to each other (a ``tasks`` mesh axis, :data:`TASKS`) and one full-batch
gradient per task over a dataset that may not fit one device (a ``data`` axis,
:data:`DATA`). :func:`make_mesh` builds that mesh from whatever devices exist;
:func:`finetune_stacked` / :func:`multitask_stacked` run the finetuning engine under
``jax.shard_map`` on it, through the engine's documented mesh protocol
(``Config.data_axis`` / ``Config.multitask_axis`` in ``training/_engine.py``):

* tasks are spread over ``tasks``; a task count that the axis does not divide is padded with
  copies of the last task, whose results are dropped (finetune) or weighted by zero
  (multitask), so results do not change;
* in full-batch mode each task's examples are split over ``data``: every device holds
  ``m = N // D`` rows and the ``r = N % D`` leftover rows are held by all of them, and the
  gradient is ``psum((m/N) grad mean_local) + (r/N) grad mean_leftover`` -- exactly the
  gradient of the mean over all ``N`` examples. In minibatch mode data are replicated over
  ``data`` (each step's batch is small).

``tvj.finetune_tasks(..., mesh=mesh)`` and ``tvj.multitask_finetune(..., mesh=mesh)`` call
these after stacking the per-task datasets (tasks must then share shapes).
:func:`map_tasks` is the same grouping for code that runs inside one ``jit`` (the theory):
tasks of one signature are vmapped together and, given a mesh, constrained onto it.

Multi-host: call :func:`initialize` first on every host (``jax.distributed``), load only the
tasks :func:`process_task_indices` names for this host, assemble the global ``[T, N, ...]``
arrays with :func:`global_task_array`, and pass them to :func:`finetune_stacked`.
Checkpoint sharded results with :mod:`taskvec_jax.checkpoint` (orbax writes each shard from
the host that owns it and restores into the shardings of ``like``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from taskvec_jax import _checks
from taskvec_jax import tree as tree_lib
from taskvec_jax.training import _engine

PyTree = Any
TASKS = "tasks"
DATA = "data"

__all__ = [
    "DATA", "TASKS", "check_mesh", "constrain", "finetune_stacked", "finetune_tasks_sharded",
    "global_task_array", "group_by_signature", "initialize", "make_mesh", "map_tasks",
    "multitask_sharded", "multitask_stacked", "process_task_indices", "stack_tasks",
    "unstack_trajectory",
]


def make_mesh(num_task_shards: int | None = None, num_data_shards: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 2-D ``(tasks, data)`` mesh over ``devices`` (default: all of ``jax.devices()``).

    Args:
      num_task_shards: size of the ``tasks`` axis (default: all devices not used by data).
      num_data_shards: size of the ``data`` axis.
      devices: the devices to use; the first ``tasks * data`` of them are taken.

    Raises:
      ValueError: if the requested shape needs more devices than there are.
    """
    devices = list(jax.devices() if devices is None else devices)
    num_data_shards = _checks.positive_int(num_data_shards, "num_data_shards")
    if num_task_shards is None:
        num_task_shards = max(1, len(devices) // num_data_shards)
    num_task_shards = _checks.positive_int(num_task_shards, "num_task_shards")
    need = num_task_shards * num_data_shards
    if need > len(devices):
        raise ValueError(f"a ({num_task_shards} tasks x {num_data_shards} data) mesh needs "
                         f"{need} devices; only {len(devices)} are available")
    return jax.make_mesh((num_task_shards, num_data_shards), (TASKS, DATA),
                         axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices[:need])


def check_mesh(mesh: Mesh) -> tuple[int, int]:
    """Returns ``(tasks, data)`` axis sizes; raises unless ``mesh`` is such a mesh."""
    if not isinstance(mesh, Mesh) or set(mesh.axis_names) != {TASKS, DATA}:
        raise ValueError(f"mesh must be a jax.sharding.Mesh with axes ('{TASKS}', '{DATA}')"
                         " (see taskvec_jax.training.sharded.make_mesh), got "
                         f"{getattr(mesh, 'axis_names', type(mesh).__name__)}")
    return mesh.shape[TASKS], mesh.shape[DATA]


# --------------------------------------------------------------------------- grouping

def group_by_signature(datasets: Sequence[PyTree]) -> list[list[int]]:
    """Task indices grouped by :func:`taskvec_jax._checks.signature` (first-seen order):
    each group can be stacked and run through one ``vmap``-ed program."""
    groups: dict[Any, list[int]] = {}
    for t, d in enumerate(datasets):
        groups.setdefault(_checks.signature(d), []).append(t)
    return list(groups.values())


def constrain(tree: PyTree, mesh: Mesh, spec: P) -> PyTree:
    """``with_sharding_constraint`` on every leaf, ``spec`` trimmed to the leaf's rank."""
    def one(x):
        parts = tuple(spec)[:x.ndim]
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*parts)))
    return jax.tree.map(one, tree)


def map_tasks(fn: Callable, datasets: Sequence[PyTree], *per_task: Sequence[PyTree],
              mesh: Mesh | None = None) -> list:
    """``[fn(datasets[t], *(a[t] for a in per_task)) for t]``, vmapped over same-shape tasks.

    Tasks whose data share tree structure, shapes and dtypes run as one ``vmap`` (the
    compiled program holds one copy of ``fn``, not ``T``); the others run one by one.
    With a ``(tasks, data)`` mesh (inside ``jit``), a group's stacked data are constrained
    to ``P(TASKS, DATA)`` and the per-task arguments to ``P(TASKS)``: XLA then runs the
    tasks on different devices and reduces each task's mean over the ``data`` axis.
    """
    out: list = [None] * len(datasets)
    for members in group_by_signature(datasets):
        if len(members) == 1:
            t = members[0]
            out[t] = fn(datasets[t], *(a[t] for a in per_task))
            continue
        stacked = [tree_lib.stack([seq[t] for t in members])
                   for seq in (datasets, *per_task)]
        if mesh is not None:
            stacked = [constrain(tree, mesh, P(TASKS, DATA) if i == 0 else P(TASKS))
                       for i, tree in enumerate(stacked)]
        res = jax.vmap(fn)(*stacked)
        for i, t in enumerate(members):
            out[t] = jax.tree.map(lambda x, i=i: x[i], res)
    return out


def stack_tasks(task_datasets: Sequence[PyTree], num_task_shards: int
                ) -> tuple[PyTree, int]:
    """Stacks equal-shaped task datasets to ``[T_pad, N, ...]``, padding with the last task.

    Returns:
      ``(stacked, T)``; ``T_pad`` is ``T`` rounded up to a multiple of ``num_task_shards``.

    Raises:
      ValueError: naming the first task whose data shapes differ from task 0's.
    """
    first = _checks.signature(task_datasets[0])
    for t, d in enumerate(task_datasets):
        if _checks.signature(d) != first:
            shapes = jax.tree.map(jnp.shape, d)
            raise ValueError(
                f"sharding tasks needs equal data shapes; task {t} has {shapes}, task 0 has "
                f"{jax.tree.map(jnp.shape, task_datasets[0])} (run such tasks without "
                "mesh=, or pad them to one size)")
    t = len(task_datasets)
    padded = list(task_datasets) + [task_datasets[-1]] * (-t % num_task_shards)
    return tree_lib.stack(padded), t


def _split_rows(stacked: PyTree, num_data_shards: int):
    """``[T, N, ...]`` -> (body ``[T, m*D, ...]``, tail ``[T, r, ...]``), ``N = m*D + r``."""
    n = jax.tree.leaves(stacked)[0].shape[1]
    cut = (n // num_data_shards) * num_data_shards
    return (jax.tree.map(lambda x: x[:, :cut], stacked),
            jax.tree.map(lambda x: x[:, cut:], stacked))


# --------------------------------------------------------------------------- drivers

@functools.lru_cache(maxsize=64)
def _compiled(cfg: _engine.Config, mesh: Mesh, kind: str):
    """One jitted shard_map program per (configuration, mesh, kind); cached. The numbers
    the loss and the optimizer capture (``consts``) are replicated arguments."""
    nd = mesh.shape[DATA]
    full_batch = cfg.batch_size is None
    data_spec = (P(TASKS, DATA), P(TASKS)) if full_batch else P(TASKS)

    if kind == "tasks":
        def local(params, opt_state, data, keys, indices, start, consts):
            run = lambda d, k, i: _engine.run(params, opt_state, (d,), None, k,  # noqa: E731
                                              start, consts, cfg, None, i)
            return jax.vmap(run, in_axes=(0, None if keys is None else 0, 0))(
                data, keys, indices)

        def program(params, opt_state, stacked, keys, start, consts):
            data = _split_rows(stacked, nd) if full_batch else stacked
            # task i reports to progress bar i (unused without progress)
            indices = jnp.arange(jax.tree.leaves(stacked)[0].shape[0])
            return jax.shard_map(
                local, mesh=mesh, check_vma=False,
                in_specs=(P(), P(), data_spec, None if keys is None else P(TASKS),
                          P(TASKS), P(), P()),
                out_specs=P(TASKS))(params, opt_state, data, keys, indices, start, consts)
    else:
        def local(params, opt_state, data, weights, start, consts):
            return _engine.run(params, opt_state, (data,), weights, None, start, consts, cfg)

        def program(params, opt_state, stacked, weights, start, consts):
            data = _split_rows(stacked, nd)
            return jax.shard_map(
                local, mesh=mesh, check_vma=False,
                in_specs=(P(), P(), data_spec, P(TASKS), P(), P()),
                out_specs=P())(params, opt_state, data, weights, start, consts)

    return jax.jit(program)


def _check_stacked(loss_fn, params, stacked_data, mesh):
    """Validates a sharded call; returns (T, task 0's data, its example count)."""
    nt, _ = check_mesh(mesh)
    _checks.float_dtype(params, why="finetuning differentiates every leaf")
    t = jax.tree.leaves(stacked_data)[0].shape[0]
    if t % nt:
        raise ValueError(f"{t} stacked tasks do not divide over the mesh's {nt} task "
                         "shards; pad with taskvec_jax.training.sharded.stack_tasks")
    sample = jax.tree.map(lambda x: x[0], stacked_data)
    return t, sample, _checks.num_examples(sample, name="task 0")


def finetune_stacked(loss_fn, params: PyTree, stacked_data: PyTree,
                     optimizer: optax.GradientTransformation, num_epochs: int,
                     mesh: Mesh, *, batch_size: int | None = None,
                     microbatch_size: int | None = None, key: jax.Array | None = None,
                     drop_remainder: bool = False, keep_epochs: Sequence[int] | str | None = None,
                     record_gradients: bool = False, opt_state: Any = None,
                     start_epoch: int = 0, progress: bool | int | str = False,
                     check_finite: bool = True, num_tasks: int | None = None
                     ) -> _engine.Trajectory:
    """Independent finetunes of ``params`` on ``T`` stacked tasks, sharded over ``mesh``.

    ``stacked_data`` leaves are ``[T, N, ...]`` (host arrays, or global jax Arrays built by
    :func:`global_task_array` on several hosts); ``T`` must be a multiple of the ``tasks``
    axis (:func:`stack_tasks` pads). Task ``t`` shuffles with ``fold_in(key, t)``. The
    keyword arguments are those of :func:`taskvec_jax.finetune`; ``num_tasks`` (default
    ``T``) is how many of the stacked tasks are real: the padding after them gets no
    progress bar.

    Returns:
      One :class:`~taskvec_jax.Trajectory` whose leaves have a leading task axis ``T``.
    """
    t, sample, n = _check_stacked(loss_fn, params, stacked_data, mesh)
    cfg, consts = _engine.make_config(
        loss_fn, optimizer, num_epochs, batch_size=batch_size,
        microbatch_size=microbatch_size, drop_remainder=drop_remainder,
        keep_epochs=keep_epochs, record_gradients=record_gradients, progress=progress,
        key=key, sizes=[n], names=["task 0"], check_finite=check_finite,
        data_axis=DATA if batch_size is None else None, ordered_callbacks=False)
    _checks.loss_is_scalar(loss_fn, params, sample, min(n, cfg.batch_size or n), "task 0")
    keys = None if key is None else jnp.stack([jax.random.fold_in(key, i)
                                               for i in range(t)])
    if opt_state is None:
        opt_state = optimizer.init(params)
    start = jnp.asarray(start_epoch)
    with _engine.progress_bar(cfg, [f"task {i}" for i in range(num_tasks or t)]):
        buffer, losses, grads, states, finite, _ = _engine.execute(
            lambda c, k: _compiled(c, mesh, "tasks")(params, opt_state, stacked_data, keys,
                                                     start, k), cfg, consts)
    _engine.check_finite(finite, losses, start_epoch, [f"task {i}" for i in range(t)])
    return _engine.Trajectory(buffer, _engine.kept_epochs(keep_epochs, num_epochs,
                                                          start_epoch),
                              losses, grads, states)


def multitask_stacked(loss_fn, params: PyTree, stacked_data: PyTree,
                      optimizer: optax.GradientTransformation, num_epochs: int,
                      mesh: Mesh, *, weights: jax.Array, batch_size: int | None = None,
                      microbatch_size: int | None = None, drop_remainder: bool = False,
                      keep_epochs: Sequence[int] | str | None = None,
                      record_gradients: bool = False, opt_state: Any = None,
                      start_epoch: int = 0, progress: bool | int | str = False,
                      check_finite: bool = True) -> _engine.Trajectory:
    """Full-batch GD on ``sum_t w_t L_t`` with tasks and examples sharded over ``mesh``.

    ``weights`` has one entry per stacked task (0 for padding tasks). Every device computes
    its tasks' gradients on its rows; two ``psum``s (data, then tasks) give the multitask
    gradient, and the replicated optimizer step follows.
    """
    if batch_size is not None:
        raise ValueError("multitask_finetune with mesh= runs full-batch GD; minibatch "
                         "multitask runs without a mesh")
    _, sample, n = _check_stacked(loss_fn, params, stacked_data, mesh)
    cfg, consts = _engine.make_config(
        loss_fn, optimizer, num_epochs, batch_size=None, microbatch_size=microbatch_size,
        drop_remainder=drop_remainder, keep_epochs=keep_epochs,
        record_gradients=record_gradients, progress=progress, key=None, sizes=[n],
        names=["task 0"], check_finite=check_finite, data_axis=DATA, multitask_axis=TASKS,
        ordered_callbacks=False)
    _checks.loss_is_scalar(loss_fn, params, sample, n, "task 0")
    if opt_state is None:
        opt_state = optimizer.init(params)
    start, weights = jnp.asarray(start_epoch), jnp.asarray(weights)
    with _engine.progress_bar(cfg, "multitask"):
        buffer, losses, grads, opt_state, finite, _ = _engine.execute(
            lambda c, k: _compiled(c, mesh, "multitask")(params, opt_state, stacked_data,
                                                         weights, start, k), cfg, consts)
    _engine.check_finite(finite, losses, start_epoch, ["multitask"])
    return _engine.Trajectory(buffer, _engine.kept_epochs(keep_epochs, num_epochs,
                                                          start_epoch),
                              losses, grads, opt_state)


def unstack_trajectory(traj: _engine.Trajectory, num_tasks: int
                       ) -> list[_engine.Trajectory]:
    """Splits a stacked Trajectory into ``num_tasks`` per-task ones (drops padding)."""
    parts = _engine.split_leading(
        (traj.params, traj.losses, traj.epoch_gradients, traj.opt_state), num_tasks)
    return [_engine.Trajectory(p, traj.epochs, loss, g, state)
            for p, loss, g, state in parts]


def finetune_tasks_sharded(loss_fn, params, task_datasets, optimizer, num_epochs, mesh,
                           **options) -> list[_engine.Trajectory]:
    """``finetune_tasks(..., mesh=mesh)``: stack, pad, :func:`finetune_stacked`, unstack.

    ``options`` are :func:`finetune_stacked`'s keyword arguments (the public entry point
    :func:`taskvec_jax.finetune_tasks` names them all).
    """
    datasets = _checks.task_datasets(task_datasets)
    stacked, t = stack_tasks(datasets, check_mesh(mesh)[0])
    traj = finetune_stacked(loss_fn, params, stacked, optimizer, num_epochs, mesh,
                            num_tasks=t, **options)
    return unstack_trajectory(traj, t)


def multitask_sharded(loss_fn, params, task_datasets, optimizer, num_epochs, mesh, *,
                      weights=None, **options) -> _engine.Trajectory:
    """``multitask_finetune(..., mesh=mesh)``: stack, pad with zero-weight tasks, run
    :func:`multitask_stacked`."""
    datasets = _checks.task_datasets(task_datasets)
    nt, _ = check_mesh(mesh)
    stacked, t = stack_tasks(datasets, nt)
    w = jnp.ones(t) if weights is None else jnp.asarray(weights)
    if w.shape != (t,):
        raise ValueError(f"weights must have one entry per task ({t}), got shape "
                         f"{w.shape}")
    w = jnp.concatenate([w, jnp.zeros(-t % nt, w.dtype)])
    return multitask_stacked(loss_fn, params, stacked, optimizer, num_epochs, mesh,
                             weights=w, **options)


# --------------------------------------------------------------------------- multi-host

def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, **kwargs) -> None:
    """Starts JAX's multi-host runtime (``jax.distributed.initialize``) once per process.

    On Cloud TPU pod slices and SLURM/Open MPI clusters every argument is detected
    automatically; elsewhere pass the coordinator's ``host:port``, the process count and
    this process's id. A single-process run needs no call at all. ``kwargs`` go to
    ``jax.distributed.initialize`` unchanged.
    """
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               **kwargs)


def process_task_indices(mesh: Mesh, num_tasks: int) -> list[int]:
    """The (padded) task indices whose shards live on this process's devices.

    Each process loads only these tasks' data and passes them to
    :func:`global_task_array`.
    """
    nt, _ = check_mesh(mesh)
    padded = math.ceil(num_tasks / nt) * nt
    per_shard = padded // nt
    mine = set()
    local = set(d.id for d in mesh.local_devices)
    for i, row in enumerate(np.asarray(mesh.devices)):
        if any(d.id in local for d in row):
            mine.update(range(i * per_shard, (i + 1) * per_shard))
    return sorted(mine)


def global_task_array(mesh: Mesh, local_stacked: PyTree, num_padded_tasks: int) -> PyTree:
    """Assembles ``[T, N, ...]`` global arrays from this process's ``[T_local, N, ...]`` rows.

    ``local_stacked`` holds the tasks of :func:`process_task_indices`, in order; the result
    is sharded ``P('tasks')`` and can go straight into :func:`finetune_stacked`.
    """
    sharding = NamedSharding(mesh, P(TASKS))
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            sharding, np.asarray(x), (num_padded_tasks,) + tuple(np.shape(x)[1:])),
        local_stacked)
