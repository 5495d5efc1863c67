"""The finetuning engine: scans over epochs and steps, the program cache, the gradient
protocol (private module of :mod:`taskvec_jax.training`).

A run is one compiled program: an outer ``lax.scan`` over epochs writing parameter
snapshots into a preallocated buffer, an inner ``lax.scan`` over minibatch steps (or over
the microbatches of one full-batch gradient, :mod:`taskvec_jax.training.microbatch`).
Everything static about a run lives in one hashable :class:`Config`, which keys the jit
cache, so calling again with the same ``loss_fn``, optimizer, shapes and options does not
retrace and the number of traces does not grow with the number of epochs.

The gradient protocol (how one epoch's gradient is assembled) has two optional mesh
axes, both fields of :class:`Config` and both documented there:

* ``data_axis``: each dataset is a ``(body, tail)`` pair and every device holds ``m`` body
  rows and the same ``r`` tail rows; the full-batch gradient is
  ``psum((m/N) grad mean_body) + (r/N) grad mean_tail`` over ``data_axis``;
* ``multitask_axis``: ``datasets[0]`` stacks this device's tasks on axis 0 and the
  multitask loss and gradient are ``psum``-ed over ``multitask_axis``.

A caller that sets either must run :func:`run` where those axes are bound (inside
``jax.shard_map``); :mod:`taskvec_jax.training.sharded` is that caller.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from taskvec_jax import _checks
from taskvec_jax import tree as tree_lib
from taskvec_jax.training.microbatch import mean_value_and_grad

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

__all__ = ["Config", "Trajectory", "check_inputs", "kept_epochs", "make_config", "run",
           "run_jit", "run_many", "split_leading"]


class Trajectory(NamedTuple):
    """The result of a finetuning run.

    Attributes:
      params: parameter snapshots; every leaf has a leading axis of length
        ``len(epochs)``; ``params[i]`` is the model after epoch ``epochs[i]``
        (epoch 0 = the starting point).
      epochs: int numpy array of the absolute epoch index of each snapshot.
      losses: ``[num_epochs]`` training loss of each epoch (see
        :mod:`taskvec_jax.training`).
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
class Config:
    """Everything static about a run; hashable, so it keys the compilation cache.

    ``data_axis`` / ``multitask_axis`` are the engine's mesh protocol (module docstring):
    ``None`` for a single-device run; a mesh axis name when :func:`run` is called inside
    a ``jax.shard_map`` that binds it.
    """

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
    data_axis: str | None = None
    multitask_axis: str | None = None


# --------------------------------------------------------------------------- configuration

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


def make_config(loss_fn, optimizer, num_epochs, *, batch_size, microbatch_size,
                drop_remainder, keep_epochs, record_gradients, progress, key,
                sizes: Sequence[int], names: Sequence[str], data_axis: str | None = None,
                multitask_axis: str | None = None) -> Config:
    """Validates the options of a run and returns its :class:`Config`.

    Raises:
      ValueError: for a non-callable loss, a non-optax optimizer, non-positive counts or
        sizes, ``batch_size`` above any dataset's size (naming it), or a missing key in
        minibatch mode.
    """
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if not isinstance(optimizer, optax.GradientTransformation):
        raise ValueError("optimizer must be an optax.GradientTransformation, got "
                         f"{type(optimizer).__name__}")
    num_epochs = _checks.positive_int(num_epochs, "num_epochs")
    batch_size = _checks.positive_int(batch_size, "batch_size", allow_none=True)
    microbatch_size = _checks.positive_int(microbatch_size, "microbatch_size",
                                           allow_none=True)
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
    return Config(loss_fn=loss_fn, optimizer=optimizer, num_epochs=num_epochs,
                  batch_size=batch_size, microbatch_size=microbatch_size,
                  drop_remainder=bool(drop_remainder), slots=slots, num_slots=num_slots,
                  keep_start=keep_start, record_gradients=bool(record_gradients),
                  progress=every, data_axis=data_axis, multitask_axis=multitask_axis)


def kept_epochs(keep_epochs, num_epochs, start_epoch) -> np.ndarray:
    """The absolute epochs a run keeps (``Trajectory.epochs``)."""
    kept, _, _, _ = _keep_plan(keep_epochs, num_epochs)
    return np.asarray(kept, dtype=np.int64) + int(start_epoch)


def check_inputs(loss_fn, params, datasets: Sequence[PyTree], cfg: Config,
                 names: Sequence[str]) -> None:
    """Checks that ``params`` are float and ``loss_fn`` returns a scalar on each dataset
    (shape evaluation only; call with one representative per shape group)."""
    _checks.float_dtype(params, why="finetuning differentiates every leaf")
    for d, name in zip(datasets, names):
        n = _checks.num_examples(d, name=name)
        _checks.loss_is_scalar(loss_fn, params, d, min(n, cfg.batch_size or n), name)


# --------------------------------------------------------------------------- epochs

def _weighted(values: Sequence[Any], weights: jax.Array | None):
    """``sum_t w_t * values[t]`` for scalars or trees (float32+ accumulation)."""
    return tree_lib.weighted_sum(list(values), weights)


def _optimizer_step(cfg: Config, params, opt_state, grad):
    updates, opt_state = cfg.optimizer.update(grad, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def _dataset_value_and_grad(cfg: Config, params, data):
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


def _full_batch_epoch(cfg: Config, params, opt_state, datasets, weights, epoch_key):
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


def _minibatch_epoch(cfg: Config, params, opt_state, datasets, weights, epoch_key):
    """One epoch of minibatch steps over one or several datasets.

    With several datasets (multitask), every step takes ``B`` examples from each task;
    the epoch has ``max_t N_t // B`` steps and a smaller task continues cyclically
    through its own permutation (``index mod N_t``), so the largest task sees each of its
    examples at most once per epoch and the others are revisited.
    """
    b = cfg.batch_size
    sizes = [_checks.num_examples(d) for d in datasets]
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


# --------------------------------------------------------------------------- programs

def run(params, opt_state, datasets, weights, key, start_epoch, cfg: Config):
    """The whole run: an outer scan over epochs writing snapshots into a buffer.

    Args:
      params, opt_state: the starting point.
      datasets: a tuple of datasets (one for a single finetune, ``T`` for multitask; see
        :class:`Config` for the sharded forms).
      weights: ``None`` or ``[T]`` multitask weights.
      key: PRNG key for minibatch shuffling (epoch ``e`` uses ``fold_in(key, e)``).
      start_epoch: absolute index of the epoch ``params`` comes from.
      cfg: the run's :class:`Config`.

    Returns:
      ``(buffer, losses, epoch_gradients, opt_state)``.
    """
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


run_jit = jax.jit(run, static_argnames=("cfg",))


@functools.partial(jax.jit, static_argnames=("cfg",))
def run_many(params, opt_state, datasets, weights, keys, start_epoch, cfg):
    """:func:`run` vmapped over tasks that share data shapes (one compiled program)."""
    return jax.vmap(lambda d, k: run(params, opt_state, d, weights, k, start_epoch, cfg),
                    in_axes=(0, None if keys is None else 0))(datasets, keys)


@functools.partial(jax.jit, static_argnums=1)
def split_leading(tree: PyTree, n: int) -> list[PyTree]:
    """``[tree[0], ..., tree[n-1]]`` along every leaf's leading axis, in ONE dispatch.

    Slicing a stacked result task by task eagerly costs one dispatch per leaf and task,
    which dominated ``finetune_tasks`` for small models (measured: 90% of the call).
    """
    return [jax.tree.map(lambda x: x[i], tree) for i in range(n)]
