"""Empirical neural tangent kernels, pytree-native, from jvp and vjp (never a dense Jacobian).

For a model ``f(theta; x) in R^O`` the empirical NTK of two batches is

    K[i, j, a, b] = < d f_a(theta; x1_i) / d theta , d f_b(theta; x2_j) / d theta >
                  = (J1 J2^T)[(i, a), (j, b)],

the kernel that governs the linearized model: one step of GD on a squared loss of
``f_lin`` moves the outputs by ``-eta K r`` (Jacot et al. 2018; 2305.12827 sec. 5).

How it is computed (:func:`empirical_ntk`): the rows of ``J2`` are produced by per-example
vjps (``jax.vjp`` of ``f(., x2_j)`` with each output basis vector; ``N2 * O`` of them), in
chunks of ``chunk_size`` rows; each chunk of rows is pushed through ONE batched jvp over
all of ``x1`` (``J1 v`` for each row ``v``), which fills ``K[:, :, j, b]``. Memory: one
chunk of ``chunk_size`` parameter-shaped rows plus ``chunk_size * N1 * O`` outputs; the
full ``J2`` is never held unless ``chunk_size >= N2 * O``. Cost: ``N2 * O`` single-example
vjps plus ``N2 * O`` jvps over the ``N1`` examples.

Examples are assumed independent (no batch statistics): ``f(theta; x)[i]`` depends on
``x[i]`` alone, as for every model here.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import functools

import jax
import jax.numpy as jnp
import numpy as np

from taskvec_jax import _checks

PyTree = Any
ApplyFn = Callable[[PyTree, PyTree], jax.Array]

__all__ = ["cross_task_kernel", "empirical_ntk", "kernel_alignment",
           "kernel_target_alignment"]


def _example(x: PyTree, j) -> PyTree:
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, j, keepdims=True), x)


def _flat_outputs(apply_fn: ApplyFn, params: PyTree, x: PyTree, n: int) -> jax.Array:
    out = apply_fn(params, x)
    if not isinstance(out, jax.Array) and not hasattr(out, "shape"):
        raise ValueError("empirical_ntk needs apply_fn to return one array [N, ...], got "
                         f"{type(out).__name__}")
    if out.ndim == 0 or out.shape[0] != n:
        raise ValueError(f"apply_fn must return one output per example (leading axis {n}),"
                         f" got shape {out.shape}")
    return out.reshape(n, -1)


def empirical_ntk(apply_fn: ApplyFn, params: PyTree, x1: PyTree, x2: PyTree | None = None,
                  *, trace: bool = True, chunk_size: int | None = None) -> jax.Array:
    """The empirical NTK Gram ``J(x1) J(x2)^T`` of ``apply_fn`` at ``params``.

    Args:
      apply_fn: ``apply_fn(params, x) -> [N, ...]`` outputs (trailing axes are flattened
        to ``O`` outputs per example).
      params: any pytree of float arrays.
      x1: inputs, a pytree with a leading example axis ``N1``.
      x2: inputs (``N2``); ``None`` means ``x1``.
      trace: average over the output pair diagonal, ``K[i, j] = (1/O) sum_a
        K[i, j, a, a]`` (the ``trace_axes=(-1,)`` default of
        ``neural_tangents.empirical_ntk_fn``, which also averages); ``False`` returns
        the full ``[N1, N2, O, O]`` kernel.
      chunk_size: how many Jacobian rows of ``x2`` to hold at once (memory only; the
        result is the same). ``None``: all ``N2 * O`` rows at once.

    Returns:
      ``[N1, N2]`` (``trace``) or ``[N1, N2, O, O]``, in the outputs' dtype.

    Raises:
      ValueError: for empty or inconsistent inputs, non-float params, non-positive
        ``chunk_size``, or an ``apply_fn`` without one output row per example.
    """
    _checks.float_dtype(params, name="params", why="the NTK differentiates every leaf")
    chunk_size = _checks.positive_int(chunk_size, "chunk_size", allow_none=True)
    n1 = _checks.num_examples(x1, name="x1")
    x2 = x1 if x2 is None else x2
    n2 = _checks.num_examples(x2, name="x2")
    return _ntk(apply_fn, params, x1, x2, n1, n2, bool(trace), chunk_size)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7))
def _ntk(apply_fn, params, x1, x2, n1, n2, trace, chunk_size):
    out_shape = jax.eval_shape(lambda p, x: _flat_outputs(apply_fn, p, x, n2), params, x2)
    o = out_shape.shape[1]
    dtype = out_shape.dtype

    def row(index):
        # One Jacobian row of x2: d f_b(x2_j) / d theta, with (j, b) = divmod(index, O).
        j, b = index // o, index % o
        xj = _example(x2, j)
        _, vjp = jax.vjp(lambda p: _flat_outputs(apply_fn, p, xj, 1)[0], params)
        return vjp(jax.nn.one_hot(b, o, dtype=dtype))[0]

    def column(index):
        v = row(index)
        return jax.jvp(lambda p: _flat_outputs(apply_fn, p, x1, n1), (params,), (v,))[1]

    indices = jnp.arange(n2 * o)
    cols = jax.lax.map(column, indices, batch_size=chunk_size or n2 * o)  # [N2*O, N1, O]
    k = jnp.transpose(cols.reshape(n2, o, n1, o), (2, 0, 3, 1))           # [N1, N2, O, O]
    if trace:
        # The mean over the output diagonal: neural_tangents' trace_axes=(-1,) convention.
        return jnp.einsum("ijaa->ij", k) / o
    return k


def kernel_alignment(k1: jax.Array, k2: jax.Array, *, centered: bool = True) -> jax.Array:
    """Kernel alignment ``<K1, K2>_F / (||K1||_F ||K2||_F)`` of two ``[N, N]`` Grams.

    ``centered=True`` first centers both, ``K -> H K H`` with ``H = I - 11^T / N``
    (centered kernel alignment, Cortes et al. 2012); ``False`` is the uncentered
    alignment of Cristianini et al. 2002. In ``[-1, 1]`` (``[0, 1]`` for PSD kernels).
    """
    k1, k2 = jnp.asarray(k1), jnp.asarray(k2)
    if k1.ndim != 2 or k1.shape[0] != k1.shape[1] or k1.shape != k2.shape:
        raise ValueError(f"kernel_alignment needs two square Grams of one shape, got "
                         f"{k1.shape} and {k2.shape}")
    if centered:
        def center(k):
            return k - k.mean(0, keepdims=True) - k.mean(1, keepdims=True) + k.mean()
        k1, k2 = center(k1), center(k2)
    return jnp.vdot(k1, k2) / (jnp.linalg.norm(k1) * jnp.linalg.norm(k2))


def kernel_target_alignment(k: jax.Array, labels: jax.Array, num_classes: int, *,
                            centered: bool = True) -> jax.Array:
    """Alignment of a Gram with the label kernel ``Y Y^T`` (``Y`` one-hot ``[N, C]``)."""
    y = jax.nn.one_hot(jnp.asarray(labels), num_classes, dtype=jnp.result_type(k))
    return kernel_alignment(k, y @ y.T, centered=centered)


def cross_task_kernel(apply_fn: ApplyFn, params: PyTree, task_inputs: Sequence[PyTree], *,
                      chunk_size: int | None = None) -> tuple[jax.Array, jax.Array]:
    """How much the tasks' tangent features overlap: normalized NTK block norms.

    With ``K_st = K(D_s, D_t)`` the (traced) NTK between the inputs of tasks ``s`` and
    ``t``, returns ``A[s, t] = ||K_st||_F / sqrt(||K_ss||_F ||K_tt||_F)`` (``A[t, t] = 1``)
    and the full Gram over all tasks' inputs. For the linearized model a step on task
    ``s`` moves the outputs on task ``t`` by ``-eta K_ts r_s``: ``A[s, t] ~ 0`` is the
    kernel-level form of weight disentanglement (2305.12827, sec. 5: eigenfunctions
    localized on each task's support).

    Args:
      apply_fn: ``apply_fn(params, x) -> [N, ...]``.
      params: the point the kernel is taken at (``theta_0`` for the linearized model).
      task_inputs: one input pytree per task (leading example axes; one structure).
      chunk_size: as in :func:`empirical_ntk`.

    Returns:
      ``(A [T, T], K [sum N_t, sum N_t])``.
    """
    inputs = _checks.non_empty_sequence(task_inputs, "task_inputs", item="task's inputs")
    sizes = [_checks.num_examples(x, name=f"task {t}") for t, x in enumerate(inputs)]
    x = jax.tree.map(lambda *a: jnp.concatenate(a), *inputs)
    k = empirical_ntk(apply_fn, params, x, chunk_size=chunk_size)
    edges = np.concatenate([[0], np.cumsum(sizes)])
    t_count = len(sizes)
    norms = jnp.stack([jnp.stack([jnp.linalg.norm(k[edges[s]:edges[s + 1],
                                                     edges[t]:edges[t + 1]])
                                  for t in range(t_count)]) for s in range(t_count)])
    d = jnp.sqrt(jnp.diag(norms))
    return norms / jnp.outer(d, d), k
