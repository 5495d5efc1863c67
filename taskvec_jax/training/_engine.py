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
import inspect
import types
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from taskvec_jax import _checks
from taskvec_jax import tree as tree_lib
from taskvec_jax.training.microbatch import (mean_over_microbatches,
                                             mean_over_microbatches_with_state,
                                             mean_value_and_grad,
                                             mean_value_and_grad_with_state)

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

__all__ = ["MESH_STATE_ERROR", "Closure", "Config", "Trajectory", "check_finite", "check_inputs",
           "check_optimizer", "execute", "kept_epochs", "make_config", "progress_bar", "run",
           "run_jit", "run_many", "split_closure", "split_leading", "static_config",
           "steps_per_epoch", "STEP_PROGRESS_MIN_STEPS"]


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
      model_state: the non-trainable model state (BatchNorm statistics, when finetuning
        with ``model_state=``) at every kept epoch, like ``params``: every leaf has a
        leading axis of length ``len(epochs)`` (memory: one state copy per kept epoch);
        ``None`` otherwise. It is never differentiated and never part of ``params`` (so
        never of a task vector). :attr:`final_model_state` is the last one.
    """

    params: PyTree
    epochs: np.ndarray
    losses: jax.Array
    epoch_gradients: PyTree | None
    opt_state: Any
    model_state: Any = None

    @property
    def final_params(self) -> PyTree:
        """The parameters after the last epoch (always kept)."""
        return jax.tree.map(lambda x: x[-1], self.params)

    @property
    def final_model_state(self) -> Any:
        """The model state after the last epoch (``None`` without ``model_state=``)."""
        return None if self.model_state is None else jax.tree.map(lambda x: x[-1],
                                                                  self.model_state)

    def _index(self, epoch: int) -> int:
        matches = np.nonzero(np.asarray(self.epochs) == epoch)[0]
        if matches.size == 0:
            raise ValueError(f"epoch {epoch} was not kept; kept epochs are "
                             f"{np.asarray(self.epochs).tolist()}")
        return int(matches[0])

    def at(self, epoch: int) -> PyTree:
        """The parameters after absolute epoch ``epoch`` (must be a kept epoch)."""
        i = self._index(epoch)
        return jax.tree.map(lambda x: x[i], self.params)

    def model_state_at(self, epoch: int) -> Any:
        """The model state after absolute epoch ``epoch`` (must be a kept epoch)."""
        i = self._index(epoch)
        if self.model_state is None:
            raise ValueError("this trajectory has no model state (finetune without "
                             "model_state=)")
        return jax.tree.map(lambda x: x[i], self.model_state)


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything static about a run; hashable, so it keys the compilation cache.

    ``loss_fn`` and ``update`` are :class:`Closure` templates (the structure of the loss
    and of the optimizer's ``update``); the numbers they capture are arguments of the
    program (``consts`` of :func:`run`), so a new ``optax.sgd(lr)`` or a new loss closure
    that differs only in captured numbers hits the cache. Inside :func:`run` the two
    fields hold the rebuilt functions.

    ``data_axis`` / ``multitask_axis`` are the engine's mesh protocol (module docstring):
    ``None`` for a single-device run; a mesh axis name when :func:`run` is called inside
    a ``jax.shard_map`` that binds it.
    """

    loss_fn: Any                    # Closure (the key) / the rebuilt loss inside run
    update: Any                     # Closure (the key) / the rebuilt update inside run
    extra_args: bool                # update takes value=, grad=, value_fn= (lbfgs)
    num_epochs: int
    batch_size: int | None
    microbatch_size: int | None
    drop_remainder: bool
    slots: tuple[int, ...]          # slot written after relative epoch e (index e-1)
    num_slots: int
    keep_start: bool                # relative epoch 0 is kept (in slot 0)
    record_gradients: bool
    progress: int                   # report every `progress` epochs; 0 = off
    check_finite: bool              # emit one finite flag per epoch
    data_axis: str | None = None
    multitask_axis: str | None = None
    stateful: bool = False          # loss_fn(params, batch, state) -> (loss, new_state)
    progress_steps: bool = False    # the bar counts minibatch steps, not epochs
    ordered_callbacks: bool = True  # progress callbacks ordered (False inside shard_map)


# --------------------------------------------------------------------------- closures
#
# The program cache is keyed on STRUCTURE, not on object identity: a new ``optax.sgd(lr)``
# or a new ``loss_fn`` closure that differs only in the numbers it captures must reuse the
# compiled program. A Python function is split into a hashable template (its code, its
# globals, and the structure of what its closure cells hold, recursively) and the numbers
# it captures (Python floats, jax arrays, float numpy arrays), which become arguments of
# the compiled program. Inside the program the function is rebuilt from the template with
# the traced numbers in its cells. A function that uses a captured number in Python
# control flow (``if lr > 0``) cannot take it traced; such runs fall back to a template
# that keeps every number static (keyed by value), which is the old behaviour.


