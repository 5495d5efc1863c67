"""Divergence detection, optimizers beyond GradientTransformation, progress bars, and
the memory of the default Trajectory (issue 13, items 3, 5, 6, 9)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import taskvec_jax as tvj
from taskvec_jax.training import _engine


def _quadratic(p, batch):
    """L(w) = mean_i 0.5 * sum_j a_ij w_j^2: GD multiplies w_j by (1 - lr * mean a_j)."""
    return jnp.mean(0.5 * jnp.sum(batch["a"] * p["w"] ** 2, axis=-1))


def _diverging_run(num_epochs):
    """float32 GD with lr 1e6 on a = 1: |w| grows 1e6x per epoch; the loss overflows."""
    params = {"w": jnp.ones(3, jnp.float32)}
    data = {"a": jnp.ones((4, 3), jnp.float32)}
    return params, data


def _first_nonfinite_epoch(lr, num_epochs):
    """An independent float32 loop: the first epoch whose loss (at theta^(e-1)) or
    parameters theta^(e) are not finite, and the losses."""
    w = np.ones(3, np.float32)
    losses = []
    with np.errstate(over="ignore", invalid="ignore"):
        for e in range(1, num_epochs + 1):
            loss = np.float32(0.5) * np.sum(w * w, dtype=np.float32)
            w = (w - np.float32(lr) * w).astype(np.float32)
            losses.append(loss)
            if not (np.isfinite(loss) and np.all(np.isfinite(w))):
                return e, losses
    return None, losses


def test_divergence_raises_naming_the_epoch_and_the_last_finite_loss():
    params, data = _diverging_run(20)
    epoch, losses = _first_nonfinite_epoch(1e6, 20)
    assert epoch == 5  # 1.5, 1.5e12, 1.5e24, 1.5e36, inf
    last = re.escape(repr(float(losses[epoch - 2])))  # the loss of epoch 4, ~1.5e36
    with pytest.raises(FloatingPointError, match=rf"data: .*non-finite in epoch 5 "
                       rf".*last finite loss was {last} \(epoch 4\)"):
        tvj.finetune(_quadratic, params, data, optax.sgd(1e6), 20)
    raw = tvj.finetune(_quadratic, params, data, optax.sgd(1e6), 20, check_finite=False)
    assert not np.all(np.isfinite(raw.losses))
    np.testing.assert_allclose(raw.losses[:epoch - 1], losses[:epoch - 1], rtol=1e-6)


def test_divergence_names_the_task_in_finetune_tasks_and_multitask():
    params, data = _diverging_run(8)
    calm = {"a": jnp.full((4, 3), 1e-7, jnp.float32)}  # lr * a = 0.1: converges
    with pytest.raises(FloatingPointError, match="task 1: .*non-finite in epoch 5"):
        tvj.finetune_tasks(_quadratic, params, [calm, data], optax.sgd(1e6), 8)
    with pytest.raises(FloatingPointError, match="task 0: .*epoch 5"):  # not vmapped
        tvj.finetune_tasks(_quadratic, params, [data, {"a": calm["a"][:3]}],
                           optax.sgd(1e6), 8)
    with pytest.raises(FloatingPointError, match="multitask: .*epoch 5"):
        tvj.multitask_finetune(_quadratic, params, [calm, data], optax.sgd(1e6), 8)
    trajs = tvj.finetune_tasks(_quadratic, params, [calm, data], optax.sgd(1e6), 8,
                               check_finite=False)
    assert np.all(np.isfinite(trajs[0].losses)) and not np.all(np.isfinite(trajs[1].losses))


def _lowered_text(check_finite, progress, batch_size=None):
    """The StableHLO of the engine's program itself (white box: under a caller's jit the
    unused finite flags would be dead code, so the public path cannot show them)."""
    params, data = _diverging_run(2)
    key = None if batch_size is None else jax.random.key(0)
    cfg, consts = _engine.make_config(
        _quadratic, optax.sgd(0.1), 3, batch_size=batch_size, microbatch_size=None,
        drop_remainder=False, keep_epochs=None, record_gradients=False, progress=progress,
        key=key, sizes=[4], names=["data"], check_finite=check_finite)
    opt_state = optax.sgd(0.1).init(params)
    return _engine.run_jit.lower(params, opt_state, (data,), None, key, jnp.asarray(0),
                                 consts, cfg).as_text()


def test_off_switches_leave_nothing_in_the_program():
    for batch_size in (None, 2):
        plain = _lowered_text(check_finite=False, progress=False, batch_size=batch_size)
        assert "is_finite" not in plain and "callback" not in plain
    assert "is_finite" in _lowered_text(check_finite=True, progress=False)
    assert "callback" in _lowered_text(check_finite=False, progress=True)
    # the step bar's callback sits in the step loop: the epoch bar's does not
    epochs = _lowered_text(check_finite=False, progress="epochs", batch_size=2)
    steps = _lowered_text(check_finite=False, progress="steps", batch_size=2)
    assert "callback" in epochs and "callback" in steps
    assert _engine.make_config(
        _quadratic, optax.sgd(0.1), 3, batch_size=2, microbatch_size=None,
        drop_remainder=False, keep_epochs=None, record_gradients=False, progress="steps",
        key=jax.random.key(0), sizes=[4], names=["data"])[0].progress_steps
    with pytest.raises(ValueError, match="progress must be a bool, a positive int"):
        tvj.finetune(_quadratic, *_diverging_run(1), optax.sgd(0.1), 1, progress="step")


def _bar_lines(err: str) -> list[str]:
    """tqdm's refreshes (carriage returns and cursor moves) as separate lines."""
    return [line for line in re.split(r"[\r\n]|\x1b\[A", err) if line.strip()]


