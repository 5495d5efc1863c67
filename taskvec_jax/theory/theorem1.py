"""Theorem 1 of "On Task Vectors and Gradients" (Zhou et al., arXiv 2508.16082), numerically.

Tasks ``t = 1..T`` with mean losses ``L_t``, base ``theta_0``, step ``eta``
(``learning_rate``), merge coefficient ``alpha``; ``L_MT = sum_t L_t``.

* per task, full-batch GD: ``theta_t^(e+1) = theta_t^(e) - eta * grad L_t(theta_t^(e))``;
* task arithmetic: ``theta_TA^(k) = theta_0 + alpha * sum_t (theta_t^(k) - theta_0)``;
* multitask GD with step ``alpha * eta``:
  ``theta_MT^(e+1) = theta_MT^(e) - alpha * eta * grad L_MT(theta_MT^(e))``.

Theorem 1: ``theta_TA^(1) = theta_MT^(1)`` exactly, and for ``k >= 2``

    theta_TA^(k) - theta_MT^(k) = eta^2 * C_k + O(eta^3),
    C_k = alpha * sum_t sum_{e=1}^{k-1} H_t(theta_MT^(e)) sum_{m=0}^{e-1} r_t(theta_MT^(m)),
    r_t = grad L_t - alpha * grad L_MT,

with ``H_t`` the Hessian of ``L_t`` (:func:`task_arithmetic_gap` measures the left side,
:func:`second_order_term` computes ``C_k`` with ``T (k - 1)`` Hessian-vector products,
:func:`trajectory_curvature` measures what Theorem 2 bounds). Per-task work is grouped and
sharded by :func:`taskvec_jax.training.sharded.map_tasks`; every mean over examples goes
through :mod:`taskvec_jax.training.microbatch`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from taskvec_jax import _checks
from taskvec_jax import hessian as hessian_lib
from taskvec_jax import tree as tree_lib
from taskvec_jax.training import finetune_tasks, multitask_finetune
from taskvec_jax.training.microbatch import mean_value_and_grad
from taskvec_jax.training.sharded import map_tasks

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

__all__ = [
    "HESSIAN_AT", "TaskArithmeticGap", "TrajectoryCurvature", "multitask_gd",
    "second_order_term", "task_arithmetic_gap", "trajectory_curvature",
]

HESSIAN_AT = ("current", "previous")
_WHY = "the theory differentiates every leaf"


def _validate(task_datasets, num_epochs, params, loss_fn):
    datasets = _checks.task_datasets(task_datasets)
    num_epochs = _checks.positive_int(num_epochs, "num_epochs")
    dtype = _checks.float_dtype(params, why=_WHY)
    # By shape only: a per-example loss would otherwise fail deep inside jax.grad.
    for t, data in enumerate(datasets):
        _checks.loss_is_scalar(loss_fn, params, data, _checks.num_examples(data),
                               f"task {t}")
    return datasets, num_epochs, dtype


def _task_grads(loss_fn, params, datasets, microbatch_size, mesh=None):
    return map_tasks(lambda d: mean_value_and_grad(loss_fn, params, d, microbatch_size)[1],
                     datasets, mesh=mesh)


# --------------------------------------------------------------------------- Theorem 1

@functools.cache
def _sgd() -> optax.GradientTransformation:
    # One optimizer object for every call: the engine caches its compiled program on the
    # optimizer, so a learning-rate sweep must not create a new optax.sgd(lr) per value.
    # The step size lives in the optimizer state instead; updates are -lr * g, exactly
    # those of optax.sgd(lr).
    return optax.inject_hyperparams(optax.sgd)(learning_rate=0.0)


def _sgd_state(params: PyTree, lr, dtype):
    state = _sgd().init(params)
    return state._replace(hyperparams={"learning_rate": jnp.asarray(lr, dtype)})


class TaskArithmeticGap(NamedTuple):
    """Task arithmetic and multitask GD after ``k = 1..K`` epochs (Theorem 1's two sides).

    Every tree leaf has a leading axis of length ``K``; index ``k - 1`` holds epoch ``k``.

    Attributes:
      epochs: ``[1, 2, ..., K]``.
      task_arithmetic: ``theta_TA^(k) = theta_0 + alpha * sum_t tau_t^(k)``.
      multitask: ``theta_MT^(k)``, GD on ``sum_t L_t`` with step ``alpha * lr``.
      gap: ``theta_TA^(k) - theta_MT^(k)``.
    """

    epochs: np.ndarray
    task_arithmetic: PyTree
    multitask: PyTree
    gap: PyTree

    @property
    def gap_norms(self) -> jax.Array:
        """``[K]``: ``||theta_TA^(k) - theta_MT^(k)||_2`` over all leaves."""
        return jax.vmap(tree_lib.norm)(self.gap)

    @property
    def gap_max_abs(self) -> jax.Array:
        """``[K]``: the largest ``|theta_TA^(k) - theta_MT^(k)|`` entry."""
        return jax.vmap(lambda g: tree_lib.max(jax.tree.map(jnp.abs, g)))(self.gap)


def task_arithmetic_gap(loss_fn: LossFn, params: PyTree, task_datasets: Sequence[PyTree],
                        learning_rate: float, alpha: float, num_epochs: int, *,
                        batch_size: int | None = None, microbatch_size: int | None = None,
                        key: jax.Array | None = None, drop_remainder: bool = False,
                        progress: bool | int = False, mesh: Any = None
                        ) -> TaskArithmeticGap:
    """Runs both sides of Theorem 1 with the finetuning engine and returns their gap.

    ``theta_t^(k)`` comes from :func:`taskvec_jax.finetune_tasks` with SGD at step
    ``learning_rate`` (``lr`` below), ``theta_MT^(k)`` from
    :func:`taskvec_jax.multitask_finetune` with step ``alpha * lr``
    (both full batch by default, so epoch = one GD step), and
    ``theta_TA^(k) = theta_0 + alpha * sum_t (theta_t^(k) - theta_0)``. With full-batch GD,
    ``gap[0]`` is zero up to rounding (Theorem 1, ``k = 1``) and ``gap[k-1]`` is
    ``lr^2 * C_k + O(lr^3)`` (see :func:`second_order_term`).

    The optimizer is ``optax.inject_hyperparams(optax.sgd)`` with the step in its state:
    the same updates ``-lr * g`` as ``optax.sgd(lr)``, and one compiled program for a whole
    sweep over ``lr`` and ``alpha``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss.
      params: ``theta_0``, a pytree of float arrays.
      task_datasets: one dataset per task (pytrees with a leading example axis).
      learning_rate: the per-task step ``eta``.
      alpha: the merge coefficient.
      num_epochs: ``K``.
      batch_size, microbatch_size, key, drop_remainder, progress, mesh: passed to both
        engine calls (:func:`taskvec_jax.finetune_tasks`); ``batch_size`` with ``key``
        leaves the theorem's setting for minibatch SGD.

    Returns:
      A :class:`TaskArithmeticGap`.
    """
    datasets, num_epochs, dtype = _validate(task_datasets, num_epochs, params, loss_fn)
    lr = learning_rate
    options = dict(batch_size=batch_size, microbatch_size=microbatch_size, key=key,
                   drop_remainder=drop_remainder, progress=progress, mesh=mesh,
                   keep_epochs="all", record_gradients=False)
    opt = _sgd()
    trajs = finetune_tasks(loss_fn, params, list(datasets), opt, num_epochs,
                           opt_state=_sgd_state(params, lr, dtype), **options)
    mt = multitask_finetune(loss_fn, params, list(datasets), opt, num_epochs,
                            opt_state=_sgd_state(params, alpha * lr, dtype), **options)

    # theta_TA^(k) = theta_0 + alpha * sum_t tau_t^(k), k = 1..K (leaves [K, ...]).
    base = jax.tree.map(lambda x: x[None], params)
    task_vectors = [tree_lib.sub(jax.tree.map(lambda x: x[1:], tr.params), base)
                    for tr in trajs]
    ta = tree_lib.weighted_sum([tree_lib.weighted_sum(task_vectors)], [alpha], start=base)
    mt_params = jax.tree.map(lambda x: x[1:], mt.params)
    return TaskArithmeticGap(epochs=np.arange(1, num_epochs + 1), task_arithmetic=ta,
                             multitask=mt_params, gap=tree_lib.sub(ta, mt_params))


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_epochs", "microbatch_size"))
def _multitask_gd(loss_fn, params, datasets, lr, alpha, num_epochs, microbatch_size):
    step = alpha * lr

    def body(theta, _):
        g = tree_lib.weighted_sum(_task_grads(loss_fn, theta, datasets, microbatch_size))
        new = tree_lib.weighted_sum([g], [-step], start=theta)
        return new, new

    _, traj = jax.lax.scan(body, params, None, length=num_epochs)
    return jax.tree.map(lambda p, x: jnp.concatenate([p[None], x]), params, traj)


def multitask_gd(loss_fn: LossFn, params: PyTree, task_datasets: Sequence[PyTree],
                 learning_rate, alpha, num_epochs: int, *,
                 microbatch_size: int | None = None) -> PyTree:
    """The multitask GD trajectory ``theta_MT^(0..K)`` as one jittable, vmappable scan.

    ``theta_MT^(e+1) = theta_MT^(e) - alpha * lr * sum_t grad L_t(theta_MT^(e))`` with
    ``lr = learning_rate``: the same iterates as
    ``multitask_finetune(..., optax.sgd(alpha * lr), K)``, written so that ``params``,
    ``task_datasets``, ``learning_rate`` and ``alpha`` may be traced (``jax.vmap`` over
    configurations).

    Returns:
      A pytree whose leaves have a leading axis of length ``K + 1`` (index 0 = ``theta_0``).
    """
    datasets, num_epochs, _ = _validate(task_datasets, num_epochs, params, loss_fn)
    return _multitask_gd(loss_fn, params, datasets, learning_rate, alpha, num_epochs,
                         microbatch_size)


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_epochs", "hessian_at",
                                             "microbatch_size", "hvp_fn", "mesh"))
def _second_order(loss_fn, params, datasets, lr, alpha, num_epochs, hessian_at,
                  microbatch_size, hvp_fn, mesh=None):
    step = alpha * lr
    zeros = tree_lib.zeros_like(params)

    def grads_and_residuals(theta):
        g = _task_grads(loss_fn, theta, datasets, microbatch_size, mesh)
        g_mt = tree_lib.weighted_sum(g)
        return g_mt, [tree_lib.weighted_sum([g_mt], [-alpha], start=gt)
                      for gt in g]  # r_t = g_t - alpha g_MT

    def curvature(theta, sums):
        # alpha * sum_t H_t(theta) S_t: exactly T Hessian-vector products.
        hv = map_tasks(lambda d, s: hvp_fn(loss_fn, theta, d, s,
                                            microbatch_size=microbatch_size),
                        datasets, sums, mesh=mesh)
        return tree_lib.weighted_sum(hv)

    def add_curvature(theta, sums, c, do_it):
        # lax.cond runs one branch at run time (the scan index is never batched), so
        # the HVPs happen only when do_it holds: T per productive step, T (K - 1) in all.
        return jax.lax.cond(do_it, lambda: tree_lib.weighted_sum(
            [curvature(theta, sums)], [alpha], start=c),
                            lambda: c)

    def body(carry, e):
        theta, sums, c = carry
        if hessian_at == "current":
            # C_{e+1} = C_e + alpha sum_t H_t(theta^(e)) sum_{m<e} r_t(theta^(m)).
            c = add_curvature(theta, sums, c, e > 0)
        g_mt, r = grads_and_residuals(theta)
        sums = [tree_lib.add(s, rt) for s, rt in zip(sums, r)]
        if hessian_at == "previous":
            # C_{e+2} = C_{e+1} + alpha sum_t H_t(theta^(e)) sum_{m<=e} r_t(theta^(m)).
            c = add_curvature(theta, sums, c, e < num_epochs - 1)
        return (tree_lib.weighted_sum([g_mt], [-step], start=theta), sums, c), c

    init = (params, [zeros] * len(datasets), zeros)
    _, cs = jax.lax.scan(body, init, jnp.arange(num_epochs))
    if hessian_at == "current":
        return cs  # cs[e] = C_{e+1}
    # cs[e] = C_{e+2}; C_1 = 0 and the last step adds nothing.
    return jax.tree.map(lambda z, x: jnp.concatenate([z[None], x[:-1]]), zeros, cs)


def second_order_term(loss_fn: LossFn, params: PyTree, task_datasets: Sequence[PyTree],
                      learning_rate, alpha, num_epochs: int, *, hessian_at: str = "current",
                      all_epochs: bool = False, microbatch_size: int | None = None,
                      hvp_fn: Callable | None = None, mesh=None) -> PyTree:
    """The ``eta^2`` coefficient ``C_k`` of Theorem 1, from Hessian-vector products.

    ``theta_TA^(k) - theta_MT^(k) = lr^2 * C_k + O(lr^3)`` (``lr = learning_rate``) with

        C_k = alpha * sum_t sum_{e=1}^{k-1} H_t(theta_MT^(e)) sum_{m=0}^{e-1} r_t(theta_MT^(m)),
        r_t(theta) = grad L_t(theta) - alpha * grad L_MT(theta),

    along the multitask trajectory ``theta_MT^(e)`` (step ``alpha * lr``), which this
    function runs itself. ``hessian_at="previous"`` evaluates each Hessian one step earlier,
    ``H_t(theta_MT^(e-1))`` (the indexing of the paper's summary, sum over ``e = 0..k-2``);
    the two forms differ by ``O(lr)``, so both satisfy the same ``O(lr^3)`` statement.

    Cost: the inner sum is a running sum ``S_t`` carried through a ``lax.scan`` over the
    ``K`` multitask steps, so all of ``C_1..C_K`` together take exactly ``T * (K - 1)``
    Hessian-vector products (one per task per step, skipped by ``lax.cond`` on the one
    step that contributes nothing: ``C_1 = 0``) and ``T * K`` gradients; never a dense
    Hessian.

    Jittable and vmappable in ``params``, ``task_datasets``, ``learning_rate`` and
    ``alpha``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss.
      params: ``theta_0``.
      task_datasets: one dataset per task.
      learning_rate: the per-task step ``eta``.
      alpha: the merge coefficient.
      num_epochs: ``K``.
      hessian_at: ``"current"`` (``H_t`` at ``theta_MT^(e)``) or ``"previous"``
        (at ``theta_MT^(e-1)``).
      all_epochs: return ``C_1..C_K`` stacked on a leading axis of length ``K`` (index
        ``k - 1``) instead of ``C_K`` alone.
      microbatch_size: compute gradients and HVPs in chunks of this many examples.
      hvp_fn: replaces :func:`taskvec_jax.hessian.hvp` (same signature,
        ``hvp_fn(loss_fn, params, data, v, microbatch_size=None)``), e.g. to count
        evaluations or to use a Gauss-Newton product. Must be hashable (it is static).
      mesh: a ``(tasks, data)`` mesh (:func:`taskvec_jax.training.sharded.make_mesh`): tasks of
        equal data shapes are spread over ``tasks`` and each task's examples over
        ``data`` (the same result, up to the order of floating-point sums).

    Returns:
      ``C_K`` (a pytree shaped like ``params``), or all ``C_k`` if ``all_epochs``.
    """
    datasets, num_epochs, _ = _validate(task_datasets, num_epochs, params, loss_fn)
    if hessian_at not in HESSIAN_AT:
        raise ValueError(f"hessian_at must be one of {HESSIAN_AT}, got {hessian_at!r}")
    cs = _second_order(loss_fn, params, datasets, learning_rate, alpha, num_epochs, hessian_at,
                       microbatch_size, hvp_fn or hessian_lib.hvp, mesh)
    return cs if all_epochs else jax.tree.map(lambda x: x[-1], cs)


class TrajectoryCurvature(NamedTuple):
    """Gradient and Hessian norms of every task along the multitask trajectory.

    Attributes:
      params: ``theta_MT^(0..K)``, leaves ``[K + 1, ...]``.
      grad_norms: ``[K + 1, T]``, ``||grad L_t(theta_MT^(e))||_2``.
      hessian_norms: ``[K + 1, T]``, ``||H_t(theta_MT^(e))||_2`` by power iteration (a
        lower estimate that converges to the norm; see
        :func:`taskvec_jax.hessian.power_iteration`).
      converged: ``[K + 1, T]``, whether each power iteration met its tolerance.
    """

    params: PyTree
    grad_norms: jax.Array
    hessian_norms: jax.Array
    converged: jax.Array


def trajectory_curvature(loss_fn: LossFn, params: PyTree,
                         task_datasets: Sequence[PyTree], learning_rate, alpha,
                         num_epochs: int, key: jax.Array, *, tol: float = 1e-9,
                         max_steps: int = 500, microbatch_size: int | None = None,
                         max_iters: int | None = None) -> TrajectoryCurvature:
    """Measures ``||grad L_t||`` and ``||H_t||_2`` at every point of ``theta_MT^(0..K)``.

    These are the quantities Theorem 2 bounds by ``G_max`` and ``H_max``. Jittable and
    vmappable; power iterations for all points and tasks run together (``vmap``).

    Args:
      loss_fn, params, task_datasets, learning_rate, alpha, num_epochs: as in
        :func:`second_order_term`; the trajectory is :func:`multitask_gd`'s.
      key: PRNG key for the power iterations' starting vectors (one per point and task).
      tol, max_steps: the power iteration's tolerance and cap
        (:func:`taskvec_jax.hessian.power_iteration`).
      microbatch_size: compute gradients and HVPs in chunks of this many examples.
      max_iters: deprecated alias of ``max_steps``.

    Returns:
      A :class:`TrajectoryCurvature`.
    """
    max_steps = _checks.renamed(max_iters, "max_iters", max_steps, "max_steps", 500)
    datasets, num_epochs, _ = _validate(task_datasets, num_epochs, params, loss_fn)
    return _trajectory_curvature(loss_fn, params, datasets, learning_rate, alpha,
                                 num_epochs, key, tol, max_steps, microbatch_size)


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_epochs", "tol", "max_steps",
                                             "microbatch_size"))
def _trajectory_curvature(loss_fn, params, datasets, lr, alpha, num_epochs, key, tol,
                          max_steps, microbatch_size):
    traj = _multitask_gd(loss_fn, params, datasets, lr, alpha, num_epochs,
                         microbatch_size)
    num_points = num_epochs + 1
    keys = jax.random.split(key, num_points * len(datasets)).reshape(
        (num_points, len(datasets)) + key.shape)

    def one_task(theta, d, key):
        g = mean_value_and_grad(loss_fn, theta, d, microbatch_size)[1]
        res = hessian_lib.hessian_spectral_norm(loss_fn, theta, d, key, tol=tol,
                                                max_steps=max_steps,
                                                microbatch_size=microbatch_size)
        return tree_lib.norm(g), res.norm, res.converged

    def at_point(theta, point_keys):
        res = map_tasks(functools.partial(one_task, theta), datasets, list(point_keys))
        return tuple(jnp.stack(x) for x in zip(*res))

    gn, hn, conv = jax.vmap(at_point)(traj, keys)
    return TrajectoryCurvature(params=traj, grad_norms=gn, hessian_norms=hn,
                               converged=conv)


