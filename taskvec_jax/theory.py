"""Theorems 1 and 2 of "On Task Vectors and Gradients" (Zhou et al., arXiv 2508.16082).

Tasks ``t = 1..T`` with mean losses ``L_t``, base ``theta_0``, step ``eta``, merge
coefficient ``alpha``; ``L_MT = sum_t L_t``.

* per task, full-batch GD: ``theta_t^(e+1) = theta_t^(e) - eta * grad L_t(theta_t^(e))``;
* task arithmetic: ``theta_TA^(k) = theta_0 + alpha * sum_t (theta_t^(k) - theta_0)``;
* multitask GD with step ``alpha * eta``:
  ``theta_MT^(e+1) = theta_MT^(e) - alpha * eta * grad L_MT(theta_MT^(e))``.

Theorem 1: ``theta_TA^(1) = theta_MT^(1)`` exactly, and for ``k >= 2``

    theta_TA^(k) - theta_MT^(k) = eta^2 * C_k + O(eta^3),
    C_k = alpha * sum_t sum_{e=1}^{k-1} H_t(theta_MT^(e)) sum_{m=0}^{e-1} r_t(theta_MT^(m)),
    r_t = grad L_t - alpha * grad L_MT,

with ``H_t`` the Hessian of ``L_t`` (:func:`task_arithmetic_gap` measures the left side,
:func:`second_order_term` computes ``C_k`` with ``T (k - 1)`` Hessian-vector products).

Theorem 2 bounds ``||C_k||`` for feed-forward networks: :func:`feedforward_bound` gives
explicit ``G_max >= ||grad L_t||`` and ``H_max >= ||H_t||_2`` from the layers' spectral
norms, the input norm and the activation's derivative bounds, then

    ||C_k|| <= |alpha| * T * rho * k (k - 1) / 2 * H_max * G_max,
    rho = |1 - alpha| + |alpha| (T - 1)     (so ||r_t|| <= rho * G_max),

next to the form stated in the paper's summary, ``T ((k - 2 + 2) / 2) |alpha T + 1| H_max
G_max``. docs/theory.md derives every step and reports where the stated form fails.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from taskvec_jax import hessian as hessian_lib
from taskvec_jax import tree as tree_lib
from taskvec_jax.finetune import (
    check_task_datasets,
    finetune_tasks,
    mean_value_and_grad,
    multitask_finetune,
)

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

__all__ = [
    "ACTIVATION_CONSTANTS", "ActivationConstants", "FeedforwardBound",
    "TaskArithmeticGap", "TrajectoryCurvature", "feedforward_bound", "mlp_weight_norms",
    "multitask_gd", "paper_second_order_bound", "second_order_bound",
    "second_order_term", "task_arithmetic_gap", "trajectory_curvature",
]

HESSIAN_AT = ("current", "previous")


# --------------------------------------------------------------------------- validation

def _check_epochs(num_epochs: int) -> int:
    if isinstance(num_epochs, bool) or not isinstance(num_epochs, (int, np.integer)) \
            or num_epochs < 1:
        raise ValueError(f"num_epochs must be a positive integer, got {num_epochs!r}")
    return int(num_epochs)


def _float_dtype(params: PyTree):
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError("params is empty: it has no array leaves")
    for path, leaf in tree_lib.leaves_with_paths(params):
        if not tree_lib.is_float(leaf):
            raise ValueError(f"params: leaf '{path}' has dtype {jnp.result_type(leaf)}; "
                             "the theory differentiates every leaf, so all must be "
                             "floating point")
    return jnp.result_type(*leaves)


def _axpy(a, x: PyTree, y: PyTree) -> PyTree:
    """``y + a * x`` leaf by leaf, keeping ``y``'s dtypes (``a`` may be a traced scalar)."""
    return jax.tree.map(lambda xi, yi: (yi + a * xi).astype(yi.dtype), x, y)


def _signature(data: PyTree):
    leaves, treedef = jax.tree.flatten(data)
    return treedef, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves)


