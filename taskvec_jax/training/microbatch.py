"""The one microbatched mean of the library: ``sum_c (n_c / N) fn(chunk_c)``.

Every full-batch quantity that is a mean over examples (the loss, its gradient, a
Hessian-vector product) can be computed in chunks of ``m`` examples with the same result
and the memory of one chunk: :func:`mean_over_microbatches` scans the ``N // m`` full
chunks and adds the ``N % m`` leftover examples as one smaller chunk weighted by its size.
The finetuning engine (:mod:`taskvec_jax.training`), :mod:`taskvec_jax.hessian` and
:mod:`taskvec_jax.theory` all go through it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from taskvec_jax import _checks
from taskvec_jax import tree as tree_lib

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

__all__ = ["mean_over_microbatches", "mean_value_and_grad"]


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
    n = _checks.num_examples(data)
    m = _checks.positive_int(microbatch_size, "microbatch_size", allow_none=True)
    if m is None or m >= n:
        return fn(data)
    full = n // m
    rest = n - full * m
    chunks = jax.tree.map(lambda x: x[:full * m].reshape((full, m) + x.shape[1:]), data)
    first = jax.tree.map(lambda x: x[0], chunks)
    acc0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, first))

    def body(acc, chunk):
        return tree_lib.add(acc, fn(chunk)), None

    total, _ = jax.lax.scan(body, acc0, chunks)
    out = tree_lib.scale(m / n, total)
    if rest:
        tail = jax.tree.map(lambda x: x[full * m:], data)
        out = tree_lib.add_scale(out, rest / n, fn(tail))
    return out


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