class _Static:
    """A cell value kept as it is: equal by ``==`` when hashable, else by identity."""

    __slots__ = ("value", "_key")

    def __init__(self, value):
        self.value = value
        try:
            hash(value)
            self._key = (type(value), value)
        except TypeError:
            self._key = None

    def __eq__(self, other):
        if not isinstance(other, _Static):
            return NotImplemented
        if self._key is None or other._key is None:
            return self.value is other.value
        try:
            return bool(self._key == other._key)
        except Exception:  # an __eq__ that does not return a bool (arrays inside)
            return self.value is other.value

    def __hash__(self):
        return hash(self._key) if self._key is not None else id(self.value)


class _Const:
    """A captured number passed to the program as an argument (jit keys its aval)."""

    __slots__ = ()

    def __eq__(self, other):
        return isinstance(other, _Const)

    def __hash__(self):
        return hash(_Const)


def _is_number(v) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, float):
        return True
    if isinstance(v, jax.Array):
        return True
    return isinstance(v, np.ndarray) and np.issubdtype(v.dtype, np.inexact)


def _split(value, consts: list, convert: bool, depth: int, seen: frozenset):
    """``value`` -> its template; appends the captured numbers to ``consts``."""
    if convert and _is_number(value):
        consts.append(value)  # jit traces a Python float weakly typed, like the float
        return _Const()
    if depth > 8:
        return _Static(value)
    if isinstance(value, types.FunctionType) and id(value) not in seen:
        cells = value.__closure__ or ()
        inner = seen | {id(value)}
        parts = []
        for cell in cells:
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell (a name assigned after the def)
                parts.append(_EMPTY)
                continue
            parts.append(_split(content, consts, convert, depth + 1, inner))
        return _FunctionTemplate(value, tuple(parts))
    if isinstance(value, functools.partial):
        return _PartialTemplate(
            _split(value.func, consts, convert, depth + 1, seen),
            tuple(_split(a, consts, convert, depth + 1, seen) for a in value.args),
            tuple((k, _split(a, consts, convert, depth + 1, seen))
                  for k, a in sorted(value.keywords.items())))
    if type(value) in (tuple, list) or (isinstance(value, tuple) and hasattr(value, "_fields")):
        return _SeqTemplate(type(value), tuple(_split(v, consts, convert, depth + 1, seen)
                                               for v in value))
    return _Static(value)


_EMPTY = _Static("<empty cell>")


@dataclasses.dataclass(frozen=True, eq=False)
class _FunctionTemplate:
    function: types.FunctionType
    cells: tuple

    def _key(self):
        f = self.function
        return (f.__code__, id(f.__globals__), _Static(f.__defaults__),
                _Static(None if f.__kwdefaults__ is None
                        else tuple(sorted(f.__kwdefaults__.items()))), self.cells)

    def __eq__(self, other):
        return isinstance(other, _FunctionTemplate) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())


@dataclasses.dataclass(frozen=True)
class _PartialTemplate:
    func: Any
    args: tuple
    keywords: tuple


@dataclasses.dataclass(frozen=True)
class _SeqTemplate:
    kind: type
    items: tuple


def _rebuild(template, consts):
    """The value ``template`` describes, with the next entries of ``consts`` (an iterator)."""
    if isinstance(template, _Const):
        return next(consts)
    if isinstance(template, _Static):
        return template.value
    if isinstance(template, _FunctionTemplate):
        f = template.function
        if not template.cells:
            return f
        cells = tuple(types.CellType() if t is _EMPTY else types.CellType(
            _rebuild(t, consts)) for t in template.cells)
        g = types.FunctionType(f.__code__, f.__globals__, f.__name__, f.__defaults__,
                               cells)
        g.__kwdefaults__ = f.__kwdefaults__
        g.__dict__.update(f.__dict__)
        return g
    if isinstance(template, _PartialTemplate):
        return functools.partial(_rebuild(template.func, consts),
                                 *(_rebuild(a, consts) for a in template.args),
                                 **{k: _rebuild(a, consts) for k, a in template.keywords})
    if isinstance(template, _SeqTemplate):
        items = [_rebuild(t, consts) for t in template.items]
        return template.kind(*items) if hasattr(template.kind, "_fields") else \
            template.kind(items)
    raise TypeError(f"not a closure template: {template!r}")