def _map_tasks(fn: Callable, datasets: Sequence[PyTree], *per_task: Sequence[PyTree],
               mesh=None) -> list:
    """``[fn(datasets[t], *(a[t] for a in per_task)) for t]``, vmapped over same-shape tasks.

    Tasks whose data share tree structure, shapes and dtypes run as one ``vmap`` (the
    compiled program holds one copy of ``fn``, not ``T``); the others run one by one.
    With a ``(tasks, data)`` mesh (inside ``jit``), a group's stacked data are constrained
    to ``P("tasks", "data")`` and the per-task arguments to ``P("tasks")``: XLA then runs
    the tasks on different devices and reduces each task's mean over the ``data`` axis.
    """
    groups: dict[Any, list[int]] = {}
    for t, d in enumerate(datasets):
        groups.setdefault(_signature(d), []).append(t)
    out: list = [None] * len(datasets)
    for members in groups.values():
        if len(members) == 1:
            t = members[0]
            out[t] = fn(datasets[t], *(a[t] for a in per_task))
            continue
        stacked = [tree_lib.stack([seq[t] for t in members])
                   for seq in (datasets, *per_task)]
        if mesh is not None:
            stacked = [_constrain(tree, mesh, P("tasks", "data") if i == 0 else P("tasks"))
                       for i, tree in enumerate(stacked)]
        res = jax.vmap(fn)(*stacked)
        for i, t in enumerate(members):
            out[t] = jax.tree.map(lambda x, i=i: x[i], res)
    return out


def _constrain(tree: PyTree, mesh, spec) -> PyTree:
    """``with_sharding_constraint`` on every leaf, ``spec`` trimmed to the leaf's rank."""
    def one(x):
        parts = tuple(spec)[:x.ndim]
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*parts)))
    return jax.tree.map(one, tree)


def _task_grads(loss_fn, params, datasets, microbatch_size, mesh=None):
    return _map_tasks(lambda d: mean_value_and_grad(loss_fn, params, d, microbatch_size)[1],
                      datasets, mesh=mesh)


def _sum_trees(trees):
    out = trees[0]
    for t in trees[1:]:
        out = tree_lib.add(out, t)
    return out


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
                        lr: float, alpha: float, num_epochs: int,
                        **finetune_kwargs) -> TaskArithmeticGap:
    """Runs both sides of Theorem 1 with the finetuning engine and returns their gap.

    ``theta_t^(k)`` comes from :func:`taskvec_jax.finetune_tasks` with SGD at step ``lr``,
    ``theta_MT^(k)`` from :func:`taskvec_jax.multitask_finetune` with step ``alpha * lr``
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
      lr: the per-task step ``eta``.
      alpha: the merge coefficient.
      num_epochs: ``K``.
      **finetune_kwargs: passed to both engine calls, e.g. ``microbatch_size``, or
        ``batch_size`` with ``key`` to leave the theorem's setting for minibatch SGD.

    Returns:
      A :class:`TaskArithmeticGap`.
    """
    datasets = check_task_datasets(task_datasets)
    num_epochs = _check_epochs(num_epochs)
    dtype = _float_dtype(params)
    for name in ("keep_epochs", "opt_state", "start_epoch", "record_gradients"):
        if name in finetune_kwargs:
            raise TypeError(f"task_arithmetic_gap sets {name} itself")
    opt = _sgd()
    trajs = finetune_tasks(loss_fn, params, list(datasets), opt, num_epochs,
                           opt_state=_sgd_state(params, lr, dtype),
                           record_gradients=False, **finetune_kwargs)
    mt = multitask_finetune(loss_fn, params, list(datasets), opt, num_epochs,
                            opt_state=_sgd_state(params, alpha * lr, dtype),
                            record_gradients=False, **finetune_kwargs)

    def merge(base, *task_params):
        tau = sum(p[1:] - base for p in task_params)  # sum_t tau_t^(k), k = 1..K
        return (base + alpha * tau).astype(base.dtype)

    ta = jax.tree.map(merge, params, *[tr.params for tr in trajs])
    mt_params = jax.tree.map(lambda x: x[1:], mt.params)
    return TaskArithmeticGap(epochs=np.arange(1, num_epochs + 1), task_arithmetic=ta,
                             multitask=mt_params, gap=tree_lib.sub(ta, mt_params))


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_epochs", "microbatch_size"))
def _multitask_gd(loss_fn, params, datasets, lr, alpha, num_epochs, microbatch_size):
    step = alpha * lr

    def body(theta, _):
        g = _sum_trees(_task_grads(loss_fn, theta, datasets, microbatch_size))
        new = _axpy(-step, g, theta)
        return new, new

    _, traj = jax.lax.scan(body, params, None, length=num_epochs)
    return jax.tree.map(lambda p, x: jnp.concatenate([p[None], x]), params, traj)


