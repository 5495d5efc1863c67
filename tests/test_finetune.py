"""The finetuning engine: exact identities with independent references, in float64."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import taskvec_jax as tvj
from taskvec_jax.models import CNN, MLP, make_loss_fn
from taskvec_jax.training import microbatch
from tests.helpers import digits, init, max_abs_diff


def _mlp(data, activation="tanh"):
    model = MLP((16, 10), activation, param_dtype=jnp.float64)
    return make_loss_fn(model), init(model, data)


def _cnn(data):
    model = CNN(10, channels=(3,), hidden=8, param_dtype=jnp.float64)
    return make_loss_fn(model), init(model, data)


@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_one_epoch_task_vector_is_minus_lr_times_gradient(make):
    data = digits(120)
    loss_fn, params = make(data)
    lr = 0.37
    traj = tvj.finetune(loss_fn, params, data, optax.sgd(lr), 1, record_gradients=True)
    tau = tvj.task_vector(traj.at(1), params)
    expected = tvj.tree.scale(-lr, jax.grad(loss_fn)(params, data))
    chex.assert_trees_all_close(tau, expected, atol=1e-12, rtol=0)
    # The recorded epoch gradient is that one gradient.
    assert max_abs_diff(jax.tree.map(lambda g: g[0], traj.epoch_gradients),
                        jax.grad(loss_fn)(params, data)) <= 1e-14


def _reference_gd(loss_fn, params, data, lr, k):
    grad = jax.jit(jax.grad(loss_fn))
    out, losses = [params], []
    for _ in range(k):
        losses.append(loss_fn(params, data))
        params = jax.tree.map(lambda p, g: p - lr * g, params, grad(params, data))
        out.append(params)
    return out, losses


def test_k_epochs_equal_independent_loop_and_microbatches_equal_full():
    data = digits(101)  # prime: no microbatch size divides it
    loss_fn, params = _mlp(data)
    ref, ref_losses = _reference_gd(loss_fn, params, data, 0.5, 6)
    traj = tvj.finetune(loss_fn, params, data, optax.sgd(0.5), 6, keep_epochs="all")
    np.testing.assert_array_equal(traj.epochs, np.arange(7))
    for e in range(7):
        assert max_abs_diff(traj.at(e), ref[e]) <= 1e-12
    np.testing.assert_allclose(traj.losses, ref_losses, rtol=1e-13)
    for m in (1, 10, 33, 100):
        micro = tvj.finetune(loss_fn, params, data, optax.sgd(0.5), 6, microbatch_size=m,
                             keep_epochs="all")
        assert max_abs_diff(micro.params, traj.params) <= 1e-12, m
        np.testing.assert_allclose(micro.losses, traj.losses, rtol=1e-12)


def test_mean_value_and_grad_weights_the_last_chunk():
    data = digits(23)
    loss_fn, params = _mlp(data)
    full = tvj.mean_value_and_grad(loss_fn, params, data)
    for m in (2, 5, 22):
        chunked = tvj.mean_value_and_grad(loss_fn, params, data, m)
        assert abs(float(chunked[0] - full[0])) <= 1e-13
        assert max_abs_diff(chunked[1], full[1]) <= 1e-13


def test_mean_over_microbatches_weights_the_remainder():
    # 11 examples in chunks of 4: 4 + 4 + 3, weighted 4/11, 4/11, 3/11.
    data = {"x": jnp.arange(11.0)}
    out = microbatch.mean_over_microbatches(lambda b: {"m": jnp.mean(b["x"] ** 2)}, data, 4)
    np.testing.assert_allclose(out["m"], np.mean(np.arange(11.0) ** 2), rtol=1e-15)
    with pytest.raises(ValueError, match="microbatch_size must be a positive integer"):
        microbatch.mean_over_microbatches(lambda b: b, data, 0)


def _indicator_loss(params, batch):
    """Linear in params: L = mean_i <e_{idx_i}, theta>; its gradient marks the examples used."""
    return jnp.mean(params["theta"][batch["idx"]])


@pytest.mark.parametrize("n,b", [(60, 12), (60, 7), (17, 17), (9, 2)])
def test_minibatch_epoch_uses_every_example_exactly_once(n, b):
    data = {"idx": jnp.arange(n)}
    params = {"theta": jnp.zeros(n)}
    lr = 0.25
    traj = tvj.finetune(_indicator_loss, params, data, optax.sgd(lr), 1, batch_size=b,
                        key=jax.random.key(3), record_gradients=True)
    moved = -np.asarray(traj.at(1)["theta"]) / lr
    steps, rest = divmod(n, b)
    # each full-batch member moves by 1/b, each member of the final partial step by 1/rest
    assert np.sum(np.isclose(moved, 1.0 / b, rtol=0, atol=1e-15)) == steps * b
    if rest:
        assert np.sum(np.isclose(moved, 1.0 / rest, rtol=0, atol=1e-15)) == rest
    assert np.all(moved > 0)  # no example skipped
    # epoch gradient = sum of the step gradients
    np.testing.assert_allclose(traj.epoch_gradients["theta"][0], moved, atol=1e-15)


def test_minibatch_linear_loss_moves_by_steps_times_mean_gradient():
    # The statement: for a loss linear in the parameters, one epoch moves the
    # parameters by exactly -lr * (steps per epoch) * mean gradient.
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(48, 5)))
    loss = lambda p, batch: jnp.mean(batch["a"] @ p["w"])  # noqa: E731
    params = {"w": jnp.asarray(rng.normal(size=5))}
    mean_grad = a.mean(0)
    for b in (4, 6, 16, 48):
        traj = tvj.finetune(loss, params, {"a": a}, optax.sgd(0.1), 1, batch_size=b,
                            key=jax.random.key(b))
        np.testing.assert_allclose(traj.at(1)["w"] - params["w"],
                                   -0.1 * (48 // b) * mean_grad, rtol=0, atol=1e-13)


def test_drop_remainder_skips_the_partial_step():
    n, b = 10, 4
    traj = tvj.finetune(_indicator_loss, {"theta": jnp.zeros(n)}, {"idx": jnp.arange(n)},
                        optax.sgd(1.0), 1, batch_size=b, key=jax.random.key(0),
                        drop_remainder=True)
    assert int(np.sum(np.asarray(traj.at(1)["theta"]) != 0)) == 8


def test_shuffles_depend_on_key_and_epoch():
    n = 40
    run = lambda key, e: tvj.finetune(  # noqa: E731
        _indicator_loss, {"theta": jnp.zeros(n)}, {"idx": jnp.arange(n)}, optax.sgd(1.0),
        e, batch_size=8, key=key, drop_remainder=False)
    a = run(jax.random.key(0), 1)
    b = run(jax.random.key(0), 1)
    np.testing.assert_array_equal(a.at(1)["theta"], b.at(1)["theta"])
    # With momentum the per-example history reveals the order; different keys differ.
    mom = lambda key: tvj.finetune(  # noqa: E731
        _indicator_loss, {"theta": jnp.zeros(n)}, {"idx": jnp.arange(n)},
        optax.sgd(1.0, momentum=0.9), 1, batch_size=8, key=key).at(1)["theta"]
    assert not np.array_equal(mom(jax.random.key(0)), mom(jax.random.key(1)))
    np.testing.assert_array_equal(mom(jax.random.key(5)), mom(jax.random.key(5)))


def test_finetune_tasks_equals_per_task_finetune_full_and_minibatch():
    base = digits(200)
    tasks = [jax.tree.map(lambda x: x[:80], base), jax.tree.map(lambda x: x[80:160], base),
             jax.tree.map(lambda x: x[160:], base)]  # two share a shape, one does not
    loss_fn, params = _mlp(base)
    full = dict(keep_epochs="all", record_gradients=True)
    trajs = tvj.finetune_tasks(loss_fn, params, tasks, optax.sgd(0.3), 3, **full)
    assert len(trajs) == 3
    for t, d in enumerate(tasks):
        single = tvj.finetune(loss_fn, params, d, optax.sgd(0.3), 3, **full)
        assert max_abs_diff(trajs[t].params, single.params) <= 1e-12
        assert max_abs_diff(trajs[t].epoch_gradients, single.epoch_gradients) <= 1e-12
        np.testing.assert_allclose(trajs[t].losses, single.losses, rtol=1e-12)
    key = jax.random.key(11)
    trajs = tvj.finetune_tasks(loss_fn, params, tasks, optax.adam(1e-2), 2, batch_size=16,
                               key=key)
    for t, d in enumerate(tasks):
        single = tvj.finetune(loss_fn, params, d, optax.adam(1e-2), 2, batch_size=16,
                              key=jax.random.fold_in(key, t))
        assert max_abs_diff(trajs[t].params, single.params) <= 1e-12


def test_multitask_with_one_task_equals_finetune_and_sums_gradients():
    base = digits(150)
    loss_fn, params = _mlp(base)
    single = tvj.finetune(loss_fn, params, base, optax.sgd(0.2), 3, keep_epochs="all")
    mt = tvj.multitask_finetune(loss_fn, params, [base], optax.sgd(0.2), 3, keep_epochs="all")
    assert max_abs_diff(mt.params, single.params) == 0.0
    tasks = [jax.tree.map(lambda x: x[:70], base), jax.tree.map(lambda x: x[70:], base)]
    w = jnp.array([0.25, 2.0])
    mt = tvj.multitask_finetune(loss_fn, params, tasks, optax.sgd(0.2), 1, weights=w)
    g = tvj.tree.add(tvj.tree.scale(0.25, jax.grad(loss_fn)(params, tasks[0])),
                     tvj.tree.scale(2.0, jax.grad(loss_fn)(params, tasks[1])))
    assert max_abs_diff(tvj.task_vector(mt.at(1), params), tvj.tree.scale(-0.2, g)) <= 1e-13
    # minibatch multitask runs, is deterministic, and visits max_t N_t // B steps
    a = tvj.multitask_finetune(loss_fn, params, tasks, optax.sgd(0.2), 2, batch_size=20,
                               key=jax.random.key(1))
    b = tvj.multitask_finetune(loss_fn, params, tasks, optax.sgd(0.2), 2, batch_size=20,
                               key=jax.random.key(1))
    assert max_abs_diff(a.params, b.params) == 0.0


@pytest.mark.parametrize("optimizer", [
    optax.sgd(0.5),
    optax.adam(1e-2),
    optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 30), weight_decay=1e-3),
], ids=["sgd", "adam", "adamw-schedule"])
def test_loss_decreases_on_real_digits(optimizer):
    data = digits(400)
    loss_fn, params = _mlp(data)
    traj = tvj.finetune(loss_fn, params, data, optimizer, 30)
    final = float(loss_fn(traj.final_params, data))
    assert final < 0.5 * float(traj.losses[0])
    mini = tvj.finetune(loss_fn, params, data, optimizer, 5, batch_size=32,
                        key=jax.random.key(0))
    assert float(loss_fn(mini.final_params, data)) < float(mini.losses[0])


def test_keep_epochs_stores_only_requested_snapshots():
    data = digits(64)
    loss_fn, params = _mlp(data)
    full = tvj.finetune(loss_fn, params, data, optax.sgd(0.4), 7, keep_epochs="all")
    some = tvj.finetune(loss_fn, params, data, optax.sgd(0.4), 7, keep_epochs=[0, 3, 5],
                        record_gradients=False)
    np.testing.assert_array_equal(some.epochs, [0, 3, 5, 7])  # the last is always kept
    assert jax.tree.leaves(some.params)[0].shape[0] == 4
    assert some.epoch_gradients is None
    for e in (0, 3, 5, 7):
        assert max_abs_diff(some.at(e), full.at(e)) == 0.0
    no_start = tvj.finetune(loss_fn, params, data, optax.sgd(0.4), 7, keep_epochs=[2])
    np.testing.assert_array_equal(no_start.epochs, [2, 7])
    assert max_abs_diff(no_start.at(2), full.at(2)) == 0.0
    with pytest.raises(ValueError, match="epoch 4 was not kept"):
        some.at(4)


def test_compiles_once_and_not_per_epoch():
    data = digits(50)
    model = MLP((8, 10), param_dtype=jnp.float64)
    inner = make_loss_fn(model)
    traces = []

    def counting(p, batch):
        traces.append(1)  # runs only while tracing
        return inner(p, batch)

    # shape check + one trace of the epoch body, not one per epoch; chex raises on a 4th
    loss_fn = chex.assert_max_traces(counting, n=3)
    params = init(model, data)
    opt = optax.sgd(0.1)
    tvj.finetune(loss_fn, params, data, opt, 40)
    first = len(traces)
    assert first <= 3
    tvj.finetune(loss_fn, params, data, opt, 40)
    tvj.finetune(loss_fn, tvj.tree.scale(2.0, params), data, opt, 40)
    assert len(traces) == first  # same shapes and config: cached, no retrace
    loss_fn = counting  # the minibatch program traces again, on purpose
    tvj.finetune(loss_fn, params, data, opt, 40, batch_size=10, key=jax.random.key(0))
    mini = len(traces)
    tvj.finetune(loss_fn, params, data, opt, 40, batch_size=10, key=jax.random.key(1))
    assert mini > first  # a new configuration compiles once ...
    assert len(traces) == mini  # ... and a new key does not retrace it


def test_progress_bar_shows_epochs_and_loss_and_is_silent_when_off(capsys):
    data = digits(32)
    loss_fn, params = _mlp(data)
    tvj.finetune(loss_fn, params, data, optax.sgd(0.1), 4, progress=2)
    err = capsys.readouterr().err  # tqdm writes to stderr
    assert "finetune" in err and "4/4" in err and "loss " in err
    tvj.finetune(loss_fn, params, data, optax.sgd(0.1), 4)
    jax.effects_barrier()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_bad_inputs_get_clear_errors():
    data = digits(20)
    loss_fn, params = _mlp(data)
    sgd = optax.sgd(0.1)
    with pytest.raises(ValueError, match="num_epochs must be a positive integer, got 0"):
        tvj.finetune(loss_fn, params, data, sgd, 0)
    with pytest.raises(ValueError, match="num_epochs must be a positive integer, got 2.5"):
        tvj.finetune(loss_fn, params, data, sgd, 2.5)
    with pytest.raises(ValueError, match="batch_size 32 exceeds the 20 examples of data"):
        tvj.finetune(loss_fn, params, data, sgd, 1, batch_size=32, key=jax.random.key(0))
    with pytest.raises(ValueError, match="needs a PRNG key"):
        tvj.finetune(loss_fn, params, data, sgd, 1, batch_size=4)
    with pytest.raises(ValueError, match="microbatch_size must be a positive integer"):
        tvj.finetune(loss_fn, params, data, sgd, 1, microbatch_size=0)
    with pytest.raises(ValueError, match="data is empty: leaf 'image' has 0 examples"):
        tvj.finetune(loss_fn, params, jax.tree.map(lambda x: x[:0], data), sgd, 1)
    with pytest.raises(ValueError, match="data is empty"):
        tvj.finetune(loss_fn, params, {}, sgd, 1)
    with pytest.raises(ValueError, match=r"leaf 'label' has 19 examples, leaf 'image' has 20"):
        tvj.finetune(loss_fn, params, {"image": data["image"], "label": data["label"][:19]},
                     sgd, 1)
    with pytest.raises(ValueError, match="params: leaf 'step' has dtype int32"):
        tvj.finetune(loss_fn, {**params, "step": jnp.int32(0)}, data, sgd, 1)
    with pytest.raises(ValueError, match=r"scalar mean loss; on data it returned shape \(20,\)"):
        tvj.finetune(lambda p, b: jnp.zeros(b["label"].shape[0]) + p["Dense_0"]["bias"][0],
                     params, data, sgd, 1)
    with pytest.raises(ValueError, match="optax.GradientTransformation"):
        tvj.finetune(loss_fn, params, data, "sgd", 1)
    with pytest.raises(ValueError, match=r"init\(params\) and update"):
        tvj.finetune(loss_fn, params, data, optax.sgd(0.1).update, 1)
    with pytest.raises(ValueError, match=r"keep_epochs must lie in \[0, num_epochs=3\]"):
        tvj.finetune(loss_fn, params, data, sgd, 3, keep_epochs=[5])
    with pytest.raises(ValueError, match="task_datasets is empty"):
        tvj.finetune_tasks(loss_fn, params, [], sgd, 1)
    with pytest.raises(ValueError, match="batch_size 16 exceeds the 10 examples of task 1"):
        tvj.finetune_tasks(loss_fn, params, [data, jax.tree.map(lambda x: x[:10], data)],
                           sgd, 1, batch_size=16, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"task 1: leaf 'label' has 3 examples"):
        tvj.multitask_finetune(loss_fn, params,
                               [data, {"image": data["image"], "label": data["label"][:3]}],
                               sgd, 1)
    with pytest.raises(ValueError, match="weights must have one entry per task"):
        tvj.multitask_finetune(loss_fn, params, [data, data], sgd, 1, weights=[1.0])
