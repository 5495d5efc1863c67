"""Iterative task arithmetic: ATM, Alternating Tuning and Merging (Zhou et al., 2025).

Round ``r`` finetunes the current merged model ``theta^(r)`` on every task for a budget
of ``num_epochs`` epochs, takes the task vectors ``tau_t^(r) = theta_t^(r) - theta^(r)``
and merges them: ``theta^(r+1) = theta^(r) + alpha * sum_t tau_t^(r)``, ``alpha = 1/T`` by
default (the average of the task vectors).

Why it works (the paper's Theorem 1): with full-batch gradient descent of step ``eta`` and
one epoch per round, ``tau_t^(r) = -eta * grad L_t(theta^(r))``, so each round is exactly
one step of multitask gradient descent on ``L_MT = sum_t L_t`` with step ``alpha * eta``;
ATM is then gradient descent on the multitask loss and approaches its minimizer.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from taskvec_jax import _checks
from taskvec_jax import tree as tree_lib
from taskvec_jax.merging import _common, arithmetic
from taskvec_jax.training import finetune_tasks

PyTree = Any

__all__ = ["ATMResult", "atm"]


class ATMResult(NamedTuple):
    """The result of :func:`atm`.

    Attributes:
      params: every round's merged model; each leaf has a leading axis of length
        ``num_rounds + 1`` (index 0 = the starting model, index ``r`` = after round ``r``).
      losses: ``[num_rounds, T, num_epochs]``, the training loss of every task's
        finetuning epochs in every round (as in ``Trajectory.losses``).
    """

    params: PyTree
    losses: jax.Array

    @property
    def final_params(self) -> PyTree:
        """The model after the last round."""
        return jax.tree.map(lambda x: x[-1], self.params)

    def at(self, round_index: int) -> PyTree:
        """The model after round ``round_index`` (0 = the start)."""
        return jax.tree.map(lambda x: x[round_index], self.params)


def atm(loss_fn: Callable[[PyTree, PyTree], jax.Array], params: PyTree,
        task_datasets: Sequence[PyTree], optimizer: optax.GradientTransformation,
        num_rounds: int, *, num_epochs: int = 1, alpha: float | jax.Array | None = None,
        key: jax.Array | None = None, **finetune_kwargs) -> ATMResult:
    """Alternating Tuning and Merging: ``num_rounds`` rounds of finetune-then-average.

    ``theta^(r+1) = theta^(r) + alpha * sum_t (finetune_t(theta^(r)) - theta^(r))`` where
    ``finetune_t`` runs :func:`taskvec_jax.finetune_tasks` for ``num_epochs`` epochs (one,
    the paper's setting, by default) from ``theta^(r)`` with a fresh optimizer state;
    tasks whose data shapes agree are vmapped into one compiled program. Round ``r``
    shuffles (minibatch mode) with ``jax.random.fold_in(key, r)``, task ``t`` within it
    with a further ``fold_in(., t)``.

    With full-batch GD (``optax.sgd(eta)``, ``batch_size=None``), ``num_epochs=1`` and
    ``alpha``, ``num_rounds`` rounds equal ``multitask_finetune`` with
    ``optax.sgd(alpha * eta)`` for ``num_rounds`` epochs, exactly (Theorem 1).

    Memory: ``num_rounds + 1`` models for the returned trajectory, and per round the
    ``T`` finetuned models (one snapshot each: ``keep_epochs`` defaults to the last epoch
    and ``record_gradients`` to ``False``) plus what finetuning itself holds.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar mean loss``.
      params: the starting model ``theta^(0)`` (a pytree of float arrays).
      task_datasets: a non-empty sequence of datasets, one per task.
      optimizer: an optax transformation, re-initialized every round.
      num_rounds: number of rounds ``R >= 1``.
      num_epochs: the finetuning budget per task and round.
      alpha: merge coefficient on the sum of task vectors; ``None`` means ``1/T``.
      key: PRNG key, required in minibatch mode.
      **finetune_kwargs: passed to :func:`taskvec_jax.finetune_tasks` (``batch_size``,
        ``microbatch_size``, ``mesh``, ...).

    Returns:
      An :class:`ATMResult`.

    Raises:
      ValueError: for a non-positive ``num_rounds``, an empty task list, a NaN/Inf in
        ``params`` or in a round's finetuned model (naming the round, task and leaf), or
        anything :func:`taskvec_jax.finetune_tasks` rejects.
    """
    num_rounds = _checks.positive_int(num_rounds, "num_rounds")
    task_datasets = _checks.non_empty_sequence(task_datasets, "task_datasets",
                                               item="task's data")
    num_tasks = len(task_datasets)
    alpha = _common.scalar_alpha(1.0 / num_tasks if alpha is None else alpha)
    for name in ("start_epoch", "opt_state"):
        if name in finetune_kwargs:
            raise ValueError(f"atm restarts finetuning every round; {name} is not accepted")
    accepted = inspect.signature(finetune_tasks).parameters
    unknown = sorted(k for k in finetune_kwargs if k not in accepted)
    if unknown:
        raise TypeError(f"atm got unexpected arguments {unknown}; it passes keyword arguments "
                        "on to taskvec_jax.finetune_tasks")
    _common.check_finite([params], names=["params"])
    finetune_kwargs.setdefault("keep_epochs", (num_epochs,))
    finetune_kwargs.setdefault("record_gradients", False)

    leaves, treedef = _common.flatten(params)
    rounds = [leaves]
    losses = []
    theta = params
    for r in range(num_rounds):
        round_key = None if key is None else jax.random.fold_in(key, r)
        trajs = finetune_tasks(loss_fn, theta, task_datasets, optimizer,
                                            num_epochs, key=round_key, **finetune_kwargs)
        finetuned = [tr.final_params for tr in trajs]
        # A task that diverged in this round must not be averaged into the next start.
        _common.check_finite(finetuned, what=f"round {r}: finetuned task")
        theta = _merge_round(theta, finetuned, alpha)
        rounds.append(_common.flatten(theta)[0])
        losses.append(jnp.stack([tr.losses for tr in trajs]))
    stacked = [jnp.stack(xs) for xs in zip(*rounds)]
    return ATMResult(jax.tree.unflatten(treedef, stacked), jnp.stack(losses))


@jax.jit
def _merge_round(theta, finetuned, alpha):
    """``theta + sum_t alpha * (finetuned_t - theta)``, one accumulator, no stacking.

    The differences are taken in the accumulation dtype (at least float32), so that a
    bfloat16 model's task vectors lose nothing before they are summed; XLA fuses them
    into the sum.
    """
    def task_vector(model):
        return jax.tree.map(lambda x, b: x.astype(tree_lib.accumulation_dtype(b.dtype))
                            - b.astype(tree_lib.accumulation_dtype(b.dtype)), model, theta)

    return arithmetic.add_weighted(theta, [task_vector(m) for m in finetuned],
                                   jnp.broadcast_to(alpha, (len(finetuned),)))