def multitask_gd(loss_fn: LossFn, params: PyTree, task_datasets: Sequence[PyTree],
                 lr, alpha, num_epochs: int, *,
                 microbatch_size: int | None = None) -> PyTree:
    """The multitask GD trajectory ``theta_MT^(0..K)`` as one jittable, vmappable scan.

    ``theta_MT^(e+1) = theta_MT^(e) - alpha * lr * sum_t grad L_t(theta_MT^(e))``: the
    same iterates as ``multitask_finetune(..., optax.sgd(alpha * lr), K)``, written so that
    ``params``, ``task_datasets``, ``lr`` and ``alpha`` may be traced (``jax.vmap`` over
    configurations).

    Returns:
      A pytree whose leaves have a leading axis of length ``K + 1`` (index 0 = ``theta_0``).
    """
    datasets = check_task_datasets(task_datasets)
    num_epochs = _check_epochs(num_epochs)
    _float_dtype(params)
    return _multitask_gd(loss_fn, params, datasets, lr, alpha, num_epochs,
                         microbatch_size)


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_epochs", "hessian_at",
                                             "microbatch_size", "hvp_fn", "mesh"))
def _second_order(loss_fn, params, datasets, lr, alpha, num_epochs, hessian_at,
                  microbatch_size, hvp_fn, mesh=None):
    step = alpha * lr
    zeros = tree_lib.zeros_like(params)

    def grads_and_residuals(theta):
        g = _task_grads(loss_fn, theta, datasets, microbatch_size, mesh)
        g_mt = _sum_trees(g)
        return g_mt, [_axpy(-alpha, g_mt, gt) for gt in g]  # r_t = g_t - alpha g_MT

    def curvature(theta, sums):
        # alpha * sum_t H_t(theta) S_t: exactly T Hessian-vector products.
        hv = _map_tasks(lambda d, s: hvp_fn(loss_fn, theta, d, s,
                                            microbatch_size=microbatch_size),
                        datasets, sums, mesh=mesh)
        return _sum_trees(hv)

    def add_curvature(theta, sums, c, do_it):
        # lax.cond runs one branch at run time (the scan index is never batched), so
        # the HVPs happen only when do_it holds: T per productive step, T (K - 1) in all.
        return jax.lax.cond(do_it, lambda: _axpy(alpha, curvature(theta, sums), c),
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
        return (_axpy(-step, g_mt, theta), sums, c), c

    init = (params, [zeros] * len(datasets), zeros)
    _, cs = jax.lax.scan(body, init, jnp.arange(num_epochs))
    if hessian_at == "current":
        return cs  # cs[e] = C_{e+1}
    # cs[e] = C_{e+2}; C_1 = 0 and the last step adds nothing.
    return jax.tree.map(lambda z, x: jnp.concatenate([z[None], x[:-1]]), zeros, cs)


def second_order_term(loss_fn: LossFn, params: PyTree, task_datasets: Sequence[PyTree],
                      lr, alpha, num_epochs: int, *, hessian_at: str = "current",
                      all_epochs: bool = False, microbatch_size: int | None = None,
                      hvp_fn: Callable | None = None, mesh=None) -> PyTree:
    """The ``eta^2`` coefficient ``C_k`` of Theorem 1, from Hessian-vector products.

    ``theta_TA^(k) - theta_MT^(k) = lr^2 * C_k + O(lr^3)`` with

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

    Jittable and vmappable in ``params``, ``task_datasets``, ``lr`` and ``alpha``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss.
      params: ``theta_0``.
      task_datasets: one dataset per task.
      lr: the per-task step ``eta``.
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
      mesh: a ``(tasks, data)`` mesh (:func:`taskvec_jax.parallel.make_mesh`): tasks of
        equal data shapes are spread over ``tasks`` and each task's examples over
        ``data`` (the same result, up to the order of floating-point sums).

    Returns:
      ``C_K`` (a pytree shaped like ``params``), or all ``C_k`` if ``all_epochs``.
    """
    datasets = check_task_datasets(task_datasets)
    num_epochs = _check_epochs(num_epochs)
    _float_dtype(params)
    if hessian_at not in HESSIAN_AT:
        raise ValueError(f"hessian_at must be one of {HESSIAN_AT}, got {hessian_at!r}")
    cs = _second_order(loss_fn, params, datasets, lr, alpha, num_epochs, hessian_at,
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
                         task_datasets: Sequence[PyTree], lr, alpha, num_epochs: int,
                         key: jax.Array, *, tol: float = 1e-9, max_iters: int = 500,
                         microbatch_size: int | None = None) -> TrajectoryCurvature:
    """Measures ``||grad L_t||`` and ``||H_t||_2`` at every point of ``theta_MT^(0..K)``.

    These are the quantities Theorem 2 bounds by ``G_max`` and ``H_max``. Jittable and
    vmappable; power iterations for all points and tasks run together (``vmap``).

    Args:
      loss_fn, params, task_datasets, lr, alpha, num_epochs: as in
        :func:`second_order_term`; the trajectory is :func:`multitask_gd`'s.
      key: PRNG key for the power iterations' starting vectors (one per point and task).
      tol, max_iters: the power iteration's tolerance and cap
        (:func:`taskvec_jax.hessian.power_iteration`).
      microbatch_size: compute gradients and HVPs in chunks of this many examples.

    Returns:
      A :class:`TrajectoryCurvature`.
    """
    datasets = check_task_datasets(task_datasets)
    num_epochs = _check_epochs(num_epochs)
    _float_dtype(params)
    return _trajectory_curvature(loss_fn, params, datasets, lr, alpha, num_epochs, key,
                                 tol, max_iters, microbatch_size)


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_epochs", "tol", "max_iters",
                                             "microbatch_size"))
