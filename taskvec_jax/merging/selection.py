"""Selection merges: MagMax, TALL masks and Consensus merging, DELLA.

* :func:`magmax` (Marczak et al., "MagMax: Leveraging Model Merging for Seamless Continual
  Learning", ECCV 2024): per entry, the task vector value of largest magnitude.
* :func:`tall_masks`, :func:`tall_mask_models`, :func:`consensus_mask`, :func:`consensus`
  (Wang et al., "Localizing Task Information for Improved Model Merging and Compression",
  ICML 2024): per-task masks of the entries where a task's own vector dominates its
  distance to the multi-task vector, and the merge restricted to entries that at least
  ``min_tasks`` tasks use.
* :func:`della_prune`, :func:`della`, :func:`della_linear` (Deep et al., "DELLA-Merging:
  Reducing Interference in Model Merging through Magnitude-Based Sampling", 2024; the
  definition of mergekit's ``della`` / ``della_linear`` methods): random drops with
  probabilities ranked by magnitude, then a TIES-style or linear merge.

Per-task coefficients ``alpha`` scale the task vectors first (``tau_t <- alpha_t tau_t``)
wherever a method combines them; non-float leaves are ``None`` in task vectors and keep
the base's value in models; sums run in at least float32. Every leaf is one small jitted
program (cached by shape), and every function is jittable as a whole.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from taskvec_jax import tree as tree_lib
from taskvec_jax.merging import _common, _leafwise, _shards
from taskvec_jax.merging.matrices import (
    MatrixRule,
    as_matrix,
    default_is_matrix,
    matrix_split,
)

PyTree = Any

__all__ = [
    "CONSENSUS", "DELLA_RESCALES", "consensus", "consensus_mask", "della",
    "della_keep_probabilities", "della_linear", "della_prune", "magmax",
    "magmax_task_vector", "tall_mask_models", "tall_masks",
]

CONSENSUS = ("mass", "count")
DELLA_RESCALES = ("l1", "probability", None)

# mergekit leaves a tensor unrescaled when either L1 norm is below this absolute bound.
_L1_EPS = 1e-7


# --------------------------------------------------------------------------- MagMax

@jax.jit
def _magmax_leaf(ref, xs, alphas):
    ys = _leafwise.scaled(xs, alphas)
    best = ys[0]
    for y in ys[1:]:           # ">=": on equal magnitudes the later task wins
        best = jnp.where(jnp.abs(y) >= jnp.abs(best), y, best)
    return _leafwise.finish(ref, best, xs[0])


def magmax_task_vector(task_vectors: Sequence[PyTree], *, alpha: Any = 1.0) -> PyTree:
    """The MagMax task vector: per entry, ``alpha_t tau_t`` of largest magnitude.

    ``out[j] = alpha_s tau_s[j]`` with ``s = argmax_t |alpha_t tau_t[j]|``; on equal
    magnitudes the LATER task wins (the reference folds the tasks in order and replaces
    the running choice when ``|new| >= |current|``).

    Args:
      task_vectors: a non-empty sequence of task vectors with one structure.
      alpha: a scalar or one coefficient per task.

    Returns:
      A tree shaped like the task vectors (``None`` at non-float leaves).

    Raises:
      ValueError: empty input, mismatched trees (naming task and leaf path), complex
        leaves, or an alpha of the wrong shape.
    """
    return _magmax(None, task_vectors, alpha)


def magmax(base: PyTree, task_vectors: Sequence[PyTree], *, alpha: Any = 1.0) -> PyTree:
    """MagMax (Marczak et al., ECCV 2024): ``base + magmax_task_vector(alpha_t tau_t)``.

    With a scalar ``alpha`` this is FusionBench's ``magmax_merge`` with
    ``scaling_factor=alpha`` (scaling commutes with the selection). When the task vectors
    have disjoint supports the selection is their sum.

    Args:
      base: the pretrained model.
      task_vectors: a non-empty sequence of task vectors shaped like ``base``.
      alpha: a scalar or one coefficient per task (may be traced).

    Returns:
      The merged model, shaped like ``base`` with its dtypes.

    Raises:
      ValueError: as :func:`magmax_task_vector`, and for a task vector not matching ``base``.
    """
    return _magmax(base, task_vectors, alpha)


def _magmax(base, task_vectors, alpha):
    _common.flatten_tasks(task_vectors, base)
    _leafwise.check_real(task_vectors, "magmax")
    alphas = _common.per_task_alpha(alpha, len(task_vectors))
    return _leafwise.merge_leaves(base, task_vectors, alphas,
                                  lambda path, ref, xs, a: _magmax_leaf(ref, xs, a))


# --------------------------------------------------------------------------- TALL masks

def _multitask(task_vectors, alphas, multitask_vector):
    if multitask_vector is None:
        return tree_lib.weighted_sum(list(task_vectors), alphas)
    _common.flatten_tasks([multitask_vector], task_vectors[0])
    return multitask_vector


@jax.jit
def _tall_leaf(xs, alphas, lambdas, multi):
    ys = _leafwise.scaled(xs, alphas)
    m = jnp.asarray(multi).astype(ys[0].dtype)
    return tuple(jnp.abs(y) > lambdas[t].astype(y.dtype) * jnp.abs(m - y)
                 for t, y in enumerate(ys))


def _masks(task_vectors, alphas, lambdas, multi):
    """Per leaf, the tuple of T masks (``None`` at non-float leaves)."""
    multi_leaves, _ = _common.flatten(multi)
    task_leaves = [_common.flatten(tau)[0] for tau in task_vectors]
    out = []
    for i, m in enumerate(multi_leaves):
        if not _common.is_param(task_leaves[0][i]):
            out.append(None)
            continue
        out.append(_tall_leaf(tuple(leaves[i] for leaves in task_leaves), alphas, lambdas,
                              m))
    return out


def _tall_setup(task_vectors, alpha, mask_lambda, multitask_vector, base=None):
    _common.flatten_tasks(task_vectors, base)
    _leafwise.check_real(task_vectors, "TALL masks")
    alphas = _common.per_task_alpha(alpha, len(task_vectors))
    lambdas = _common.per_task_alpha(mask_lambda, len(task_vectors), name="mask_lambda")
    multi = _multitask(task_vectors, alphas, multitask_vector)
    return alphas, lambdas, multi


def tall_masks(task_vectors: Sequence[PyTree], *, mask_lambda: Any = 0.4,
               alpha: Any = 1.0, multitask_vector: PyTree | None = None) -> list[PyTree]:
    """TALL masks (Wang et al., ICML 2024): where task ``t`` keeps its own information.

    ``m_t = |alpha_t tau_t| > lambda_t * |tau_MTL - alpha_t tau_t|`` entrywise, with the
    multi-task vector ``tau_MTL = sum_t alpha_t tau_t`` (or ``multitask_vector``, e.g. a
    TIES merge). The comparison is strict, as in the reference code (the paper writes
    ``>=``; they differ only on exact ties, e.g. where ``tau_t`` is zero).

    Args:
      task_vectors: a non-empty sequence of task vectors with one structure.
      mask_lambda: ``lambda``, a scalar or one per task (the paper picks each task's from
        ``{0.2, 0.3, 0.4, 0.5, 0.6}`` on validation data).
      alpha: a scalar or one coefficient per task, applied to the task vectors.
      multitask_vector: the multi-task vector to compare against (default the sum).

    Returns:
      A list of ``T`` boolean trees (``None`` at non-float leaves).

    Raises:
      ValueError: empty or mismatched input (naming task and leaf path), complex leaves,
        a ``mask_lambda`` or ``alpha`` of the wrong shape.
    """
    alphas, lambdas, multi = _tall_setup(task_vectors, alpha, mask_lambda, multitask_vector)
    per_leaf = _masks(task_vectors, alphas, lambdas, multi)
    _, treedef = _common.flatten(task_vectors[0])
    return [jax.tree.unflatten(treedef, [None if m is None else m[t] for m in per_leaf])
            for t in range(len(task_vectors))]


def tall_mask_models(base: PyTree, task_vectors: Sequence[PyTree], *,
                     mask_lambda: Any = 0.4, alpha: Any = 1.0,
                     multitask_vector: PyTree | None = None) -> list[PyTree]:
    """One model per task, retrieved from the multi-task vector by its TALL mask.

    ``theta_t = base + m_t * tau_MTL`` with ``m_t`` from :func:`tall_masks` (Wang et al.,
    ICML 2024, the compression use: one merged vector plus ``T`` binary masks stand for
    ``T`` models; FusionBench's ``TallMaskTaskArithmeticAlgorithm``).

    Args:
      base: the pretrained model.
      task_vectors: a non-empty sequence of task vectors shaped like ``base``.
      mask_lambda, alpha, multitask_vector: as :func:`tall_masks`.

    Returns:
      A list of ``T`` models shaped like ``base`` with its dtypes.

    Raises:
      ValueError: as :func:`tall_masks`.
    """
    alphas, lambdas, multi = _tall_setup(task_vectors, alpha, mask_lambda, multitask_vector,
                                         base)
    per_leaf = _masks(task_vectors, alphas, lambdas, multi)
    base_leaves, treedef = _common.flatten(base)
    multi_leaves, _ = _common.flatten(multi)
    models = []
    for t in range(len(task_vectors)):
        out = [b if m is None else _masked_add(b, m[t], v)
               for b, m, v in zip(base_leaves, per_leaf, multi_leaves)]
        models.append(jax.tree.unflatten(treedef, out))
    return models


@jax.jit
def _masked_add(b, mask, v):
    adt = _common.accumulation_dtype(jnp.result_type(b))
    kept = jnp.where(mask, jnp.asarray(v).astype(adt), jnp.zeros((), adt))
    return (jnp.asarray(b).astype(adt) + kept).astype(jnp.result_type(b))


def _check_min_tasks(min_tasks):
    if isinstance(min_tasks, bool) or not isinstance(min_tasks, int) or min_tasks < 0:
        raise ValueError(f"min_tasks must be an integer >= 0, got {min_tasks!r}")
    return min_tasks


def consensus_mask(task_vectors: Sequence[PyTree], *, min_tasks: int = 2,
                   mask_lambda: Any = 0.4, alpha: Any = 1.0,
                   multitask_vector: PyTree | None = None) -> PyTree:
    """The consensus mask: entries that at least ``min_tasks`` TALL masks keep.

    ``m = #{t: m_t} >= min_tasks`` (Wang et al., ICML 2024). ``min_tasks=2`` drops both
    "catastrophic" (no task) and "selfish" (one task) weights; ``1`` drops only the
    catastrophic ones; ``0`` keeps everything (the merge reduces to its base method);
    above ``T`` keeps nothing.

    Args:
      task_vectors: a non-empty sequence of task vectors with one structure.
      min_tasks: the threshold ``k``, an integer ``>= 0``.
      mask_lambda, alpha, multitask_vector: as :func:`tall_masks`.

    Returns:
      A boolean tree (``None`` at non-float leaves).

    Raises:
      ValueError: as :func:`tall_masks`, or for a bad ``min_tasks``.
    """
    k = _check_min_tasks(min_tasks)
    masks = tall_masks(task_vectors, mask_lambda=mask_lambda, alpha=alpha,
                       multitask_vector=multitask_vector)
    return _count_at_least(masks, k)


def _count_at_least(masks, k):
    leaves = [_common.flatten(m)[0] for m in masks]
    _, treedef = _common.flatten(masks[0])
    out = [None if ls[0] is None else _count_leaf(tuple(ls), k)
           for ls in zip(*leaves)]
    return jax.tree.unflatten(treedef, out)


@functools.partial(jax.jit, static_argnums=1)
def _count_leaf(ms, k):
    count = sum(m.astype(jnp.int32) for m in ms)
    return count >= k


def consensus(base: PyTree, task_vectors: Sequence[PyTree], *, min_tasks: int = 2,
              mask_lambda: Any = 0.4, alpha: Any = 1.0,
              multitask_vector: PyTree | None = None) -> PyTree:
    """Consensus merging (Wang et al., ICML 2024): ``base + m * tau_MTL``.

    ``m`` is :func:`consensus_mask`; ``tau_MTL = sum_t alpha_t tau_t`` (Consensus Task
    Arithmetic) unless ``multitask_vector`` is given (e.g. a TIES vector: Consensus TIES).

    Args:
      base: the pretrained model.
      task_vectors: a non-empty sequence of task vectors shaped like ``base``.
      min_tasks, mask_lambda, alpha, multitask_vector: as :func:`consensus_mask`.

    Returns:
      The merged model, shaped like ``base`` with its dtypes.

    Raises:
      ValueError: as :func:`consensus_mask`, and for a task vector not matching ``base``.
    """
    k = _check_min_tasks(min_tasks)
    alphas, lambdas, multi = _tall_setup(task_vectors, alpha, mask_lambda, multitask_vector,
                                         base)
    per_leaf = _masks(task_vectors, alphas, lambdas, multi)
    base_leaves, treedef = _common.flatten(base)
    multi_leaves, _ = _common.flatten(multi)
    out = [b if m is None else _masked_add(b, _count_leaf(m, k), v)
           for b, m, v in zip(base_leaves, per_leaf, multi_leaves)]
    return jax.tree.unflatten(treedef, out)


# --------------------------------------------------------------------------- DELLA

def _check_della(density, epsilon, rescale):
    d = _common.check_density(density)
    e = _common.static_number(epsilon, "epsilon")
    if e < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    if d < 1.0 and not (0.0 < d - e and d + e < 1.0):
        raise ValueError(f"density +/- epsilon must lie in (0, 1), got density={d}, "
                         f"epsilon={e} (mergekit's condition)")
    if rescale not in DELLA_RESCALES:
        raise ValueError(f"unknown rescale {rescale!r}; choose one of {DELLA_RESCALES}")
    return d, e


def _probs(x, split, density, epsilon):
    """Keep probabilities ``(d - eps) + 2 eps * rank / (n - 1)`` over each ranking group,
    laid out as ``x``. A leaf split over Explicit mesh axes is ranked on its blocks
    (:func:`taskvec_jax.merging._shards.group_ranks`: the group's blocks pass each
    device in a ring, no leaf is gathered); any other leaf by one sort."""
    n = math.prod(x.shape if split is None else x.shape[:split])
    rank = None if n == 1 else _shards.group_ranks(x, split)
    if n == 1:                 # one entry per group: the middle of the band
        rank_norm = jnp.full(x.shape, 0.5, x.dtype)
    elif rank is not None:
        rank_norm = rank.astype(x.dtype) / (n - 1)
    else:
        # Groups as rows (XLA's CPU sort is faster along the last axis), then the inverse
        # permutation by one scatter (a second sort would cost as much as the first).
        # The sort keys are the integer bit patterns of |v| (monotone in the magnitude for
        # non-negative floats, NaN above inf as in argsort) paired with the position: the
        # lexicographic (magnitude, position) order is the stable order, and XLA:CPU
        # compares integers faster than floats (argsort's comparator handles NaN and -0).
        # A sort runs along an unsharded axis only: a leaf split over mesh axes and too
        # large for group_ranks' int32 positions is gathered.
        whole = _common.gathered(x)
        vt = (whole.reshape(-1, 1) if split is None else as_matrix(whole, split)).T
        bits = jnp.dtype(f"int{8 * vt.dtype.itemsize}")
        mag = jax.lax.bitcast_convert_type(jnp.abs(vt), bits)
        pos = jax.lax.broadcasted_iota(jnp.int32, vt.shape, 1)
        _, order = jax.lax.sort((mag, pos), dimension=1, num_keys=2, is_stable=False)
        rows = jnp.arange(vt.shape[0])[:, None]
        rank = jnp.zeros(vt.shape, jnp.int32).at[rows, order].set(
            jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None, :], vt.shape))
        rank_norm = _common.laid_out_like(
            (rank.T.astype(x.dtype) / (n - 1)).reshape(x.shape), x)
    return (density - epsilon) + rank_norm * (2 * epsilon)


def _prune(x, u, split, density, epsilon, rescale):
    """One task's DELLA-pruned leaf (in ``x``'s dtype)."""
    if density >= 1.0:
        return x
    p = _probs(x, split, density, epsilon)
    keep = u < p
    zero = jnp.zeros((), x.dtype)
    if rescale == "probability":
        return jnp.where(keep, x / p, zero)
    masked = jnp.where(keep, x, zero)
    if rescale is None:
        return masked
    before, after = jnp.sum(jnp.abs(x)), jnp.sum(jnp.abs(masked))
    small = (before < _L1_EPS) | (after < _L1_EPS)
    return masked * jnp.where(small, jnp.ones((), x.dtype), before / jnp.where(small, 1,
                                                                                 after))


def _uniforms(key, t, i, x, dtype):
    # drawn where x's blocks are (threefry's bits do not depend on the layout)
    sharding = jax.typeof(x).sharding
    out = None if sharding.mesh.empty or all(e is None for e in sharding.spec) else sharding
    return jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, t), i),
                              jnp.shape(x), dtype, out_sharding=out)


@functools.partial(jax.jit, static_argnames=("split", "density", "epsilon"))
def _probs_leaf(x, *, split, density, epsilon):
    adt = _common.accumulation_dtype(jnp.result_type(x))
    return _probs(jnp.asarray(x).astype(adt), split, density, epsilon)


def della_keep_probabilities(task_vector: PyTree, *, density: float, epsilon: float = 0.15,
                             is_matrix: MatrixRule = default_is_matrix) -> PyTree:
    """DELLA's per-entry keep probabilities (MagPrune), ranked by magnitude.

    In each ranking group of ``n`` entries, the entry of magnitude rank ``r`` (0 = the
    smallest; equal magnitudes ranked by position, the earlier lower) is kept with
    probability ``p = (density - epsilon) + 2 epsilon r / (n - 1)`` (``density`` for
    ``n = 1``), so the mean keep rate is ``density``. Groups, as mergekit's rows of a
    PyTorch ``[out, in]`` weight: for a matrix leaf (``is_matrix``, rows = inputs), each
    column (one output's weights); any other leaf is one group (mergekit ranks a 1-D
    tensor whole and a >= 3-D tensor along its axis 1).

    Args:
      task_vector: a pytree of arrays (``None`` and non-float leaves give ``None``).
      density: the mean keep probability, in ``(0, 1]``; ``1`` keeps everything.
      epsilon: half the width of the probability band, ``>= 0``, with
        ``0 < density - epsilon`` and ``density + epsilon < 1`` when ``density < 1``.
      is_matrix: see :mod:`~taskvec_jax.merging.matrices`.

    Returns:
      A tree of probabilities (float32 at least) shaped like ``task_vector``.

    Raises:
      ValueError: for a density or epsilon out of range.
    """
    d, e = _check_della(density, epsilon, "l1")
    leaves, treedef = _common.flatten(task_vector)
    paths = _common.leaf_paths(task_vector)
    out = [None if not _common.is_param(x) else
           jnp.ones(jnp.shape(x), _common.accumulation_dtype(jnp.result_type(x))) if d >= 1
           else _probs_leaf(x, split=matrix_split(is_matrix, p, x), density=d, epsilon=e)
           for p, x in zip(paths, leaves)]
    return jax.tree.unflatten(treedef, out)


@functools.partial(jax.jit, static_argnames=("split", "density", "epsilon", "rescale",
                                             "index"))
def _prune_leaf(x, key, task, *, split, density, epsilon, rescale, index):
    adt = _common.accumulation_dtype(jnp.result_type(x))
    xa = jnp.asarray(x).astype(adt)
    u = _uniforms(key, task, index, xa, adt)
    return _prune(xa, u, split, density, epsilon, rescale).astype(jnp.result_type(x))


def della_prune(task_vector: PyTree, *, key: jax.Array, density: float,
                epsilon: float = 0.15, rescale: str | None = "l1",
                is_matrix: MatrixRule = default_is_matrix, task: int = 0) -> PyTree:
    """DELLA's MagPrune of one task vector: drop each entry with ``1 - p``, rescale.

    ``keep = u < p`` with ``p`` from :func:`della_keep_probabilities` and, for the leaf at
    flattening position ``i`` (``None`` leaves counted),
    ``u = jax.random.uniform(fold_in(fold_in(key, task), i), leaf.shape, dtype)``
    (``dtype`` float32 at least). Then ``rescale``:

    * ``"l1"`` (mergekit's ``rescale: true``): the kept entries are scaled so the leaf's
      L1 norm is unchanged, ``masked * (||tau||_1 / ||masked||_1)``, unless either norm
      is below ``1e-7`` (mergekit's absolute bound; then no scaling);
    * ``"probability"`` (the DELLA paper): every kept entry is divided by its ``p``, so
      ``E[out] = tau``;
    * ``None``: no rescaling.

    ``density=1`` returns the task vector unchanged (as mergekit).

    Args:
      task_vector: a pytree of arrays; ``None`` and non-float leaves are returned as is.
      key: a PRNG key.
      density, epsilon, is_matrix: as :func:`della_keep_probabilities`.
      rescale: ``"l1"``, ``"probability"`` or ``None``.
      task: the task index folded into ``key`` (merges pass ``t``).

    Returns:
      A tree shaped like ``task_vector`` with its dtypes.

    Raises:
      ValueError: for a density, epsilon or rescale out of range.
    """
    d, e = _check_della(density, epsilon, rescale)
    leaves, treedef = _common.flatten(task_vector)
    paths = _common.leaf_paths(task_vector)
    out = [x if not _common.is_param(x) else
           _prune_leaf(x, key, task, split=matrix_split(is_matrix, p, x), density=d,
                       epsilon=e, rescale=rescale, index=i)
           for i, (p, x) in enumerate(zip(paths, leaves))]
    return jax.tree.unflatten(treedef, out)


@functools.partial(jax.jit, static_argnames=("split", "density", "epsilon", "rescale",
                                             "index", "consensus", "linear"))
def _della_leaf(ref, xs, key, alphas, weights, *, split, density, epsilon, rescale, index,
                consensus, linear):
    adt = _common.accumulation_dtype(jnp.result_type(xs[0]))
    pruned = []
    for t, x in enumerate(xs):
        xa = jnp.asarray(x).astype(adt)
        pruned.append(_prune(xa, _uniforms(key, t, index, xa, adt), split, density,
                             epsilon, rescale))
    if linear:
        merged = sum(alphas[t].astype(adt) * y for t, y in enumerate(pruned))
        return _leafwise.finish(ref, merged, xs[0])
    ds = [weights[t].astype(adt) * y for t, y in enumerate(pruned)]
    score = sum(jnp.sign(d) for d in ds) if consensus == "count" else sum(ds)
    elected = jnp.where(score >= 0, 1, -1).astype(adt)     # a tie elects +
    agree = [jnp.sign(d) == elected for d in ds]           # zeros never agree
    mixed = sum(jnp.where(a, d, 0) for a, d in zip(agree, ds))
    divisor = sum(jnp.where(a, weights[t].astype(adt), 0) for t, a in enumerate(agree))
    divisor = jnp.where(divisor == 0, jnp.ones((), adt), divisor)
    return _leafwise.finish(ref, alphas[0].astype(adt) * (mixed / divisor), xs[0])


def _della_run(base, task_vectors, key, density, epsilon, rescale, is_matrix, alphas,
               weights, consensus, linear):
    d, e = _check_della(density, epsilon, rescale)
    _common.flatten_tasks(task_vectors, base)
    _leafwise.check_real(task_vectors, "DELLA")
    base_leaves, treedef = _common.flatten(base)
    paths = _common.leaf_paths(base)
    task_leaves = [_common.flatten(tau)[0] for tau in task_vectors]
    out = []
    for i, (path, b) in enumerate(zip(paths, base_leaves)):
        x0 = task_leaves[0][i]
        if not _common.is_param(x0):
            out.append(b)
            continue
        out.append(_della_leaf(b, tuple(ls[i] for ls in task_leaves), key, alphas, weights,
                               split=matrix_split(is_matrix, path, x0), density=d,
                               epsilon=e, rescale=rescale, index=i, consensus=consensus,
                               linear=linear))
    return jax.tree.unflatten(treedef, out)


def della(base: PyTree, task_vectors: Sequence[PyTree], *, key: jax.Array,
          density: float = 0.5, epsilon: float = 0.15, alpha: Any = 1.0,
          weights: Any = None, consensus: str = "mass", rescale: str | None = "l1",
          is_matrix: MatrixRule = default_is_matrix) -> PyTree:
    """DELLA-Merging, as mergekit's ``della`` method: MagPrune, elect, weighted mean.

    With ``delta_t = della_prune(tau_t, key=key, task=t, ...)`` and ``d_t = w_t delta_t``
    (``w = weights``, default all ones), per entry:

    * elected sign ``s = +1`` if ``sum_t d_t >= 0`` (``consensus="mass"``) or
      ``sum_t sign(d_t) >= 0`` (``"count"``), else ``-1``: a tie elects ``+``;
    * ``a_t = [sign(d_t) == s]`` (a zero never agrees);
    * ``out = base + alpha * (sum_t a_t d_t) / (sum_t a_t w_t)``, the divisor replaced by
      1 where it is 0.

    ``alpha`` is mergekit's ``lambda`` and ``weights`` its per-model ``weight``. The merge
    is a weighted mean, so ``alpha`` is one scalar; per-task scaling is ``weights``.

    Args:
      base: the pretrained model.
      task_vectors: a non-empty sequence of task vectors shaped like ``base``.
      key: a PRNG key (task ``t`` uses ``fold_in(key, t)``, see :func:`della_prune`).
      density, epsilon, rescale, is_matrix: as :func:`della_prune`.
      alpha: the scalar scaling of the merged vector (may be traced).
      weights: ``None`` or one weight per task.
      consensus: ``"mass"`` or ``"count"``.

    Returns:
      The merged model, shaped like ``base`` with its dtypes.

    Raises:
      ValueError: as :func:`della_prune`; mismatched trees (naming the task and leaf),
        an unknown consensus, a non-scalar alpha, weights of the wrong shape.
    """
    if consensus not in CONSENSUS:
        raise ValueError(f"unknown consensus {consensus!r}; choose one of {CONSENSUS}")
    alpha = _common.per_task_alpha(_scalar(alpha), 1)
    w = _common.per_task_alpha(1.0 if weights is None else weights, len(task_vectors)
                               if _is_seq(task_vectors) else 1, name="weights")
    return _della_run(base, task_vectors, key, density, epsilon, rescale, is_matrix, alpha,
                      w, consensus, False)


def della_linear(base: PyTree, task_vectors: Sequence[PyTree], *, key: jax.Array,
                 density: float = 0.5, epsilon: float = 0.15, alpha: Any = 1.0,
                 rescale: str | None = "l1",
                 is_matrix: MatrixRule = default_is_matrix) -> PyTree:
    """Linear DELLA, as mergekit's ``della_linear``: ``base + sum_t alpha_t delta_t``.

    ``delta_t = della_prune(tau_t, key=key, task=t, ...)``; ``alpha_t`` is mergekit's
    ``lambda * weight_t`` (its default ``normalize: false``).

    Args:
      base: the pretrained model.
      task_vectors: a non-empty sequence of task vectors shaped like ``base``.
      key: a PRNG key.
      density, epsilon, rescale, is_matrix: as :func:`della_prune`.
      alpha: a scalar or one coefficient per task (may be traced).

    Returns:
      The merged model, shaped like ``base`` with its dtypes.

    Raises:
      ValueError: as :func:`della_prune`, mismatched trees, an alpha of the wrong shape.
    """
    n = len(task_vectors) if _is_seq(task_vectors) else 1
    alphas = _common.per_task_alpha(alpha, n)
    return _della_run(base, task_vectors, key, density, epsilon, rescale, is_matrix,
                      alphas, alphas, None, True)


def _scalar(alpha):
    a = jnp.asarray(alpha)
    if a.ndim != 0:
        raise ValueError(f"alpha must be a scalar for della (a weighted mean; per-task "
                         f"scaling is `weights`), got shape {a.shape}")
    return a


def _is_seq(x) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, (dict, str, bytes))
