"""Model soups: uniform, greedy and learned weight averages (Wortsman et al., ICML 2022).

A soup averages whole models finetuned from the same start, not task vectors:
``soup = sum_i w_i * theta_i`` with ``w_i >= 0`` and ``sum_i w_i = 1``. Float leaves are
averaged (sums run in at least float32 and are cast back); non-float leaves (step
counters, integer buffers) are taken from ``models[0]``. A model holding NaN or Inf is
rejected (``ValueError`` naming the model index and leaf), so that a greedy soup never
drops it silently and no average hides it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from jax import lax

from taskvec_jax.merging import _common

PyTree = Any

__all__ = ["GRANULARITIES", "GreedySoup", "LearnedSoup", "greedy_soup", "learned_soup",
           "uniform_soup"]

ScoreFn = Callable[[PyTree], jax.Array]


def _mean_leaves(total: list[Any], count, like: list[Any]) -> list[Any]:
    return [x if s is None else (s / count).astype(x.dtype) for s, x in zip(total, like)]


def _float_sum(leaves: list[Any]) -> list[Any]:
    return [x.astype(_common.accumulation_dtype(x.dtype)) if _common.is_param(x) else None
            for x in leaves]


def uniform_soup(models: Sequence[PyTree]) -> PyTree:
    """The uniform soup ``(1/M) * sum_i theta_i``.

    Memory: one model-sized accumulator (at least float32) and the output.

    Args:
      models: a non-empty sequence of models with equal structure, shapes and dtypes.

    Returns:
      A model shaped like ``models[0]``, with its dtypes.

    Raises:
      ValueError: for an empty sequence, models that do not match (naming the model
        index and leaf path), or a model holding NaN/Inf (naming index and leaf; under
        ``jit`` the NaN propagates into the average).
    """
    _common.check_models(models)
    _common.check_finite(models, what="model")
    return _uniform_soup_jit(tuple(models))


@jax.jit
def _uniform_soup_jit(models):
    first, treedef = _common.flatten(models[0])
    total = _float_sum(first)
    for m in models[1:]:
        leaves, _ = _common.flatten(m)
        total = [s if s is None else s + x.astype(s.dtype) for s, x in zip(total, leaves)]
    return jax.tree.unflatten(treedef, _mean_leaves(total, len(models), first))


class GreedySoup(NamedTuple):
    """The result of :func:`greedy_soup`.

    Attributes:
      params: the soup, the uniform average of the selected models.
      selected: ``bool[M]``, which models (in input order) are in the soup.
      order: ``int[M]``, the input indices sorted by individual score, best first (ties:
        lower index first); the order in which models were offered to the soup.
      individual_scores: ``[M]``, ``score_fn`` of each model alone.
      score: ``score_fn(params)``, the soup's held-out score.
    """

    params: PyTree
    selected: jax.Array
    order: jax.Array
    individual_scores: jax.Array
    score: jax.Array


def greedy_soup(models: Sequence[PyTree], score_fn: ScoreFn) -> GreedySoup:
    """The greedy soup (Wortsman et al., 2022, Recipe 1).

    Models are sorted by ``score_fn`` (a held-out score, higher is better), the soup
    starts as the best one, and each next model is added if the uniform average of the
    soup's models and it scores at least as well as the soup (``>=``: a model that does not
    change the score is kept). The soup's score therefore never falls below the best
    single model's.

    The whole procedure is one compiled program (``lax.fori_loop`` over models, each
    fetched with ``lax.switch``), so ``score_fn`` is traced twice in all, whatever ``M``.

    Memory: the running sum and the candidate (two model-sized, at least float32), the
    candidate soup passed to ``score_fn`` and one fetched model; models are never stacked.

    Args:
      models: a non-empty sequence of models with equal structure, shapes and dtypes.
      score_fn: ``score_fn(params) -> scalar``, e.g. held-out accuracy; must be jittable.

    Returns:
      A :class:`GreedySoup`.

    Raises:
      ValueError: for an empty sequence, mismatched models (naming index and path), or a
        model holding NaN/Inf (naming index and leaf). Under an outer ``jit`` that check
        cannot run; a model whose score is NaN is then never added, and the returned
        ``individual_scores`` show it.
    """
    _common.check_models(models)
    _common.check_finite(models, what="model")
    if not callable(score_fn):
        raise ValueError(f"score_fn must be callable, got {type(score_fn).__name__}")
    return _greedy_soup_jit(tuple(models), score_fn)


@functools.partial(jax.jit, static_argnums=(1,))
def _greedy_soup_jit(models, score_fn):
    first, treedef = _common.flatten(models[0])
    num_models = len(models)
    def fetch(i):
        # The branches close over the models, so nothing is stacked; the widening to
        # the accumulation dtype happens inside the branch, for the fetched model only.
        return lax.switch(i, [lambda m=m: _float_sum(_common.flatten(m)[0]) for m in models])

    def score_of(total, count):
        return jnp.asarray(score_fn(jax.tree.unflatten(
            treedef, _mean_leaves(total, count, first))))

    def score_one(i, scores):
        return scores.at[i].set(score_of(fetch(i), 1))

    score_dtype = jax.eval_shape(
        lambda: score_of(_float_sum(_common.flatten(models[0])[0]), 1)).dtype
    scores = lax.fori_loop(0, num_models, score_one, jnp.zeros(num_models, score_dtype))
    order = jnp.argsort(-scores, stable=True)
    best = order[0]

    def offer(j, carry):
        total, count, current, selected = carry
        i = order[j]
        candidate = [s if s is None else s + x for s, x in zip(total, fetch(i))]
        value = score_of(candidate, count + 1)
        accept = value >= current
        total = [s if s is None else jnp.where(accept, c, s)
                 for s, c in zip(total, candidate)]
        return (total, count + accept.astype(count.dtype), jnp.where(accept, value, current),
                selected.at[i].set(accept))

    carry = (fetch(best), jnp.ones((), jnp.int32), scores[best],
             jnp.zeros(num_models, bool).at[best].set(True))
    total, count, current, selected = lax.fori_loop(1, num_models, offer, carry)
    params = jax.tree.unflatten(treedef, _mean_leaves(total, count, first))
    return GreedySoup(params, selected, order, scores, current)


class LearnedSoup(NamedTuple):
    """The result of :func:`learned_soup`.

    Attributes:
      params: the soup ``sum_i softmax(logits)_i * theta_i`` at the learned logits.
      weights: the mixing weights ``softmax(logits)``: ``[M]`` (``granularity="model"``)
        or a tree with an ``[M]`` leaf per float leaf (``"leaf"``; ``None`` elsewhere).
      logits: the learned logits, shaped like ``weights``.
      losses: ``[num_steps + 1]``, ``loss_fn`` of the soup before each step and after the
        last (``losses[0]`` is the uniform soup's loss with the default start).
    """

    params: PyTree
    weights: Any
    logits: Any
    losses: jax.Array


GRANULARITIES = ("model", "leaf")
# One object, so that calls with the default optimizer share one compilation.
_DEFAULT_OPTIMIZER = optax.adam(0.05)


def learned_soup(models: Sequence[PyTree], loss_fn: Callable[[PyTree, PyTree], jax.Array],
                 data: PyTree, *, granularity: str = "model",
                 optimizer: optax.GradientTransformation | None = None,
                 num_steps: int = 100, init_logits: Any = None) -> LearnedSoup:
    """The learned soup (Wortsman et al., 2022): mixing weights trained by gradient descent.

    Minimizes ``loss_fn(soup(logits), data)`` over ``logits`` with ``optimizer``, where
    ``soup(logits) = sum_i softmax(logits)_i * theta_i`` with one weight vector for the
    whole model (``granularity="model"``) or one per float leaf (``"leaf"``, Wortsman et
    al.'s "by layer"). Gradients come from ``jax.grad`` through the soup; the steps run in
    one ``lax.scan``. The default start, zero logits, is the uniform soup.

    Memory: the soup (one model-sized, at least float32) and its gradient during each
    step, plus ``loss_fn``'s own activations; the models are read, never stacked or copied.

    Args:
      models: a non-empty sequence of models with equal structure, shapes and dtypes.
      loss_fn: ``loss_fn(params, data) -> scalar`` (a held-out loss); jittable.
      data: the batch ``loss_fn`` is evaluated on (full batch, every step).
      granularity: ``"model"`` or ``"leaf"``.
      optimizer: an optax transformation for the logits (default ``optax.adam(0.05)``).
      num_steps: number of optimizer steps (``>= 0``).
      init_logits: starting logits shaped like ``LearnedSoup.logits`` (default zeros).

    Returns:
      A :class:`LearnedSoup`.

    Raises:
      ValueError: for an empty or mismatched list of models, a model holding NaN/Inf
        (naming index and leaf), an unknown granularity, a negative ``num_steps`` or
        ``init_logits`` of the wrong shape.
    """
    _common.check_models(models)
    _common.check_finite(models, what="model")
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; choose one of "
                         f"{GRANULARITIES}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be a non-negative integer, got {num_steps!r}")
    if optimizer is None:
        optimizer = _DEFAULT_OPTIMIZER
    num_models = len(models)
    first, treedef = _common.flatten(models[0])
    if granularity == "model":
        zeros = jnp.zeros(num_models, _common.accumulation_dtype(_first_float(first)))
    else:
        zeros = jax.tree.unflatten(treedef, [
            jnp.zeros(num_models, _common.accumulation_dtype(x.dtype))
            if _common.is_param(x) else None for x in first])
    if init_logits is None:
        init_logits = zeros
    else:
        want = jax.tree.map(jnp.shape, zeros)
        got_leaves, got_def = jax.tree.flatten(init_logits)
        want_leaves, want_def = jax.tree.flatten(zeros)
        if got_def != want_def or [jnp.shape(a) for a in got_leaves] != [
                jnp.shape(b) for b in want_leaves]:
            raise ValueError(f"init_logits must be shaped like {want} for "
                             f"granularity={granularity!r}")
        init_logits = jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), init_logits, zeros)
    return _learned_soup_jit(tuple(models), data, init_logits, loss_fn=loss_fn,
                             optimizer=optimizer, num_steps=num_steps,
                             granularity=granularity)


def _first_float(leaves):
    return next(x.dtype for x in leaves if _common.is_param(x))


@functools.partial(jax.jit, static_argnames=("loss_fn", "optimizer", "num_steps",
                                             "granularity"))
def _learned_soup_jit(models, data, logits, *, loss_fn, optimizer, num_steps, granularity):
    first, treedef = _common.flatten(models[0])
    model_leaves = [_common.flatten(m)[0] for m in models]

    def soup(logits):
        if granularity == "model":
            w = jax.nn.softmax(logits)
            weights = [w] * len(first)
        else:
            weights = [None if w is None else jax.nn.softmax(w)
                       for w in _common.flatten(logits)[0]]
        out = []
        for i, x in enumerate(first):
            if not _common.is_param(x):
                out.append(x)
                continue
            adt = weights[i].dtype
            mixed = sum(weights[i][m] * model_leaves[m][i].astype(adt)
                        for m in range(len(models)))
            out.append(mixed.astype(x.dtype))
        return jax.tree.unflatten(treedef, out)

    def objective(logits):
        return loss_fn(soup(logits), data)

    value_and_grad = jax.value_and_grad(objective)

    def step(carry, _):
        logits, state = carry
        loss, grad = value_and_grad(logits)
        updates, state = optimizer.update(grad, state, logits)
        return (optax.apply_updates(logits, updates), state), loss

    (logits, _), losses = lax.scan(step, (logits, optimizer.init(logits)), None,
                                   length=num_steps)
    final_loss = objective(logits)
    losses = jnp.concatenate([losses, final_loss[None]])
    weights = jax.tree.map(jax.nn.softmax, logits)
    return LearnedSoup(soup(logits), weights, logits, losses)