def _trajectory_curvature(loss_fn, params, datasets, lr, alpha, num_epochs, key, tol,
                          max_iters, microbatch_size):
    traj = _multitask_gd(loss_fn, params, datasets, lr, alpha, num_epochs,
                         microbatch_size)
    num_points = num_epochs + 1
    keys = jax.random.split(key, num_points * len(datasets)).reshape(
        (num_points, len(datasets)) + key.shape)

    def one_task(theta, d, key):
        g = mean_value_and_grad(loss_fn, theta, d, microbatch_size)[1]
        res = hessian_lib.hessian_spectral_norm(loss_fn, theta, d, key, tol=tol,
                                                max_iters=max_iters,
                                                microbatch_size=microbatch_size)
        return tree_lib.norm(g), res.norm, res.converged

    def at_point(theta, point_keys):
        res = _map_tasks(functools.partial(one_task, theta), datasets,
                         list(point_keys))
        return tuple(jnp.stack(x) for x in zip(*res))

    gn, hn, conv = jax.vmap(at_point)(traj, keys)
    return TrajectoryCurvature(params=traj, grad_norms=gn, hessian_norms=hn,
                               converged=conv)


# --------------------------------------------------------------------------- Theorem 2

class ActivationConstants(NamedTuple):
    """What the Theorem-2 bound needs to know about an activation ``phi``.

    Attributes:
      a1: ``sup |phi'|``.
      a2: ``sup |phi''|`` (where ``phi`` is twice differentiable; 0 for ReLU, whose
        Hessian exists and has no ``phi''`` term off a measure-zero set of kinks).
      phi0: ``|phi(0)|``; with ``a1`` it gives ``|phi(u)| <= phi0 + a1 |u|``.
      sup: ``sup |phi|`` (``inf`` if unbounded).
    """

    a1: float
    a2: float
    phi0: float
    sup: float


ACTIVATION_CONSTANTS: dict[str, ActivationConstants] = {
    # phi' = 1[u > 0]; phi'' = 0 off u = 0.
    "relu": ActivationConstants(1.0, 0.0, 0.0, math.inf),
    # phi' = 1 - tanh^2 <= 1; |phi''| = 2 |tanh| (1 - tanh^2), largest at tanh^2 = 1/3.
    "tanh": ActivationConstants(1.0, 4.0 / (3.0 * math.sqrt(3.0)), 0.0, 1.0),
    # phi' = sigmoid < 1; phi'' = s (1 - s) <= 1/4; phi(0) = log 2.
    "softplus": ActivationConstants(1.0, 0.25, math.log(2.0), math.inf),
    # phi' = s (1 - s) <= 1/4; |phi''| = s (1 - s) |1 - 2 s|, largest 1 / (6 sqrt 3).
    "sigmoid": ActivationConstants(0.25, 1.0 / (6.0 * math.sqrt(3.0)), 0.5, 1.0),
    "identity": ActivationConstants(1.0, 0.0, 0.0, math.inf),
}