@dataclasses.dataclass(frozen=True)
class Closure:
    """A function as (hashable structure, captured numbers): the program-cache key part.

    ``convert=False`` keeps every captured number static (keyed by value).
    """

    template: Any
    converted: bool

    def rebuild(self, consts: Sequence[Any]):
        """The function with ``consts`` (traced inside the program) in its cells."""
        return _rebuild(self.template, iter(consts))


def split_closure(fn, convert: bool = True) -> tuple[Closure, tuple]:
    """Splits ``fn`` into its :class:`Closure` and the numbers it captures."""
    consts: list = []
    template = _split(fn, consts, convert, 0, frozenset())
    return Closure(template, convert), tuple(consts)


_TRACED_NUMBER_ERRORS = (jax.errors.ConcretizationTypeError,
                         jax.errors.TracerArrayConversionError,
                         jax.errors.TracerIntegerConversionError)


# --------------------------------------------------------------------------- configuration

def _keep_plan(keep_epochs: Sequence[int] | str | None, num_epochs: int):
    """Maps each relative epoch 1..E to a snapshot slot; the last epoch is always kept.

    ``None`` (the default) keeps the start and the end (epochs 0 and E), ``"all"`` keeps
    every epoch. An epoch that is not kept writes into the slot of the next kept epoch,
    which that epoch overwrites later, so the buffer holds exactly the kept snapshots and
    no slicing copy is needed at the end.
    """
    if isinstance(keep_epochs, str):
        if keep_epochs != "all":
            raise ValueError(f"keep_epochs must be None, 'all' or a sequence of epochs, "
                             f"got {keep_epochs!r}")
        kept = list(range(num_epochs + 1))
    elif keep_epochs is None:
        kept = [0, num_epochs]
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


MESH_STATE_ERROR = (
    "model_state= is not supported with mesh=: the mesh splits each full-batch gradient "
    "over the 'data' axis (and multitask runs its tasks side by side), so there is no one "
    "order in which the batches would update the state; a sequential state (BatchNorm "
    "statistics) needs the single-device run: drop mesh=")


def check_optimizer(optimizer) -> bool:
    """Raises unless ``optimizer`` has callable ``init`` and ``update``; returns whether
    its ``update`` takes keyword arguments (``value``, ``grad``, ``value_fn``: optax's
    ``GradientTransformationExtraArgs``, ``MultiSteps``, ``lbfgs``)."""
    init, update = getattr(optimizer, "init", None), getattr(optimizer, "update", None)
    if not (callable(init) and callable(update)):
        raise ValueError("optimizer must be an optax.GradientTransformation (or any object "
                         "with init(params) and update(updates, state, params)), got "
                         f"{type(optimizer).__name__}")
    try:
        parameters = inspect.signature(update).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is p.VAR_KEYWORD or p.name == "value_fn" for p in parameters)


STEP_PROGRESS_MIN_STEPS = 100
"""With ``progress=True``, an epoch of at least this many minibatch steps gets a bar over
steps (``progress="steps"`` always does, ``progress="epochs"`` never)."""


def _progress_mode(progress, batch_size, sizes, drop_remainder) -> tuple[int, bool]:
    """``progress`` -> ``(report every k epochs (0: off), bar over steps)``."""
    if isinstance(progress, str):
        if progress not in ("steps", "epochs"):
            raise ValueError(f"progress must be a bool, a positive int (report every k "
                             f"epochs), 'steps' or 'epochs', got {progress!r}")
        return 1, progress == "steps" and batch_size is not None
    if not progress:
        return 0, False
    if progress is True:
        if batch_size is None:  # one step per epoch
            return 1, False
        steps = max(steps_per_epoch(n, batch_size, drop_remainder, len(sizes) > 1)
                    for n in sizes)
        return 1, steps >= STEP_PROGRESS_MIN_STEPS
    return _checks.positive_int(progress, "progress"), False


def steps_per_epoch(n: int, batch_size: int, drop_remainder: bool, multitask: bool) -> int:
    """Optimizer steps of one minibatch epoch over ``n`` examples (module docstring of
    :mod:`taskvec_jax.training`): ``n // B``, plus the leftover step of a single
    dataset unless ``drop_remainder`` (multitask: ``max_t N_t // B``, no leftover)."""
    leftover = not (drop_remainder or multitask or n % batch_size == 0)
    return n // batch_size + int(leftover)


