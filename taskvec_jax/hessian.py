"""Hessian-vector products and the spectral quantities built on them, over any pytree.

The second-order term of Theorem 1 (Zhou et al., "On Task Vectors and Gradients", arXiv
2508.16082) and the Hessian bound of Theorem 2 need the Hessian ``H = grad^2 L(theta)`` of
a mean loss only through products ``H v``. Nothing here forms a dense Hessian:

* :func:`hvp` -- ``H v`` by forward-over-reverse differentiation,
  ``H v = d/de grad L(theta + e v) |_{e=0}`` (one JVP of the gradient; Pearlmutter, 1994),
  accumulated over microbatches when the data is too large for one pass;
* :func:`power_iteration` / :func:`hessian_spectral_norm` -- ``||H||_2 = max_i |lambda_i|``
  by power iteration on ``v <- H v / ||H v||``;
* :func:`hutchinson_trace` / :func:`hessian_trace` -- ``tr H = E[z^T H z]`` for Rademacher
  ``z`` (Hutchinson, 1989), with the standard error of the estimate.

``power_iteration`` and ``hutchinson_trace`` take any symmetric linear operator on pytrees
(``matvec(v) -> A v``), so they apply equally to a Gauss-Newton matrix or a test matrix.
Everything is jittable and vmappable (the loops are ``lax.while_loop`` / ``lax.map``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from taskvec_jax import _checks
from taskvec_jax import tree as tree_lib
from taskvec_jax.training.microbatch import mean_over_microbatches

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]
MatVec = Callable[[PyTree], PyTree]

__all__ = [
    "PowerIterationResult", "TraceEstimate", "hessian_matvec", "hessian_spectral_norm",
    "hessian_trace", "hutchinson_trace", "hvp", "power_iteration",
]


def hvp(loss_fn: LossFn, params: PyTree, data: PyTree, v: PyTree, *,
        microbatch_size: int | None = None) -> PyTree:
    """Hessian-vector product ``H v`` of the mean loss, by forward-over-reverse.

    Computes ``H v = d/de grad L(params + e v) |_{e=0}`` with ``L(p) = loss_fn(p, data)``,
    i.e. ``jax.jvp(jax.grad(L), (params,), (v,))[1]``: one gradient evaluation's cost, a
    few times over, and never the ``P x P`` matrix.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss over the batch.
      params: the point ``theta`` at which the Hessian is taken.
      data: pytree of arrays, leading axis = examples.
      v: a pytree shaped like ``params`` (the direction).
      microbatch_size: accumulate ``H v`` over chunks of this many examples (memory only;
        the result is the same, see
        :func:`taskvec_jax.training.microbatch.mean_over_microbatches`).

    Returns:
      ``H v``, a pytree shaped like ``params``.
    """
    grad_fn = jax.grad(loss_fn)

    def chunk_hvp(batch):
        return jax.jvp(lambda p: grad_fn(p, batch), (params,), (v,))[1]

    return mean_over_microbatches(chunk_hvp, data, microbatch_size)


def hessian_matvec(loss_fn: LossFn, params: PyTree, data: PyTree, *,
                   microbatch_size: int | None = None) -> MatVec:
    """Returns ``v -> H v`` for the Hessian of the mean loss at ``params`` (see :func:`hvp`)."""
    return lambda v: hvp(loss_fn, params, data, v, microbatch_size=microbatch_size)


def _random_like(key: jax.Array, like: PyTree, sampler) -> PyTree:
    # One draw of all P entries, then split into leaves: a single random-bits kernel in
    # the compiled program instead of one per leaf (this dominates compile time for
    # small models).
    leaves, treedef = jax.tree.flatten(like)
    sizes = [int(np.prod(jnp.shape(x))) for x in leaves]
    dtype = jnp.result_type(*leaves)
    flat = sampler(key, (sum(sizes),), dtype)
    out, start = [], 0
    for x, size in zip(leaves, sizes):
        out.append(flat[start:start + size].reshape(jnp.shape(x)).astype(
            jnp.result_type(x)))
        start += size
    return jax.tree.unflatten(treedef, out)


class PowerIterationResult(NamedTuple):
    """The outcome of :func:`power_iteration`.

    Attributes:
      norm: the estimate ``||A v||`` of ``||A||_2 = max_i |lambda_i|`` (never above it).
      eigenvalue: the Rayleigh quotient ``v^T A v``: the signed dominant eigenvalue when
        it is unique (ambiguous if ``lambda`` and ``-lambda`` both dominate).
      vector: the final unit vector ``v`` (a pytree).
      num_iterations: how many products ``A v`` were taken.
      converged: whether the relative change of ``norm`` fell below ``tol``.
    """

    norm: jax.Array
    eigenvalue: jax.Array
    vector: PyTree
    num_iterations: jax.Array
    converged: jax.Array


def power_iteration(matvec: MatVec, v0: PyTree, *, tol: float = 1e-9,
                    max_steps: int = 500, max_iters: int | None = None
                    ) -> PowerIterationResult:
    """Largest eigenvalue magnitude of a symmetric operator by power iteration.

    Iterates ``w = A v``, ``mu = ||w||``, ``v <- w / mu`` until
    ``|mu_i - mu_{i-1}| <= tol * mu_i`` or ``max_steps`` products. For unit ``v``,
    ``||A v||^2 = v^T A^2 v``, so ``mu`` rises monotonically to ``||A||_2`` at the rate
    ``(lambda_2 / lambda_1)^2`` per step, whatever the signs of the eigenvalues, and is
    never above it: power iteration gives a lower estimate of the spectral norm.

    Args:
      matvec: ``v -> A v`` for a symmetric ``A`` acting on pytrees shaped like ``v0``.
      v0: the starting vector (must not be orthogonal to the top eigenvector; a random
        one almost surely is not). It need not be normalized.
      tol: relative tolerance on successive estimates.
      max_steps: cap on the number of products.
      max_iters: deprecated alias of ``max_steps``.

    Returns:
      A :class:`PowerIterationResult`.
    """
    max_steps = _checks.renamed(max_iters, "max_iters", max_steps, "max_steps", 500)
    max_steps = _checks.positive_int(max_steps, "max_steps")
    v0 = tree_lib.scale(1.0 / tree_lib.norm(v0), v0)
    dtype = jnp.result_type(*jax.tree.leaves(v0))
    tiny = jnp.finfo(dtype).tiny

    def step(v):
        w = matvec(v)
        mu = tree_lib.norm(w)
        return tree_lib.scale(1.0 / jnp.maximum(mu, tiny), w), mu, tree_lib.vdot(v, w)

    def cond(state):
        i, _, mu, prev, _ = state
        return (i < max_steps) & (jnp.abs(mu - prev) > tol * mu)

    def body(state):
        i, v, mu, _, _ = state
        v_new, mu_new, rayleigh = step(v)
        return i + 1, v_new, mu_new, mu, rayleigh

    v1, mu1, rq1 = step(v0)
    init = (jnp.asarray(1), v1, mu1, jnp.asarray(-1.0, mu1.dtype), rq1)
    i, v, mu, prev, rayleigh = jax.lax.while_loop(cond, body, init)
    return PowerIterationResult(norm=mu, eigenvalue=rayleigh, vector=v,
                                num_iterations=i,
                                converged=jnp.abs(mu - prev) <= tol * mu)


def hessian_spectral_norm(loss_fn: LossFn, params: PyTree, data: PyTree,
                          key: jax.Array, *, tol: float = 1e-9, max_steps: int = 500,
                          microbatch_size: int | None = None,
                          max_iters: int | None = None) -> PowerIterationResult:
    """``||H||_2`` of the mean loss's Hessian at ``params`` by power iteration on HVPs.

    Starts from a standard normal pytree drawn with ``key``; see :func:`power_iteration`
    for the iteration, the tolerance and why the estimate never exceeds the true norm.
    ``max_iters`` is a deprecated alias of ``max_steps``.
    """
    max_steps = _checks.renamed(max_iters, "max_iters", max_steps, "max_steps", 500)
    v0 = _random_like(key, params, jax.random.normal)
    return power_iteration(hessian_matvec(loss_fn, params, data,
                                          microbatch_size=microbatch_size),
                           v0, tol=tol, max_steps=max_steps)


class TraceEstimate(NamedTuple):
    """Hutchinson's estimate of ``tr A``.

    Attributes:
      estimate: the mean of ``z_i^T A z_i`` over the probes.
      stderr: its standard error, ``std(z_i^T A z_i, ddof=1) / sqrt(num_samples)``.
      samples: the ``num_samples`` individual values ``z_i^T A z_i``.
    """

    estimate: jax.Array
    stderr: jax.Array
    samples: jax.Array


def hutchinson_trace(matvec: MatVec, like: PyTree, key: jax.Array, *,
                     num_samples: int = 100, chunk_size: int | None = None,
                     num_probes: int | None = None, batch_size: int | None = None
                     ) -> TraceEstimate:
    """Hutchinson's unbiased trace estimator ``tr A = E[z^T A z]``, Rademacher ``z``.

    For ``z`` with independent ``+-1`` entries, ``E[z z^T] = I``, so ``z^T A z`` is unbiased
    for ``tr A`` with variance ``2 sum_{i != j} A_ij^2`` (Hutchinson, 1989). The estimate
    is the mean over ``num_samples`` probes and comes with its standard error.

    Args:
      matvec: ``v -> A v`` on pytrees shaped like ``like``.
      like: a pytree giving the shapes and dtypes of the probes.
      key: PRNG key for the probes.
      num_samples: number of probes (at least 2, for the standard error).
      chunk_size: probes evaluated together (``lax.map`` batch size; ``None`` = one at a
        time, the least memory).
      num_probes, batch_size: deprecated aliases of ``num_samples`` and ``chunk_size``.

    Returns:
      A :class:`TraceEstimate`.
    """
    num_samples = _checks.renamed(num_probes, "num_probes", num_samples, "num_samples", 100)
    chunk_size = _checks.renamed(batch_size, "batch_size", chunk_size, "chunk_size", None)
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) \
            or num_samples < 2:
        raise ValueError(f"num_samples must be at least 2 (for a standard error), "
                         f"got {num_samples!r}")
    chunk_size = _checks.positive_int(chunk_size, "chunk_size", allow_none=True)

    def rademacher(k, shape, dtype):
        return jax.random.rademacher(k, shape, dtype=dtype)

    def quad(k):
        z = _random_like(k, like, rademacher)
        return tree_lib.vdot(z, matvec(z))

    samples = jax.lax.map(quad, jax.random.split(key, num_samples), batch_size=chunk_size)
    return TraceEstimate(estimate=jnp.mean(samples),
                         stderr=jnp.std(samples, ddof=1) / jnp.sqrt(num_samples),
                         samples=samples)


def hessian_trace(loss_fn: LossFn, params: PyTree, data: PyTree, key: jax.Array, *,
                  num_samples: int = 100, chunk_size: int | None = None,
                  microbatch_size: int | None = None, num_probes: int | None = None,
                  batch_size: int | None = None) -> TraceEstimate:
    """``tr H`` of the mean loss's Hessian at ``params`` by Hutchinson's estimator on HVPs.

    ``num_samples`` probes, ``chunk_size`` of them at a time (:func:`hutchinson_trace`);
    ``microbatch_size`` splits each HVP over examples. ``num_probes`` / ``batch_size`` are
    deprecated aliases of ``num_samples`` / ``chunk_size``.
    """
    num_samples = _checks.renamed(num_probes, "num_probes", num_samples, "num_samples", 100)
    chunk_size = _checks.renamed(batch_size, "batch_size", chunk_size, "chunk_size", None)
    return hutchinson_trace(hessian_matvec(loss_fn, params, data,
                                           microbatch_size=microbatch_size),
                            params, key, num_samples=num_samples, chunk_size=chunk_size)