def test_progress_bar_labels_tasks(capsys):
    params, data = _diverging_run(2)
    small = {"a": data["a"][:3]}
    tvj.finetune_tasks(_quadratic, params, [data, data, small], optax.sgd(0.1), 3,
                       progress=True)
    lines = _bar_lines(capsys.readouterr().err)
    # one bar per task, also inside the vmapped group of tasks 0 and 1
    for t in range(3):
        assert any(line.startswith(f"task {t}:") and "3/3" in line and "loss" in line
                   for line in lines), t


def test_step_progress_bars_count_steps_per_task_with_the_epoch_and_loss(capsys):
    # 10 examples in steps of 4: 2 full steps and the leftover step, 3 per epoch; tasks 0
    # and 1 share shapes (one vmapped program), task 2 (8 examples: 2 steps) runs alone
    params = {"w": jnp.ones(3)}
    a = jnp.asarray(np.random.default_rng(0).uniform(0.5, 1.5, size=(10, 3)))
    tasks = [{"a": a}, {"a": a[::-1]}, {"a": a[:8]}]
    key = jax.random.key(2)
    trajs = tvj.finetune_tasks(_quadratic, params, tasks, optax.sgd(0.1), 2, batch_size=4,
                               key=key, progress="steps")
    lines = _bar_lines(capsys.readouterr().err)
    for t, total in ((0, 6), (1, 6), (2, 4)):
        mine = [line for line in lines if line.startswith(f"task {t}:")]
        last = [line for line in mine if f"{total}/{total}" in line]
        assert last and "epoch 2/2" in last[-1] and "loss " in last[-1], (t, mine)
        # every step was shown, in the order the steps ran (epoch 1's before epoch 2's)
        counts = [int(m.group(1)) for m in map(re.compile(rf"(\d+)/{total} ").search,
                                               mine) if m]
        assert sorted(set(counts)) == list(range(1, total + 1)), counts
        assert counts == sorted(counts), counts
        first2 = min(i for i, line in enumerate(mine) if "epoch 2/2" in line)
        assert all("epoch 2/2" not in line for line in mine[:first2])
        assert all("epoch 1/2" not in line for line in mine[first2:])
    # the same trajectories as without progress (the callbacks change nothing)
    quiet = tvj.finetune_tasks(_quadratic, params, tasks, optax.sgd(0.1), 2, batch_size=4,
                               key=key)
    for t in range(3):
        np.testing.assert_array_equal(trajs[t].params["w"], quiet[t].params["w"])
    # progress=True: an epoch bar below the threshold of steps, a step bar from it on
    n = _engine.STEP_PROGRESS_MIN_STEPS

    def steps_bar(num_examples, batch_size, **kw):
        return _engine.make_config(
            _quadratic, optax.sgd(0.1), 2, batch_size=batch_size, microbatch_size=None,
            keep_epochs=None, record_gradients=False, key=key, names=["a", "b"],
            sizes=num_examples, **kw)[0].progress_steps

    assert steps_bar([2 * n - 1], 2, progress=True, drop_remainder=False)  # leftover step
    assert not steps_bar([2 * n - 1], 2, progress=True, drop_remainder=True)
    assert not steps_bar([2 * n - 1, 10], 2, progress=True, drop_remainder=False)
    assert steps_bar([10, n], 1, progress=True, drop_remainder=False)  # multitask: max_t
    assert not steps_bar([n], None, progress="steps", drop_remainder=False)  # full batch


