"""Epoch gradients derived from kept parameters (``tvj.training.epoch_gradients``) equal
the recorded ones for plain SGD, and every other optimizer is refused by name
(issue 13, memory-safe defaults: "epoch_gradients derivable or opt-in")."""

import jax
import jax.numpy as jnp
import optax
import pytest

import taskvec_jax as tvj
from taskvec_jax.models import MLP, make_loss_fn
from tests.helpers import digits, init, max_abs_diff


@pytest.fixture(scope="module")
def setup():
    data = digits(40)
    model = MLP((8, 10), "tanh", param_dtype=jnp.float64)
    return make_loss_fn(model), init(model, data), data


@pytest.mark.parametrize("options", [
    {},                                                   # full batch: the one gradient
    {"microbatch_size": 15},                              # the same, in chunks
    {"batch_size": 16, "key": jax.random.key(1)},         # the sum of 3 step gradients
], ids=["full", "microbatch", "minibatch"])
def test_derived_epoch_gradients_equal_the_recorded_ones_in_float64(setup, options):
    loss_fn, params, data = setup
    opt = optax.sgd(0.3)
    traj = tvj.finetune(loss_fn, params, data, opt, 3, keep_epochs="all",
                        record_gradients=True, **options)
    derived = tvj.training.epoch_gradients(traj, opt)
    assert jax.tree.structure(derived) == jax.tree.structure(traj.epoch_gradients)
    assert max_abs_diff(derived, traj.epoch_gradients) <= 1e-12
    # a real check: the gradients are O(0.1), the steps differ between epochs
    assert max_abs_diff(traj.epoch_gradients, jax.tree.map(jnp.zeros_like, derived)) > 1e-2
    # a new optax.sgd object with the same learning rate derives the same
    again = tvj.training.epoch_gradients(traj, optax.sgd(0.3))
    assert max_abs_diff(again, derived) == 0.0


def test_other_optimizers_and_gaps_are_refused_naming_why(setup):
    loss_fn, params, data = setup
    traj = tvj.finetune(loss_fn, params, data, optax.sgd(0.3), 2, keep_epochs="all")
    refusals = {
        "state is not empty": [optax.sgd(0.3, momentum=0.9), optax.adam(0.1),
                               optax.sgd(optax.linear_schedule(0.3, 0.1, 5)),
                               optax.MultiSteps(optax.sgd(0.3), 2)],
        "not -learning_rate \\* gradient": [
            optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.3)),
            optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.3)),
            optax.chain(optax.scale_by_sign(), optax.sgd(0.3))],
    }
    for why, optimizers in refusals.items():
        for opt in optimizers:
            with pytest.raises(ValueError, match=rf"exact only for plain SGD.*{why}.*"
                               "record_gradients=True"):
                tvj.training.epoch_gradients(traj, opt)
    # the trajectory's own state says it was not plain SGD, whatever is passed
    adam = tvj.finetune(loss_fn, params, data, optax.adam(1e-2), 2, keep_epochs="all")
    with pytest.raises(ValueError, match="state is not empty"):
        tvj.training.epoch_gradients(adam, optax.sgd(0.3))
    with pytest.raises(ValueError, match=r"consecutive kept epochs .*\[0, 2\].*"
                       "record_gradients=True"):
        tvj.training.epoch_gradients(
            tvj.finetune(loss_fn, params, data, optax.sgd(0.3), 2), optax.sgd(0.3))