def make_config(loss_fn, optimizer, num_epochs, *, batch_size, microbatch_size,
                drop_remainder, keep_epochs, record_gradients, progress, key,
                sizes: Sequence[int], names: Sequence[str], check_finite: bool = True,
                data_axis: str | None = None, multitask_axis: str | None = None,
                stateful: bool = False, ordered_callbacks: bool = True
                ) -> tuple[Config, tuple]:
    """Validates the options of a run; returns its :class:`Config` and the numbers the
    loss and the optimizer capture (``consts``, the program's argument).

    Raises:
      ValueError: for a non-callable loss, an optimizer without ``init``/``update``,
        non-positive counts or sizes, ``batch_size`` above any dataset's size (naming
        it), or a missing key in minibatch mode.
    """
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    extra_args = check_optimizer(optimizer)
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
    if stateful and (data_axis is not None or multitask_axis is not None):
        raise ValueError(MESH_STATE_ERROR)
    _, slots, num_slots, keep_start = _keep_plan(keep_epochs, num_epochs)
    every, progress_steps = _progress_mode(progress, batch_size, sizes, drop_remainder)
    loss_closure, loss_consts = split_closure(loss_fn)
    update_closure, update_consts = split_closure(optimizer.update)
    cfg = Config(loss_fn=loss_closure, update=update_closure, extra_args=extra_args,
                 num_epochs=num_epochs, batch_size=batch_size,
                 microbatch_size=microbatch_size, drop_remainder=bool(drop_remainder),
                 slots=slots, num_slots=num_slots, keep_start=keep_start,
                 record_gradients=bool(record_gradients), progress=every,
                 progress_steps=progress_steps,
                 ordered_callbacks=bool(ordered_callbacks) and every > 0,
                 check_finite=bool(check_finite), data_axis=data_axis,
                 multitask_axis=multitask_axis, stateful=bool(stateful))
    return cfg, (loss_consts, update_consts)


def static_config(cfg: Config, consts) -> tuple[Config, tuple]:
    """The same run with every captured number static (keyed by value): the fallback for
    functions that use a captured number in Python control flow."""
    loss, _ = split_closure(cfg.loss_fn.rebuild(consts[0]), convert=False)
    update, _ = split_closure(cfg.update.rebuild(consts[1]), convert=False)
    return dataclasses.replace(cfg, loss_fn=loss, update=update), ((), ())


def execute(call: Callable[[Config, tuple], Any], cfg: Config, consts):
    """``call(cfg, consts)``; if tracing fails because a captured number was traced (a
    loss or optimizer that branches on it in Python), runs again with it static."""
    try:
        return call(cfg, consts)
    except _TRACED_NUMBER_ERRORS:
        if not (cfg.loss_fn.converted and any(len(c) for c in consts)):
            raise
    return call(*static_config(cfg, consts))


def kept_epochs(keep_epochs, num_epochs, start_epoch) -> np.ndarray:
    """The absolute epochs a run keeps (``Trajectory.epochs``)."""
    kept, _, _, _ = _keep_plan(keep_epochs, num_epochs)
    return np.asarray(kept, dtype=np.int64) + int(start_epoch)


def check_inputs(loss_fn, params, datasets: Sequence[PyTree], cfg: Config,
                 names: Sequence[str], model_state=None) -> None:
    """Checks that ``params`` are float and ``loss_fn`` returns a scalar on each dataset
    (shape evaluation only; call with one representative per shape group). With
    ``cfg.stateful``: that ``loss_fn(params, batch, state)`` returns ``(scalar, state)``
    with the state's tree structure, shapes and dtypes."""
    _checks.float_dtype(params, why="finetuning differentiates every leaf")
    for d, name in zip(datasets, names):
        n = _checks.num_examples(d, name=name)
        size = min(n, cfg.batch_size or n)
        if not cfg.stateful:
            _checks.loss_is_scalar(loss_fn, params, d, size, name)
            continue
        batch = jax.tree.map(lambda x: x[:size], d)
        out = jax.eval_shape(loss_fn, params, batch, model_state)
        if not (isinstance(out, tuple) and len(out) == 2 and jnp.shape(out[0]) == ()):
            raise ValueError("with model_state=, loss_fn(params, batch, state) must return "
                             f"(scalar loss, new_state); on {name} it returned {out}")
        def sig(tree):
            leaves, treedef = jax.tree.flatten(tree)
            return treedef, [(tuple(x.shape), jnp.dtype(x.dtype)) for x in leaves]
        if sig(out[1]) != sig(model_state):
            raise ValueError(
                f"with model_state=, the new_state loss_fn returns on {name} must match "
                f"model_state in structure, shapes and dtypes (it is carried through a "
                f"scan): got {sig(out[1])}, model_state is {sig(model_state)}")


# --------------------------------------------------------------------------- epochs

