"""Non-trainable model state (flax linen BatchNorm ``batch_stats``) carried by the engine:
updated every step, never differentiated, never in the task vector (issue 13, item 2)."""

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


def _reference(params, state, batches, lr):
    """An independent Python loop: one SGD step and one state update per batch."""
    step = jax.jit(jax.value_and_grad(_loss, has_aux=True))
    losses = []
    for batch in batches:
        (loss, state), grad = step(params, batch, state)
        params = jax.tree.map(lambda p, g: p - lr * g, params, grad)
        losses.append(loss)
    return params, state, losses


def test_full_batch_running_statistics_equal_an_independent_loop(setup):
    data, params, state = setup
    traj = tvj.finetune(_loss, params, data, optax.sgd(0.3), 3, model_state=state)
    ref_params, ref_state, ref_losses = _reference(params, state, [data] * 3, 0.3)
    assert max_abs_diff(traj.model_state, ref_state) <= 1e-12
    assert max_abs_diff(traj.final_params, ref_params) <= 1e-12
    np.testing.assert_allclose(traj.losses, ref_losses, rtol=1e-12)
    # the statistics moved, and they are not parameters: the task vector has none
    assert max_abs_diff(traj.model_state, state) > 1e-3
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
    assert max_abs_diff(traj.model_state, ref_state) <= 1e-12
    assert max_abs_diff(traj.final_params, ref_params) <= 1e-12
    np.testing.assert_allclose(traj.losses[0], np.mean(ref_losses), rtol=1e-12)


def test_finetune_tasks_carries_a_state_per_task_and_errors_are_clear(setup):
    data, params, state = setup
    tasks = [jax.tree.map(lambda x: x[:24], data), jax.tree.map(lambda x: x[24:], data)]
    trajs = tvj.finetune_tasks(_loss, params, tasks, optax.sgd(0.3), 2, model_state=state)
    for t, d in enumerate(tasks):
        single = tvj.finetune(_loss, params, d, optax.sgd(0.3), 2, model_state=state)
        assert max_abs_diff(trajs[t].model_state, single.model_state) <= 1e-12
    with pytest.raises(ValueError, match=r"must return \(scalar loss, new_state\)"):
        tvj.finetune(lambda p, b, s: _loss(p, b, s)[0], params, data, optax.sgd(0.1), 1,
                     model_state=state)
    with pytest.raises(ValueError, match="must match model_state in structure, shapes and"):
        tvj.finetune(_loss, params, data, optax.sgd(0.1), 1,
                     model_state=jax.tree.map(lambda x: x.astype(jnp.float32), state))
    with pytest.raises(ValueError, match="microbatch_size"):
        tvj.finetune(_loss, params, data, optax.sgd(0.1), 1, model_state=state,
                     microbatch_size=8)
    with pytest.raises(ValueError, match="not supported with mesh="):
        tvj.finetune_tasks(_loss, params, tasks, optax.sgd(0.1), 1, model_state=state,
                           mesh=object())


def test_model_state_is_saved_and_restored_with_the_trajectory(setup, tmp_path):
    data, params, state = setup
    traj = tvj.finetune(_loss, params, data, optax.sgd(0.3), 1, model_state=state)
    path = tvj.checkpoint.save(tmp_path / "traj", traj)
    back = tvj.checkpoint.restore(path, like=traj)
    assert max_abs_diff(back.model_state, traj.model_state) == 0.0
    assert max_abs_diff(back.params, traj.params) == 0.0
