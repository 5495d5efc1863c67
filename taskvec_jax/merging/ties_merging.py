"""TIES-merging: trim, elect signs, disjoint merge (Yadav et al., NeurIPS 2023).

:func:`ties_task_vector` returns the merged task vector, :func:`ties` the merged model.
The trim ranks magnitudes with the exact kernel of :mod:`taskvec_jax.merging._select`
(scopes, the ``ceil(density * n)`` count and ties in magnitude are documented there).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from taskvec_jax import task_vectors as tv_lib
from taskvec_jax.merging import _common, _select

PyTree = Any

__all__ = ["CONSENSUS", "TIES_MERGES", "ties", "ties_merge", "ties_task_vector"]

TIES_MERGES = ("mean", "sum")
CONSENSUS = ("mass", "count")


def _check_real(task_leaves: list[list[Any]], paths: list[str], what: str) -> None:
    for t, leaves in enumerate(task_leaves):
        for path, x in zip(paths, leaves):
            if _common.is_param(x) and jnp.issubdtype(jnp.result_type(x),
                                                       jnp.complexfloating):
                raise ValueError(f"task vector {t}: leaf '{path}' is complex "
                                 f"({jnp.result_type(x)}); {what} elects signs and needs "
                                 "real values")


def ties_task_vector(task_vectors: Sequence[PyTree], *, density: float = 0.2,
                     scope: str = "global", merge: str = "mean", consensus: str = "mass",
                     alpha: float | Sequence[float] | jax.Array | None = None) -> PyTree:
    """The TIES-merged task vector: trim, elect signs, disjoint merge (Yadav et al., 2023).

    For each task ``t``: ``hat_t = alpha_t * trim(tau_t, density, scope)`` (``alpha_t = 1``
    by default; the trim ranks ``|tau_t|``, the same ranks as ``|alpha_t tau_t|``). Per
    parameter, with ``P = sum_t max(hat_t, 0)`` and ``N = sum_t min(hat_t, 0)``, the
    elected sign ``s`` is

    * ``consensus="mass"``: ``sign(P + N)``, the sign of the summed trimmed values (TIES'
      election; mergekit's ``consensus_method: sum``);
    * ``consensus="count"``: ``sign(#{t: hat_t > 0} - #{t: hat_t < 0})``, a majority vote
      of the signs (mergekit's ``consensus_method: count``).

    The merge keeps only the trimmed values that agree with ``s`` (strictly same sign;
    zeros never agree):

    * ``merge="mean"``: ``P / #{t: hat_t > 0}`` where ``s > 0``,
      ``N / #{t: hat_t < 0}`` where ``s < 0``;
    * ``merge="sum"``: ``P`` where ``s > 0``, ``N`` where ``s < 0``;

    and ``0`` where ``s = 0`` (no sign is elected; mergekit elects ``+`` there).

    Memory: one pass over the tasks, holding two model-sized float accumulators (``P``,
    ``N``, in at least float32) and, for ``"mean"`` or ``"count"``, two
    one-byte-per-parameter counters (``T < 256``; int32 otherwise), plus the output. The
    ``T`` trimmed task vectors are never held at once: called eagerly, each task is one
    compiled step that updates the donated accumulators in place, so only one task's
    transients exist at a time (on CPU, XLA materializes the inputs of the counting
    reductions: about two model-sized 32-bit buffers for ``density < 1``, none for
    ``density == 1``). Under an outer ``jax.jit`` the tasks run one after the other in a
    ``lax.fori_loop`` (each fetched by ``lax.switch``: one more model-sized copy);
    measured on CPU, the temporaries do not grow with ``T`` either way (see
    docs/merging.md).

    Args:
      task_vectors: a non-empty sequence of task vectors with equal structure.
      density: fraction kept by the trim, in ``(0, 1]``; ``1.0`` skips trimming (use it
        after :func:`~taskvec_jax.merging.dare` for DARE-TIES).
      scope: the trim's scope: ``"global"``, ``"leaf"`` or ``"row"``.
      merge: ``"mean"`` or ``"sum"``.
      consensus: the sign election, ``"mass"`` or ``"count"``.
      alpha: ``None`` (no scaling), a scalar or one coefficient per task, applied to each
        task vector before the election (may be traced).

    Returns:
      A tree shaped like the task vectors (``None`` at non-float leaves).

    Raises:
      ValueError: empty input, mismatched trees (naming task and leaf path), complex
        leaves, a NaN/Inf entry (naming task and leaf; under ``jit`` it propagates to the
        output instead), a density outside ``(0, 1]``, an unknown scope, merge or
        consensus, or alpha of the wrong shape.
    """
    density = _common.check_density(density)
    scope = _select.check_scope(scope)
    if merge not in TIES_MERGES:
        raise ValueError(f"unknown merge {merge!r}; choose one of {TIES_MERGES}")
    if consensus not in CONSENSUS:
        raise ValueError(f"unknown consensus {consensus!r}; choose one of {CONSENSUS}")
    _, task_leaves = _common.flatten_tasks(task_vectors)
    _check_real(task_leaves, _common.leaf_paths(task_vectors[0]), "TIES")
    _common.check_finite(task_vectors)
    alphas = None if alpha is None else _common.per_task_alpha(alpha, len(task_vectors))
    options = dict(density=density, scope=scope, merge=merge, consensus=consensus)
    if _common.is_traced((task_vectors, alphas)):
        return _ties_graph(tuple(task_vectors), alphas, **options)
    # Called eagerly: one compiled step per task, its accumulators donated, so that only
    # one task's transient buffers ever exist. (One program with a Python loop over the
    # tasks let XLA overlap them: on CPU, 15 model-sized temporaries for 8 tasks.)
    state = _ties_init(task_vectors[0], len(task_vectors), merge, consensus)
    for t, task_vector in enumerate(task_vectors):
        state = _ties_step_jit(state, task_vector, None if alphas is None else alphas[t],
                               **options)
    return _ties_finish_jit(state, task_vectors[0], merge=merge, consensus=consensus)


def ties_merge(task_vectors: Sequence[PyTree], *, density: float = 0.2,
               scope: str = "global", merge: str = "mean") -> PyTree:
    """Deprecated alias of :func:`ties_task_vector` (removed in the next release)."""
    warnings.warn("ties_merge is deprecated: use ties_task_vector (the merged task vector) "
                  "or ties (the merged model)", DeprecationWarning, stacklevel=2)
    return ties_task_vector(task_vectors, density=density, scope=scope, merge=merge)


def _needs_counts(merge: str, consensus: str) -> bool:
    return merge == "mean" or consensus == "count"


def _ties_init(like, num_tasks, merge, consensus="mass"):
    """Zero accumulators ``(P, N, #pos, #neg)`` (``None`` at non-parameters)."""
    leaves, _ = _common.flatten(like)
    cdtype = jnp.uint8 if num_tasks < 256 else jnp.int32
    zeros = lambda dtype: [jnp.zeros(jnp.shape(x), dtype(x)) if _common.is_param(x)  # noqa: E731
                           else None for x in leaves]
    sums = lambda x: _common.accumulation_dtype(jnp.result_type(x))  # noqa: E731
    counts = ((zeros(lambda x: cdtype), zeros(lambda x: cdtype))
              if _needs_counts(merge, consensus) else (None, None))
    return (zeros(sums), zeros(sums)) + counts


def _ties_step(state, task_vector, alpha, *, density, scope, merge, consensus):
    """Adds one task's trimmed (and ``alpha``-scaled) values to ``(P, N, #pos, #neg)``."""
    pos, neg, pos_n, neg_n = state
    leaves, _ = _common.flatten(task_vector)
    if density < 1.0:
        leaves = _select.keep_masked(leaves, _select.band_masks(leaves, density, 0.0, scope))
    counted = _needs_counts(merge, consensus)
    pos, neg = list(pos), list(neg)
    if counted:
        pos_n, neg_n = list(pos_n), list(neg_n)
    for i, x in enumerate(leaves):
        if pos[i] is None:
            continue
        if alpha is not None:
            x = alpha.astype(pos[i].dtype) * x.astype(pos[i].dtype)
        pos[i] = pos[i] + jnp.maximum(x, 0).astype(pos[i].dtype)
        neg[i] = neg[i] + jnp.minimum(x, 0).astype(neg[i].dtype)
        if counted:
            pos_n[i] = pos_n[i] + (x > 0).astype(pos_n[i].dtype)
            neg_n[i] = neg_n[i] + (x < 0).astype(neg_n[i].dtype)
    return pos, neg, pos_n, neg_n


def _ties_finish(state, like, *, merge, consensus="mass"):
    """Elects ``s`` (by mass or count) and returns the disjoint mean or sum."""
    pos, neg, pos_n, neg_n = state
    leaves, treedef = _common.flatten(like)
    out = []
    for i, x in enumerate(leaves):
        if pos[i] is None:
            out.append(None)
            continue
        p, q = pos[i], neg[i]
        if merge == "mean":
            p = p / jnp.maximum(pos_n[i], 1).astype(p.dtype)
            q = q / jnp.maximum(neg_n[i], 1).astype(q.dtype)
        if consensus == "mass":
            elected = pos[i] + neg[i]
            up, down = elected > 0, elected < 0
        else:    # compare the unsigned counts directly: no subtraction to wrap around
            up, down = pos_n[i] > neg_n[i], pos_n[i] < neg_n[i]
        merged = jnp.where(up, p, jnp.where(down, q, jnp.zeros((), p.dtype)))
        # A NaN (or +Inf meeting -Inf) elects no sign; propagate it, never hide it.
        merged = jnp.where(jnp.isnan(pos[i] + neg[i]), jnp.nan, merged)
        out.append(merged.astype(x.dtype))
    return jax.tree.unflatten(treedef, out)


_STATIC = ("density", "scope", "merge", "consensus")
_ties_step_jit = jax.jit(_ties_step, static_argnames=_STATIC, donate_argnums=0)
_ties_finish_jit = jax.jit(_ties_finish, static_argnames=("merge", "consensus"))


@functools.partial(jax.jit, static_argnames=_STATIC)
def _ties_graph(task_vectors, alphas, *, density, scope, merge, consensus):
    """All tasks in one program (the path taken under an outer ``jax.jit``)."""
    state = _ties_init(task_vectors[0], len(task_vectors), merge, consensus)
    items = [(tv, None if alphas is None else alphas[t]) for t, tv in enumerate(task_vectors)]
    state = _common.fold_tasks(
        lambda state, item: _ties_step(state, *item, density=density, scope=scope,
                                       merge=merge, consensus=consensus), state, items)
    return _ties_finish(state, task_vectors[0], merge=merge, consensus=consensus)


def ties(base: PyTree, task_vectors: Sequence[PyTree], *,
         alpha: float | Sequence[float] | jax.Array = 1.0, density: float = 0.2,
         scope: str = "global", merge: str = "mean", consensus: str = "mass") -> PyTree:
    """TIES-merging (Yadav et al., 2023): ``base + ties_task_vector([alpha_t * tau_t])``.

    Per-task ``alpha_t`` scales task vector ``t`` before the trim / elect / disjoint-merge
    steps (as mergekit weights its deltas). For one scalar ``alpha`` that is
    ``base + alpha * ties_task_vector(task_vectors)`` (the election and the disjoint mean
    commute with a common scale of either sign), which is how it is computed then. See
    :func:`ties_task_vector` for the steps and their memory. DARE-TIES is
    ``ties(base, [dare(tau_t, ...) for t], density=1.0)`` (or any density to trim after
    dropping).

    Args:
      base: the pretrained model the task vectors start from.
      task_vectors: a non-empty sequence of task vectors shaped like ``base``.
      alpha: a scalar or one coefficient per task (``[T]``); may be traced.
      density: fraction kept by the trim, in ``(0, 1]``.
      scope: the trim's scope, ``"global"``, ``"leaf"`` or ``"row"``.
      merge: ``"mean"`` or ``"sum"``.
      consensus: the sign election, ``"mass"`` (TIES) or ``"count"``.

    Returns:
      The merged model, shaped like ``base`` with its dtypes; non-float leaves of
      ``base`` are kept.

    Raises:
      ValueError: as :func:`ties_task_vector`, and for a task vector that does not match
        ``base`` (naming the task index and leaf path) or alpha of the wrong shape.
    """
    _common.flatten_tasks(task_vectors, base)
    alphas = _common.per_task_alpha(alpha, len(task_vectors))
    options = dict(density=density, scope=scope, merge=merge, consensus=consensus)
    alpha = jnp.asarray(alpha)
    if alpha.ndim == 0:
        return tv_lib.apply(base, ties_task_vector(task_vectors, **options), alpha)
    return tv_lib.apply(base, ties_task_vector(task_vectors, alpha=alphas, **options))
