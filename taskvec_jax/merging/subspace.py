"""Subspace merges: Iso-C, Iso-CTS (isotropic merging) and TSV-M (task singular vectors).

Each acts on every matrix leaf (chosen by ``is_matrix``, see
:mod:`~taskvec_jax.merging.matrices`) through SVDs, and merges every other float leaf by
the mean of the task vectors, as the reference code (FusionBench) does. Per-task
coefficients scale the task vectors first: ``tau_t <- alpha_t * tau_t``. All three maps
are homogeneous (``f(c * taus) = c * f(taus)`` for every real ``c``), so a scalar
``alpha`` equals the reference's scaling of the merged task vector.

Reference-code choices kept (each named in tests/test_merging_parity_refs.py):

* Iso-C's and Iso-CTS's isotropic spectrum is the mean of all ``min(m, n)`` singular
  values, zeros included (not of the rank);
* Iso-CTS sizes its subspaces as ``c = int(min(m, n) * common_space_fraction)`` then moves
  the remainder to a multiple of ``T`` with Python's ``round`` (half to even), and
  projects the common subspace out of the *output* side only;
* TSV-M keeps ``k = min(m, n) // T`` triplets per task (the last ``min(m, n) - T k``
  directions of the merged matrix are empty).

SVDs run in at least float32 (bfloat16 inputs are widened), the result is cast back.
Everything is jittable (``is_matrix`` and the fractions are static).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from taskvec_jax import _checks
from taskvec_jax import tree as tree_lib
from taskvec_jax.merging import _common, _leafwise
from taskvec_jax.merging.matrices import (
    MatrixRule,
    as_matrix,
    default_is_matrix,
    matrix_split,
)

PyTree = Any

__all__ = [
    "iso_c", "iso_c_task_vector", "iso_cts", "iso_cts_task_vector", "subspace_sizes",
    "task_interference", "tsv", "tsv_task_vector",
]


# --------------------------------------------------------------------------- linear algebra

def _svd(m: jax.Array):
    return jnp.linalg.svd(m, full_matrices=False)


def _polar(m: jax.Array) -> jax.Array:
    """The orthogonal polar factor ``U V^T`` of ``m = U S V^T`` (nearest orthonormal)."""
    u, _, vh = _svd(m)
    return u @ vh


def _isotropic(m: jax.Array) -> jax.Array:
    """``mean(S) * U V^T``: ``m`` with every singular value replaced by their mean."""
    u, s, vh = _svd(m)
    return jnp.mean(s) * (u @ vh)


def _iso_c_matrix(mats: list[jax.Array]) -> jax.Array:
    return _isotropic(sum(mats[1:], mats[0]))


def subspace_sizes(shape: tuple[int, int], num_tasks: int,
                   common_space_fraction: float) -> tuple[int, int]:
    """Iso-CTS's ``(common, per_task)`` subspace sizes for a matrix of ``shape``.

    ``r = min(shape)``; ``c0 = int(r * common_space_fraction)``; the task-specific total
    ``round((r - c0) / T) * T`` (Python's ``round``: halves to even) is a multiple of ``T``;
    ``common = r - total`` and ``per_task = total / T``. So ``common + T * per_task == r``.

    Raises:
      ValueError: if rounding up leaves no room (``total > r``).
    """
    r = min(shape)
    c0 = int(r * common_space_fraction)
    total = round((r - c0) / num_tasks) * num_tasks
    if total > r:
        raise ValueError(f"matrix of shape {tuple(shape)} has {r} directions: "
                         f"common_space_fraction={common_space_fraction} with {num_tasks} "
                         f"tasks rounds the task-specific space up to {total} > {r}; "
                         "raise common_space_fraction")
    return r - total, total // num_tasks


def _iso_cts_matrix(mats: list[jax.Array], fraction: float) -> jax.Array:
    # The reference works on PyTorch's [out, in] weights and projects the common space out
    # of their left (output) side; the matrix views here are [in, out], so it runs on the
    # transposes and the result is transposed back.
    ws = [m.T for m in mats]
    num_tasks = len(ws)
    common, per_task = subspace_sizes(ws[0].shape, num_tasks, fraction)
    u, s, vh = _svd(sum(ws[1:], ws[0]))
    u_c, s_c, vh_c = u[:, :common], s[:common], vh[:common]
    us, ss, vhs = [], [], []
    for w in ws:
        u_t, s_t, vh_t = _svd(w - u_c @ (u_c.T @ w))
        us.append(u_t[:, :per_task])
        ss.append(s_t[:per_task])
        vhs.append(vh_t[:per_task])
    big_u = jnp.concatenate(us + [u_c], axis=1)
    big_s = jnp.concatenate(ss + [s_c])
    big_vh = jnp.concatenate(vhs + [vh_c], axis=0)
    merged = jnp.mean(big_s) * (_polar(big_u) @ _polar(big_vh))
    return merged.T


def _tsv_matrix(mats: list[jax.Array]) -> jax.Array:
    num_tasks = len(mats)
    k = min(mats[0].shape) // num_tasks
    if k == 0:     # fewer directions than tasks: every task keeps nothing
        return jnp.zeros_like(mats[0])
    us, ss, vhs = [], [], []
    for m in mats:
        u, s, vh = _svd(m)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    big_u = _polar(jnp.concatenate(us, axis=1))
    big_vh = _polar(jnp.concatenate(vhs, axis=0))
    return (big_u * jnp.concatenate(ss)) @ big_vh


# --------------------------------------------------------------------------- driver

_MATRIX_FNS = {"iso_c": _iso_c_matrix, "iso_cts": _iso_cts_matrix, "tsv": _tsv_matrix}


@functools.partial(jax.jit, static_argnames=("method", "fraction"))
def _matrix_jit(ref, mats, alphas, *, method, fraction):
    """One matrix leaf (already viewed as a matrix): ``ref + merge(alpha_t * tau_t)``.

    Compiled per matrix shape, so leaves that fold to the same matrix share a program.
    """
    fn = _MATRIX_FNS[method]
    if method == "iso_cts":
        fn = functools.partial(fn, fraction=fraction)
    # an SVD needs its whole matrix: a sharded leaf is gathered, the result laid out back
    whole = [_common.gathered(m) for m in mats]
    out = _leafwise.finish(_common.gathered(ref), fn(_leafwise.scaled(whole, alphas)), whole[0])
    return _common.laid_out_like(out, mats[0])


@jax.jit
def _mean_jit(ref, xs, alphas):
    """A leaf that is not a matrix: ``ref + (1/T) sum_t alpha_t tau_t``."""
    return tree_lib.weighted_sum(list(xs), alphas / len(xs), start=ref)


def _leaf(path, ref, xs, alphas, *, method, is_matrix, fraction):
    split = matrix_split(is_matrix, path, xs[0])
    if split is None:
        return _mean_jit(ref, xs, alphas)
    shape = jnp.shape(xs[0])
    mats = tuple(as_matrix(jnp.asarray(x), split) for x in xs)
    out = _matrix_jit(None if ref is None else as_matrix(jnp.asarray(ref), split), mats,
                      alphas, method=method, fraction=fraction)
    return out.reshape(shape)


def _run(base, task_vectors, alpha, *, method, is_matrix, fraction=None):
    if not callable(is_matrix):
        raise ValueError(f"is_matrix must be a function (path, leaf) -> None | bool | int, "
                         f"got {is_matrix!r}")
    _common.flatten_tasks(task_vectors, base)
    _leafwise.check_real(task_vectors, method)
    alphas = _common.per_task_alpha(alpha, len(task_vectors))
    if method == "iso_cts":
        _check_sizes(task_vectors[0], len(task_vectors), fraction, is_matrix)

    leaf_fn = functools.partial(_leaf, method=method, is_matrix=is_matrix,
                                fraction=fraction if method == "iso_cts" else None)
    return _leafwise.merge_leaves(base, task_vectors, alphas, leaf_fn)


def _check_fraction(value: Any) -> float:
    f = _common.static_number(value, "common_space_fraction")
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"common_space_fraction must lie in [0, 1], got {value!r}")
    return f


def _check_sizes(tau, num_tasks, fraction, is_matrix):
    """Iso-CTS's subspace sizes for every matrix leaf, checked before tracing."""
    leaves, _ = _common.flatten(tau)
    for path, x in zip(_common.leaf_paths(tau), leaves):
        if not _common.is_param(x):
            continue
        split = matrix_split(is_matrix, path, x)
        if split is None:
            continue
        shape = (math.prod(x.shape[:split]), math.prod(x.shape[split:]))
        try:
            subspace_sizes(shape, num_tasks, fraction)
        except ValueError as err:
            raise ValueError(f"leaf '{path}': {err}") from None


# --------------------------------------------------------------------------- Iso-C

def iso_c_task_vector(task_vectors: Sequence[PyTree], *,
                      is_matrix: MatrixRule = default_is_matrix) -> PyTree:
    """The Iso-C merged task vector (Marczak et al., "No Task Left Behind: Isotropic Model
    Merging with Common and Task-Specific Subspaces", ICML 2025).

    Per matrix leaf, with ``M = sum_t tau_t = U S V^T``: ``U (mean(S) I) V^T`` (the sum with
    a flat spectrum: every singular value replaced by the mean of all ``min(m, n)`` of
    them). Other float leaves: ``(1/T) sum_t tau_t``.

    Cost: one SVD per matrix leaf, ``O(m n min(m, n))``.

    Args:
      task_vectors: a non-empty sequence of task vectors with one structure.
      is_matrix: which leaves are matrices and how N-D ones fold
        (:func:`~taskvec_jax.merging.matrices.default_is_matrix`).

    Returns:
      A tree shaped like the task vectors (``None`` at non-float leaves).

    Raises:
      ValueError: empty input, mismatched trees (naming the task and leaf path), complex
        leaves, or a bad ``is_matrix`` answer (naming the leaf).
    """
    ones = jnp.ones((len(task_vectors),)) if _is_seq(task_vectors) else 1.0
    return _run(None, task_vectors, ones, method="iso_c", is_matrix=is_matrix)


def iso_c(base: PyTree, task_vectors: Sequence[PyTree], *, alpha: Any = 1.0,
          is_matrix: MatrixRule = default_is_matrix) -> PyTree:
    """Iso-C: ``base + iso_c_task_vector([alpha_t * tau_t])`` (Marczak et al., ICML 2025).

    Per matrix leaf ``U (mean(S) I) V^T`` with ``U S V^T = sum_t alpha_t tau_t``; other
    leaves ``base + (1/T) sum_t alpha_t tau_t``. With a scalar ``alpha`` this is
    FusionBench's ``iso_c`` merged vector scaled by ``alpha`` (the map is homogeneous).
    The paper tunes ``alpha`` on held-out data (values around 1-2 for ViTs).

    Args:
      base: the pretrained model.
      task_vectors: a non-empty sequence of task vectors shaped like ``base``.
      alpha: a scalar or one coefficient per task (may be traced).
      is_matrix: see :func:`iso_c_task_vector`.

    Returns:
      The merged model, shaped like ``base`` with its dtypes.

    Raises:
      ValueError: as :func:`iso_c_task_vector`, for a task vector that does not match
        ``base``, or an ``alpha`` of the wrong shape.
    """
    return _run(base, task_vectors, alpha, method="iso_c", is_matrix=is_matrix)


# --------------------------------------------------------------------------- Iso-CTS

def iso_cts_task_vector(task_vectors: Sequence[PyTree], *,
                        common_space_fraction: float = 0.8,
                        is_matrix: MatrixRule = default_is_matrix) -> PyTree:
    """The Iso-CTS merged task vector (Marczak et al., ICML 2025).

    Per matrix leaf, in PyTorch orientation ``W_t = tau_t^T`` (``[out, in]``; the matrix
    views here are flax's ``[in, out]``), with ``r = min(m, n)`` and
    ``(c, k) = subspace_sizes(W.shape, T, common_space_fraction)``:

    1. common subspace: the top ``c`` singular triplets ``(U_c, S_c, V_c)`` of
       ``sum_t W_t``;
    2. task-specific subspaces: the top ``k`` triplets ``(U_t, S_t, V_t)`` of
       ``W_t - U_c U_c^T W_t`` (the common output directions projected out);
    3. ``U = polar([U_1 .. U_T, U_c])``, ``V = polar([V_1 .. V_T, V_c])`` (the nearest
       orthonormal frames, ``polar(A) = A (A^T A)^{-1/2}``), and ``sigma`` the mean of all
       ``r`` singular values ``[S_1 .. S_T, S_c]``;
    4. the merge ``sigma U V^T``, transposed back to ``[in, out]``.

    Other float leaves: ``(1/T) sum_t tau_t``.

    Cost: ``T + 3`` SVDs of an ``m x n`` matrix per matrix leaf.

    Args:
      task_vectors: a non-empty sequence of task vectors with one structure.
      common_space_fraction: the share of ``r`` given to the common subspace before
        rounding, in ``[0, 1]`` (a concrete number; the paper's default 0.8).
      is_matrix: see :mod:`~taskvec_jax.merging.matrices`.

    Returns:
      A tree shaped like the task vectors (``None`` at non-float leaves).

    Raises:
      ValueError: as :func:`iso_c_task_vector`; a fraction out of range, or one that
        leaves no room for the rounded task-specific space (naming the leaf).
    """
    fraction = _check_fraction(common_space_fraction)
    ones = jnp.ones((len(task_vectors),)) if _is_seq(task_vectors) else 1.0
    return _run(None, task_vectors, ones, method="iso_cts", is_matrix=is_matrix,
                fraction=fraction)


def iso_cts(base: PyTree, task_vectors: Sequence[PyTree], *,
            common_space_fraction: float = 0.8, alpha: Any = 1.0,
            is_matrix: MatrixRule = default_is_matrix) -> PyTree:
    """Iso-CTS: ``base + iso_cts_task_vector([alpha_t * tau_t])`` (Marczak et al., 2025).

    See :func:`iso_cts_task_vector` for the four steps. With a scalar ``alpha`` this is
    FusionBench's ``iso_cts`` merged vector times ``alpha``.

    Args:
      base: the pretrained model.
      task_vectors: a non-empty sequence of task vectors shaped like ``base``.
      common_space_fraction: see :func:`iso_cts_task_vector`.
      alpha: a scalar or one coefficient per task (may be traced).
      is_matrix: see :mod:`~taskvec_jax.merging.matrices`.

    Returns:
      The merged model, shaped like ``base`` with its dtypes.

    Raises:
      ValueError: as :func:`iso_cts_task_vector` and :func:`iso_c`.
    """
    fraction = _check_fraction(common_space_fraction)
    return _run(base, task_vectors, alpha, method="iso_cts", is_matrix=is_matrix,
                fraction=fraction)


# --------------------------------------------------------------------------- TSV-M

def tsv_task_vector(task_vectors: Sequence[PyTree], *,
                    is_matrix: MatrixRule = default_is_matrix) -> PyTree:
    """The TSV-M merged task vector (Gargiulo et al., "Task Singular Vectors: Reducing
    Task Interference in Model Merging", CVPR 2025).

    Per matrix leaf (``m x n``, ``r = min(m, n)``, ``k = r // T``): each task keeps its top
    ``k`` singular triplets ``tau_t ~ U_t S_t V_t^T``; with ``U = [U_1 .. U_T]``,
    ``S = diag(S_1 .. S_T)`` and ``V = [V_1 .. V_T]`` the merge is
    ``polar(U) S polar(V)^T``, where ``polar(A) = A (A^T A)^{-1/2}`` is the orthonormal
    frame nearest to ``A`` (the reference computes it as ``P Q^T`` from ``A = P D Q^T``).
    When the tasks' kept singular vectors are already orthogonal across tasks,
    ``polar`` changes nothing and the merge is ``sum_t U_t S_t V_t^T``. Other float
    leaves: ``(1/T) sum_t tau_t``.

    Cost: ``T + 2`` SVDs per matrix leaf; memory one ``m x (T k)`` frame per leaf.

    Args:
      task_vectors: a non-empty sequence of task vectors with one structure.
      is_matrix: see :mod:`~taskvec_jax.merging.matrices`.

    Returns:
      A tree shaped like the task vectors (``None`` at non-float leaves).

    Raises:
      ValueError: as :func:`iso_c_task_vector`.
    """
    ones = jnp.ones((len(task_vectors),)) if _is_seq(task_vectors) else 1.0
    return _run(None, task_vectors, ones, method="tsv", is_matrix=is_matrix)


def tsv(base: PyTree, task_vectors: Sequence[PyTree], *, alpha: Any = 1.0,
        is_matrix: MatrixRule = default_is_matrix) -> PyTree:
    """TSV-M: ``base + tsv_task_vector([alpha_t * tau_t])`` (Gargiulo et al., CVPR 2025).

    See :func:`tsv_task_vector`. Per-task ``alpha`` scales each task vector before its SVD,
    as FusionBench does for a list of alphas; a scalar ``alpha`` equals FusionBench's
    scaling of the merged vector (the map is homogeneous). The paper uses ``alpha = 1``.

    Args:
      base: the pretrained model.
      task_vectors: a non-empty sequence of task vectors shaped like ``base``.
      alpha: a scalar or one coefficient per task (may be traced).
      is_matrix: see :mod:`~taskvec_jax.merging.matrices`.

    Returns:
      The merged model, shaped like ``base`` with its dtypes.

    Raises:
      ValueError: as :func:`iso_c`.
    """
    return _run(base, task_vectors, alpha, method="tsv", is_matrix=is_matrix)


# --------------------------------------------------------------------------- interference

def task_interference(task_vectors: Sequence[PyTree], *,
                      is_matrix: MatrixRule = default_is_matrix, rank: int | None = None,
                      reduce: bool = True) -> jax.Array | dict[str, jax.Array]:
    """Singular task interference (Gargiulo et al., CVPR 2025, the TSV paper).

    Per matrix leaf, from each task's top ``k`` singular triplets ``U_t S_t V_t^T``
    (``k = rank``, default ``min(m, n) // T``: the triplets TSV-M keeps), with
    ``U = [U_1 .. U_T]`` and ``V = [V_1 .. V_T]`` side by side and
    ``S = diag(S_1 .. S_T)``:

        STI = || (U^T U - I) S (V^T V - I) ||_1      (entrywise: the sum of |entries|)

    It is 0 when the tasks' singular vectors are mutually orthogonal across tasks (each
    ``U_t^T U_t = I`` already), and grows with overlapping, differently weighted
    subspaces. (FusionBench's ``compute_task_singular_interference`` stacks the ``U_t``
    along rows and asks ``torch.linalg.norm`` for ``ord="1"``; it raises for every
    input, see the parity tests; this is the paper's formula.)

    Args:
      task_vectors: a non-empty sequence of task vectors with one structure.
      is_matrix: see :mod:`~taskvec_jax.merging.matrices`.
      rank: triplets per task (capped at ``min(m, n)``); ``None``: ``min(m, n) // T``.
      reduce: sum over the matrix leaves (a scalar) or return ``{path: STI}``.

    Returns:
      A float scalar, or a dict from matrix-leaf path to its interference.

    Raises:
      ValueError: as :func:`iso_c_task_vector`, or if no leaf is a matrix.
    """
    if not callable(is_matrix):
        raise ValueError(f"is_matrix must be a function (path, leaf) -> None | bool | int, "
                         f"got {is_matrix!r}")
    _common.flatten_tasks(task_vectors)
    _leafwise.check_real(task_vectors, "task_interference")
    if rank is not None:
        rank = _checks.positive_int(rank, "rank")
    out = _interference_jit(tuple(task_vectors), is_matrix=is_matrix, rank=rank)
    if not out:
        raise ValueError("task_interference: no leaf is a matrix under is_matrix")
    return sum(out.values()) if reduce else out


@functools.partial(jax.jit, static_argnames=("is_matrix", "rank"))
def _interference_jit(task_vectors, *, is_matrix, rank):
    paths = _common.leaf_paths(task_vectors[0])
    task_leaves = [_common.flatten(tau)[0] for tau in task_vectors]
    out = {}
    for i, path in enumerate(paths):
        x0 = task_leaves[0][i]
        if not _common.is_param(x0):
            continue
        split = matrix_split(is_matrix, path, x0)
        if split is None:
            continue
        adt = _common.accumulation_dtype(jnp.result_type(x0))
        mats = [as_matrix(_common.gathered(jnp.asarray(leaves[i])).astype(adt), split)
                for leaves in task_leaves]     # whole matrices for the SVDs
        k = min(min(mats[0].shape), rank) if rank else min(mats[0].shape) // len(mats)
        if k == 0:
            continue
        svds = [(u[:, :k], s[:k], vh[:k]) for u, s, vh in map(_svd, mats)]
        u = jnp.concatenate([s[0] for s in svds], axis=1)
        s = jnp.concatenate([s[1] for s in svds])
        v = jnp.concatenate([s[2].T for s in svds], axis=1)
        eye = jnp.eye(u.shape[1], dtype=adt)
        out[path] = jnp.sum(jnp.abs(((u.T @ u - eye) * s) @ (v.T @ v - eye)))
    return out


def _is_seq(x) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, (dict, str, bytes))
