"""Choosing a merge coefficient on validation data.

The protocol of Ilharco et al. (2023) and the papers that follow them: for every
coefficient ``alpha`` of a grid, merge, evaluate every task on its validation split, and
normalize by the individually finetuned model's score on the same split:
``normalized[a, t] = score_t(merge(alpha_a)) / finetuned_score_t``. The chosen
coefficient maximizes the mean over tasks of the normalized score. The whole table is
returned, so that a sweep can be plotted and reported, not only its argmax.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from taskvec_jax import _checks
from taskvec_jax import tree as tree_lib
from taskvec_jax.merging import _common

PyTree = Any

__all__ = ["CoefficientSearch", "coefficient_search"]


class CoefficientSearch(NamedTuple):
    """The result of :func:`coefficient_search`; row ``a`` is grid point ``alphas[a]``.

    Attributes:
      alphas: ``[A, ...]``, the grid, as given.
      scores: ``[A, T]``, ``score_fns[t](merge_fn(alphas[a]))``.
      normalized: ``[A, T]``, ``scores / finetuned_scores``.
      mean_normalized: ``[A]``, the mean over tasks of ``normalized``.
      best_index: index of the largest ``mean_normalized`` (the first one on ties; NaN
        rows never win unless every row is NaN).
      best_alpha: ``alphas[best_index]``.
      finetuned_scores: ``[T]``, the individually finetuned scores used to normalize.
    """

    alphas: jax.Array
    scores: jax.Array
    normalized: jax.Array
    mean_normalized: jax.Array
    best_index: jax.Array
    best_alpha: jax.Array
    finetuned_scores: jax.Array


def coefficient_search(merge_fn: Callable[[jax.Array], PyTree], alphas: Any,
                       score_fns: Sequence[Callable[[PyTree], jax.Array]],
                       finetuned_scores: Any, *, jit: bool = True) -> CoefficientSearch:
    """Evaluates a grid of merge coefficients; picks the best mean normalized score.

    ``normalized[a, t] = score_fns[t](merge_fn(alphas[a])) / finetuned_scores[t]`` and
    ``best = argmax_a mean_t normalized[a, t]``. With accuracies, ``normalized`` is the
    "normalized accuracy" (merged accuracy / individually finetuned accuracy).

    Example::

        taus = [tvj.task_vector(ft, base) for ft in finetuned]
        fns = [lambda p, d=d: tvj.models.accuracy(model, p, d) for d in val_datasets]
        result = coefficient_search(lambda a: task_arithmetic(base, taus, alpha=a),
                                    jnp.linspace(0.0, 1.0, 11), fns, ft_accuracies)

    Memory: with ``jit=True`` the grid is evaluated by ``lax.map`` inside one compiled
    program, one merged model at a time (``merge_fn`` and the score functions are traced
    once); with ``jit=False`` it is a Python loop (any Python ``merge_fn`` works).

    Args:
      merge_fn: ``merge_fn(alpha) -> params``, e.g.
        ``lambda a: task_arithmetic(base, taus, alpha=a)``.
      alphas: the grid: a non-empty sequence or array whose leading axis indexes grid
        points (scalars, or e.g. ``[T]`` per-task coefficients).
      score_fns: one ``score(params) -> scalar`` per task (higher is better), each on
        that task's validation split.
      finetuned_scores: ``[T]`` positive scores of the individually finetuned models.
      jit: evaluate the grid in one compiled program.

    Returns:
      A :class:`CoefficientSearch`.

    Raises:
      ValueError: for an empty grid, no score functions, a ``finetuned_scores`` of the
        wrong length, a non-positive finetuned score, or a grid point whose merged model
        holds NaN/Inf (naming the grid index and leaf; a NaN *score* of a finite model is
        kept in the table and never wins).
    """
    score_fns = _checks.non_empty_sequence(score_fns, "score_fns",
                                           item="score function per task")
    for t, fn in enumerate(score_fns):
        if not callable(fn):
            raise ValueError(f"score_fns[{t}] is not callable: {type(fn).__name__}")
    alphas = jnp.asarray(alphas)
    if alphas.ndim == 0 or alphas.shape[0] == 0:
        raise ValueError(f"alphas must be a non-empty grid (leading axis = grid points), "
                         f"got shape {alphas.shape}")
    finetuned = jnp.asarray(finetuned_scores)
    if finetuned.shape != (len(score_fns),):
        raise ValueError(f"finetuned_scores must have one entry per task "
                         f"({len(score_fns)}), got shape {finetuned.shape}")
    if not isinstance(finetuned, jax.core.Tracer) and not bool(jnp.all(finetuned > 0)):
        raise ValueError(f"finetuned_scores must be positive to normalize by, got "
                         f"{finetuned.tolist()}")

    def evaluate(alpha):
        params = merge_fn(alpha)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                                    for x in jax.tree.leaves(params) if tree_lib.is_float(x)]
                                   or [jnp.array(True)]))
        return jnp.stack([jnp.asarray(fn(params)) for fn in score_fns]), finite

    if jit:
        scores, finite = jax.jit(lambda grid: lax.map(evaluate, grid))(alphas)
    else:
        scores, finite = (jnp.stack(x) for x in zip(*[evaluate(a) for a in alphas]))
    if not _common.is_traced(finite) and not bool(jnp.all(finite)):
        # A non-finite merged model must not be skipped silently as a "NaN row"; merge
        # that grid point again, eagerly, to name the leaf.
        a = int(jnp.argmin(finite))
        _common.check_finite([merge_fn(alphas[a])], names=[f"merge_fn(alphas[{a}])"])
        raise ValueError(f"merge_fn(alphas[{a}]) returned a non-finite model")
    normalized = scores / finetuned
    mean_normalized = jnp.mean(normalized, axis=1)
    best = jnp.argmax(jnp.where(jnp.isnan(mean_normalized), -jnp.inf, mean_normalized))
    return CoefficientSearch(alphas, scores, normalized, mean_normalized, best, alphas[best],
                             finetuned)
