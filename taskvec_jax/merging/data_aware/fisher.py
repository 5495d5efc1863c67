"""Fisher merging and the diagonal Fisher it needs (Matena & Raffel, NeurIPS 2022).

Fisher merging weights every parameter of every model by its diagonal Fisher
information, the curvature of that model's log-likelihood: a parameter the task's
predictions are sensitive to keeps its value, one they ignore yields to the others.

* :func:`diagonal_fisher` estimates ``F = E_x E_y [ (d/dtheta log p(y | x, theta))^2 ]``
  from per-example gradients (``jax.vmap`` of ``jax.grad``, in chunks for memory);
* :func:`fisher` merges models with their Fishers.

Reference implementation compared against (tests/test_merging_fisher.py): FusionBench's
``fusion_bench/method/fisher_merging/fisher_merging.py`` (``merging_with_fisher_weights``,
after MergeLM). Two differences are arguments here: FusionBench rescales each model's
Fisher by the inverse of its global L2 norm by default (``normalize=True`` here; Matena &
Raffel do not, our default), and FusionBench's classification Fisher squares the gradient
of a *batch sum* of ``sqrt(p_y) log p_y`` (a cheap surrogate), where ``mode="expected"``
here computes the exact expectation over classes per example.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from taskvec_jax import _checks
from taskvec_jax import tree as tree_lib
from taskvec_jax.merging import _common
from taskvec_jax.merging.data_aware import _stats

PyTree = Any

__all__ = ["FISHER_MODES", "diagonal_fisher", "fisher"]

FISHER_MODES = ("empirical", "sampled", "expected")


# --------------------------------------------------------------------------- merge

def fisher(models: Sequence[PyTree], fishers: Sequence[PyTree], *, eps: float = 1e-6,
           weights: Sequence[float] | jax.Array | None = None,
           normalize: bool = False) -> PyTree:
    """Fisher merging: per entry ``theta = sum_t w_t F_t theta_t / sum_t w_t F_t``.

    With ``F_t <- F_t + eps`` (so that an entry no model is sensitive to is the
    ``w``-weighted average instead of ``0/0``) and ``w_t`` the per-model weights (Matena
    & Raffel's ``lambda_t``; default ``1/T``). With ``normalize=True`` each ``w_t`` is
    further multiplied by ``c_t = (1 / (||F_t|| + eps)) / sum_s (1 / (||F_s|| + eps))``,
    ``||F_t||`` the L2 norm of model ``t``'s whole Fisher (FusionBench's
    ``normalize_fisher_weight``, which puts tasks whose Fishers differ in scale on one
    footing). Equal Fishers give the ``w``-weighted average: the uniform soup by default.

    A leaf whose Fisher is ``None`` in every model is the ``w``-weighted average (the
    uniform soup's value by default); non-float leaves keep ``models[0]``'s value. Sums
    run in at least float32; the result is cast to each leaf's dtype.

    Memory: two model-sized accumulators (numerator, denominator) and the output; the
    models and Fishers are read one at a time.

    Args:
      models: ``T`` models with equal structure, shapes and dtypes (finetuned from one
        base; a task-vector form is ``fisher([base + tau_t], ...)``).
      fishers: ``T`` trees shaped like the models, non-negative diagonal Fishers (e.g.
        from :func:`diagonal_fisher`), ``None`` at leaves without one. Every model must
        have a Fisher at the same leaves.
      eps: added to every Fisher entry, ``>= 0`` (FusionBench's ``minimal_fisher_weight``).
      weights: ``T`` non-negative per-model weights, or ``None`` for ``1/T``.
      normalize: rescale each model by the inverse norm of its Fisher (see above).

    Returns:
      The merged model, shaped like ``models[0]``, in its dtypes.

    Raises:
      ValueError: for mismatched models (naming model index and leaf path), a number of
        Fishers different from the number of models, a Fisher whose leaf is missing or has
        the wrong shape (naming model and path), a negative ``eps`` or bad ``weights``.
    """
    _common.check_models(models)
    num = len(models)
    fishers = _checks.non_empty_sequence(fishers, "fishers", item="Fisher per model")
    if len(fishers) != num:
        raise ValueError(f"fishers has {len(fishers)} entries, models has {num}: pass one "
                         "Fisher per model")
    _stats.check_statistics(models[0], fishers, "fishers", "Fisher", square=False)
    eps = _common.static_number(eps, "eps")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    w = (jnp.full((num,), 1.0 / num) if weights is None
         else _common.per_task_alpha(weights, num, name="weights"))
    if not _common.is_traced(w) and bool(jnp.any(w < 0)):
        raise ValueError(f"weights must be non-negative, got {np.asarray(w).tolist()}")
    return _fisher_jit(tuple(models), tuple(fishers), w, eps=eps, normalize=bool(normalize))


@functools.partial(jax.jit, static_argnames=("eps", "normalize"))
def _fisher_jit(models, fishers, w, *, eps, normalize):
    first, treedef = _common.flatten(models[0])
    fisher_leaves = [_common.flatten(f)[0] for f in fishers]
    adt = tree_lib.accumulation_dtype(
        jnp.result_type(*[x for x in first if _common.is_param(x)]))
    w = w.astype(adt)
    if normalize:
        norms = jnp.stack([tree_lib.norm([f.astype(adt) for f in fl if f is not None])
                           for fl in fisher_leaves])
        inv = 1.0 / (norms + eps)
        w = w * inv / jnp.sum(inv)
    out = []
    for i, x in enumerate(first):
        if not _common.is_param(x):
            out.append(x)
            continue
        if fisher_leaves[0][i] is None:   # no Fisher: the w-weighted average
            terms = [_common.flatten(m)[0][i] for m in models]
            out.append(tree_lib.weighted_sum(terms, w / jnp.sum(w)))
            continue
        num = den = None
        for t, m in enumerate(models):
            xt = _common.flatten(m)[0][i]
            ft = fisher_leaves[t][i]
            a = tree_lib.accumulation_dtype(jnp.result_type(xt, ft))
            weight = w[t].astype(a) * (ft.astype(a) + eps)
            num = weight * xt.astype(a) if num is None else num + weight * xt.astype(a)
            den = weight if den is None else den + weight
        out.append((num / den).astype(x.dtype))
    return jax.tree.unflatten(treedef, out)


# --------------------------------------------------------------------------- statistics

def diagonal_fisher(fn: Callable[[PyTree, PyTree], jax.Array], params: PyTree,
                    data: PyTree, *, mode: str = "empirical", num_examples: int | None = None,
                    key: jax.Array | None = None,
                    microbatch_size: int | None = None) -> PyTree:
    """The diagonal Fisher ``F = (1/N) sum_i E_y[(d/dtheta log p(y | x_i, theta))^2]``.

    Per example ``i`` (of the first ``num_examples`` of ``data``), one of:

    * ``mode="empirical"``: ``g_i = grad_theta fn(theta, example_i)`` where ``fn`` is a
      ``loss_fn(params, batch) -> scalar MEAN loss`` (the library's convention; called on
      a batch of one), and ``F = (1/N) sum_i g_i^2``. For a negative log-likelihood loss
      (cross-entropy) this is the *empirical* Fisher, with the observed labels; for any
      other loss it is the mean squared per-example gradient.
    * ``mode="sampled"``: ``fn(params, batch) -> [B, C]`` logits (or log-probabilities;
      ``log_softmax`` is applied) and ``y_i ~ p(. | x_i)`` is drawn from
      ``jax.random.fold_in(key, i)``; ``g_i = grad log p(y_i | x_i)`` (Matena & Raffel's
      Monte-Carlo estimate with one sample; the true Fisher in expectation).
    * ``mode="expected"``: ``fn`` as for ``"sampled"``; the exact expectation
      ``sum_c p(c | x_i) (grad log p(c | x_i))^2``, ``C`` gradients per example.

    Per-example gradients are ``jax.vmap``-ed over chunks of ``microbatch_size`` examples
    (all at once by default) and their squares summed in a ``lax.scan`` over chunks, in at
    least float32: the result does not depend on ``microbatch_size``.

    Cost: ``N`` per-example gradients (``N * C`` for ``"expected"``). Memory: about
    ``microbatch_size`` (times ``C`` for ``"expected"``) parameter-sized gradients, plus
    the accumulator.

    Args:
      fn: the loss (``"empirical"``) or logits function (``"sampled"``, ``"expected"``).
      params: the model whose Fisher is estimated (every leaf floating point).
      data: a pytree of arrays with a leading example axis (including the labels for
        ``"empirical"``).
      mode: ``"empirical"``, ``"sampled"`` or ``"expected"``.
      num_examples: use only the first ``num_examples`` examples (default: all).
      key: PRNG key for ``"sampled"`` (required there, unused otherwise).
      microbatch_size: examples per vmapped chunk (memory only).

    Returns:
      A tree shaped like ``params``, in at least float32 (the accumulation dtype).

    Raises:
      ValueError: for an unknown mode, a missing key in ``"sampled"`` mode, non-float
        parameters, empty or inconsistent data, ``num_examples`` or ``microbatch_size``
        that are not positive integers or exceed the data, or ``fn`` returning the wrong
        shape.
    """
    if mode not in FISHER_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {FISHER_MODES}")
    if not callable(fn):
        raise ValueError(f"fn must be callable, got {type(fn).__name__}")
    _checks.float_dtype(params)
    n_data = _checks.num_examples(data)
    n = _checks.positive_int(num_examples, "num_examples", allow_none=True) or n_data
    if n > n_data:
        raise ValueError(f"num_examples is {n}, but data has only {n_data} examples")
    microbatch_size = _checks.positive_int(microbatch_size, "microbatch_size",
                                           allow_none=True)
    if mode == "sampled" and key is None:
        raise ValueError("mode='sampled' draws labels from the model: pass key=")
    if mode == "empirical":
        _checks.loss_is_scalar(fn, params, data, 1, "one example")
    else:
        sample = _stats.take(data, 0, 1)
        out = jax.eval_shape(fn, params, sample)
        if getattr(out, "ndim", None) != 2 or out.shape[0] != 1:
            raise ValueError(f"mode={mode!r}: fn must return [batch, num_classes] logits; "
                             f"on one example it returned shape "
                             f"{getattr(out, 'shape', type(out).__name__)}")
    if key is None:
        key = jax.random.key(0)    # unused outside "sampled"; keeps one program signature
    total = _diagonal_fisher_jit(fn, params, data, key, n=n, mode=mode,
                                 microbatch_size=microbatch_size)
    return jax.tree.map(lambda s: s / n, total)


@functools.partial(jax.jit, static_argnames=("fn", "n", "mode", "microbatch_size"))
def _diagonal_fisher_jit(fn, params, data, key, *, n, mode, microbatch_size):
    adt = tree_lib.accumulation_dtype(_checks.float_dtype(params))

    def batch_of_one(example):
        return jax.tree.map(lambda x: x[None], example)

    def log_probs(p, example):
        return jax.nn.log_softmax(fn(p, batch_of_one(example))[0].astype(adt))

    def squared_grad(example, index):
        if mode == "empirical":
            g = jax.grad(lambda p: fn(p, batch_of_one(example)))(params)
            return jax.tree.map(lambda x: jnp.square(x.astype(adt)), g)
        if mode == "sampled":
            logp = jax.lax.stop_gradient(log_probs(params, example))
            y = jax.random.categorical(jax.random.fold_in(key, index), logp)
            g = jax.grad(lambda p: log_probs(p, example)[y])(params)
            return jax.tree.map(lambda x: jnp.square(x.astype(adt)), g)
        jac = jax.jacrev(log_probs)(params, example)            # leaves [C, *shape]
        prob = jnp.exp(jax.lax.stop_gradient(log_probs(params, example)))
        return jax.tree.map(
            lambda j: jnp.tensordot(prob, jnp.square(j.astype(adt)), axes=1), jac)

    def stat(chunk, indices):
        per_example = jax.vmap(squared_grad)(chunk, indices)
        return jax.tree.map(lambda x: jnp.sum(x, axis=0), per_example)

    return _stats.chunked_sum(stat, data, n, microbatch_size)
