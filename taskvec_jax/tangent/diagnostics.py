"""Linear-path diagnostics of task vectors: paths, interpolation barriers, per-layer tables.

* :func:`linear_path` -- a metric (loss, accuracy, ...) along ``theta_0 + lambda * tau``;
* :func:`interpolation_path` / :func:`interpolation_barrier` -- along the segment
  ``(1 - lambda) theta_a + lambda theta_b`` between two models (e.g. two merges) and its
  barrier ``max_lambda [m(theta_lambda) - ((1 - lambda) m(theta_a) + lambda m(theta_b))]``
  (Frankle et al. 2020's linear mode connectivity; ``0`` for a convex metric);
* :func:`layer_table` -- per-leaf norms of each task vector and the cosines between
  task vectors leaf by leaf, named by leaf path.

Points along a path are ``vmap``-ed in chunks of ``chunk_size`` (``lax.map`` with
``batch_size``), so a whole path is one compiled program.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from taskvec_jax import _checks
from taskvec_jax import task_vectors as task_vectors_lib
from taskvec_jax import tree as tree_lib

PyTree = Any
MetricFn = Callable[[PyTree], PyTree]

__all__ = ["Barrier", "LayerTable", "interpolation_barrier", "interpolation_path",
           "layer_table", "linear_path"]


def _check_path(lambdas, chunk_size) -> tuple[jax.Array, int | None]:
    chunk_size = _checks.positive_int(chunk_size, "chunk_size", allow_none=True)
    lambdas = jnp.asarray(lambdas)
    if lambdas.ndim != 1 or lambdas.shape[0] == 0:
        raise ValueError(f"lambdas must be a non-empty 1-D array, got shape {lambdas.shape}")
    return lambdas, chunk_size


@functools.partial(jax.jit, static_argnums=(0, 4))
def _segment(metric_fn, start, direction, lambdas, chunk_size):
    """``metric_fn(start + lambda * direction)`` over ``lambdas``, one compiled program."""
    return jax.lax.map(
        lambda lam: metric_fn(tree_lib.weighted_sum([direction], lam[None], start=start)),
        lambdas, batch_size=chunk_size or lambdas.shape[0])


def linear_path(metric_fn: MetricFn, base: PyTree, task_vector: PyTree, lambdas, *,
                chunk_size: int | None = None) -> PyTree:
    """``metric_fn(base + lambda * task_vector)`` for each ``lambda``.

    Args:
      metric_fn: ``params -> scalar`` (or a pytree of scalars, e.g. ``(loss, accuracy)``).
      base: ``theta_0``.
      task_vector: a tree shaped like ``base`` (a sum of task vectors works too).
      lambdas: ``[M]`` coefficients.
      chunk_size: points evaluated at once (memory only).

    Returns:
      ``metric_fn``'s output with a leading axis ``M``.
    """
    task_vectors_lib.check_compatible(task_vector, base, name="task_vector",
                                      reference_name="base", allow_none=False)
    lambdas, chunk_size = _check_path(lambdas, chunk_size)
    return _segment(metric_fn, base, task_vector, lambdas, chunk_size)


def interpolation_path(metric_fn: MetricFn, params_a: PyTree, params_b: PyTree, lambdas,
                       *, chunk_size: int | None = None) -> PyTree:
    """``metric_fn((1 - lambda) params_a + lambda params_b)`` for each ``lambda``."""
    task_vectors_lib.check_compatible(params_b, params_a, name="params_b",
                                      reference_name="params_a", allow_none=False)
    lambdas, chunk_size = _check_path(lambdas, chunk_size)
    # (1 - lambda) a + lambda b = a + lambda (b - a)
    return _segment(metric_fn, params_a, tree_lib.sub(params_b, params_a), lambdas,
                    chunk_size)


class Barrier(NamedTuple):
    """A metric along a segment and its barrier.

    Attributes:
      lambdas: ``[M]``, including both ends ``0`` and ``1``.
      values: ``[M]`` metric values along the segment.
      barrier: ``max_lambda s * (values - linear interpolation of the end values)``,
        ``s = 1`` for a loss (the path rising above the chord), ``s = -1`` for a metric
        where higher is better (accuracy dipping below it).
    """

    lambdas: jax.Array
    values: jax.Array
    barrier: jax.Array


def interpolation_barrier(metric_fn: Callable[[PyTree], jax.Array], params_a: PyTree,
                          params_b: PyTree, *, num_points: int = 11,
                          higher_is_better: bool = False,
                          chunk_size: int | None = None) -> Barrier:
    """The barrier of a scalar metric on the segment between two models.

    ``barrier = max_{lambda in [0, 1]} s * (m(theta_lambda) - (1 - lambda) m(theta_a)
    - lambda m(theta_b))`` over ``num_points`` evenly spaced ``lambda`` (ends included),
    with ``s = 1`` for a loss and ``s = -1`` when ``higher_is_better`` (accuracy: the
    largest dip below the chord). ``0`` at the ends, so ``barrier >= 0``.
    """
    num_points = _checks.positive_int(num_points, "num_points")
    if num_points < 2:
        raise ValueError(f"num_points must be at least 2 (both ends), got {num_points}")
    lambdas = jnp.linspace(0.0, 1.0, num_points)
    values = interpolation_path(metric_fn, params_a, params_b, lambdas,
                                chunk_size=chunk_size)
    values = jnp.asarray(values)
    if values.shape != (num_points,):
        raise ValueError(f"metric_fn must return a scalar, got shape {values.shape[1:]}")
    chord = (1 - lambdas) * values[0] + lambdas * values[-1]
    sign = -1.0 if higher_is_better else 1.0
    # + 0.0 turns the ends' -0.0 (sign * 0) into 0.0
    return Barrier(lambdas, values, jnp.max(sign * (values - chord)) + 0.0)


class LayerTable(NamedTuple):
    """Per-leaf statistics of ``T`` task vectors.

    Attributes:
      paths: the ``L`` leaf paths (``'Dense_0/kernel'``).
      norms: ``[L, T]``, ``||tau_t[leaf]||_2``.
      cosines: ``[L, T, T]``, ``cos(tau_s[leaf], tau_t[leaf])`` (NaN where a leaf of a
        task vector is zero: the angle is undefined).
      total_norms: ``[T]``, whole-tree norms.
      total_cosines: ``[T, T]``, whole-tree cosines.
    """

    paths: list[str]
    norms: jax.Array
    cosines: jax.Array
    total_norms: jax.Array
    total_cosines: jax.Array

    def rows(self) -> list[dict]:
        """One dict per leaf, for printing or a markdown table."""
        out = []
        for i, path in enumerate(self.paths):
            out.append({"path": path, "norms": [float(v) for v in self.norms[i]],
                        "cosines": [[float(v) for v in r] for r in self.cosines[i]]})
        return out


def layer_table(task_vectors: Sequence[PyTree]) -> LayerTable:
    """Per-leaf norms and pairwise cosines of task vectors (``None`` leaves are skipped).

    Raises:
      ValueError: for an empty sequence or task vectors of different structure (naming
        the task and leaf path).
    """
    tvs = _checks.non_empty_sequence(task_vectors, "task_vectors", item="task vector")
    for t, tv in enumerate(tvs[1:], start=1):
        task_vectors_lib.check_compatible(tv, tvs[0], name=f"task vector {t}",
                                          reference_name="task vector 0")
    per_task = [tree_lib.leaves_with_paths(tv) for tv in tvs]
    paths = [p for p, _ in per_task[0]]

    def stats(vectors):                                  # [T, D] -> norms, cosines
        g = vectors @ vectors.T
        n = jnp.sqrt(jnp.diag(g))
        return n, g / jnp.outer(n, n)

    norms, cosines = [], []
    for i in range(len(paths)):
        n, c = stats(jnp.stack([jnp.ravel(leaves[i][1]) for leaves in per_task]))
        norms.append(n)
        cosines.append(c)
    flat = jnp.stack([tree_lib.ravel(tv)[0] for tv in tvs])
    total_norms, total_cosines = stats(flat)
    return LayerTable(paths, jnp.stack(norms), jnp.stack(cosines), total_norms,
                      total_cosines)
