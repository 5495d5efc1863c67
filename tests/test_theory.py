"""Theorem 1 of arXiv 2508.16082, checked numerically in float64.

* k = 1: task arithmetic after one epoch of full-batch GD IS one multitask GD step;
* k >= 2: the gap is lr^2 C_k + O(lr^3): slopes 2 and 3 on log-log axes;
* C_k from running sums of HVPs equals the double sum built from dense Hessians, with
  exactly T (k - 1) Hessian-vector products, counted at run time.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import taskvec_jax as tvj
from taskvec_jax import hessian, theory, tree
from taskvec_jax.models import MLP, make_loss_fn


def _tasks(num_tasks, n=12, dim=6, classes=4, seed=0, sizes=None):
    rng = np.random.default_rng(seed)
    out = []
    for t in range(num_tasks):
        m = n if sizes is None else sizes[t]
        out.append({"image": jnp.asarray(rng.normal(size=(m, dim)) * (1 + 0.3 * t)),
                    "label": jnp.asarray(rng.integers(0, classes, size=m))})
    return out


@functools.cache
def _model(activation, features=(8, 4), loss="cross_entropy", dim=6):
    model = MLP(features=features, activation=activation, param_dtype=jnp.float64)
    params = model.init(jax.random.key(0), jnp.zeros((1, dim)))["params"]
    return make_loss_fn(model, loss), params


def _flat(x):
    return np.asarray(tree.ravel(x)[0])


# --------------------------------------------------------------------------- k = 1

@pytest.mark.parametrize("activation", ["tanh", "softplus", "relu"])
@pytest.mark.parametrize("num_tasks", [2, 5])
def test_one_epoch_task_arithmetic_is_one_multitask_step(activation, num_tasks):
    loss_fn, params = _model(activation)
    tasks = _tasks(num_tasks, seed=num_tasks)
    lr, alpha = 0.3, 0.7
    gap = theory.task_arithmetic_gap(loss_fn, params, tasks, lr, alpha, 2)
    assert float(gap.gap_max_abs[0]) <= 1e-13
    # Not vacuous: the second epoch already differs, and the step moved the model.
    assert float(gap.gap_norms[1]) > 1e-6
    # Independent check of the multitask side: theta_0 - alpha lr sum_t grad L_t.
    grads = [jax.grad(loss_fn)(params, d) for d in tasks]
    expected = jax.tree.map(lambda p, *g: p - alpha * lr * sum(g), params, *grads)
    np.testing.assert_allclose(_flat(jax.tree.map(lambda x: x[0], gap.multitask)),
                               _flat(expected), rtol=0, atol=1e-14)
    assert np.max(np.abs(_flat(expected) - _flat(params))) > 1e-3


def test_gap_uses_the_same_steps_as_optax_sgd():
    loss_fn, params = _model("tanh")
    tasks = _tasks(3)
    lr, alpha, k = 0.2, 1.3, 3
    gap = theory.task_arithmetic_gap(loss_fn, params, tasks, lr, alpha, k)
    trajs = tvj.finetune_tasks(loss_fn, params, tasks, optax.sgd(lr), k)
    mt = tvj.multitask_finetune(loss_fn, params, tasks, optax.sgd(alpha * lr), k)
    taus = [tvj.task_vector(tr.final_params, params) for tr in trajs]
    ta = tvj.apply(params, functools.reduce(tree.add, taus), alpha)
    np.testing.assert_allclose(_flat(jax.tree.map(lambda x: x[-1], gap.task_arithmetic)),
                               _flat(ta), rtol=0, atol=1e-14)
    np.testing.assert_allclose(_flat(jax.tree.map(lambda x: x[-1], gap.multitask)),
                               _flat(mt.final_params), rtol=0, atol=1e-14)
    np.testing.assert_array_equal(gap.epochs, [1, 2, 3])


def test_multitask_gd_matches_the_engine():
    loss_fn, params = _model("softplus")
    tasks = _tasks(3, sizes=[12, 7, 12])
    mt = tvj.multitask_finetune(loss_fn, params, tasks, optax.sgd(0.5 * 0.3), 4,
                                keep_epochs="all")
    ours = jax.jit(lambda p: theory.multitask_gd(loss_fn, p, tasks, 0.3, 0.5, 4))(params)
    np.testing.assert_allclose(_flat(ours), _flat(mt.params), rtol=0, atol=1e-14)


def test_minibatch_sgd_breaks_the_one_epoch_equality():
    loss_fn, params = _model("tanh")
    tasks = _tasks(2, n=12)
    full = theory.task_arithmetic_gap(loss_fn, params, tasks, 0.2, 1.0, 1)
    sgd = theory.task_arithmetic_gap(loss_fn, params, tasks, 0.2, 1.0, 1, batch_size=4,
                                     key=jax.random.key(0))
    assert float(full.gap_max_abs[0]) <= 1e-14
    assert float(sgd.gap_norms[0]) > 1e-4


# --------------------------------------------------------------------------- k >= 2

@pytest.mark.parametrize("activation", ["tanh", "softplus"])
def test_gap_is_second_order_in_lr_and_c_k_is_its_coefficient(activation):
    loss_fn, params = _model(activation)
    tasks = _tasks(3, seed=7)
    alpha, num_epochs = 0.8, 5
    lrs = np.logspace(-3, -2, 5)  # one decade
    gaps, residuals = [], {h: [] for h in theory.HESSIAN_AT}
    for lr in lrs:
        gap = theory.task_arithmetic_gap(loss_fn, params, tasks, lr, alpha, num_epochs)
        gaps.append(np.asarray(gap.gap_norms))
        for h in theory.HESSIAN_AT:
            c = theory.second_order_term(loss_fn, params, tasks, lr, alpha, num_epochs,
                                         hessian_at=h, all_epochs=True)
            res = tree.sub(gap.gap, tree.scale(lr ** 2, c))
            residuals[h].append(np.asarray(jax.vmap(tree.norm)(res)))
    gaps = np.array(gaps)
    for k in range(2, num_epochs + 1):
        slope = np.polyfit(np.log(lrs), np.log(gaps[:, k - 1]), 1)[0]
        assert abs(slope - 2) <= 0.1, (k, slope)
        for h in theory.HESSIAN_AT:
            res = np.array(residuals[h])[:, k - 1]
            slope3 = np.polyfit(np.log(lrs), np.log(res), 1)[0]
            assert abs(slope3 - 3) <= 0.15, (h, k, slope3)
            # lr^2 C_k captures the gap: the residual is a small fraction of it.
            assert np.all(res < 0.1 * gaps[:, k - 1])


# --------------------------------------------------------------------------- C_k exactly

def _dense_second_order(loss_fn, params, tasks, lr, alpha, num_epochs, hessian_at):
    """C_1..C_K from dense jax.hessian and the explicit double sum (no running sums)."""
    flat0, unravel = tree.ravel(params)

    def loss_t(f, d):
        return loss_fn(unravel(f), d)

    grad_fn, hess_fn = jax.jit(jax.grad(loss_t)), jax.jit(jax.hessian(loss_t))
    thetas = [flat0]
    for _ in range(num_epochs):
        g = sum(grad_fn(thetas[-1], d) for d in tasks)
        thetas.append(thetas[-1] - alpha * lr * g)
    grads = [[np.asarray(grad_fn(th, d)) for d in tasks] for th in thetas]
    hess = [[np.asarray(hess_fn(th, d)) for d in tasks] for th in thetas]
    resid = [[g[t] - alpha * sum(g) for t in range(len(tasks))] for g in grads]
    out = []
    for k in range(1, num_epochs + 1):
        c = np.zeros_like(np.asarray(flat0))
        for t in range(len(tasks)):
            for e in range(1, k):
                h = hess[e][t] if hessian_at == "current" else hess[e - 1][t]
                c += alpha * h @ sum(resid[m][t] for m in range(e))
        out.append(c)
    return np.stack(out)


@pytest.mark.parametrize("hessian_at", theory.HESSIAN_AT)
def test_second_order_term_equals_the_dense_hessian_double_sum(hessian_at):
    loss_fn, params = _model("tanh", features=(3, 3), dim=3)
    tasks = _tasks(3, n=5, dim=3, classes=3, seed=3, sizes=[5, 4, 5])
    lr, alpha, num_epochs = 0.4, 0.6, 4
    dense = _dense_second_order(loss_fn, params, tasks, lr, alpha, num_epochs, hessian_at)
    ours = theory.second_order_term(loss_fn, params, tasks, lr, alpha, num_epochs,
                                    hessian_at=hessian_at, all_epochs=True)
    ours = np.stack([_flat(c) for c in tree.unstack(ours)])
    assert np.all(ours[0] == 0)
    for k in range(2, num_epochs + 1):
        err = np.linalg.norm(ours[k - 1] - dense[k - 1]) / np.linalg.norm(dense[k - 1])
        assert err <= 1e-10, (k, err)
    # C_K alone is the last of them; microbatching changes nothing.
    last = theory.second_order_term(loss_fn, params, tasks, lr, alpha, num_epochs,
                                    hessian_at=hessian_at, microbatch_size=2)
    np.testing.assert_allclose(_flat(last), ours[-1], rtol=1e-12, atol=1e-14)


def test_second_order_term_uses_exactly_t_times_k_minus_1_hvps():
    loss_fn, params = _model("tanh", features=(3, 3), dim=3)
    tasks = _tasks(3, n=5, dim=3, classes=3, seed=3, sizes=[5, 4, 5])  # a vmapped pair + one
    calls = []

    def counting_hvp(loss_fn, params, data, v, microbatch_size=None):
        # Runs once per real evaluation (per task under vmap, per executed scan step).
        jax.debug.callback(lambda n: calls.append(float(n)), tree.norm(v))
        return hessian.hvp(loss_fn, params, data, v, microbatch_size=microbatch_size)

    for hessian_at, num_epochs in [("current", 1), ("current", 4), ("previous", 4)]:
        calls.clear()
        c = theory.second_order_term(loss_fn, params, tasks, 0.4, 0.6, num_epochs,
                                     hessian_at=hessian_at, hvp_fn=counting_hvp)
        jax.block_until_ready(c)
        jax.effects_barrier()
        assert len(calls) == len(tasks) * (num_epochs - 1), (hessian_at, num_epochs)
    # The counted run computes the same C_k as the default one.
    plain = theory.second_order_term(loss_fn, params, tasks, 0.4, 0.6, 4,
                                     hessian_at="previous")
    np.testing.assert_allclose(_flat(c), _flat(plain), rtol=1e-13, atol=1e-15)


def test_second_order_term_vmaps_over_step_sizes():
    loss_fn, params = _model("tanh", features=(3, 3), dim=3)
    tasks = _tasks(2, n=5, dim=3, classes=3)
    lrs = jnp.array([0.01, 0.1, 0.3])
    batched = jax.jit(jax.vmap(lambda lr: theory.second_order_term(
        loss_fn, params, tasks, lr, 0.5, 3)))(lrs)
    for i, lr in enumerate(lrs):
        one = theory.second_order_term(loss_fn, params, tasks, float(lr), 0.5, 3)
        np.testing.assert_allclose(_flat(jax.tree.map(lambda x: x[i], batched)),
                                   _flat(one), rtol=1e-12, atol=1e-15)


def test_trajectory_curvature_measures_the_true_norms():
    loss_fn, params = _model("tanh", features=(3, 3), dim=3)
    tasks = _tasks(2, n=5, dim=3, classes=3)
    curv = theory.trajectory_curvature(loss_fn, params, tasks, 0.3, 0.8, 2,
                                       jax.random.key(0), tol=1e-13, max_steps=5000)
    assert curv.grad_norms.shape == (3, 2) and bool(curv.converged.all())
    _, unravel = tree.ravel(params)
    grad_fn = jax.jit(jax.grad(lambda x, d: loss_fn(unravel(x), d)))
    hess_fn = jax.jit(jax.hessian(lambda x, d: loss_fn(unravel(x), d)))
    for e, theta in enumerate(tree.unstack(curv.params)):
        f = tree.ravel(theta)[0]
        for t, d in enumerate(tasks):
            g, h = grad_fn(f, d), hess_fn(f, d)
            np.testing.assert_allclose(curv.grad_norms[e, t], np.linalg.norm(g),
                                       rtol=1e-12)
            exact = np.max(np.abs(np.linalg.eigvalsh(np.asarray(h))))
            assert abs(float(curv.hessian_norms[e, t]) - exact) <= 1e-6 * exact


def test_errors_name_the_problem():
    loss_fn, params = _model("tanh")
    tasks = _tasks(2)
    with pytest.raises(ValueError, match="hessian_at"):
        theory.second_order_term(loss_fn, params, tasks, 0.1, 1.0, 2, hessian_at="next")
    with pytest.raises(ValueError, match="num_epochs"):
        theory.second_order_term(loss_fn, params, tasks, 0.1, 1.0, 0)
    with pytest.raises(ValueError, match="empty"):
        theory.task_arithmetic_gap(loss_fn, params, [], 0.1, 1.0, 2)
    with pytest.raises(ValueError, match="task 1"):
        theory.multitask_gd(loss_fn, params, [tasks[0], {"image": jnp.zeros((0, 6)),
                                                         "label": jnp.zeros((0,), int)}],
                            0.1, 1.0, 2)
    with pytest.raises(ValueError, match="'step'"):
        theory.second_order_term(loss_fn, {**params, "step": jnp.zeros((), jnp.int32)},
                                 tasks, 0.1, 1.0, 2)
    with pytest.raises(TypeError, match="keep_epochs"):
        theory.task_arithmetic_gap(loss_fn, params, tasks, 0.1, 1.0, 2, keep_epochs=[1])