def _weighted(values: Sequence[Any], weights: jax.Array | None):
    """``sum_t w_t * values[t]`` for scalars or trees (float32+ accumulation)."""
    return tree_lib.weighted_sum(list(values), weights)


def _optimizer_step(cfg: Config, params, opt_state, grad, loss, value_fn):
    """One optimizer update. Optimizers whose ``update`` takes keywords get optax's extra
    arguments ``value`` (the loss at ``params``), ``grad`` and ``value_fn`` (the loss the
    gradient is of, for line searches such as ``optax.lbfgs``); others ignore them."""
    if cfg.extra_args:
        updates, opt_state = cfg.update(grad, opt_state, params, value=loss, grad=grad,
                                        value_fn=value_fn)
    else:
        updates, opt_state = cfg.update(grad, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def _dataset_value(cfg: Config, params, data):
    """The mean loss over one dataset (the value of :func:`_dataset_value_and_grad`)."""
    def mean(d):
        return mean_over_microbatches(lambda b: cfg.loss_fn(params, b), d,
                                      cfg.microbatch_size)
    if cfg.data_axis is None:
        return mean(data)
    body, tail = data
    m = jax.tree.leaves(body)[0].shape[0]
    r = jax.tree.leaves(tail)[0].shape[0]
    n = m * jax.lax.axis_size(cfg.data_axis) + r
    total = jax.lax.psum(mean(body) * (m / n), cfg.data_axis) if m else 0.0
    return total + mean(tail) * (r / n) if r else total


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


def _stateful_value_and_grad(cfg: Config, params, datasets, weights, state):
    """``sum_t w_t (L_t, grad L_t)`` of a stateful loss and the state after all batches.

    One state is threaded through the tasks in order (task 0's batch, then task 1's, ...)
    and, with ``microbatch_size``, through each batch's chunks in order
    (:func:`~taskvec_jax.training.microbatch.mean_value_and_grad_with_state`): the
    updates a Python loop over the same batches would make. The state is never
    differentiated: each task's gradient is taken at the state it was handed.

    Returns:
      ``(loss, grad, new_state, value_fn)``; ``value_fn(p)`` is the loss at ``p`` with the
      states each task was handed (the value optax's line searches evaluate).
    """
    losses, grads, handed = [], [], []
    for d in datasets:
        handed.append(state)
        loss, grad, state = mean_value_and_grad_with_state(cfg.loss_fn, params, d, state,
                                                           cfg.microbatch_size)
        losses.append(loss)
        grads.append(grad)

    def value_fn(p):
        return _weighted([mean_over_microbatches_with_state(
            lambda b, s: cfg.loss_fn(p, b, s), d, s0, cfg.microbatch_size)[0]
            for d, s0 in zip(datasets, handed)], weights)

    return _weighted(losses, weights), _weighted(grads, weights), state, value_fn


def _full_batch_epoch(cfg: Config, params, opt_state, state, datasets, weights,
                      epoch_key, where):
    del epoch_key, where  # full-batch GD is deterministic; its one step is the epoch
    if cfg.stateful:
        # the state is updated once per epoch per task (per chunk with microbatch_size)
        loss, grad, state, value_fn = _stateful_value_and_grad(cfg, params, datasets,
                                                               weights, state)
        params, opt_state = _optimizer_step(cfg, params, opt_state, grad, loss, value_fn)
        return params, opt_state, state, loss, grad
    if cfg.multitask_axis is None:
        results = [_dataset_value_and_grad(cfg, params, d) for d in datasets]
        loss = _weighted([r[0] for r in results], weights)
        grad = _weighted([r[1] for r in results], weights)

        def value_fn(p):
            return _weighted([_dataset_value(cfg, p, d) for d in datasets], weights)
    else:
        # Sharded multitask: this device's tasks are stacked along axis 0 of datasets[0]
        # and weighted by the local slice of `weights` (0 for padding tasks).
        losses, grads = jax.vmap(lambda d: _dataset_value_and_grad(cfg, params, d))(
            datasets[0])
        loss, grad = jax.lax.psum(
            (jnp.tensordot(weights, losses, 1),
             jax.tree.map(lambda g: jnp.tensordot(weights, g, 1), grads)),
            cfg.multitask_axis)

        def value_fn(p):
            values = jax.vmap(lambda d: _dataset_value(cfg, p, d))(datasets[0])
            return jax.lax.psum(jnp.tensordot(weights, values, 1), cfg.multitask_axis)
    params, opt_state = _optimizer_step(cfg, params, opt_state, grad, loss, value_fn)
    return params, opt_state, state, loss, grad


def _minibatch_epoch(cfg: Config, params, opt_state, state, datasets, weights,
                     epoch_key, where):
    """One epoch of minibatch steps over one or several datasets.

    With several datasets (multitask), every step takes ``B`` examples from each task;
    the epoch has ``max_t N_t // B`` steps and a smaller task continues cyclically
    through its own permutation (``index mod N_t``), so the largest task sees each of its
    examples at most once per epoch and the others are revisited.

    ``where`` is ``(relative epoch, bar index)``, for the step progress callback
    (``cfg.progress_steps``).
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

    num_steps = (steps if len(datasets) > 1 else
                 steps_per_epoch(sizes[0], b, cfg.drop_remainder, False))
    every = max(1, num_steps // 100)  # at most ~100 host callbacks per epoch

    def report(i, loss):
        if cfg.progress_steps:  # i = the step's index in this epoch (0..num_steps-1)
            i = i + 1
            rel_epoch, bar = where
            jax.lax.cond(jnp.logical_or(i % every == 0, i == num_steps),
                         lambda: _callback(cfg, functools.partial(
                             _report_step, steps=num_steps, num_epochs=cfg.num_epochs),
                             bar, rel_epoch, i, loss), lambda: None)

    def step(carry, xs):
        step_idx, i = xs
        params, opt_state, state, grad_sum, loss_sum = carry
        batches = [jax.tree.map(lambda x: jnp.take(x, i, axis=0), d)
                   for d, i in zip(datasets, step_idx)]
        if cfg.stateful:  # the state moves once per step and task (per chunk)
            loss, grad, state, value_fn = _stateful_value_and_grad(cfg, params, batches,
                                                                   weights, state)
            params, opt_state = _optimizer_step(cfg, params, opt_state, grad, loss,
                                                value_fn)
            report(i, loss)
            return (params, opt_state, state, tree_lib.add(grad_sum, grad),
                    loss_sum + loss), None
        if cfg.microbatch_size is None:
            loss, grad = jax.value_and_grad(step_loss)(params, batches)
        else:
            results = [mean_value_and_grad(cfg.loss_fn, params, bt, cfg.microbatch_size)
                       for bt in batches]
            loss = _weighted([r[0] for r in results], weights)
            grad = _weighted([r[1] for r in results], weights)
        params, opt_state = _optimizer_step(cfg, params, opt_state, grad, loss,
                                            lambda p: step_loss(p, batches))
        report(i, loss)
        return (params, opt_state, state, tree_lib.add(grad_sum, grad),
                loss_sum + loss), None

    first = [jax.tree.map(lambda x: x[:b], d) for d in datasets]
    loss_dtype = (jax.eval_shape(lambda p, bs: _weighted(
        [cfg.loss_fn(p, bt, state)[0] for bt in bs], weights), params, first)
        if cfg.stateful else jax.eval_shape(step_loss, params, first)).dtype
    carry = (params, opt_state, state, tree_lib.zeros_like(params),
             jnp.zeros((), loss_dtype))
    # the step index only feeds the step progress bar: off, the scan has no such input
    carry, _ = jax.lax.scan(step, carry,
                            (idx, jnp.arange(steps) if cfg.progress_steps else None))
    if num_steps > steps:  # the leftover examples of a single dataset: one smaller step
        carry, _ = step(carry, ((perms[0][steps * b:],), steps))
    params, opt_state, state, grad_sum, loss_sum = carry
    return params, opt_state, state, loss_sum / num_steps, grad_sum


# --------------------------------------------------------------------------- progress

class _BarSlot:
    """The bars the running program reports to (one per task of the dispatch). A plain
    object, not thread-local: XLA runs host callbacks on its own threads."""

    bars: list = []


_BARS = _BarSlot()


class progress_bar:  # noqa: N801 (a context manager used like a function)
    """tqdm bars (one per label) that :func:`run`'s progress callbacks advance.

    ``with progress_bar(cfg, labels): ...`` around a dispatch; ``labels`` is one label or
    one per task of the dispatch (a vmapped group: the task with bar index ``i`` reports
    to bar ``i``). The bars count epochs, or minibatch steps with ``cfg.progress_steps``.
    On exit it waits for the program's callbacks (``jax.effects_barrier``) before closing
    them. With ``cfg.progress == 0`` it does nothing, and the program holds no callback.
    """

    def __init__(self, cfg: Config, labels: str | Sequence[str]):
        self.cfg = cfg
        self.labels = [labels] if isinstance(labels, str) else list(labels)

    def __enter__(self):
        if self.cfg.progress:
            from tqdm.auto import tqdm
            steps = self.cfg.progress_steps
            _BARS.bars = [tqdm(total=None if steps else self.cfg.num_epochs, desc=label,
                               unit="step" if steps else "epoch", leave=True,
                               mininterval=0, position=i if len(self.labels) > 1 else None)
                          for i, label in enumerate(self.labels)]
        return self

    def __exit__(self, *exc):
        if self.cfg.progress:
            jax.effects_barrier()
            for bar in _BARS.bars:
                bar.close()
            _BARS.bars = []
        return False


def _callback(cfg: Config, fn, *args) -> None:
    """``jax.debug.callback`` of a progress report. Ordered (the host sees the reports in
    program order, per task) except inside ``shard_map``, where ordered effects are not
    supported; the host side only moves a bar forward, so late reports are harmless."""
    jax.debug.callback(fn, *args, ordered=cfg.ordered_callbacks)


def _bar(index):
    bars = _BARS.bars
    i = int(np.asarray(index))
    return bars[i] if 0 <= i < len(bars) else None  # no bar: a padding task


def _show(loss) -> str:
    loss = np.asarray(loss)
    return f"{float(loss):.5g}" if loss.ndim == 0 else np.array2string(
        loss.reshape(-1), precision=4, max_line_width=80)


def _report_epoch(index, rel_epoch, loss):
    """Host side of the epoch callback: moves bar ``index`` to ``rel_epoch``, shows the
    loss."""
    bar = _bar(index)
    if bar is None:
        return
    rel_epoch = int(np.max(np.asarray(rel_epoch)))
    if rel_epoch <= bar.n:  # a late report, or another device's copy of this one
        return
    bar.set_postfix_str(f"loss {_show(loss)}", refresh=False)
    bar.update(rel_epoch - bar.n)


def _report_step(index, rel_epoch, step, loss, *, steps: int, num_epochs: int):
    """Host side of the step callback: moves bar ``index`` to step ``step`` of epoch
    ``rel_epoch`` (of ``steps`` per epoch), shows the epoch and the step's loss."""
    bar = _bar(index)
    if bar is None:
        return
    if bar.total is None:  # the steps per epoch are known inside the program
        bar.total = steps * num_epochs
    rel_epoch = int(np.max(np.asarray(rel_epoch)))
    position = (rel_epoch - 1) * steps + int(np.max(np.asarray(step)))
    if position <= bar.n:
        return
    bar.set_postfix_str(f"epoch {rel_epoch}/{num_epochs}, loss {_show(loss)}",
                        refresh=False)
    bar.update(position - bar.n)


# --------------------------------------------------------------------------- programs

def run(params, opt_state, datasets, weights, key, start_epoch, consts, cfg: Config,
        model_state=None, bar_index=0):
    """The whole run: an outer scan over epochs writing snapshots into a buffer.

    Args:
      params, opt_state: the starting point.
      datasets: a tuple of datasets (one for a single finetune, ``T`` for multitask; see
        :class:`Config` for the sharded forms).
      weights: ``None`` or ``[T]`` multitask weights.
      key: PRNG key for minibatch shuffling (epoch ``e`` uses ``fold_in(key, e)``).
      start_epoch: absolute index of the epoch ``params`` comes from.
      consts: ``(loss consts, update consts)``, the numbers the loss and the optimizer
        capture (from :func:`make_config`).
      cfg: the run's :class:`Config`.
      model_state: with ``cfg.stateful``, the non-trainable state (BatchNorm statistics)
        that ``loss_fn(params, batch, state) -> (loss, new_state)`` carries; it goes
        through the scan and is never differentiated.
      bar_index: which of :class:`progress_bar`'s bars this run reports to (the task's
        position in a vmapped group); unused without ``cfg.progress``.

    Returns:
      ``(buffer, losses, epoch_gradients, opt_state, finite, model_state)``; ``finite``
      is ``[E]`` bools (loss and parameters finite after each epoch), ``None`` unless
      ``cfg.check_finite``; ``model_state`` is the state at every kept epoch (leading
      axis ``num_slots``, like ``buffer``), ``None`` without a state.
    """
    cfg = dataclasses.replace(cfg, loss_fn=cfg.loss_fn.rebuild(consts[0]),
                              update=cfg.update.rebuild(consts[1]))
    epoch_fn = _full_batch_epoch if cfg.batch_size is None else _minibatch_epoch
    def slots_of(tree):
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (cfg.num_slots,) + jnp.shape(x))
                            .astype(jnp.result_type(x)), tree)

    def write(buffer, tree, slot):
        return jax.tree.map(lambda b, x: jax.lax.dynamic_update_index_in_dim(
            b, x, slot, 0), buffer, tree)

    # the model state is kept at the same epochs as the parameters (slot 0: the start)
    buffer = (slots_of(params), slots_of(model_state))

    def body(carry, xs):
        params, opt_state, state, buffer = carry
        rel_epoch, slot = xs
        epoch = start_epoch + rel_epoch
        epoch_key = None if key is None else jax.random.fold_in(key, epoch)
        params, opt_state, state, loss, grad = epoch_fn(cfg, params, opt_state, state,
                                                        datasets, weights, epoch_key,
                                                        (rel_epoch, bar_index))
        if cfg.progress and not cfg.progress_steps:
            report = jnp.logical_or(rel_epoch % cfg.progress == 0,
                                    rel_epoch == cfg.num_epochs)
            jax.lax.cond(report, lambda: _callback(cfg, _report_epoch, bar_index,
                                                   rel_epoch, loss), lambda: None)
        finite = None
        if cfg.check_finite:
            # one reduction per epoch; the host reads the [E] flags once, after the run
            finite = functools.reduce(
                jnp.logical_and, [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)],
                jnp.all(jnp.isfinite(loss)))
        buffer = (write(buffer[0], params, slot), write(buffer[1], state, slot))
        ys = (loss, grad if cfg.record_gradients else None, finite)
        return (params, opt_state, state, buffer), ys

    xs = (jnp.arange(1, cfg.num_epochs + 1), jnp.asarray(cfg.slots, jnp.int32))
    (_, opt_state, _, buffer), (losses, grads, finite) = jax.lax.scan(
        body, (params, opt_state, model_state, buffer), xs)
    return buffer[0], losses, grads, opt_state, finite, buffer[1]


