"""Tests for taskvec_jax.merging.atm (iterative task arithmetic) on quadratic task losses."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import taskvec_jax as tvj

M = tvj.merging
NUM_TASKS, N, D = 3, 16, 4


def loss_fn(params, batch):
    """Least squares, 0.5 * mean (x . w + c - y)^2: a quadratic task loss."""
    pred = batch["x"] @ params["w"] + params["c"]
    return 0.5 * jnp.mean((pred - batch["y"]) ** 2)


def _tasks(seed=0):
    rng = np.random.default_rng(seed)
    tasks = []
    for t in range(NUM_TASKS):
        x = rng.normal(size=(N, D))
        y = x @ rng.normal(size=D) + 0.5 * t + 0.1 * rng.normal(size=N)
        tasks.append({"x": jnp.asarray(x), "y": jnp.asarray(y)})
    return tasks


def _multitask_optimum(tasks):
    """argmin sum_t L_t in closed form: sum_t X_t^T (X_t w - y_t) / N = 0 (with bias)."""
    a = np.zeros((D + 1, D + 1))
    b = np.zeros(D + 1)
    for task in tasks:
        x1 = np.concatenate([np.asarray(task["x"]), np.ones((N, 1))], axis=1)
        a += x1.T @ x1 / N
        b += x1.T @ np.asarray(task["y"]) / N
    sol = np.linalg.solve(a, b)
    return sol, np.linalg.eigvalsh(a)


def _flat(params):
    return np.concatenate([np.asarray(params["w"]), np.atleast_1d(np.asarray(params["c"]))])


P0 = {"w": jnp.zeros(D), "c": jnp.zeros(())}


def test_one_epoch_rounds_equal_multitask_gradient_descent():
    # Theorem 1, round by round: with full-batch SGD(eta) and alpha, ATM is multitask GD
    # on sum_t L_t with step alpha * eta.
    tasks = _tasks()
    eta, alpha, rounds = 0.1, 0.5, 6
    result = M.atm(loss_fn, P0, tasks, optax.sgd(eta), rounds, alpha=alpha)
    mt = tvj.multitask_finetune(loss_fn, P0, tasks, optax.sgd(alpha * eta), rounds,
                                keep_epochs="all")
    assert result.params["w"].shape == (rounds + 1, D)
    assert result.losses.shape == (rounds, NUM_TASKS, 1)
    for r in range(rounds + 1):
        np.testing.assert_allclose(_flat(result.at(r)), _flat(mt.at(r)), rtol=1e-13,
                                   atol=1e-15)
    # Round r's finetuning losses are the task losses at the round-r model.
    for r in range(rounds):
        for t in range(NUM_TASKS):
            np.testing.assert_allclose(result.losses[r, t, 0],
                                       loss_fn(result.at(r), tasks[t]), rtol=1e-13)


def test_atm_approaches_the_multitask_optimum_as_rounds_grow():
    tasks = _tasks(1)
    optimum, eigs = _multitask_optimum(tasks)
    # Default alpha = 1/T: each round is a GD step of size eta / T on sum_t L_t.
    eta = NUM_TASKS / eigs.max()
    rounds = 60
    result = M.atm(loss_fn, P0, tasks, optax.sgd(eta), rounds)
    dist = np.array([np.linalg.norm(_flat(result.at(r)) - optimum) for r in range(rounds + 1)])
    assert np.all(np.diff(dist) < 0)
    # Linear convergence at the GD rate (1 - lambda_min / lambda_max) per round.
    rate = 1 - eigs.min() / eigs.max()
    assert dist[-1] <= dist[0] * rate ** rounds * (1 + 1e-6) + 1e-12
    assert dist[-1] < 1e-3 * dist[0]


def test_longer_budgets_stop_short_of_the_optimum_by_order_eta():
    # With k > 1 epochs a round is no longer a multitask GD step (the eta^2 term of
    # Theorem 1): ATM's fixed point misses the multitask optimum by O(eta).
    tasks = _tasks(2)
    optimum, eigs = _multitask_optimum(tasks)
    gaps = []
    for eta in (0.2 / eigs.max(), 0.1 / eigs.max()):
        result = M.atm(loss_fn, P0, tasks, optax.sgd(eta), 150 if eta > 0.15 / eigs.max()
                       else 300, num_epochs=4, alpha=1.0 / NUM_TASKS)
        last, before = _flat(result.at(-1)), _flat(result.at(-2))
        assert np.linalg.norm(last - before) < 1e-6 * np.linalg.norm(last)   # converged
        gaps.append(np.linalg.norm(last - optimum))
    assert gaps[1] > 0
    assert 1.8 < gaps[0] / gaps[1] < 2.2                                    # slope 1 in eta


def test_minibatch_rounds_are_deterministic_and_kwargs_flow_to_finetuning():
    tasks = _tasks(3)
    key = jax.random.key(0)
    a = M.atm(loss_fn, P0, tasks, optax.sgd(0.05), 3, batch_size=4, key=key)
    b = M.atm(loss_fn, P0, tasks, optax.sgd(0.05), 3, batch_size=4, key=key)
    np.testing.assert_array_equal(a.params["w"], b.params["w"])
    assert a.losses.shape == (3, NUM_TASKS, 1)
    c = M.atm(loss_fn, P0, tasks, optax.sgd(0.05), 3, batch_size=4, key=jax.random.key(1))
    assert not np.array_equal(a.params["w"], c.params["w"])
    # Round 0 by hand: every task finetuned with fold_in(fold_in(key, 0), t).
    trajs = tvj.finetune_tasks(loss_fn, P0, tasks, optax.sgd(0.05), 1, batch_size=4,
                               key=jax.random.fold_in(key, 0))
    by_hand = jax.tree.map(lambda p0, *ft: p0 + sum(f - p0 for f in ft) / NUM_TASKS, P0,
                           *[tr.final_params for tr in trajs])
    np.testing.assert_allclose(_flat(a.at(1)), _flat(by_hand), rtol=1e-14)
    # microbatch_size reaches the engine (same full-batch gradient, same result).
    full = M.atm(loss_fn, P0, tasks, optax.sgd(0.1), 2)
    micro = M.atm(loss_fn, P0, tasks, optax.sgd(0.1), 2, microbatch_size=5)
    np.testing.assert_allclose(full.params["w"], micro.params["w"], rtol=1e-13)
    with pytest.raises(TypeError, match="unexpected arguments"):
        M.atm(loss_fn, P0, tasks, optax.sgd(0.1), 1, not_an_option=3)


def test_atm_under_jit_equals_eager():
    tasks = _tasks(4)
    eager = M.atm(loss_fn, P0, tasks, optax.sgd(0.1), 3)
    jitted = jax.jit(lambda p, ts: M.atm(loss_fn, p, ts, optax.sgd(0.1), 3))(P0, tasks)
    np.testing.assert_allclose(jitted.params["w"], eager.params["w"], rtol=1e-14)
    np.testing.assert_allclose(jitted.losses, eager.losses, rtol=1e-14)


def test_bad_input_raises_a_clear_value_error():
    tasks = _tasks()
    with pytest.raises(ValueError, match="num_rounds must be a positive integer"):
        M.atm(loss_fn, P0, tasks, optax.sgd(0.1), 0)
    with pytest.raises(ValueError, match="task_datasets is empty"):
        M.atm(loss_fn, P0, [], optax.sgd(0.1), 1)
    with pytest.raises(ValueError, match="start_epoch is not accepted"):
        M.atm(loss_fn, P0, tasks, optax.sgd(0.1), 1, start_epoch=3)
    with pytest.raises(ValueError, match="real scalar"):
        M.atm(loss_fn, P0, tasks, optax.sgd(0.1), 1, alpha=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="needs a PRNG key"):
        M.atm(loss_fn, P0, tasks, optax.sgd(0.1), 1, batch_size=4)
