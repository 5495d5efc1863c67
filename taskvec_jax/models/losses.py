"""Turn a model into ``loss_fn(params, batch)`` and measure accuracy.

A batch is a dict with an input and a label entry (``"image"`` and ``"label"`` by default,
the tensorflow-datasets names). ``params`` is the model's parameter tree (for flax linen,
``variables["params"]``), which is what task vectors and finetuning operate on.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from taskvec_jax._checks import num_examples

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]

LOSSES = ("cross_entropy", "mse")


def apply_fn_of(model: nn.Module | ApplyFn) -> ApplyFn:
    """``apply(params, x) -> outputs`` for a flax linen module (or a callable, unchanged)."""
    if isinstance(model, nn.Module):
        return lambda params, x: model.apply({"params": params}, x)
    if callable(model):
        return model
    raise ValueError(f"expected a flax Module or apply(params, x), got {type(model).__name__}")


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy; integer labels ``[B]`` or probability targets ``[B, C]``."""
    if jnp.issubdtype(labels.dtype, jnp.integer):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return optax.softmax_cross_entropy(logits, labels).mean()


def mse(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over examples of ``0.5 * ||f(x) - y||^2`` (integer labels become one-hot)."""
    if jnp.issubdtype(targets.dtype, jnp.integer) and targets.ndim == outputs.ndim - 1:
        targets = jax.nn.one_hot(targets, outputs.shape[-1], dtype=outputs.dtype)
    diff = (outputs - targets).reshape((outputs.shape[0], -1))
    return 0.5 * jnp.mean(jnp.sum(diff * diff, axis=-1))


def make_loss_fn(model: nn.Module | ApplyFn, loss: str = "cross_entropy", *,
                 input_key: str = "image", label_key: str = "label"
                 ) -> Callable[[PyTree, PyTree], jax.Array]:
    """Returns ``loss_fn(params, batch) -> scalar mean loss`` for ``model``.

    Args:
      model: a flax linen module or ``apply(params, x) -> outputs``.
      loss: ``"cross_entropy"`` or ``"mse"`` (``0.5 * squared error``, summed over outputs
        and averaged over examples).
      input_key: the batch entry fed to the model.
      label_key: the batch entry holding labels / targets.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
    apply = apply_fn_of(model)
    criterion = cross_entropy if loss == "cross_entropy" else mse

    def loss_fn(params: PyTree, batch: PyTree) -> jax.Array:
        return criterion(apply(params, batch[input_key]), batch[label_key])

    return loss_fn


def accuracy(model: nn.Module | ApplyFn, params: PyTree, data: PyTree, *,
             batch_size: int | None = None, input_key: str = "image",
             label_key: str = "label") -> jax.Array:
    """Fraction of examples whose arg-max output equals the integer label.

    ``batch_size`` evaluates in chunks (for memory); the answer is the same.
    """
    apply = apply_fn_of(model)
    n = num_examples(data)

    def correct(batch):
        pred = jnp.argmax(apply(params, batch[input_key]), axis=-1)
        return jnp.sum(pred == batch[label_key])

    if batch_size is None or batch_size >= n:
        return correct(data) / n
    full = n // batch_size
    head = jax.tree.map(lambda x: x[:full * batch_size].reshape(
        (full, batch_size) + x.shape[1:]), data)
    total = jax.lax.map(correct, head).sum()
    if n % batch_size:
        total = total + correct(jax.tree.map(lambda x: x[full * batch_size:], data))
    return total / n