def test_multisteps_accumulates_then_steps():
    # MultiSteps(sgd, 2): epoch 1 only accumulates; epoch 2 applies the mean of the two
    # (equal) gradients at theta^(0): exactly one sgd step.
    params = {"w": jnp.array([1.0, -2.0, 0.5])}
    data = {"a": jnp.asarray(np.random.default_rng(1).uniform(0.5, 2.0, size=(6, 3)))}
    multi = tvj.finetune(_quadratic, params, data, optax.MultiSteps(optax.sgd(0.3), 2), 2,
                         keep_epochs="all")
    one = tvj.finetune(_quadratic, params, data, optax.sgd(0.3), 1)
    np.testing.assert_array_equal(multi.at(1)["w"], params["w"])
    # MultiSteps averages with float32 weights: equal to the sgd step to float32 rounding
    np.testing.assert_allclose(multi.at(2)["w"], one.final_params["w"], rtol=1e-7)
    # ... and exactly what optax's own loop over MultiSteps gives
    opt = optax.MultiSteps(optax.sgd(0.3), 2)
    state, p = opt.init(params), params
    for _ in range(2):
        updates, state = opt.update(jax.grad(_quadratic)(p, data), state, p)
        p = optax.apply_updates(p, updates)
    np.testing.assert_allclose(multi.at(2)["w"], p["w"], rtol=1e-14)


def _lbfgs_reference(loss_fn, params, data, num_steps):
    """optax's documented lbfgs loop (value_and_grad_from_state), full batch."""
    opt = optax.lbfgs()
    state = opt.init(params)
    fn = lambda p: loss_fn(p, data)  # noqa: E731
    value_and_grad = optax.value_and_grad_from_state(fn)

    @jax.jit
    def step(params, state):
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad,
                                    value_fn=fn)
        return optax.apply_updates(params, updates), state

    for _ in range(num_steps):
        params, state = step(params, state)
    return params


def test_lbfgs_gets_value_grad_and_value_fn_and_matches_optax_loop():
    rng = np.random.default_rng(2)
    data = {"x": jnp.asarray(rng.normal(size=(20, 3))), "y": jnp.asarray(rng.normal(size=20))}
    loss = lambda p, b: jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)  # noqa: E731
    params = {"w": jnp.zeros(3)}
    traj = tvj.finetune(loss, params, data, optax.lbfgs(), 2)
    ref = _lbfgs_reference(loss, params, data, 2)
    np.testing.assert_allclose(traj.final_params["w"], ref["w"], rtol=1e-10, atol=1e-12)
    assert float(traj.losses[-1]) < float(traj.losses[0])


def _bytes(tree):
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def test_default_trajectory_memory_for_vit_b32_is_two_snapshots():
    # Counted from shapes only (jax.eval_shape): CLIP ViT-B/32's image tower, float32,
    # 10 epochs of full-batch adam; the loss is a stand-in (memory does not depend on it).
    from taskvec_jax.clip import model as clip_model

    config = clip_model.get_config("ViT-B-32").vision
    tower = clip_model.CLIPVisionTransformer(config)
    image = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    params = jax.eval_shape(lambda x: tower.init(jax.random.key(0), x), image)["params"]
    per_copy = _bytes(params)
    num_params = per_copy // 4
    assert 87_000_000 < num_params < 89_000_000  # "88M"

    loss = lambda p, b: sum(jnp.sum(x) for x in jax.tree.leaves(p)) * jnp.mean(b["x"])  # noqa
    data = {"x": jax.ShapeDtypeStruct((8,), jnp.float32)}
    opt = optax.adam(1e-5)
    default = jax.eval_shape(lambda p, d: tvj.finetune(loss, p, d, opt, 10), params, data)
    everything = jax.eval_shape(lambda p, d: tvj.finetune(
        loss, p, d, opt, 10, keep_epochs="all", record_gradients=True), params, data)
    traj_default = _bytes((default.params, default.epoch_gradients, default.losses))
    traj_all = _bytes((everything.params, everything.epoch_gradients, everything.losses))
    assert default.epoch_gradients is None
    assert _bytes(default.params) == 2 * per_copy  # the start and the end
    assert traj_all == 21 * per_copy + 10 * 4     # 11 snapshots + 10 gradients + losses
    model_and_adam = per_copy + _bytes(default.opt_state)
    print(f"\nViT-B/32 image tower: {num_params:,} params, {per_copy / 2**20:.0f} MiB per "
          f"float32 copy; model + adam state {model_and_adam / 2**20:.0f} MiB; 10-epoch "
          f"Trajectory by default {traj_default / 2**20:.0f} MiB, with keep_epochs='all' "
          f"and record_gradients=True {traj_all / 2**20:.0f} MiB")
    assert traj_default <= model_and_adam