# (Gamma, Lambda) of the loss on the network output f: ||d ell / d f|| <= Gamma and
# ||d^2 ell / d f^2||_2 <= Lambda. Cross-entropy: d ell/df = softmax(f) - y with y a
# probability vector, ||.|| <= sqrt 2; d^2 ell/df^2 = diag(p) - p p^T, norm <= 1/2.
# Squared loss 0.5 ||f - y||^2: d ell/df = f - y (bounded via ||f||), Hessian I.
_LOSSES = ("cross_entropy", "mse")


class FeedforwardBound(NamedTuple):
    """Theorem 2's constants for one network, loss and merge (see :func:`feedforward_bound`).

    Attributes:
      jacobian_norm: ``J_max >= ||d f / d theta||_2`` for every input.
      grad_norm: ``G_max >= ||grad L_t(theta)||``.
      hessian_norm: ``H_max >= ||H_t(theta)||_2``.
      residual_norm: ``rho * G_max >= ||r_t(theta)||``.
      second_order: the project's bound on ``||C_k||``.
      paper_form: the paper summary's stated form
        ``T ((h + 2) / 2) |alpha T + 1| H_max G_max``, ``h = k - 2``.
    """

    jacobian_norm: jax.Array
    grad_norm: jax.Array
    hessian_norm: jax.Array
    residual_norm: jax.Array
    second_order: jax.Array
    paper_form: jax.Array


def second_order_bound(grad_norm, hessian_norm, num_tasks: int, alpha, num_epochs):
    """``|alpha| T rho k (k - 1) / 2 * H_max * G_max`` with ``rho = |1 - alpha| + |alpha| (T - 1)``.

    Valid for any model: if ``||grad L_t|| <= G_max`` and ``||H_t||_2 <= H_max`` at the
    points where ``C_k`` evaluates them, then ``||r_t|| <= rho G_max`` (since
    ``r_t = (1 - alpha) g_t - alpha sum_{s != t} g_s``), the inner sum of ``C_k`` has norm
    at most ``e rho G_max``, and summing ``e = 1..k-1`` over ``T`` tasks gives the bound.
    Holds for both ``hessian_at`` choices.
    """
    alpha = jnp.asarray(alpha)
    rho = jnp.abs(1.0 - alpha) + jnp.abs(alpha) * (num_tasks - 1)
    k = jnp.asarray(num_epochs)
    return jnp.abs(alpha) * num_tasks * rho * k * (k - 1) / 2 * hessian_norm * grad_norm


def paper_second_order_bound(grad_norm, hessian_norm, num_tasks: int, alpha, num_epochs):
    """The paper summary's stated form ``T ((h + 2) / 2) |alpha T + 1| H_max G_max``, ``h = k - 2``."""
    h = jnp.asarray(num_epochs) - 2
    return num_tasks * (h + 2) / 2 * jnp.abs(jnp.asarray(alpha) * num_tasks + 1) \
        * hessian_norm * grad_norm


