"""The one microbatched mean of the library: ``sum_c (n_c / N) fn(chunk_c)``.

Every full-batch quantity that is a mean over examples (the loss, its gradient, a
Hessian-vector product) can be computed in chunks of ``m`` examples with the same result
and the memory of one chunk: :func:`mean_over_microbatches` scans the ``N // m`` full
chunks and adds the ``N % m`` leftover examples as one smaller chunk weighted by its size.
The finetuning engine (:mod:`taskvec_jax.training`), :mod:`taskvec_jax.hessian` and
:mod:`taskvec_jax.theory` all go through it. A stateful loss (BatchNorm statistics,
``loss_fn(params, batch, state) -> (loss, new_state)``) threads its state through the
chunks in order: :func:`mean_over_microbatches_with_state` (the same scan, which the
stateless mean is a special case of) and :func:`mean_value_and_grad_with_state`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from taskvec_jax import _checks
from taskvec_jax import tree as tree_lib

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

__all__ = ["mean_over_microbatches", "mean_over_microbatches_with_state",
           "mean_value_and_grad", "mean_value_and_grad_with_state"]


def mean_over_microbatches(fn: Callable[[PyTree], PyTree], data: PyTree,
                           microbatch_size: int | None = None) -> PyTree:
    """``sum_c (n_c / N) fn(chunk_c)``: an example-weighted mean of ``fn`` over chunks.

    When ``fn(batch)`` is a mean over the examples of ``batch`` (a mean loss, its gradient,
    a Hessian-vector product), this equals ``fn(data)``. The ``N // m`` full chunks run in
    a ``lax.scan`` (one chunk in memory at a time, plus one accumulator); the ``N % m``
    leftover examples form one smaller chunk weighted by its size.
    ``microbatch_size=None`` (or ``>= N``) calls ``fn(data)`` directly.

    Args:
      fn: maps a batch (pytree, leading axis = examples) to a pytree of arrays.
      data: the full dataset.
      microbatch_size: the chunk size ``m``.

    Returns:
      A pytree shaped like ``fn``'s output.

    Raises:
      ValueError: for empty or inconsistent ``data`` or a non-positive ``microbatch_size``.
    """
    out, _ = mean_over_microbatches_with_state(lambda batch, state: (fn(batch), state),
                                               data, (), microbatch_size)
    return out


def mean_over_microbatches_with_state(fn: Callable[[PyTree, PyTree], tuple[PyTree, PyTree]],
                                      data: PyTree, state: PyTree,
                                      microbatch_size: int | None = None
                                      ) -> tuple[PyTree, PyTree]:
    """The weighted mean of :func:`mean_over_microbatches` with a state threaded through
    the chunks in order: ``(out_c, s_c) = fn(chunk_c, s_{c-1})``, ``s_0 = state``.

    Returns ``(sum_c (n_c / N) out_c, s_C)``: chunk ``c`` sees the state the chunks
    before it left (for BatchNorm running statistics: one update per chunk, in example
    order, the last leftover chunk last), so the final state is that of a loop over the
    chunks. The state is a carried value, never averaged; it must keep its structure,
    shapes and dtypes. With ``microbatch_size=None`` (or ``>= N``) it is ``fn(data,
    state)``.
    """
    n = _checks.num_examples(data)
    m = _checks.positive_int(microbatch_size, "microbatch_size", allow_none=True)
    if m is None or m >= n:
        return fn(data, state)
    full = n // m
    rest = n - full * m
    chunks = jax.tree.map(lambda x: x[:full * m].reshape((full, m) + x.shape[1:]), data)
    first = jax.tree.map(lambda x: x[0], chunks)
    acc0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                        jax.eval_shape(fn, first, state)[0])

    def body(carry, chunk):
        acc, state = carry
        out, state = fn(chunk, state)
        return (tree_lib.add(acc, out), state), None

    (total, state), _ = jax.lax.scan(body, (acc0, state), chunks)
    out = tree_lib.scale(m / n, total)
    if rest:
        tail = jax.tree.map(lambda x: x[full * m:], data)
        tail_out, state = fn(tail, state)
        out = tree_lib.add_scale(out, rest / n, tail_out)
    return out, state


def mean_value_and_grad(loss_fn: LossFn, params: PyTree, data: PyTree,
                        microbatch_size: int | None = None) -> tuple[jax.Array, PyTree]:
    """Mean loss over all of ``data`` and its gradient, optionally in microbatches.

    ``(L, grad L)`` with ``L = loss_fn(params, data)``; with ``microbatch_size=m`` chunk
    ``c`` of size ``n_c`` contributes ``(n_c / N) * (L_c, grad L_c)``
    (:func:`mean_over_microbatches`), which sums to the unsplit values. Peak memory is
    that of one chunk's backward pass plus one gradient accumulator.
    """
    vg = jax.value_and_grad(loss_fn)
    return mean_over_microbatches(lambda batch: vg(params, batch), data, microbatch_size)


def mean_value_and_grad_with_state(loss_fn: Callable, params: PyTree, data: PyTree,
                                   state: PyTree, microbatch_size: int | None = None
                                   ) -> tuple[jax.Array, PyTree, PyTree]:
    """Mean loss, its gradient and the updated state of a stateful loss, in microbatches.

    ``loss_fn(params, batch, state) -> (loss, new_state)``. Chunk ``c`` (``n_c``
    examples) is evaluated at the state the previous chunks left
    (:func:`mean_over_microbatches_with_state`) and contributes
    ``(n_c / N) * (L_c, grad L_c)``; the state is never differentiated. Without chunks
    this is ``value_and_grad(loss_fn, has_aux=True)`` on all of ``data``; with chunks
    and a loss whose value depends on the batch composition (BatchNorm in training mode
    normalizes by each chunk's own statistics) it is the mean over chunks ("ghost batch
    normalization"), not the unsplit value.

    Returns:
      ``(loss, grad, new_state)``.
    """
    vg = jax.value_and_grad(loss_fn, has_aux=True)

    def chunk(batch, s):
        (loss, s), grad = vg(params, batch, s)
        return (loss, grad), s

    (loss, grad), state = mean_over_microbatches_with_state(chunk, data, state,
                                                            microbatch_size)
    return loss, grad, state
