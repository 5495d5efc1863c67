"""A shared encoder with frozen per-task classification heads.

The task-vector literature finetunes one image encoder per task with that task's
classification head frozen (CLIP's zero-shot head), merges the encoders, and evaluates
each task with its own head. :class:`TaskHeads` is that setting for any encoder:

* heads are linear maps ``features -> classes`` fitted once on the *base* encoder's
  features (a linear probe: the analogue of a zero-shot head when there is no text tower)
  or given (CLIP zero-shot heads), then frozen;
* tasks with different class counts share one padded ``[T, D, C_max]`` head tensor; the
  padded classes get a bias of ``-1e9`` so their softmax weight is exactly zero;
* every example carries its task id (``batch["task"]``), so ONE
  ``loss_fn(encoder_params, batch)`` serves every task: it plugs straight into
  ``finetune_tasks``, ``multitask_finetune`` and the theory functions, whose ``L_t`` is
  then the mean loss of task ``t`` with its own head.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from taskvec_jax.models.losses import cross_entropy

PyTree = Any
EncodeFn = Callable[[PyTree, jax.Array], jax.Array]

PAD_BIAS = -1e9


class TaskHeads(NamedTuple):
    """Frozen linear heads for ``T`` tasks.

    Attributes:
      kernel: ``[T, D, C_max]``.
      bias: ``[T, C_max]`` (``-1e9`` on the padded classes of a task).
      num_classes: ``[T]`` int, each task's real class count.
    """

    kernel: jax.Array
    bias: jax.Array
    num_classes: np.ndarray

    def logits(self, features: jax.Array, task: jax.Array) -> jax.Array:
        """Per-example logits ``features[i] @ kernel[task[i]] + bias[task[i]]``."""
        return (jnp.einsum("nd,ndc->nc", features, self.kernel[task])
                + self.bias[task])


def stack_heads(heads: Sequence[tuple[jax.Array, jax.Array]]) -> TaskHeads:
    """Pads per-task ``(kernel [D, C_t], bias [C_t])`` pairs into one :class:`TaskHeads`."""
    if not heads:
        raise ValueError("stack_heads needs at least one head")
    d = heads[0][0].shape[0]
    c_max = max(k.shape[1] for k, _ in heads)
    kernels, biases = [], []
    for t, (k, b) in enumerate(heads):
        if k.shape[0] != d or b.shape != (k.shape[1],):
            raise ValueError(f"head {t}: kernel {k.shape} and bias {b.shape} do not fit "
                             f"feature width {d}")
        pad = c_max - k.shape[1]
        kernels.append(jnp.pad(k, ((0, 0), (0, pad))))
        biases.append(jnp.concatenate([b, jnp.full((pad,), PAD_BIAS, b.dtype)]))
    return TaskHeads(jnp.stack(kernels), jnp.stack(biases),
                     np.asarray([k.shape[1] for k, _ in heads]))


def fit_linear_head(features: jax.Array, labels: jax.Array, num_classes: int, *,
                    steps: int = 300, learning_rate: float = 0.1,
                    weight_decay: float = 1e-4) -> tuple[jax.Array, jax.Array]:
    """Fits a softmax linear probe on frozen features by full-batch Adam.

    Minimizes ``mean CE(features @ W + b, labels) + weight_decay/2 * ||W||^2``; features
    are used as given (no normalization). Deterministic (zero initialization).

    Returns:
      ``(kernel [D, num_classes], bias [num_classes])``.
    """
    d = features.shape[1]
    params = {"kernel": jnp.zeros((d, num_classes), features.dtype),
              "bias": jnp.zeros((num_classes,), features.dtype)}

    def loss(p):
        return (cross_entropy(features @ p["kernel"] + p["bias"], labels)
                + 0.5 * weight_decay * jnp.sum(p["kernel"] ** 2))

    opt = optax.adam(learning_rate)

    def step(carry, _):
        p, s = carry
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    return params["kernel"], params["bias"]


def with_task_ids(data: PyTree, task: int) -> PyTree:
    """Adds ``"task": task`` (an int32 per example) to a batch dict."""
    n = jax.tree.leaves(data)[0].shape[0]
    return {**data, "task": jnp.full((n,), task, jnp.int32)}


def multihead_loss_fn(encode: EncodeFn, heads: TaskHeads, *, input_key: str = "image",
                      label_key: str = "label") -> Callable[[PyTree, PyTree], jax.Array]:
    """``loss_fn(params, batch)``: mean cross-entropy of each example under its task's head."""
    def loss_fn(params: PyTree, batch: PyTree) -> jax.Array:
        features = encode(params, batch[input_key])
        return cross_entropy(heads.logits(features, batch["task"]), batch[label_key])
    return loss_fn


def multihead_accuracy(encode: EncodeFn, heads: TaskHeads, params: PyTree, data: PyTree,
                       *, input_key: str = "image", label_key: str = "label"
                       ) -> jax.Array:
    """Accuracy of ``params`` on ``data`` (which carries ``"task"``) under the frozen heads."""
    logits = heads.logits(encode(params, data[input_key]), data["task"])
    return jnp.mean(jnp.argmax(logits, -1) == data[label_key])
