"""Non-trainable model state (flax linen BatchNorm ``batch_stats``) carried by the engine:
updated every step (every chunk, every task in order), never differentiated, never in the
task vector, kept at every kept epoch and checkpointed with the trajectory (issue 13,
item 2)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import taskvec_jax as tvj
from tests.helpers import digits, max_abs_diff


class BatchNormCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(4, (3, 3), param_dtype=jnp.float64)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.8,
                         param_dtype=jnp.float64)(x)
        x = nn.relu(x).mean(axis=(1, 2))
        return nn.Dense(10, param_dtype=jnp.float64)(x)


MODEL = BatchNormCNN()


def _loss(params, batch, state):
    logits, updates = MODEL.apply({"params": params, "batch_stats": state}, batch["image"],
                                  mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, updates["batch_stats"]


@pytest.fixture(scope="module")
def setup():
    data = digits(48)
    variables = MODEL.init(jax.random.key(0), data["image"][:2])
    # flax creates batch_stats in float32; float64 inputs update them in float64
    state = jax.tree.map(lambda x: x.astype(jnp.float64), variables["batch_stats"])
    return data, variables["params"], state


_STEP = jax.jit(jax.value_and_grad(_loss, has_aux=True))


def _reference(params, state, batches, lr, states=None):
    """An independent Python loop: one SGD step and one state update per batch (the
    states after each step are appended to ``states``)."""
    losses = []
    for batch in batches:
        (loss, state), grad = _STEP(params, batch, state)
        params = jax.tree.map(lambda p, g: p - lr * g, params, grad)
        losses.append(loss)
        if states is not None:
            states.append(state)
    return params, state, losses


def test_full_batch_running_statistics_equal_an_independent_loop(setup):
    data, params, state = setup
    traj = tvj.finetune(_loss, params, data, optax.sgd(0.3), 3, model_state=state,
                        keep_epochs="all")
    states = [state]
    ref_params, ref_state, ref_losses = _reference(params, state, [data] * 3, 0.3, states)
    assert max_abs_diff(traj.final_model_state, ref_state) <= 1e-12
    # the state at every kept epoch, like the parameters (epoch 0: the start)
    assert jax.tree.leaves(traj.model_state)[0].shape[0] == 4
    for e in range(4):
        assert max_abs_diff(traj.model_state_at(e), states[e]) <= 1e-12
    assert max_abs_diff(traj.final_params, ref_params) <= 1e-12
    np.testing.assert_allclose(traj.losses, ref_losses, rtol=1e-12)
    # the statistics moved, and they are not parameters: the task vector has none
    assert max_abs_diff(traj.final_model_state, state) > 1e-3
    assert "batch_stats" not in jax.tree_util.keystr(
        jax.tree_util.tree_flatten_with_path(tvj.task_vector(traj.final_params, params))[0])
    assert jax.tree.structure(tvj.task_vector(traj.final_params, params)) == \
        jax.tree.structure(params)


def test_minibatch_state_moves_once_per_step(setup):
    data, params, state = setup
    key = jax.random.key(4)
    traj = tvj.finetune(_loss, params, data, optax.sgd(0.1), 1, batch_size=16, key=key,
                        model_state=state)
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.fold_in(key, 1),
                                                                0), 48))
    batches = [jax.tree.map(lambda x, i=i: x[perm[i * 16:(i + 1) * 16]], data)
               for i in range(3)]
    ref_params, ref_state, ref_losses = _reference(params, state, batches, 0.1)
    assert max_abs_diff(traj.final_model_state, ref_state) <= 1e-12
    # default keep_epochs: the start and the end, for the state as for the parameters
    assert max_abs_diff(traj.model_state_at(0), state) == 0.0
    assert max_abs_diff(traj.final_params, ref_params) <= 1e-12
    np.testing.assert_allclose(traj.losses[0], np.mean(ref_losses), rtol=1e-12)


def test_finetune_tasks_carries_a_state_per_task_and_errors_are_clear(setup):
    data, params, state = setup
    tasks = [jax.tree.map(lambda x: x[:24], data), jax.tree.map(lambda x: x[24:], data)]
    trajs = tvj.finetune_tasks(_loss, params, tasks, optax.sgd(0.3), 2, model_state=state,
                               keep_epochs="all")  # one vmapped group: a state per task
    for t, d in enumerate(tasks):
        states = [state]
        _reference(params, state, [d] * 2, 0.3, states)
        for e in range(3):
            assert max_abs_diff(trajs[t].model_state_at(e), states[e]) <= 1e-12
    assert max_abs_diff(trajs[0].final_model_state, trajs[1].final_model_state) > 1e-3
    with pytest.raises(ValueError, match=r"must return \(scalar loss, new_state\)"):
        tvj.finetune(lambda p, b, s: _loss(p, b, s)[0], params, data, optax.sgd(0.1), 1,
                     model_state=state)
    with pytest.raises(ValueError, match="must match model_state in structure, shapes and"):
        tvj.finetune(_loss, params, data, optax.sgd(0.1), 1,
                     model_state=jax.tree.map(lambda x: x.astype(jnp.float32), state))
    for entry in (tvj.finetune_tasks, tvj.multitask_finetune):
        with pytest.raises(ValueError, match="not supported with mesh=: the mesh splits "
                           ".*no one order in which the batches would update the state"):
            entry(_loss, params, tasks, optax.sgd(0.1), 1, model_state=state,
                  mesh=object())
    with pytest.raises(ValueError, match="this trajectory has no model state"):
        tvj.finetune(lambda p, b: _loss(p, b, state)[0], params, data, optax.sgd(0.1),
                     1).model_state_at(0)


def _chunks(batch, m):
    n = batch["label"].shape[0]
    return [jax.tree.map(lambda x, i=i: x[i:i + m], batch) for i in range(0, n, m)]


def test_microbatches_thread_the_state_through_the_chunks_in_order(setup):
    # 48 examples in chunks of 20: 20, 20 and the leftover 8, in that order; each chunk's
    # loss and gradient at the state the chunks before it left, weighted by n_c / N
    data, params, state = setup
    traj = tvj.finetune(_loss, params, data, optax.sgd(0.3), 2, model_state=state,
                        microbatch_size=20, keep_epochs="all")
    p, s, losses = params, state, []
    for e in range(1, 3):
        loss, grad = 0.0, jax.tree.map(jnp.zeros_like, p)
        for chunk in _chunks(data, 20):
            w = chunk["label"].shape[0] / 48
            (chunk_loss, s), chunk_grad = _STEP(p, chunk, s)
            loss = loss + w * chunk_loss
            grad = jax.tree.map(lambda a, g, w=w: a + w * g, grad, chunk_grad)
        p = jax.tree.map(lambda q, g: q - 0.3 * g, p, grad)
        losses.append(loss)
        assert max_abs_diff(traj.model_state_at(e), s) <= 1e-12
        assert max_abs_diff(traj.at(e), p) <= 1e-12
    np.testing.assert_allclose(traj.losses, losses, rtol=1e-12)
    # ghost batch normalization: not the unsplit run (statistics of chunks, not of all)
    unsplit = tvj.finetune(_loss, params, data, optax.sgd(0.3), 2, model_state=state)
    assert max_abs_diff(unsplit.final_model_state, traj.final_model_state) > 1e-6


def test_multitask_threads_one_shared_state_through_the_tasks(setup):
    # minibatch multitask: each step takes 8 examples of task 0 (16 examples: cycled)
    # and of task 1 (24: 3 steps), task 0's batch updates the state first; weights 0.7, 0.3
    data, params, state = setup
    tasks = [jax.tree.map(lambda x: x[:16], data), jax.tree.map(lambda x: x[16:40], data)]
    key = jax.random.key(3)
    traj = tvj.multitask_finetune(_loss, params, tasks, optax.sgd(0.2), 1, batch_size=8,
                                  key=key, weights=[0.7, 0.3], model_state=state)
    ek = jax.random.fold_in(key, 1)
    perms = [np.asarray(jax.random.permutation(jax.random.fold_in(ek, t), n))
             for t, n in enumerate((16, 24))]
    p, s, losses = params, state, []
    for i in range(3):
        loss, grad = 0.0, jax.tree.map(jnp.zeros_like, p)
        for t, w in enumerate((0.7, 0.3)):
            rows = perms[t][np.arange(i * 8, (i + 1) * 8) % len(perms[t])]
            (task_loss, s), task_grad = _STEP(p, jax.tree.map(lambda x: x[rows], tasks[t]), s)
            loss = loss + w * task_loss
            grad = jax.tree.map(lambda a, g, w=w: a + w * g, grad, task_grad)
        p = jax.tree.map(lambda q, g: q - 0.2 * g, p, grad)
        losses.append(loss)
    assert max_abs_diff(traj.final_model_state, s) <= 1e-12
    assert max_abs_diff(traj.final_params, p) <= 1e-12
    np.testing.assert_allclose(traj.losses[0], np.mean(losses), rtol=1e-12)


def test_model_state_is_saved_and_restored_with_the_trajectory(setup, tmp_path):
    data, params, state = setup
    traj = tvj.finetune(_loss, params, data, optax.sgd(0.3), 2, model_state=state,
                        keep_epochs="all")
    path = tvj.checkpoint.save(tmp_path / "traj", traj)
    for back in (tvj.checkpoint.restore(path, like=traj), tvj.checkpoint.restore(path)):
        assert isinstance(back, tvj.Trajectory)
        assert jax.tree.structure(back.model_state) == jax.tree.structure(traj.model_state)
        assert max_abs_diff(back.model_state, traj.model_state) == 0.0
        assert max_abs_diff(back.params, traj.params) == 0.0
        for e in range(3):
            assert max_abs_diff(back.model_state_at(e), traj.model_state_at(e)) == 0.0


def test_recomputing_statistics_for_a_merged_model_with_sgd_zero(setup):
    # docs/merging.md's recipe: one epoch of optax.sgd(0.0) over the data leaves the
    # (merged) parameters exactly as they are and runs every batch through the model in
    # training mode; the same compiled program as the minibatch test (structure cache)
    data, params, state = setup
    merged = tvj.merging.task_arithmetic(params, [tvj.tree.scale(0.1, params)], alpha=1.0)
    key = jax.random.key(4)
    traj = tvj.finetune(_loss, merged, data, optax.sgd(0.0), 1, batch_size=16, key=key,
                        model_state=state)
    assert max_abs_diff(traj.final_params, merged) == 0.0
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.fold_in(key, 1),
                                                                0), 48))
    s, forward = state, jax.jit(_loss)
    for i in range(3):
        _, s = forward(merged, jax.tree.map(lambda x: x[perm[i * 16:(i + 1) * 16]], data), s)
    assert max_abs_diff(traj.final_model_state, s) <= 1e-12
    assert max_abs_diff(traj.final_model_state, state) > 1e-3


def test_resumable_finetune_saves_and_resumes_the_state(setup, tmp_path):
    # interrupted after epoch 1, resumed to 3: the state and parameters of 3 epochs of an
    # independent loop; a state of another dtype is another run
    from taskvec_jax.training.resumable import resumable_finetune

    data, params, state = setup
    where = tmp_path / "run"
    first, _ = resumable_finetune(_loss, params, data, optax.sgd(0.3), 1, where,
                                  model_state=state)
    run, losses = resumable_finetune(_loss, params, data, optax.sgd(0.3), 3, where,
                                     model_state=state)
    ref_params, ref_state, ref_losses = _reference(params, state, [data] * 3, 0.3)
    assert run.epoch == 3 and max_abs_diff(run.model_state, ref_state) <= 1e-12
    assert max_abs_diff(run.params, ref_params) <= 1e-12
    assert max_abs_diff(first.model_state, run.model_state) > 1e-6
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-12)
    # the state's shapes and dtypes are part of the loss's fingerprint
    with pytest.raises(ValueError, match="another run's checkpoint: the loss function "
                       "changed"):
        resumable_finetune(_loss, params, data, optax.sgd(0.3), 4, where,
                           model_state=jax.tree.map(lambda x: x.astype(jnp.float32), state))
