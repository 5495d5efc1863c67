"""AdaMerging: merge coefficients learned on unlabeled inputs (Yang et al., ICLR 2024).

AdaMerging ("AdaMerging: Adaptive Model Merging for Multi-Task Learning") learns the
coefficients of task arithmetic, ``theta(lambda) = base + sum_t lambda_t * tau_t``, by
minimizing the Shannon entropy of the merged model's predictions on unlabeled inputs of
every task (entropy is a proxy for the unavailable loss: in the paper, low entropy
correlates with low loss). Task-wise: one ``lambda_t`` per task. Layer-wise: one per task
per parameter tensor (a "layer" in AdaMerging's code is each weight and each bias).

In JAX the method is ``jax.grad`` through the merge, and every step of the optimizer runs
inside one ``lax.scan`` under ``jax.jit``. Any merge differentiable in its coefficients
can be learned the same way (``merge_fn=``); TIES-AdaMerging learns ``lambda_t`` over
TIES' task vectors with their masks fixed (:func:`ties_masked_task_vectors`).

Reference: FusionBench's ``fusion_bench/method/adamerging/`` (task-wise and layer-wise,
entropy summed over tasks, Adam with learning rate 1e-3, coefficients initialized at 0.3).
FusionBench optionally clamps the coefficients to ``[0, 1]``; here they are unconstrained
(an optax projection can be chained into ``optimizer`` if wanted).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from taskvec_jax import _checks
from taskvec_jax import tree as tree_lib
from taskvec_jax.merging import _common

PyTree = Any
ApplyFn = Callable[[PyTree, PyTree], jax.Array]
MergeFn = Callable[[PyTree, Sequence[PyTree], Any], PyTree]

__all__ = ["ADAMERGING_GRANULARITIES", "AdaMerging", "adamerging", "prediction_entropy",
           "scaled_merge", "ties_masked_task_vectors"]

ADAMERGING_GRANULARITIES = ("task", "layer")
# One object, so that calls with the default optimizer share one compilation.
_DEFAULT_OPTIMIZER = optax.adam(1e-3)


class AdaMerging(NamedTuple):
    """The result of :func:`adamerging`.

    Attributes:
      params: the merged model at the learned coefficients.
      coefficients: ``[T]`` (``granularity="task"``) or, for ``"layer"``, a tree shaped
        like ``base`` with a ``[T]`` array at every float leaf and ``None`` elsewhere.
      history: the coefficients before every step and after the last: the same
        structure with a leading axis of ``num_steps + 1`` (``history[0]`` is ``init``).
      losses: ``[num_steps + 1]``, the entropy objective at each entry of ``history``
        (on the step's minibatch when ``batch_size`` is set; the last entry on all
        inputs).
    """

    params: PyTree
    coefficients: Any
    history: Any
    losses: jax.Array


def prediction_entropy(apply_fn: ApplyFn | Sequence[ApplyFn], params: PyTree,
                       unlabeled_inputs: Sequence[PyTree]) -> jax.Array:
    """AdaMerging's objective: ``sum_t mean_i H(softmax(apply_fn_t(params, x_i)))``.

    ``H(p) = -sum_c p_c log p_c`` (natural log), computed from ``log_softmax`` so that a
    class with probability exactly 0 (a padded head with a ``-1e9`` bias) adds exactly 0.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> [n, C]`` logits, one callable for every
        task or a sequence of ``T`` (one head per task).
      params: the model.
      unlabeled_inputs: ``T`` pytrees of inputs, each with a leading example axis.

    Returns:
      A scalar in at least float32.
    """
    fns = _apply_fns(apply_fn, len(unlabeled_inputs))
    total = 0.0
    for fn, x in zip(fns, unlabeled_inputs):
        logits = fn(params, x)
        logp = jax.nn.log_softmax(logits.astype(tree_lib.accumulation_dtype(logits.dtype)))
        total = total + jnp.mean(-jnp.sum(jnp.exp(logp) * logp, axis=-1))
    return total


def scaled_merge(base: PyTree, task_vectors: Sequence[PyTree], coefficients: Any) -> PyTree:
    """``base + sum_t lambda_t * tau_t``: AdaMerging's merge, task-wise or layer-wise.

    ``coefficients`` is ``[T]`` (task arithmetic with per-task alpha) or a tree shaped like
    ``base`` with a ``[T]`` array at every float leaf (``None`` elsewhere): leaf ``l`` of
    the merge is ``base_l + sum_t coefficients_l[t] * tau_t,l``. Linear in the
    coefficients, hence differentiable; sums run in at least float32
    (:func:`taskvec_jax.tree.weighted_sum`).
    """
    if _is_array(coefficients):
        return tree_lib.weighted_sum(list(task_vectors), coefficients, start=base)
    coef_leaves, _ = _common.flatten(coefficients)
    scaled = []
    for t, tau in enumerate(task_vectors):
        leaves, treedef = _common.flatten(tau)
        scaled.append(jax.tree.unflatten(treedef, [
            None if (x is None or c is None) else c[t].astype(
                tree_lib.accumulation_dtype(jnp.result_type(x))) * x
            for x, c in zip(leaves, coef_leaves)]))
    return tree_lib.weighted_sum(scaled, start=base)


def ties_masked_task_vectors(task_vectors: Sequence[PyTree], *, density: float = 0.2,
                             scope: str = "global") -> list[PyTree]:
    """Each task vector restricted to the entries TIES keeps for it (masks then fixed).

    ``out_t = where(hat_t * s > 0, hat_t, 0)`` with ``hat_t = trim(tau_t, density, scope)``
    and ``s = sign(sum_t hat_t)`` the elected sign (Yadav et al., 2023). Then
    ``sum_t out_t`` is the TIES-merged task vector with ``merge="sum"``, and
    ``scaled_merge(base, out, lambda)`` is the merge TIES-AdaMerging learns
    ``lambda`` for (differentiable in ``lambda``: the masks are constants).

    Args:
      task_vectors: a non-empty sequence of task vectors with equal structure.
      density: fraction kept by the trim, in ``(0, 1]``.
      scope: the trim's scope, ``"global"``, ``"leaf"`` or ``"row"``.

    Returns:
      A list of ``T`` task vectors (``None`` at non-float leaves).
    """
    from taskvec_jax import merging   # the package, at call time (it imports this module)

    _common.flatten_tasks(task_vectors)
    trimmed = [merging.trim(tau, density=density, scope=scope) for tau in task_vectors]
    elected = jax.tree.map(jnp.sign, tree_lib.weighted_sum(trimmed))
    return [jax.tree.map(lambda h, s: jnp.where(h * s > 0, h, jnp.zeros((), h.dtype)), hat,
                         elected) for hat in trimmed]


def adamerging(base: PyTree, task_vectors: Sequence[PyTree],
               apply_fn: ApplyFn | Sequence[ApplyFn], unlabeled_inputs: Sequence[PyTree], *,
               granularity: str = "task", num_steps: int = 100,
               optimizer: optax.GradientTransformation | None = None, init: Any = 0.3,
               merge_fn: MergeFn | None = None, batch_size: int | None = None,
               key: jax.Array | None = None) -> AdaMerging:
    """AdaMerging: coefficients minimizing the merged model's prediction entropy.

    Minimizes ``prediction_entropy(apply_fn, merge_fn(base, task_vectors, lambda),
    unlabeled_inputs)`` over ``lambda`` with ``optimizer`` for ``num_steps`` steps, all in
    one ``lax.scan`` under ``jax.jit``, gradients by ``jax.grad`` through the merge.

    Coefficient shapes (what ``init``, ``AdaMerging.coefficients`` and ``merge_fn`` see):

    * ``granularity="task"``: ``[T]``;
    * ``granularity="layer"``: a tree shaped like ``base`` holding a ``[T]`` array at
      every float leaf and ``None`` at the others; ``coefficients_l[t]`` scales leaf
      ``l`` of task vector ``t``.

    Memory: the merged model and its gradient (model-sized, at least float32), the
    forward and backward pass of ``apply_fn`` on one step's inputs, and the
    ``num_steps + 1`` copies of the (small) coefficients in ``history``.

    Args:
      base: the pretrained model.
      task_vectors: ``T`` task vectors shaped like ``base`` (``None`` at non-float leaves).
      apply_fn: ``apply_fn(params, inputs) -> [n, C]`` logits, one callable for all tasks
        (a batch may carry its task id, as with ``taskvec_jax.models.TaskHeads``) or a
        sequence of ``T``.
      unlabeled_inputs: ``T`` pytrees of inputs (no labels needed), leading example axis.
        The paper uses the tasks' unlabeled test inputs (test-time adaptation).
      granularity: ``"task"`` or ``"layer"``.
      num_steps: optimizer steps (``>= 0``).
      optimizer: optax transformation for the coefficients (default ``optax.adam(1e-3)``,
        the paper's).
      init: starting coefficients: a scalar for every coefficient (default 0.3, the
        paper's), or an array/tree shaped as above.
      merge_fn: ``merge_fn(base, task_vectors, coefficients) -> model``, differentiable in
        ``coefficients`` (default :func:`scaled_merge`).
      batch_size: if set, each step uses ``batch_size`` inputs per task drawn without
        replacement from ``jax.random.fold_in(key, step)`` (the paper: 16); default: all.
      key: PRNG key, required with ``batch_size``.

    Returns:
      An :class:`AdaMerging`.

    Raises:
      ValueError: for mismatched task vectors (naming task and leaf path), a number of
        input sets or apply functions different from ``T``, empty inputs, an unknown
        granularity, a negative ``num_steps``, ``init`` of the wrong shape, a bad
        ``batch_size`` or a missing key, or ``apply_fn`` not returning ``[n, C]`` logits.
    """
    _common.flatten_tasks(task_vectors, base)
    num = len(task_vectors)
    if granularity not in ADAMERGING_GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; choose one of "
                         f"{ADAMERGING_GRANULARITIES}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be a non-negative integer, got {num_steps!r}")
    inputs = _checks.task_datasets(unlabeled_inputs, "unlabeled_inputs")
    if len(inputs) != num:
        raise ValueError(f"unlabeled_inputs has {len(inputs)} tasks, task_vectors has "
                         f"{num}: pass one set of inputs per task")
    fns = _apply_fns(apply_fn, num)
    for t, (fn, x) in enumerate(zip(fns, inputs)):
        out = jax.eval_shape(fn, base, _first_input(x))
        if getattr(out, "ndim", None) != 2 or out.shape[0] != 1:
            raise ValueError(f"apply_fn must return [n, num_classes] logits; on one input "
                             f"of task {t} it returned shape "
                             f"{getattr(out, 'shape', type(out).__name__)}")
    batch_size = _checks.positive_int(batch_size, "batch_size", allow_none=True)
    if batch_size is not None:
        if key is None:
            raise ValueError("batch_size draws minibatches: pass key=")
        for t, x in enumerate(inputs):
            n_t = _checks.num_examples(x, name=f"unlabeled_inputs[{t}]")
            if batch_size > n_t:
                raise ValueError(f"batch_size is {batch_size}, but task {t} has only {n_t} "
                                 "unlabeled inputs")
    if key is None:
        key = jax.random.key(0)     # unused without batch_size; one program signature
    init = _init_coefficients(base, num, granularity, init)
    return _adamerging_jit(base, tuple(task_vectors), tuple(inputs), init, key,
                           apply_fn=apply_fn if callable(apply_fn) else tuple(apply_fn),
                           merge_fn=scaled_merge if merge_fn is None else merge_fn,
                           optimizer=_DEFAULT_OPTIMIZER if optimizer is None else optimizer,
                           num_steps=num_steps, batch_size=batch_size)


def _is_array(x) -> bool:
    return isinstance(x, (int, float, np.ndarray, np.generic, jax.Array))


def _first_input(x):
    """The first example of a pytree of inputs (a batch of one)."""
    return jax.tree.map(lambda a: a[:1], x)


def _apply_fns(apply_fn, num: int) -> tuple:
    if callable(apply_fn):
        return (apply_fn,) * num
    fns = _checks.non_empty_sequence(apply_fn, "apply_fn", item="function per task")
    if len(fns) != num:
        raise ValueError(f"apply_fn has {len(fns)} functions for {num} tasks")
    for t, fn in enumerate(fns):
        if not callable(fn):
            raise ValueError(f"apply_fn[{t}] must be callable, got {type(fn).__name__}")
    return fns


def _init_coefficients(base, num, granularity, init):
    leaves, treedef = _common.flatten(base)
    adt = tree_lib.accumulation_dtype(
        jnp.result_type(*[x for x in leaves if _common.is_param(x)]))
    if granularity == "task":
        return _common.per_task_alpha(init, num, name="init").astype(adt)
    if _is_array(init) and jnp.ndim(init) == 0:
        return jax.tree.unflatten(treedef, [
            jnp.full((num,), init, adt) if _common.is_param(x) else None for x in leaves])
    init_leaves, init_def = _common.flatten(init)
    want = [(num,) if _common.is_param(x) else None for x in leaves]
    got = [None if c is None else jnp.shape(c) for c in init_leaves]
    if init_def != treedef or got != want:
        raise ValueError("init for granularity='layer' must be a scalar or a tree shaped "
                         f"like base with a [{num}] array at every float leaf and None "
                         "elsewhere")
    return jax.tree.unflatten(treedef, [None if c is None else jnp.asarray(c, adt)
                                        for c in init_leaves])


@functools.partial(jax.jit, static_argnames=("apply_fn", "merge_fn", "optimizer",
                                             "num_steps", "batch_size"))
def _adamerging_jit(base, task_vectors, inputs, coefficients, key, *, apply_fn, merge_fn,
                    optimizer, num_steps, batch_size):
    def objective(coefficients, batches):
        return prediction_entropy(apply_fn, merge_fn(base, task_vectors, coefficients),
                                  batches)

    def minibatches(step):
        if batch_size is None:
            return inputs
        out = []
        for t, x in enumerate(inputs):
            n_t = jax.tree.leaves(x)[0].shape[0]
            k = jax.random.fold_in(jax.random.fold_in(key, step), t)
            idx = jax.random.choice(k, n_t, (batch_size,), replace=False)
            out.append(jax.tree.map(lambda a: a[idx], x))
        return out

    value_and_grad = jax.value_and_grad(objective)

    def step(carry, step_index):
        coefficients, state = carry
        loss, grad = value_and_grad(coefficients, minibatches(step_index))
        updates, state = optimizer.update(grad, state, coefficients)
        return (optax.apply_updates(coefficients, updates), state), (coefficients, loss)

    (final, _), (history, losses) = lax.scan(
        step, (coefficients, optimizer.init(coefficients)), jnp.arange(num_steps))
    last = objective(final, inputs)
    history = jax.tree.map(lambda h, c: jnp.concatenate([h, c[None]]), history, final)
    losses = jnp.concatenate([losses, last[None].astype(losses.dtype)])
    return AdaMerging(merge_fn(base, task_vectors, final), final, history, losses)
