"""The first-order Taylor expansion of a model in its parameters, via ``jax.jvp``.

Ortiz-Jimenez et al., *Task Arithmetic in the Tangent Space* (arXiv 2305.12827, eq. 5)
finetune the linearized model

    f_lin(theta; x) = f(theta_0; x) + J_theta f(theta_0; x) (theta - theta_0)

instead of ``f``. Its parameters are the same pytree as the model's, so a linearized task
vector ``tau = theta_lin - theta_0`` is an ordinary task vector: every merge of
:mod:`taskvec_jax.merging` applies to it, and "converting" between the two kinds is only a
choice of how a merged point is *evaluated* -- with ``f`` (nonlinear evaluation) or with
``f_lin`` (linearized evaluation). :func:`merged_outputs` makes that choice an argument.
(The authors' PyTorch code wraps the model in a module holding ``params`` and a frozen
``params0`` and renames state-dict keys to convert; pytrees need neither.)

Cost: one ``jax.jvp`` evaluates ``f(theta_0)`` and ``J (theta - theta_0)`` together in one
forward-mode pass (about 1.5-3x a forward pass, never the Jacobian); ``jax.grad`` of a loss
of ``f_lin`` transposes that linear map (about 2x a forward pass more).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from taskvec_jax import _checks
from taskvec_jax import task_vectors as task_vectors_lib
from taskvec_jax import tree as tree_lib

PyTree = Any
ApplyFn = Callable[..., PyTree]

__all__ = ["linear_term", "linearize", "linearized_apply", "merged_outputs"]


def _check_params(params: PyTree, params0: PyTree) -> None:
    _checks.float_dtype(params0, name="params0",
                        why="the model is linearized in every leaf")
    task_vectors_lib.check_compatible(params, params0, name="params",
                                      reference_name="params0", allow_none=False)


def linear_term(apply_fn: ApplyFn, params0: PyTree, delta: PyTree, *args,
                **kwargs) -> tuple[PyTree, PyTree]:
    """``(f(params0, ...), J(params0) delta)`` from ONE ``jax.jvp`` (forward mode).

    Args:
      apply_fn: ``apply_fn(params, *args, **kwargs) -> outputs`` (any output pytree).
      params0: the expansion point ``theta_0`` (float leaves).
      delta: a tree shaped like ``params0`` (the tangent direction).
      *args, **kwargs: the model's other inputs (closed over, not differentiated).

    Returns:
      The outputs at ``params0`` and the Jacobian-vector product, both shaped like
      ``apply_fn``'s output.

    Raises:
      ValueError: if ``delta`` does not match ``params0`` (naming the leaf path).
    """
    _checks.float_dtype(params0, name="params0",
                        why="the model is linearized in every leaf")
    task_vectors_lib.check_compatible(delta, params0, name="delta",
                                      reference_name="params0", allow_none=False)
    return jax.jvp(lambda p: apply_fn(p, *args, **kwargs), (params0,), (delta,))


def linearized_apply(apply_fn: ApplyFn) -> Callable[..., PyTree]:
    """The linearization with the expansion point as an argument (traceable, vmappable).

    Returns ``g(params0, params, *args, **kwargs) = f(params0) + J(params0)(params -
    params0)``; :func:`linearize` is ``g`` with ``params0`` fixed. Use this form to
    ``vmap`` over base models or to differentiate with respect to ``params0``.
    """
    def g(params0: PyTree, params: PyTree, *args, **kwargs) -> PyTree:
        _check_params(params, params0)
        out, tangent = jax.jvp(lambda p: apply_fn(p, *args, **kwargs), (params0,),
                               (tree_lib.sub(params, params0),))
        return jax.tree.map(jnp.add, out, tangent)
    return g


def linearize(apply_fn: ApplyFn, params0: PyTree) -> Callable[..., PyTree]:
    """Linearizes ``apply_fn`` in its parameters around ``params0`` (2305.12827, eq. 5).

    ``f_lin(params, *args, **kwargs) = f(params0, *args, **kwargs)
    + J_params f(params0, *args, **kwargs) (params - params0)``, evaluated by one
    ``jax.jvp`` (no Jacobian is formed). ``f_lin`` takes and returns what ``apply_fn``
    does, so it drops into any ``loss_fn`` and through it into :func:`taskvec_jax.finetune`
    (full batch or minibatch), and it composes with ``jax.grad``, ``jax.jit`` and
    ``jax.vmap``. ``f_lin(params0) == f(params0)`` bit for bit (both eager, or both
    jitted); ``f_lin`` is affine in
    ``params``, so its parameter Hessian is zero and a loss ``l(f_lin)`` has the
    Gauss-Newton Hessian ``J^T H_l J`` exactly (docs/theory.md, "Theorem 1 in the tangent
    space").

    Example::

        f_lin = tvj.linearize(lambda p, x: model.apply({"params": p}, x), params0)
        loss_fn = lambda p, batch: cross_entropy(f_lin(p, batch["image"]), batch["label"])
        traj = tvj.finetune(loss_fn, params0, data, optax.sgd(0.1), 10)
        linearized_task_vector = tvj.task_vector(traj.final_params, params0)

    Args:
      apply_fn: ``apply_fn(params, *args, **kwargs) -> outputs``; ``params`` is any pytree
        of float arrays (flax linen ``params``, nnx state, equinox, dicts).
      params0: the expansion point ``theta_0`` (closed over; use
        :func:`linearized_apply` to trace it).

    Returns:
      ``f_lin(params, *args, **kwargs)``.

    Raises:
      ValueError: at call time, if ``params`` does not match ``params0`` (naming the leaf
        path, shapes and dtypes); at once, if ``params0`` has a non-float leaf.
    """
    _checks.float_dtype(params0, name="params0",
                        why="the model is linearized in every leaf")
    g = linearized_apply(apply_fn)

    def f_lin(params: PyTree, *args, **kwargs) -> PyTree:
        return g(params0, params, *args, **kwargs)
    return f_lin


def merged_outputs(apply_fn: ApplyFn, base: PyTree, task_vectors: Sequence[PyTree],
                   alpha, *args, linearized: bool = False, **kwargs) -> PyTree:
    """Outputs at ``base + sum_t alpha_t tau_t``, evaluated nonlinearly or in the tangent space.

    ``linearized=False``: ``f(theta_0 + sum_t alpha_t tau_t)``; ``linearized=True``:
    ``f(theta_0) + sum_t alpha_t J(theta_0) tau_t`` (one jvp along the summed direction).
    This is the conversion of 2305.12827 between linearized and nonlinear task vectors:
    the task vectors are the same trees either way; only the evaluation changes.

    Args:
      apply_fn: ``apply_fn(params, *args, **kwargs) -> outputs``.
      base: ``theta_0`` (also the expansion point when ``linearized``).
      task_vectors: a non-empty sequence of trees shaped like ``base``.
      alpha: a scalar or one coefficient per task (``[T]``; may be traced).
      *args, **kwargs: the model's inputs.
      linearized: evaluate with the linearization around ``base``.

    Returns:
      ``apply_fn``'s outputs at the merged point.

    Raises:
      ValueError: for an empty sequence, a task vector that does not match ``base``
        (naming the task and leaf path), or ``alpha`` of the wrong length.
    """
    tvs = _checks.non_empty_sequence(task_vectors, "task_vectors", item="task vector")
    for t, tv in enumerate(tvs):
        task_vectors_lib.check_compatible(tv, base, name=f"task vector {t}",
                                          reference_name="base", allow_none=False)
    alphas = jnp.broadcast_to(jnp.asarray(alpha), (len(tvs),)) if jnp.ndim(alpha) == 0 \
        else jnp.asarray(alpha)
    if alphas.shape != (len(tvs),):
        raise ValueError(f"alpha must be a scalar or have one entry per task vector "
                         f"({len(tvs)}), got shape {alphas.shape}")
    if linearized:
        delta = tree_lib.weighted_sum(tvs, alphas)
        out, tangent = jax.jvp(lambda p: apply_fn(p, *args, **kwargs), (base,), (delta,))
        return jax.tree.map(jnp.add, out, tangent)
    return apply_fn(tree_lib.weighted_sum(tvs, alphas, start=base), *args, **kwargs)
