"""Weight disentanglement error (Ortiz-Jimenez et al., arXiv 2305.12827, eq. 4).

Task arithmetic works when adding ``alpha_s tau_s`` changes the model only on task ``s``'s
inputs. The disentanglement error of ``T`` task vectors at coefficients ``alpha`` is

    xi(alpha) = sum_t E_{x in D_t} dist( f(x; theta_0 + alpha_t tau_t),
                                         f(x; theta_0 + sum_s alpha_s tau_s) ),

with ``dist`` the prediction disagreement ``1[argmax f != argmax f']`` (the paper's choice)
or an output-space distance (here ``||f - f'||_2``, the Euclidean distance of the output
vectors). ``xi = 0`` on a whole region means the merged model does on each task what that
task's own vector does: weight disentanglement. The paper plots ``xi`` on a grid of
``(alpha_1, alpha_2)`` for task pairs, for nonlinear and for linearized finetuning.

Exact properties (tested): ``xi(0) = 0``; with a single task ``xi = 0`` for every alpha;
a task whose vector is zero contributes nothing from its own vector, so with ``tau_2 = 0``
``xi`` does not depend on ``alpha_2`` and equals the interference of ``alpha_1 tau_1`` on
``D_2``; task vectors acting on disjoint input supports give ``xi = 0`` everywhere.

Evaluation: the grid points are ``vmap``-ed in chunks of ``chunk_size`` (``lax.map`` with
``batch_size``). For ``linearized=True`` the outputs are affine in ``alpha``:
``f_lin(x_t; theta_0 + sum_s alpha_s tau_s) = f(x_t; theta_0) + sum_s alpha_s J_t tau_s``,
so the ``T^2`` jvps ``J_t tau_s`` are computed once and every grid point is a weighted sum
of them (exactly the same numbers as evaluating ``f_lin`` at each point, far cheaper).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from taskvec_jax import _checks
from taskvec_jax import task_vectors as task_vectors_lib
from taskvec_jax import tree as tree_lib

PyTree = Any
ApplyFn = Callable[[PyTree, PyTree], jax.Array]

__all__ = ["DISTANCES", "alpha_grid", "disentanglement_error", "output_distance"]

DISTANCES = ("prediction", "l2")


def output_distance(a: jax.Array, b: jax.Array, distance: str) -> jax.Array:
    """Per-example ``dist(a_i, b_i)`` of two ``[N, ...]`` outputs; returns ``[N]``.

    ``"prediction"``: ``1[argmax a_i != argmax b_i]`` over the last axis (float);
    ``"l2"``: ``||a_i - b_i||_2`` over all trailing axes.
    """
    if distance == "prediction":
        return (jnp.argmax(a, -1) != jnp.argmax(b, -1)).astype(jnp.result_type(a))
    if distance == "l2":
        d = (a - b).reshape(a.shape[0], -1)
        return jnp.sqrt(jnp.sum(d * d, axis=-1))
    raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")


def alpha_grid(values_1, values_2=None) -> jax.Array:
    """The ``[A1 * A2, 2]`` grid of ``(alpha_1, alpha_2)`` pairs, ``alpha_1`` major:
    ``xi.reshape(A1, A2)[i, j]`` is the point ``(values_1[i], values_2[j])``."""
    v1 = jnp.asarray(values_1)
    v2 = v1 if values_2 is None else jnp.asarray(values_2)
    a1, a2 = jnp.meshgrid(v1, v2, indexing="ij")
    return jnp.stack([a1.ravel(), a2.ravel()], axis=-1)


def disentanglement_error(apply_fn: ApplyFn, base: PyTree, task_vectors: Sequence[PyTree],
                          task_inputs: Sequence[PyTree], alphas: jax.Array, *,
                          distance: str = "prediction", linearized: bool = False,
                          per_task: bool = False, chunk_size: int | None = None
                          ) -> jax.Array:
    """``xi(alpha)`` of 2305.12827 eq. 4 at each row of ``alphas`` (vmapped over the grid).

    Args:
      apply_fn: ``apply_fn(params, x) -> [N, ...]`` outputs (logits for
        ``"prediction"``). For per-task heads, put the task id in ``x`` (as
        :func:`taskvec_jax.models.with_task_ids` does) and read it inside ``apply_fn``.
      base: ``theta_0`` (the expansion point when ``linearized``).
      task_vectors: ``T`` trees shaped like ``base``.
      task_inputs: ``T`` input pytrees, ``task_inputs[t]`` a sample of ``D_t``.
      alphas: ``[G, T]`` coefficients (e.g. :func:`alpha_grid` for ``T = 2``).
      distance: ``"prediction"`` or ``"l2"`` (see :func:`output_distance`).
      linearized: evaluate with ``f_lin`` around ``base`` instead of ``f``.
      per_task: return the ``[G, T]`` terms ``E_{D_t} dist(...)`` instead of their sum.
      chunk_size: grid points evaluated at once (memory only).

    Returns:
      ``[G]`` (or ``[G, T]`` with ``per_task``).

    Raises:
      ValueError: for mismatched task counts or trees (naming the task and leaf path), a
        bad ``alphas`` shape, an unknown ``distance`` or a non-positive ``chunk_size``.
    """
    tvs = _checks.non_empty_sequence(task_vectors, "task_vectors", item="task vector")
    inputs = _checks.non_empty_sequence(task_inputs, "task_inputs", item="task's inputs")
    if len(inputs) != len(tvs):
        raise ValueError(f"task_inputs has {len(inputs)} entries, task_vectors has "
                         f"{len(tvs)}: pass one input sample per task")
    for t, tv in enumerate(tvs):
        task_vectors_lib.check_compatible(tv, base, name=f"task vector {t}",
                                          reference_name="base", allow_none=False)
    for t, x in enumerate(inputs):
        _checks.num_examples(x, name=f"task_inputs[{t}]")
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    chunk_size = _checks.positive_int(chunk_size, "chunk_size", allow_none=True)
    alphas = jnp.asarray(alphas)
    num_tasks = len(tvs)
    if alphas.ndim != 2 or alphas.shape[1] != num_tasks:
        raise ValueError(f"alphas must have shape [G, {num_tasks}] (one coefficient per "
                         f"task per grid point), got {alphas.shape}")
    return _xi(apply_fn, base, tvs, inputs, alphas, distance, bool(linearized),
               bool(per_task), chunk_size)


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 8))
def _xi(apply_fn, base, tvs, inputs, alphas, distance, linearized, per_task, chunk_size):
    num_tasks = len(tvs)

    if linearized:
        # f_lin(x_t; theta_0 + d) = f0_t + J_t d: T^2 jvps once, then weighted sums.
        f0, jt = [], []
        for x in inputs:
            outs = [jax.jvp(lambda p: apply_fn(p, x), (base,), (tv,)) for tv in tvs]
            f0.append(outs[0][0])
            jt.append(jnp.stack([o[1] for o in outs]))        # [T(s), N_t, ...]

        def point(a):
            terms = []
            for t in range(num_tasks):
                own = f0[t] + a[t] * jt[t][t]
                merged = f0[t] + jnp.tensordot(a.astype(jt[t].dtype), jt[t], axes=1)
                terms.append(jnp.mean(output_distance(own, merged, distance)))
            return jnp.stack(terms)
    else:
        def point(a):
            merged = tree_lib.weighted_sum(tvs, a, start=base)
            terms = []
            for t in range(num_tasks):
                own = tree_lib.weighted_sum([tvs[t]], a[t:t + 1], start=base)
                terms.append(jnp.mean(output_distance(apply_fn(own, inputs[t]),
                                                      apply_fn(merged, inputs[t]),
                                                      distance)))
            return jnp.stack(terms)

    terms = jax.lax.map(point, alphas, batch_size=chunk_size or alphas.shape[0])
    return terms if per_task else jnp.sum(terms, axis=-1)
