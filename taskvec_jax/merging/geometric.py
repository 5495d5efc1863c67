"""Geometric merges: SLERP of two models and Model Stock.

* :func:`slerp` (Shoemake, 1985, as model merges use it, e.g. mergekit and FusionBench):
  spherical linear interpolation, per leaf or over the whole tree.
* :func:`model_stock` (Jang et al., "Model Stock: All we need is just a few fine-tuned
  models", ECCV 2024): per layer, the average of the fine-tuned models pulled towards the
  base by a ratio read from the angle between their task vectors.

Both accumulate in at least float32 and cast back, keep non-float leaves (from the first
model, or the base), and are jittable.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from taskvec_jax import task_vectors as tv_lib
from taskvec_jax.merging import _common, _leafwise

PyTree = Any

__all__ = ["SLERP_SCOPES", "model_stock", "model_stock_ratio", "slerp"]

SLERP_SCOPES = ("leaf", "global")


def _slerp_coefficients(dot, t, dot_threshold):
    """``(c_a, c_b)`` of ``c_a a + c_b b``; linear when ``|dot| > dot_threshold``."""
    linear = jnp.abs(dot) > dot_threshold
    theta = jnp.arccos(jnp.clip(jnp.where(linear, 0.0, dot), -1.0, 1.0))
    sin = jnp.where(linear, 1.0, jnp.sin(theta))
    c_a = jnp.where(linear, 1 - t, jnp.sin((1 - t) * theta) / sin)
    c_b = jnp.where(linear, t, jnp.sin(t * theta) / sin)
    return c_a, c_b


def _unit_dot(xs, ys, eps):
    """``<x/|x|, y/|y|>`` over lists of arrays; a norm ``<= eps`` is not divided by."""
    na = jnp.sqrt(sum(jnp.sum(x * x) for x in xs))
    nb = jnp.sqrt(sum(jnp.sum(y * y) for y in ys))
    na = jnp.where(na > eps, na, 1.0)
    nb = jnp.where(nb > eps, nb, 1.0)
    return sum(jnp.sum((x / na) * (y / nb)) for x, y in zip(xs, ys))


@functools.partial(jax.jit, static_argnames=("scope", "dot_threshold", "eps"))
def _slerp_jit(model_a, model_b, base, t, *, scope, dot_threshold, eps):
    la, treedef = _common.flatten(model_a)
    lb, _ = _common.flatten(model_b)
    l0 = _common.flatten(base)[0] if base is not None else [None] * len(la)
    idx = [i for i, x in enumerate(la) if _common.is_param(x)]
    adt = {i: _common.accumulation_dtype(jnp.result_type(la[i])) for i in idx}
    # Interpolated vectors: the models themselves, or their task vectors from ``base``.
    va = {i: la[i].astype(adt[i]) - (0 if l0[i] is None else l0[i].astype(adt[i]))
          for i in idx}
    vb = {i: lb[i].astype(adt[i]) - (0 if l0[i] is None else l0[i].astype(adt[i]))
          for i in idx}
    coef = {}
    if scope == "global" and idx:
        wide = jnp.result_type(*[adt[i] for i in idx])
        dot = _unit_dot([va[i].astype(wide) for i in idx], [vb[i].astype(wide) for i in idx],
                        eps)
        c = _slerp_coefficients(dot, t.astype(wide), dot_threshold)
        coef = {i: c for i in idx}
    else:
        for i in idx:
            coef[i] = _slerp_coefficients(_unit_dot([va[i]], [vb[i]], eps),
                                          t.astype(adt[i]), dot_threshold)
    out = list(la)
    for i in idx:
        c_a, c_b = coef[i]
        merged = c_a.astype(adt[i]) * va[i] + c_b.astype(adt[i]) * vb[i]
        if l0[i] is not None:
            merged = l0[i].astype(adt[i]) + merged
        out[i] = merged.astype(jnp.result_type(la[i]))
    return jax.tree.unflatten(treedef, out)


def slerp(model_a: PyTree, model_b: PyTree, *, t: float | jax.Array = 0.5,
          base: PyTree | None = None, scope: str = "leaf", dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> PyTree:
    """Spherical linear interpolation of two models (or of their task vectors).

    With ``a, b`` the two models (or, given ``base``, ``a = model_a - base`` and
    ``b = model_b - base``) taken per leaf (``scope="leaf"``, as mergekit's and
    FusionBench's per-tensor slerp) or as one vector (``"global"``):
    ``cos(theta) = <a/|a|, b/|b|>`` and

        slerp = sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b

    (plus ``base``). Where ``|cos(theta)| > dot_threshold`` (nearly collinear) it is the
    linear ``(1 - t) a + t b``, as in the reference code; a norm ``<= eps`` is not
    normalized. ``t = 0`` gives ``a``, ``t = 1`` gives ``b``, and for ``|a| = |b|`` every
    point of the arc has that norm.

    Args:
      model_a: the first model (``t = 0``).
      model_b: the second, shaped like ``model_a``.
      t: the interpolation parameter (may be traced; ``[0, 1]`` stays on the arc).
      base: optional model both start from: interpolate the task vectors instead.
      scope: ``"leaf"`` or ``"global"``.
      dot_threshold: the collinearity cut-off for the linear fallback.
      eps: smallest norm that is normalized.

    Returns:
      A model shaped like ``model_a`` with its dtypes; non-float leaves from ``model_a``.

    Raises:
      ValueError: mismatched models (naming the leaf path), an unknown scope, a
        non-scalar ``t``.
    """
    if scope not in SLERP_SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose one of {SLERP_SCOPES}")
    tv_lib.check_compatible(model_b, model_a, name="model_b", reference_name="model_a",
                            allow_none=False)
    if base is not None:
        tv_lib.check_compatible(base, model_a, name="base", reference_name="model_a",
                                allow_none=False)
    _leafwise.check_real([model_a, model_b], "slerp", what="model")
    t = jnp.asarray(t)
    if t.ndim != 0:
        raise ValueError(f"t must be a scalar, got shape {t.shape}")
    threshold = _common.static_number(dot_threshold, "dot_threshold")
    return _slerp_jit(model_a, model_b, base, t, scope=scope, dot_threshold=threshold,
                      eps=_common.static_number(eps, "eps"))


# --------------------------------------------------------------------------- Model Stock

def _ratio(vs, num_tasks):
    """``t = N cos / (1 + (N - 1) cos)``, ``cos`` the mean pairwise cosine of ``vs``."""
    cos = []
    for a in range(num_tasks):
        for b in range(a + 1, num_tasks):
            norms = jnp.sqrt(jnp.sum(vs[a] * vs[a])) * jnp.sqrt(jnp.sum(vs[b] * vs[b]))
            cos.append(jnp.clip(jnp.sum(vs[a] * vs[b]) / jnp.maximum(norms, 1e-6), -1, 1))
    c = sum(cos) / len(cos)
    denom = 1 + (num_tasks - 1) * c
    singular = jnp.abs(denom) < 1e-6
    return jnp.where(singular, 0.0, num_tasks * c / jnp.where(singular, 1.0, denom))


@jax.jit
def _model_stock_leaf(ref, xs):
    ys = _leafwise.scaled(xs, jnp.ones((len(xs),)))
    ratio = _ratio(ys, len(ys))
    return _leafwise.finish(ref, ratio * (sum(ys[1:], ys[0]) / len(ys)), xs[0])


@jax.jit
def _ratio_leaf(xs):
    return _ratio(_leafwise.scaled(xs, jnp.ones((len(xs),))), len(xs))


def _check_stock(task_vectors, base=None):
    _common.flatten_tasks(task_vectors, base)
    if len(task_vectors) < 2:
        raise ValueError(f"model_stock needs at least 2 task vectors (an angle), got "
                         f"{len(task_vectors)}")
    _leafwise.check_real(task_vectors, "model_stock")


def model_stock_ratio(task_vectors: Sequence[PyTree]) -> PyTree:
    """Model Stock's per-leaf interpolation ratio ``t = N cos / (1 + (N - 1) cos)``.

    ``cos`` is the mean over the ``N (N - 1) / 2`` pairs of the cosine between two task
    vectors at that leaf (each clipped to ``[-1, 1]``, norms' product floored at
    ``1e-6``); where ``1 + (N - 1) cos`` is within ``1e-6`` of 0 the ratio is 0 (keep the
    base), as in mergekit.

    Args:
      task_vectors: ``N >= 2`` task vectors with one structure.

    Returns:
      A tree of scalars (``None`` at non-float leaves).

    Raises:
      ValueError: fewer than 2 task vectors, mismatched trees, complex leaves.
    """
    _check_stock(task_vectors)
    leaves, treedef = _common.flatten(task_vectors[0])
    task_leaves = [_common.flatten(tau)[0] for tau in task_vectors]
    out = [_ratio_leaf(tuple(ls[i] for ls in task_leaves)) if _common.is_param(x) else None
           for i, x in enumerate(leaves)]
    return jax.tree.unflatten(treedef, out)


def model_stock(base: PyTree, task_vectors: Sequence[PyTree]) -> PyTree:
    """Model Stock (Jang et al., ECCV 2024): ``base + t * (1/N) sum_i tau_i`` per leaf.

    The merged layer ``t * theta_avg + (1 - t) * theta_0`` with ``theta_avg`` the mean of
    the ``N`` fine-tuned models and ``t`` from :func:`model_stock_ratio` (the paper's
    Eq. 4: the point of the segment nearest to the centre of the fine-tuned weights'
    sphere, from the angle between them). Two identical directions (``cos = 1``) give
    ``t = 1``, the plain average; orthogonal ones (``cos = 0``) give ``t = 0``, the base.
    The method has no coefficient to tune.

    Args:
      base: the pretrained model.
      task_vectors: ``N >= 2`` task vectors shaped like ``base``.

    Returns:
      The merged model, shaped like ``base`` with its dtypes.

    Raises:
      ValueError: as :func:`model_stock_ratio`, and for a task vector not matching ``base``.
    """
    _check_stock(task_vectors, base)
    return _leafwise.merge_leaves(base, task_vectors, jnp.ones((len(task_vectors),)),
                                  lambda path, ref, xs, a: _model_stock_leaf(ref, xs))
