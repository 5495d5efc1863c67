"""The program cache is keyed on structure: sweeps over numbers compile once.

A new ``optax.sgd(lr)`` / ``optax.adam(lr)`` object, or a new ``loss_fn`` closure that
differs only in captured numbers, must reuse the compiled program (issue 13, item 1).
Compilations are counted with ``jax.monitoring``'s backend-compile events.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import taskvec_jax as tvj

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_EVENTS: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *_, **__: _EVENTS.append(name) if name == _COMPILE_EVENT else None)


def _compiles(fn):
    before = len(_EVENTS)
    out = fn()
    jax.block_until_ready(jax.tree.leaves(out))
    return len(_EVENTS) - before, out


def _problem():
    rng = np.random.default_rng(0)
    data = {"x": jnp.asarray(rng.normal(size=(24, 4))), "y": jnp.asarray(rng.normal(size=24))}
    params = {"w": jnp.zeros(4), "b": jnp.zeros(())}
    return data, params


def _loss(p, batch):
    return jnp.mean((batch["x"] @ p["w"] + p["b"] - batch["y"]) ** 2)


def _reference(optimizer, params, data, num_epochs):
    """Full-batch optax loop, one step per epoch (the engine's definition)."""
    state = optimizer.init(params)
    for _ in range(num_epochs):
        grad = jax.grad(_loss)(params, data)
        updates, state = optimizer.update(grad, state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("make", [optax.sgd, optax.adam], ids=["sgd", "adam"])
@pytest.mark.parametrize("minibatch", [False, True], ids=["full", "minibatch"])
def test_new_optimizer_objects_add_no_compilation(make, minibatch):
    data, params = _problem()
    mode = dict(batch_size=8, key=jax.random.key(0)) if minibatch else {}
    lrs = (0.1, 0.03, 0.01)
    counts, finals = [], []
    for lr in lrs:
        n, traj = _compiles(lambda lr=lr: tvj.finetune(_loss, params, data, make(lr), 4,
                                                      **mode))
        counts.append(n)
        finals.append(traj.final_params)
    assert counts[0] >= 1 and counts[1:] == [0, 0], counts
    # the reused program uses each call's own learning rate
    assert not np.allclose(finals[0]["w"], finals[1]["w"])
    if not minibatch:
        for lr, final in zip(lrs, finals):
            ref = _reference(make(lr), params, data, 4)
            np.testing.assert_allclose(final["w"], ref["w"], rtol=1e-12, atol=1e-14)


def test_new_loss_closures_differing_in_numbers_add_no_compilation():
    data, params = _problem()

    def make_loss(scale, target_shift):
        shift = jnp.asarray(target_shift)  # a captured array, too
        return lambda p, b: scale * _loss(p, {"x": b["x"], "y": b["y"] + shift})

    counts, finals = [], []
    for scale, shift in ((1.0, 0.0), (2.0, 0.5), (0.5, -1.0)):
        n, traj = _compiles(lambda s=scale, t=shift: tvj.finetune(
            make_loss(s, t), params, data, optax.sgd(0.05), 3))
        counts.append(n)
        finals.append(traj.final_params)
    assert counts[1:] == [0, 0], counts
    expected = tvj.finetune(lambda p, b: 2.0 * _loss(p, {"x": b["x"], "y": b["y"] + 0.5}),
                            params, data, optax.sgd(0.05), 3).final_params
    np.testing.assert_allclose(finals[1]["w"], expected["w"], rtol=1e-13)


def test_finetune_tasks_and_multitask_sweeps_reuse_programs():
    data, params = _problem()
    tasks = [jax.tree.map(lambda x: x[:12], data), jax.tree.map(lambda x: x[12:], data)]
    counts = [_compiles(lambda lr=lr: tvj.finetune_tasks(_loss, params, tasks,
                                                         optax.adam(lr), 2))[0]
              for lr in (0.1, 0.2, 0.3)]
    assert counts[1:] == [0, 0], counts
    counts = [_compiles(lambda lr=lr: tvj.multitask_finetune(_loss, params, tasks,
                                                             optax.sgd(lr), 2))[0]
              for lr in (0.1, 0.2, 0.3)]
    assert counts[1:] == [0, 0], counts


def test_vmap_over_learning_rates_equals_the_loop():
    data, params = _problem()
    lrs = jnp.array([0.2, 0.05, 0.01])
    run = lambda lr: tvj.finetune(_loss, params, data, optax.sgd(lr), 3).final_params  # noqa
    batched = jax.vmap(run)(lrs)
    for i, lr in enumerate([0.2, 0.05, 0.01]):
        np.testing.assert_allclose(batched["w"][i], run(lr)["w"], rtol=1e-13)


def test_python_control_flow_on_a_captured_number_falls_back_to_static():
    data, params = _problem()

    def make_loss(power):
        def loss(p, b):
            if power > 1.5:  # Python branch on the captured float: cannot be traced
                return _loss(p, b) ** 2
            return _loss(p, b)
        return loss

    for power in (1.0, 2.0):
        traj = tvj.finetune(make_loss(power), params, data, optax.sgd(0.01), 2)
        ref = tvj.finetune((lambda p, b: _loss(p, b) ** 2) if power > 1.5 else _loss,
                           params, data, optax.sgd(0.01), 2)
        np.testing.assert_allclose(traj.final_params["w"], ref.final_params["w"],
                                   rtol=1e-13)