def feedforward_bound(weight_norms: Sequence | jax.Array, input_norm, *,
                      activation: str | ActivationConstants, num_tasks: int, alpha,
                      num_epochs, loss: str = "cross_entropy",
                      bias_norms: Sequence | jax.Array | None = None,
                      widths: Sequence[int] | None = None,
                      label_norm=1.0) -> FeedforwardBound:
    """Theorem 2: explicit ``G_max``, ``H_max`` and the bound on ``||C_k||`` for an MLP.

    The network is ``h_0 = x``, ``z_l = W_l h_{l-1} + b_l``, ``h_l = phi(z_l)`` for
    ``l < L``, output ``f = z_L``, loss ``ell(f, y)`` averaged over examples. Assumed, at
    every parameter point considered: ``||W_l||_2 <= w_l``, ``||b_l|| <= beta_l``,
    ``||x|| <= B_x`` for every input, ``|phi'| <= a1``, ``|phi''| <= a2`` (docs/theory.md,
    "Theorem 2", derives every line):

    * activations: ``||h_l|| <= min(a1 ||z_l|| + sqrt(n_l) |phi(0)|, sqrt(n_l) sup|phi|)``,
      ``||z_l|| <= w_l ||h_{l-1}|| + beta_l``;
    * first derivative along a unit direction: ``S_1 = hh_0``,
      ``S_l^2 = hh_{l-1}^2 + (a1 w_l S_{l-1})^2`` with ``hh_l^2 = ||h_l||^2 + 1`` (biases);
      ``J_max = S_L``;
    * second derivative: ``Q = 2 a1 sqrt(sum_{l>=2} P_l^2 S_{l-1}^2)
      + a2 sum_{l>=2} P_l w_l S_{l-1}^2`` with ``P_l = prod_{i>l} a1 w_i``;
    * loss: ``||d ell/df|| <= Gamma``, ``||d^2 ell/df^2|| <= Lambda`` (cross-entropy:
      ``sqrt 2, 1/2``; squared: ``||f|| + ||y||, 1``);
    * ``G_max = Gamma J_max``, ``H_max = Lambda J_max^2 + Gamma Q``;
    * ``||C_k|| <= |alpha| T rho k (k - 1) / 2 H_max G_max`` (:func:`second_order_bound`).

    Jittable and vmappable in the norms, ``alpha`` and ``num_epochs``.

    Args:
      weight_norms: ``[L]`` bounds ``w_l`` on the layers' spectral norms (e.g. the
        maximum over the trajectory from :func:`mlp_weight_norms`).
      input_norm: ``B_x``, a bound on every input's Euclidean norm.
      activation: a name in :data:`ACTIVATION_CONSTANTS` or an
        :class:`ActivationConstants`.
      num_tasks: ``T``.
      alpha: the merge coefficient.
      num_epochs: ``k``.
      loss: ``"cross_entropy"`` or ``"mse"`` (``0.5 ||f - y||^2``).
      bias_norms: ``[L]`` bounds ``beta_l``, or ``None`` for a network without biases.
      widths: hidden widths ``n_1..n_{L-1}``; needed when ``phi(0) != 0`` and used to
        cap ``||h_l||`` for bounded activations.
      label_norm: bound on ``||y||`` (squared loss only; 1 for one-hot labels).

    Returns:
      A :class:`FeedforwardBound`.
    """
    if isinstance(activation, str):
        if activation not in ACTIVATION_CONSTANTS:
            raise ValueError(f"no Theorem-2 constants for activation {activation!r}; "
                             f"choose one of {sorted(ACTIVATION_CONSTANTS)} or pass "
                             "ActivationConstants(a1, a2, phi0, sup)")
        act = ACTIVATION_CONSTANTS[activation]
    else:
        act = ActivationConstants(*activation)
    if loss not in _LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {_LOSSES}")
    w = [jnp.asarray(x) for x in (weight_norms if not hasattr(weight_norms, "shape")
                                  else [weight_norms[..., i]
                                        for i in range(weight_norms.shape[-1])])]
    depth = len(w)
    if depth == 0:
        raise ValueError("weight_norms is empty: the network needs at least one layer")
    if bias_norms is None:
        b = [jnp.zeros_like(w[0])] * depth
    else:
        b = [jnp.asarray(x) for x in (bias_norms if not hasattr(bias_norms, "shape")
                                      else [bias_norms[..., i]
                                            for i in range(bias_norms.shape[-1])])]
        if len(b) != depth:
            raise ValueError(f"bias_norms has {len(b)} layers, weight_norms has {depth}")
    if widths is not None and len(widths) != depth - 1:
        raise ValueError(f"widths must list the {depth - 1} hidden widths, got "
                         f"{len(widths)}")
    if widths is None and act.phi0 != 0 and depth > 1:
        raise ValueError(f"activation has phi(0) = {act.phi0} != 0: pass the hidden "
                         "widths so that ||phi(z)|| can be bounded")
    with_bias = bias_norms is not None

    # ||h_l|| for l = 0..L-1.
    h = [jnp.asarray(input_norm)]
    for l in range(1, depth):
        z = w[l - 1] * h[-1] + b[l - 1]
        hl = act.a1 * z
        if widths is not None:
            root_n = math.sqrt(widths[l - 1])
            hl = hl + root_n * act.phi0
            if math.isfinite(act.sup):
                hl = jnp.minimum(hl, root_n * act.sup)
        h.append(hl)
    hh = [jnp.sqrt(x ** 2 + 1.0) if with_bias else x for x in h]

    # S_l bounds ||d z_l / d theta . v|| over unit v; S[l-1] is S_l.
    s = [hh[0]]
    for l in range(2, depth + 1):
        s.append(jnp.sqrt(hh[l - 1] ** 2 + (act.a1 * w[l - 1] * s[-1]) ** 2))
    jac = s[-1]

    # Q bounds ||d^2 z_L / d theta^2 [v, v]||; P_l = prod_{i=l+1}^{L} a1 w_i.
    def p(l):
        out = jnp.ones_like(w[0])
        for i in range(l + 1, depth + 1):
            out = out * act.a1 * w[i - 1]
        return out

    cross = sum((p(l) * s[l - 2]) ** 2 for l in range(2, depth + 1)) \
        if depth > 1 else jnp.zeros_like(w[0])
    curv = sum(p(l) * w[l - 1] * s[l - 2] ** 2 for l in range(2, depth + 1)) \
        if depth > 1 else jnp.zeros_like(w[0])
    q = 2.0 * act.a1 * jnp.sqrt(cross) + act.a2 * curv

    if loss == "cross_entropy":
        gamma, lam = math.sqrt(2.0), 0.5
    else:
        gamma = w[-1] * h[-1] + b[-1] + label_norm
        lam = 1.0
    g_max = gamma * jac
    h_max = lam * jac ** 2 + gamma * q
    alpha_arr = jnp.asarray(alpha)
    rho = jnp.abs(1.0 - alpha_arr) + jnp.abs(alpha_arr) * (num_tasks - 1)
    return FeedforwardBound(
        jacobian_norm=jac, grad_norm=g_max, hessian_norm=h_max,
        residual_norm=rho * g_max,
        second_order=second_order_bound(g_max, h_max, num_tasks, alpha, num_epochs),
        paper_form=paper_second_order_bound(g_max, h_max, num_tasks, alpha, num_epochs))


