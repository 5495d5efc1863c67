"""RegMean: merging linear layers by their input Grams (Jin et al., ICLR 2023).

RegMean ("Dataless Knowledge Fusion by Merging Weights of Language Models") merges each
linear layer ``y = x W`` (``W`` stored ``[in, out]``, as flax does) so that the merged
layer fits every task's outputs on that task's inputs in the least-squares sense:
``W = argmin_W sum_t ||X_t W - X_t W_t||^2 = (sum_t G_t)^-1 sum_t G_t W_t`` with
``G_t = X_t^T X_t`` the Gram of the layer's inputs on task ``t``. It needs only those Grams,
never the data or the labels.

* :func:`regmean_grams` records every flax ``nn.Dense`` (linen) or ``nnx.Linear`` kernel's
  input Gram during a forward pass;
* :func:`regmean` merges with them.

Leaves without a Gram (biases, convolutions, norms, embeddings, the kernels of layers
the forward pass did not reach) are the uniform average of the models, as in Jin et al.
and FusionBench (equivalently: task arithmetic with ``alpha = 1/T`` on their task vectors).

Reference implementation compared against (tests/test_merging_regmean.py): FusionBench's
``fusion_bench/method/regmean/regmean.py`` (``merging_with_regmean_weights``, after
MergeLM). FusionBench stores each task's Gram as a mean over the rows it saw; that is
``normalize=True`` here (each task weighted equally whatever its data size); the default
is Jin et al.'s sum, under which ``reduction=1`` is exactly least squares on all tasks'
data together.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from taskvec_jax import _checks
from taskvec_jax import tree as tree_lib
from taskvec_jax.merging import _common
from taskvec_jax.merging.data_aware import _stats

PyTree = Any

__all__ = ["regmean", "regmean_grams"]


# --------------------------------------------------------------------------- merge

def regmean(models: Sequence[PyTree], grams: Sequence[PyTree], *,
            reduction: float = 1.0) -> PyTree:
    """RegMean: ``W = (sum_t G~_t)^-1 sum_t G~_t W_t`` at every kernel with a Gram.

    ``G~_t = reduction * G_t + (1 - reduction) * diag(G_t)``: the off-diagonal entries of
    each Gram are scaled by ``reduction`` (Jin et al.'s ``alpha``; FusionBench's
    ``reduce_non_diagonal_ratio``), the diagonal kept. ``reduction = 1`` is the exact
    least-squares merge; ``reduction = 0`` is a per-input-feature weighted average
    (``W[i] = sum_t G_t[i,i] W_t[i] / sum_t G_t[i,i]``); Jin et al. use values below 1
    (e.g. 0.9) to regularize towards it. The linear system is solved with
    ``jnp.linalg.solve`` (never an explicit inverse). An input feature that is zero for
    every example of every task makes ``sum_t G~_t`` singular and the merged rows
    non-finite: that is reported, not hidden (drop such features or use ``reduction < 1``
    only helps when the diagonal is non-zero).

    Leaves whose Gram is ``None`` are the uniform average of the models; non-float leaves
    keep ``models[0]``'s value. Sums and solves run in at least float32.

    Memory: per kernel, the summed ``[in, in]`` Gram and ``[in, out]`` right-hand side.

    Args:
      models: ``T`` models with equal structure, shapes and dtypes.
      grams: ``T`` trees shaped like the models with a symmetric ``[in, in]`` Gram at
        2-D kernels stored ``[in, out]`` and ``None`` elsewhere (from
        :func:`regmean_grams`); the same leaves for every model.
      reduction: the off-diagonal scale, in ``[0, 1]``.

    Returns:
      The merged model, shaped like ``models[0]``, in its dtypes.

    Raises:
      ValueError: for mismatched models (naming index and leaf path), a number of Gram
        trees different from the number of models, a Gram at a leaf that is not a 2-D
        kernel or of the wrong shape (naming model and path), or ``reduction`` outside
        ``[0, 1]``.
    """
    _common.check_models(models)
    grams = _checks.non_empty_sequence(grams, "grams", item="Gram tree per model")
    if len(grams) != len(models):
        raise ValueError(f"grams has {len(grams)} entries, models has {len(models)}: pass "
                         "one Gram tree per model")
    _stats.check_statistics(models[0], grams, "grams", "Gram", square=True)
    reduction = _common.static_number(reduction, "reduction")
    if not 0.0 <= reduction <= 1.0:
        raise ValueError(f"reduction must lie in [0, 1], got {reduction}")
    return _regmean_jit(tuple(models), tuple(grams), reduction=reduction)


@functools.partial(jax.jit, static_argnames=("reduction",))
def _regmean_jit(models, grams, *, reduction):
    first, treedef = _common.flatten(models[0])
    model_leaves = [_common.flatten(m)[0] for m in models]
    gram_leaves = [_common.flatten(g)[0] for g in grams]
    num = len(models)
    out = []
    for i, x in enumerate(first):
        if not _common.is_param(x):
            out.append(x)
            continue
        if gram_leaves[0][i] is None:
            out.append(tree_lib.weighted_sum([m[i] for m in model_leaves],
                                             jnp.full((num,), 1.0 / num)))
            continue
        adt = tree_lib.accumulation_dtype(
            jnp.result_type(x, *[g[i] for g in gram_leaves]))
        lhs = rhs = None
        for t in range(num):
            # The solve needs whole matrices: a kernel and its Gram sharded over a mesh
            # are gathered inside this program, the merged kernel laid out like the input.
            g = _common.gathered(gram_leaves[t][i]).astype(adt)
            if reduction != 1.0:
                g = reduction * g + (1.0 - reduction) * jnp.diag(jnp.diag(g))
            term = jnp.matmul(g, _common.gathered(model_leaves[t][i]).astype(adt),
                              precision=jax.lax.Precision.HIGHEST)
            lhs = g if lhs is None else lhs + g
            rhs = term if rhs is None else rhs + term
        out.append(_common.laid_out_like(jnp.linalg.solve(lhs, rhs).astype(x.dtype), x))
    return jax.tree.unflatten(treedef, out)


# --------------------------------------------------------------------------- Grams

@contextlib.contextmanager
def _record_linear_inputs(record: Callable[[str, Any, jax.Array], None]):
    """Calls ``record(layer_name, kernel, input)`` at every linen ``nn.Dense`` and
    ``nnx.Linear`` call inside the block.

    linen: through ``nn.intercept_methods`` (a context variable). nnx has no interception
    hook, so ``nnx.Linear.__call__`` is replaced for the duration of the block (a class
    attribute: do not trace another nnx model in another thread meanwhile).
    """
    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            record("/".join(context.module.path) or "<root Dense>",
                   context.module.get_variable("params", "kernel"), args[0])
        return next_fun(*args, **kwargs)

    original = nnx.Linear.__call__

    def linear_call(self, inputs, *args, **kwargs):
        record(f"nnx.Linear({self.in_features}, {self.out_features})",
               self.kernel.get_value(), inputs)
        return original(self, inputs, *args, **kwargs)

    nnx.Linear.__call__ = linear_call
    try:
        with nn.intercept_methods(interceptor):
            yield
    finally:
        nnx.Linear.__call__ = original


def regmean_grams(apply_fn: Callable[[PyTree, PyTree], Any], params: PyTree,
                  inputs: PyTree, *, num_examples: int | None = None,
                  microbatch_size: int | None = None, normalize: bool = False) -> PyTree:
    """The input Gram ``G = X^T X`` of every linear layer's kernel, for :func:`regmean`.

    Runs ``apply_fn(params, batch)`` on the first ``num_examples`` examples of ``inputs``
    and, at every call of a flax linen ``nn.Dense`` or flax ``nnx.Linear`` layer, takes its
    input ``x`` (``[..., in]``), flattens every axis but the last into rows (examples
    times tokens for a transformer) and adds ``x^T x`` to the Gram of that layer's kernel.
    A layer called several times accumulates all its calls (the least-squares objective
    sums over every use of the weights). With ``normalize=True`` each Gram is divided by
    the number of rows it saw (FusionBench's per-task mean).

    The kernel is identified by object identity with a leaf of ``params``: ``apply_fn``
    must hand ``params``' leaves to the model unchanged (``model.apply({"params": p}, x)``
    for linen; ``nnx.merge(graphdef, p)(x)`` for an nnx ``State``). Layers inside lifted
    transforms (``nn.scan``, ``nn.vmap``, ``nnx.scan``, remat) are not supported: their
    inputs live in an inner trace.

    Examples run in chunks of ``microbatch_size`` (all at once by default), summed in a
    ``lax.scan``: the result does not depend on the chunking. Grams are accumulated in at
    least float32 with ``Precision.HIGHEST`` matmuls.

    Cost: one forward pass over the examples plus ``rows * in^2`` per layer. Memory: the
    forward pass of one chunk and one ``[in, in]`` Gram per layer.

    Args:
      apply_fn: ``apply_fn(params, batch)``; its output is not used.
      params: the model (e.g. task ``t``'s finetuned model: RegMean uses each model's own
        layer inputs on its own task's data).
      inputs: a pytree of arrays with a leading example axis (labels are not needed).
      num_examples: use only the first ``num_examples`` examples (default: all).
      microbatch_size: examples per chunk (memory only).
      normalize: divide each Gram by its number of rows.

    Returns:
      A tree shaped like ``params`` with a ``[in, in]`` Gram (in at least float32) at
      every linear kernel that was used and ``None`` at every other leaf.

    Raises:
      ValueError: for empty or inconsistent inputs, bad ``num_examples`` or
        ``microbatch_size``, a forward pass that calls no ``Dense``/``Linear`` layer, or a
        layer whose kernel is not a leaf of ``params`` (naming the layer).
    """
    if not callable(apply_fn):
        raise ValueError(f"apply_fn must be callable, got {type(apply_fn).__name__}")
    n_data = _checks.num_examples(inputs, name="inputs")
    n = _checks.positive_int(num_examples, "num_examples", allow_none=True) or n_data
    if n > n_data:
        raise ValueError(f"num_examples is {n}, but inputs has only {n_data} examples")
    microbatch_size = _checks.positive_int(microbatch_size, "microbatch_size",
                                           allow_none=True)
    # Which leaves get a Gram: found once by tracing one example (shapes only).
    sample = _stats.take(inputs, 0, 1)
    found = jax.eval_shape(lambda p, b: _layer_grams(apply_fn, p, b)[0], params, sample)
    if not found:
        raise ValueError("apply_fn called no flax nn.Dense or nnx.Linear layer: there is "
                         "no kernel to compute a Gram for")
    grams, rows = _regmean_grams_jit(apply_fn, params, inputs, n=n,
                                     microbatch_size=microbatch_size)
    leaves, treedef = _common.flatten(params)
    out = [None] * len(leaves)
    for i, g in grams.items():
        out[i] = g / rows[i].astype(g.dtype) if normalize else g
    return jax.tree.unflatten(treedef, out)


def _layer_grams(apply_fn, params, batch):
    """``({leaf index: sum of x^T x}, {leaf index: rows})`` over one forward pass."""
    leaves, _ = _common.flatten(params)
    index = {id(x): i for i, x in enumerate(leaves) if x is not None}
    paths = _common.leaf_paths(params)
    grams: dict[int, jax.Array] = {}
    rows: dict[int, jax.Array] = {}

    def record(layer, kernel, x):
        i = index.get(id(kernel))
        if i is None:
            raise ValueError(f"layer {layer}: its kernel (shape {jnp.shape(kernel)}) is not "
                             "a leaf of params; apply_fn must pass params' leaves to the "
                             "model unchanged (no casting or copying)")
        if jnp.ndim(kernel) != 2:
            raise ValueError(f"layer {layer}: kernel '{paths[i]}' has shape "
                             f"{jnp.shape(kernel)}; only 2-D kernels get a Gram")
        adt = tree_lib.accumulation_dtype(jnp.result_type(x, kernel))
        x2 = jnp.reshape(x, (-1, jnp.shape(x)[-1])).astype(adt)
        g = jnp.matmul(x2.T, x2, precision=jax.lax.Precision.HIGHEST)
        r = jnp.asarray(x2.shape[0], adt)
        grams[i] = g if i not in grams else grams[i] + g
        rows[i] = r if i not in rows else rows[i] + r

    with _record_linear_inputs(record):
        apply_fn(params, batch)
    return grams, rows


@functools.partial(jax.jit, static_argnames=("apply_fn", "n", "microbatch_size"))
def _regmean_grams_jit(apply_fn, params, inputs, *, n, microbatch_size):
    return _stats.chunked_sum(lambda chunk, _: _layer_grams(apply_fn, params, chunk),
                                inputs, n, microbatch_size)