run_jit = jax.jit(run, static_argnames=("cfg",))


@functools.partial(jax.jit, static_argnames=("cfg",))
def run_many(params, opt_state, datasets, weights, keys, start_epoch, consts, cfg,
             model_state=None):
    """:func:`run` vmapped over tasks that share data shapes (one compiled program);
    task ``i`` of the group reports to progress bar ``i``."""
    indices = jnp.arange(jax.tree.leaves(datasets)[0].shape[0])
    return jax.vmap(lambda d, k, i: run(params, opt_state, d, weights, k, start_epoch,
                                        consts, cfg, model_state, i),
                    in_axes=(0, None if keys is None else 0, 0))(datasets, keys, indices)


def check_finite(finite, losses, start_epoch: int, names: Sequence[str]) -> None:
    """Raises ``FloatingPointError`` for the first epoch (of the first task) whose loss or
    parameters are not finite, naming the epoch, the task and the last finite loss.

    Args:
      finite: ``[E]`` (or ``[T, E]`` stacked over tasks) flags from :func:`run`; ``None``
        when the run did not check.
      losses: the matching ``[E]`` / ``[T, E]`` losses.
      start_epoch: absolute index of the epoch the run started from.
      names: one label per task (``["data"]`` for a single run).

    Under a caller's ``jax.jit`` / ``jax.vmap`` the flags are traced and not checked.
    """
    if finite is None:
        return
    try:
        flags = np.asarray(finite)
    except jax.errors.TracerArrayConversionError:
        return  # under the caller's jit/vmap: the flags are values of that trace
    if flags.all():
        return
    flags = flags.reshape(-1, flags.shape[-1])
    losses = np.asarray(losses).reshape(flags.shape + np.shape(losses)[np.ndim(finite):])
    for t, row in enumerate(flags):
        if row.all():
            continue
        rel = int(np.argmin(row))  # the first False
        epoch = int(start_epoch) + rel + 1
        name = names[t] if t < len(names) else f"task {t}"
        if rel == 0:
            last = "no epoch of this call ended finite"
        else:
            last = (f"the last finite loss was {np.asarray(losses[t, rel - 1]).tolist()} "
                    f"(epoch {epoch - 1})")
        raise FloatingPointError(
            f"{name}: the loss or the parameters became non-finite in epoch {epoch} (loss "
            f"{np.asarray(losses[t, rel]).tolist()}); {last}. Lower the learning rate, or "
            "pass check_finite=False to get the raw trajectory")


@functools.partial(jax.jit, static_argnums=1)
def split_leading(tree: PyTree, n: int) -> list[PyTree]:
    """``[tree[0], ..., tree[n-1]]`` along every leaf's leading axis, in ONE dispatch.

    Slicing a stacked result task by task eagerly costs one dispatch per leaf and task,
    which dominated ``finetune_tasks`` for small models (measured: 90% of the call).
    """
    return [jax.tree.map(lambda x: x[i], tree) for i in range(n)]