def _spectral_norm(w: jax.Array) -> jax.Array:
    return jnp.linalg.svd(w, compute_uv=False)[..., 0]


def mlp_weight_norms(params: PyTree) -> tuple[jax.Array, jax.Array | None]:
    """Spectral norms of the kernels and Euclidean norms of the biases of an MLP.

    ``params`` is a :class:`taskvec_jax.models.MLP` parameter tree
    (``{"Dense_0": {"kernel": [in, out], "bias": [out]}, ...}``), optionally with leading
    batch axes on every leaf (a trajectory, a vmapped batch of models).

    Returns:
      ``(weight_norms, bias_norms)``, each ``[..., L]`` in layer order; ``bias_norms`` is
      ``None`` when the layers have no biases.

    Raises:
      ValueError: naming the offending entry when the tree is not an MLP's.
    """
    if not isinstance(params, dict) or not params:
        raise ValueError("expected an MLP parameter dict {'Dense_0': {...}, ...}, got "
                         f"{type(params).__name__}")
    names = sorted(params, key=lambda n: int(n.split("_")[-1])
                   if n.startswith("Dense_") and n.split("_")[-1].isdigit() else -1)
    for i, name in enumerate(names):
        if name != f"Dense_{i}":
            raise ValueError(f"expected layers Dense_0..Dense_{len(names) - 1}, found "
                             f"'{name}'")
        if "kernel" not in params[name]:
            raise ValueError(f"layer '{name}' has no 'kernel' (entries: "
                             f"{sorted(params[name])})")
    weights = jnp.stack([_spectral_norm(params[n]["kernel"]) for n in names], axis=-1)
    has_bias = ["bias" in params[n] for n in names]
    if any(has_bias) and not all(has_bias):
        missing = names[has_bias.index(False)]
        raise ValueError(f"layer '{missing}' has no bias while others do")
    if not all(has_bias):
        return weights, None
    biases = jnp.stack([jnp.linalg.norm(params[n]["bias"], axis=-1) for n in names],
                       axis=-1)
    return weights, biases
