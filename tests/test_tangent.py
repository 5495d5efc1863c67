"""taskvec_jax.tangent: linearization, Theorem 1 in the tangent space, NTK, disentanglement.

Everything is float64 on tiny models, so identities are checked to rounding.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import taskvec_jax as tvj
from taskvec_jax import tangent, tree
from taskvec_jax.models import MLP, make_loss_fn
from taskvec_jax.training import finetune

from tests.helpers import digits, init, max_abs_diff, rng_tree

TOL = 1e-12


def _mlp(p, x):
    """A tanh MLP 16-6-4 as a plain function (flax's naming): cheap to trace."""
    h = jnp.tanh(x.reshape(x.shape[0], -1) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


@functools.lru_cache(maxsize=None)
def _setup():
    """The flax twin of ``_mlp``, its parameters and three small digit tasks (float64)."""
    model = MLP((6, 4), "tanh", param_dtype=jnp.float64)
    tasks = [{"image": d["image"][:, :4, :4], "label": d["label"] % 4}
             for d in (digits(12, 20 * t) for t in range(3))]
    params = init(model, tasks[0])
    params = jax.tree.map(lambda a: a + 0.1 * jnp.ones_like(a) if a.ndim == 1 else a,
                          params)                       # non-zero biases
    return model, _mlp, params, tasks


def _dense_jacobian(apply_fn, params, x):
    """``[N * O, P]`` Jacobian of the flattened outputs, from jax.jacobian (reference)."""
    flat, unravel = tree.ravel(params)
    jac = jax.jit(jax.jacobian(lambda v: apply_fn(unravel(v), x).reshape(-1)))(flat)
    return jac, flat, unravel


# --------------------------------------------------------------------------- linearize

def test_linearize_is_the_first_order_taylor_expansion():
    _, f, p0, tasks = _setup()
    x = tasks[0]["image"]
    d = tree.scale(0.1, rng_tree(1, p0))
    f_lin = jax.jit(tvj.linearize(f, p0))
    jac, flat, _ = _dense_jacobian(f, p0, x)
    expected = f(p0, x) + (jac @ tree.ravel(d)[0]).reshape(f(p0, x).shape)
    got = f_lin(tree.add(p0, d), x)
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)
    np.testing.assert_allclose(got, f(p0, x) + jax.jvp(lambda p: f(p, x), (p0,), (d,))[1],
                               rtol=0, atol=TOL)
    # at the expansion point it IS the model: the tangent term is exactly zero, so f_lin
    # returns the model's own output bit for bit, eager and under jit (each compared within
    # one evaluation mode: XLA promises no bitwise agreement between a jitted program and
    # its eager twin, and with other optimization levels they do differ by an ulp)
    np.testing.assert_array_equal(tvj.linearize(f, p0)(p0, x), f(p0, x))
    np.testing.assert_array_equal(f_lin(p0, x), jax.jit(f)(p0, x))
    out, jvp = tangent.linear_term(f, p0, d, x)
    np.testing.assert_allclose(out + jvp, got, rtol=0, atol=TOL)


def test_linearization_error_is_second_order():
    _, f, p0, tasks = _setup()
    x = tasks[0]["image"]
    d = rng_tree(2, p0)
    f_lin = tvj.linearize(f, p0)
    eps = np.array([1e-2, 5e-3, 2.5e-3])
    err = [float(jnp.linalg.norm(f(tree.add_scale(p0, e, d), x)
                                 - f_lin(tree.add_scale(p0, e, d), x))) for e in eps]
    slope = np.polyfit(np.log(eps), np.log(err), 1)[0]
    assert abs(slope - 2.0) < 0.02, slope


def _affine(p, x):
    return x.reshape(x.shape[0], -1) @ p["w"] + p["b"]


def _affine_params():
    rng = np.random.default_rng(0)
    return {"w": jnp.asarray(rng.normal(size=(16, 3))), "b": jnp.asarray(rng.normal(size=3))}


def test_linearize_is_exact_for_a_model_linear_in_its_parameters():
    p0 = _affine_params()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(7, 16)))
    f_lin = tvj.linearize(_affine, p0)
    for seed in range(3):
        p = rng_tree(10 + seed, p0)
        np.testing.assert_allclose(f_lin(p, x), _affine(p, x), rtol=0, atol=TOL)


def test_one_epoch_of_full_batch_gd_on_the_linearized_model_is_minus_lr_grad():
    _, f, p0, tasks = _setup()
    f_lin = tvj.linearize(f, p0)
    loss_lin = make_loss_fn(f_lin)
    lr = 0.3
    traj = finetune(loss_lin, p0, tasks[0], optax.sgd(lr), 1)
    g_lin = jax.jit(jax.grad(loss_lin))(p0, tasks[0])
    step = tree.sub(traj.final_params, p0)
    assert max_abs_diff(step, tree.scale(-lr, g_lin)) <= 1e-15
    # f_lin and f agree in value and Jacobian at p0, so the first gradients agree too
    g = jax.jit(jax.grad(make_loss_fn(f)))(p0, tasks[0])
    assert max_abs_diff(g_lin, g) <= TOL


def test_minibatch_finetuning_of_a_linearized_linear_model_equals_the_model():
    """f_lin == f for a linear model, so the engine's minibatch runs coincide."""
    p0 = _affine_params()
    data = jax.tree.map(lambda a: a[:40], digits(40))
    data = {"image": data["image"][:, :4, :4], "label": data["label"] % 3}
    key = jax.random.key(3)
    kw = dict(batch_size=8, key=key, record_gradients=False)
    lin = finetune(make_loss_fn(tvj.linearize(_affine, p0)), p0, data, optax.adam(0.05), 3,
                   **kw)
    ref = finetune(make_loss_fn(_affine), p0, data, optax.adam(0.05), 3, **kw)
    assert max_abs_diff(lin.params, ref.params) <= 1e-10
    assert float(lin.losses[-1]) < float(lin.losses[0])


def test_linearized_model_composes_with_jit_vmap_and_grad():
    _, f, p0, tasks = _setup()
    x = tasks[0]["image"]
    f_lin = tvj.linearize(f, p0)
    deltas = [tree.scale(0.1, rng_tree(s, p0)) for s in range(3)]
    points = [tree.add(p0, d) for d in deltas]
    eager = jnp.stack([f_lin(p, x) for p in points])
    np.testing.assert_allclose(jax.jit(f_lin)(points[1], x), eager[1], rtol=0, atol=TOL)
    np.testing.assert_allclose(jax.vmap(f_lin, in_axes=(0, None))(tree.stack(points), x),
                               eager, rtol=0, atol=TOL)
    # grad: d/dp sum f_lin(p) = J(p0)^T 1, the same at every p (f_lin is affine)
    jac, _, unravel = _dense_jacobian(f, p0, x)
    want = jac.sum(0)
    for p in points[:2]:
        got = jax.jit(jax.grad(lambda q: jnp.sum(f_lin(q, x))))(p)
        np.testing.assert_allclose(tree.ravel(got)[0], want, rtol=0, atol=TOL)
    # linearized_apply traces the expansion point: vmap over base models
    bases = tree.stack(points)
    g = tangent.linearized_apply(f)
    batched = jax.vmap(g, in_axes=(0, 0, None))(bases, tree.stack([p0] * 3), x)
    loop = jnp.stack([tvj.linearize(f, b)(p0, x) for b in points])
    np.testing.assert_allclose(batched, loop, rtol=0, atol=TOL)


def test_merged_outputs_converts_between_nonlinear_and_linearized_evaluation():
    _, f, p0, tasks = _setup()
    x = tasks[1]["image"]
    tvs = [tree.scale(0.2, rng_tree(s, p0)) for s in (4, 5)]
    alpha = jnp.array([0.7, -0.4])
    merged = tree.add(p0, tree.add(tree.scale(0.7, tvs[0]), tree.scale(-0.4, tvs[1])))
    np.testing.assert_allclose(tangent.merged_outputs(f, p0, tvs, alpha, x),
                               f(merged, x), rtol=0, atol=TOL)
    np.testing.assert_allclose(tangent.merged_outputs(f, p0, tvs, alpha, x, linearized=True),
                               tvj.linearize(f, p0)(merged, x), rtol=0, atol=TOL)


def test_linearize_errors_name_the_leaf_path():
    _, f, p0, tasks = _setup()
    x = tasks[0]["image"]
    f_lin = tvj.linearize(f, p0)
    missing = {"Dense_0": p0["Dense_0"], "Dense_1": {"kernel": p0["Dense_1"]["kernel"]}}
    with pytest.raises(ValueError, match="missing leaf 'Dense_1/bias'"):
        f_lin(missing, x)
    wrong = jax.tree.map(lambda a: a, p0)
    wrong["Dense_0"] = {**p0["Dense_0"], "kernel": jnp.zeros((16, 7))}
    with pytest.raises(ValueError, match=r"'Dense_0/kernel' has shape \(16, 7\), params0 "
                                         r"has \(16, 6\)"):
        f_lin(wrong, x)
    with pytest.raises(ValueError, match=r"params0: leaf 'step' has dtype int"):
        tvj.linearize(f, {**p0, "step": jnp.zeros((), jnp.int32)})
    with pytest.raises(ValueError, match="task vector 1: .*'Dense_1/bias'"):
        tangent.merged_outputs(f, p0, [p0, missing], 1.0, x)
    with pytest.raises(ValueError, match="one entry per task vector"):
        tangent.merged_outputs(f, p0, [p0, p0], jnp.ones(3), x)


# --------------------------------------------------------------------------- Theorem 1

def test_hessian_of_a_linearized_loss_is_the_gauss_newton_matrix():
    """For f_lin the Hessian of l(f_lin(theta)) is J^T H_l J exactly (cross-entropy)."""
    _, f, p0, tasks = _setup()
    data = tasks[0]
    theta = tree.add(p0, tree.scale(0.3, rng_tree(6, p0)))   # away from p0: H_l varies
    loss_lin = make_loss_fn(tvj.linearize(f, p0))
    v = rng_tree(7, p0)
    hv = jax.jit(lambda t, u: tvj.hessian.hvp(loss_lin, t, data, u))(theta, v)
    jac, _, _ = _dense_jacobian(f, p0, data["image"])        # J of f at p0 == of f_lin
    out = tvj.linearize(f, p0)(theta, data["image"])
    h_out = jax.jit(jax.hessian(lambda o: make_loss_fn(lambda _, __: o.reshape(out.shape))(
        None, data)))(out.reshape(-1))
    gn = jac.T @ (h_out @ (jac @ tree.ravel(v)[0]))
    np.testing.assert_allclose(tree.ravel(hv)[0], gn, rtol=0, atol=TOL)


@functools.lru_cache(maxsize=None)
def _squared_setup():
    _, f, p0, tasks = _setup()
    loss = make_loss_fn(tvj.linearize(f, p0), "mse")
    return loss, p0, tasks


@pytest.mark.parametrize("lr", [0.05, 0.4])
def test_quadratic_gap_equals_the_engine_gap_of_a_linearized_squared_loss(lr):
    loss, p0, tasks = _squared_setup()
    alpha, k = 0.7, 3          # the programs of the next test are shared (same k)
    engine = tvj.theory.task_arithmetic_gap(loss, p0, tasks, lr, alpha, k)  # lr positional
    closed = tangent.quadratic_gap(loss, p0, tasks, lr, alpha, k)
    scale = float(jnp.max(jax.vmap(tree.norm)(engine.gap)))
    assert scale > 1e-4                                      # a real gap, not zeros
    assert max_abs_diff(closed.gap, engine.gap) <= 1e-13
    assert max_abs_diff(jax.tree.map(lambda a: a[0], closed.gap), tree.zeros_like(p0)) == 0


def test_tangent_theorem1_k2_is_exactly_lr_squared_c2_and_k3_has_an_exact_lr_cubed_term():
    loss, p0, tasks = _squared_setup()
    alpha = 0.7
    powers = tangent.quadratic_gap(loss, p0, tasks, 0.1, alpha, 3).powers
    p1, p2 = (jax.tree.map(lambda a, i=i: a[i], powers) for i in (0, 1))
    for lr in (0.02, 0.1, 0.3):
        gap = tvj.theory.task_arithmetic_gap(loss, p0, tasks, lr, alpha, 3).gap
        c = {h: tvj.theory.second_order_term(loss, p0, tasks, lr, alpha, 3, hessian_at=h,
                                             all_epochs=True)
             for h in ("current", "previous")}
        # constant Hessian: both indexings of C_k coincide
        assert max_abs_diff(c["current"], c["previous"]) <= 1e-13
        c2 = jax.tree.map(lambda a: a[1], c["current"])
        # C_2 = alpha sum_t H_t r_t(theta_0) = alpha P_1, independent of lr
        assert max_abs_diff(c2, tree.scale(alpha, p1)) <= 1e-13
        # k = 2: the gap is lr^2 C_2 with no remainder at all
        gap2 = jax.tree.map(lambda a: a[1], gap)
        assert max_abs_diff(tree.scale(1 / lr ** 2, gap2), c2) <= 1e-11
        # k = 3: gap = 3 alpha lr^2 P_1 - alpha lr^3 P_2 exactly
        gap3 = jax.tree.map(lambda a: a[2], gap)
        rest = tree.sub(gap3, tree.scale(3 * alpha * lr ** 2, p1))
        assert max_abs_diff(tree.scale(1 / lr ** 3, rest), tree.scale(-alpha, p2)) <= 1e-10


def test_tangent_theorem1_residual_after_c_k_has_slope_three():
    """gap - lr^2 C_k(lr) is O(lr^3) but not zero for k = 3 (C_3 follows the trajectory)."""
    loss, p0, tasks = _squared_setup()
    lrs = np.array([0.02, 0.01, 0.005])
    res = []
    for lr in lrs:
        gap = jax.tree.map(lambda a: a[2],
                           tvj.theory.task_arithmetic_gap(loss, p0, tasks, lr, 0.7, 3).gap)
        c3 = tvj.theory.second_order_term(loss, p0, tasks, lr, 0.7, 3)
        res.append(float(tree.norm(tree.sub(gap, tree.scale(lr ** 2, c3)))))
    slope = np.polyfit(np.log(lrs), np.log(res), 1)[0]
    assert abs(slope - 3.0) < 0.02, slope


# --------------------------------------------------------------------------- NTK

def test_empirical_ntk_equals_dense_jacobian_gram():
    _, f, p0, tasks = _setup()
    x1, x2 = tasks[0]["image"][:5], tasks[1]["image"][:3]
    j1, _, _ = _dense_jacobian(f, p0, x1)
    j2, _, _ = _dense_jacobian(f, p0, x2)
    o = 4
    full = (j1 @ j2.T).reshape(5, o, 3, o).transpose(0, 2, 1, 3)
    got = tangent.empirical_ntk(f, p0, x1, x2, trace=False)
    np.testing.assert_allclose(got, full, rtol=0, atol=TOL)
    chunked = tangent.empirical_ntk(f, p0, x1, x2, trace=False, chunk_size=5)
    np.testing.assert_allclose(chunked, full, rtol=0, atol=TOL)
    np.testing.assert_allclose(tangent.empirical_ntk(f, p0, x1, x2, chunk_size=2),
                               np.einsum("ijaa->ij", full) / o, rtol=0, atol=TOL)
    sym = tangent.empirical_ntk(f, p0, x1)
    np.testing.assert_allclose(sym, sym.T, rtol=0, atol=TOL)
    assert np.all(np.linalg.eigvalsh(np.asarray(sym)) > -1e-10)


def _neural_tangents_empirical():
    """neural_tangents' own ``empirical`` module (0.6.5, the last release).

    Its package ``__init__`` imports TensorFlow (for ``experimental``) and its module code
    imports names that jax 0.10 moved (``jax.core.Jaxpr`` -> ``jax.extend.core``,
    ``jax.util.safe_map``); those are aliased only while its module is imported and
    removed again, and the package ``__init__`` is bypassed. The kernel code itself runs
    unchanged.
    """
    if "neural_tangents._src.empirical" in sys.modules:
        return sys.modules["neural_tangents._src.empirical"]
    spec = importlib.util.find_spec("neural_tangents")
    assert spec is not None, ("neural-tangents is not installed: bash scripts/setup.sh "
                              "installs it (with --no-deps) for the parity extra")
    import jax.extend.core as ext_core
    import jax.interpreters.ad as ad

    added = []
    for name in ("Jaxpr", "JaxprEqn", "Literal", "Var", "Primitive"):
        if not hasattr(jax.core, name):
            setattr(jax.core, name, getattr(ext_core, name))
            added.append((jax.core, name))
    if not hasattr(ad, "zeros_like_p"):   # used only as a key of a rules table
        ad.zeros_like_p = ext_core.Primitive("zeros_like")
        added.append((ad, "zeros_like_p"))
    util_added = "jax.util" not in sys.modules
    if util_added:
        util = types.ModuleType("jax.util")
        util.safe_map = lambda f, *a: list(map(f, *a))
        util.safe_zip = lambda *a: list(zip(*a))
        sys.modules["jax.util"] = util
    sys.modules.setdefault("neural_tangents", types.ModuleType("neural_tangents"))
    sys.modules["neural_tangents"].__path__ = list(spec.submodule_search_locations)
    try:
        import neural_tangents._src.empirical as empirical
    finally:
        for module, name in added:
            delattr(module, name)
        if util_added:
            del sys.modules["jax.util"]
    return empirical


def test_empirical_ntk_matches_neural_tangents_on_a_flax_model():
    empirical = _neural_tangents_empirical()
    model, f, p0, tasks = _setup()
    x1, x2 = tasks[0]["image"][:4], tasks[2]["image"][:3]

    def apply_fn(p, x):          # the flax model, in neural_tangents' apply_fn(params, x)
        return model.apply({"params": p}, x)

    np.testing.assert_allclose(apply_fn(p0, x1), f(p0, x1), rtol=0, atol=TOL)

    ours_full = tangent.empirical_ntk(f, p0, x1, x2, trace=False, chunk_size=4)
    ours = np.einsum("ijaa->ij", ours_full) / ours_full.shape[-1]   # trace=True's formula
    impl = empirical.NtkImplementation
    theirs_full = empirical.empirical_ntk_fn(apply_fn, trace_axes=(), vmap_axes=0,
                                             implementation=impl.JACOBIAN_CONTRACTION)(
        x1, x2, p0)
    np.testing.assert_allclose(ours_full, theirs_full, rtol=0, atol=TOL)
    theirs = empirical.empirical_ntk_fn(apply_fn, vmap_axes=0,
                                        implementation=impl.NTK_VECTOR_PRODUCTS)(x1, x2, p0)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOL)


def test_kernel_alignment_and_cross_task_kernel():
    _, f, p0, tasks = _setup()
    k = tangent.empirical_ntk(f, p0, tasks[0]["image"][:6])
    assert abs(float(tangent.kernel_alignment(k, 3.0 * k)) - 1) < TOL
    m = np.asarray(k)
    h = np.eye(6) - 1 / 6
    ref = np.asarray(jnp.ones((6, 6)) + jnp.eye(6))
    kc, rc = h @ m @ h, h @ ref @ h
    want = np.sum(kc * rc) / (np.linalg.norm(kc) * np.linalg.norm(rc))
    assert abs(float(tangent.kernel_alignment(k, ref)) - want) < TOL
    want_unc = np.sum(m * ref) / (np.linalg.norm(m) * np.linalg.norm(ref))
    assert abs(float(tangent.kernel_alignment(k, ref, centered=False)) - want_unc) < TOL
    labels = tasks[0]["label"][:6]
    y = np.eye(10)[np.asarray(labels)]
    assert abs(float(tangent.kernel_target_alignment(k, labels, 10))
               - float(tangent.kernel_alignment(k, y @ y.T))) < TOL
    inputs = [t["image"][:3] for t in tasks]
    a, gram = tangent.cross_task_kernel(f, p0, inputs, chunk_size=7)
    np.testing.assert_allclose(np.diag(a), 1.0, rtol=0, atol=TOL)
    blocks = np.asarray(gram).reshape(3, 3, 3, 3).transpose(0, 2, 1, 3)
    norms = np.linalg.norm(blocks, axis=(2, 3))
    np.testing.assert_allclose(a, norms / np.sqrt(np.outer(np.diag(norms), np.diag(norms))),
                               rtol=0, atol=TOL)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        tangent.empirical_ntk(f, p0, inputs[0], chunk_size=0)
    with pytest.raises(ValueError, match="square Grams of one shape"):
        tangent.kernel_alignment(k, k[:3])


# --------------------------------------------------------------------------- disentanglement

def test_disentanglement_error_exact_cases():
    _, f, p0, tasks = _setup()
    inputs = [t["image"] for t in tasks[:2]]
    tau = tree.scale(0.5, rng_tree(8, p0))
    zero = tree.zeros_like(p0)
    grid = tangent.alpha_grid(jnp.linspace(-1.0, 2.0, 4))   # row 5 is (0, 0)
    for linearized in (False, True):
        for distance in tangent.DISTANCES:
            kw = dict(distance=distance, linearized=linearized)
            # one task: the merge IS the task's own model
            one = tangent.disentanglement_error(f, p0, [tau], inputs[:1], grid[:, :1], **kw)
            np.testing.assert_allclose(one, 0.0, rtol=0, atol=TOL)
            # tau_2 = 0: task 1's term is exactly 0; xi ignores alpha_2 and equals the
            # interference of alpha_1 tau_1 on task 2's inputs
            terms = tangent.disentanglement_error(f, p0, [tau, zero], inputs, grid,
                                                  per_task=True, **kw)
            np.testing.assert_allclose(terms[:, 0], 0.0, rtol=0, atol=TOL)
            grid_terms = np.asarray(terms[:, 1]).reshape(4, 4)
            np.testing.assert_allclose(grid_terms, grid_terms[:, :1].repeat(4, 1), rtol=0,
                                       atol=TOL)
            base_out = f(p0, inputs[1])
            for a1 in np.linspace(-1.0, 2.0, 4)[[0, 3]]:
                moved = tangent.merged_outputs(f, p0, [tau], a1, inputs[1],
                                               linearized=linearized)
                want = float(jnp.mean(tangent.output_distance(base_out, moved, distance)))
                row = int(np.argmin(np.abs(np.linspace(-1.0, 2.0, 4) - a1)))
                assert abs(grid_terms[row, 0] - want) <= TOL
            assert float(jnp.max(grid_terms)) > 0
            np.testing.assert_array_equal(
                tangent.disentanglement_error(f, p0, [tau, tau], inputs,
                                              jnp.zeros((1, 2)), **kw), 0.0)


def test_disjoint_supports_are_weight_disentangled_and_shared_ones_are_not():
    """A linear model whose tasks live on disjoint input coordinates: xi == 0 exactly."""
    rng = np.random.default_rng(0)
    x1 = np.zeros((8, 16)); x1[:, :8] = rng.normal(size=(8, 8))    # noqa: E702
    x2 = np.zeros((8, 16)); x2[:, 8:] = rng.normal(size=(8, 8))    # noqa: E702
    inputs = [jnp.asarray(x1), jnp.asarray(x2)]
    p0 = {"w": jnp.asarray(rng.normal(size=(16, 3))), "b": jnp.zeros(3)}
    tau1 = {"w": jnp.asarray(np.r_[rng.normal(size=(8, 3)), np.zeros((8, 3))]),
            "b": jnp.zeros(3)}
    tau2 = {"w": jnp.asarray(np.r_[np.zeros((8, 3)), rng.normal(size=(8, 3))]),
            "b": jnp.zeros(3)}
    grid = tangent.alpha_grid(jnp.linspace(-2.0, 2.0, 5))
    for distance in tangent.DISTANCES:
        xi = tangent.disentanglement_error(_affine, p0, [tau1, tau2], inputs, grid,
                                           distance=distance, chunk_size=7)
        np.testing.assert_allclose(xi, 0.0, rtol=0, atol=TOL)
    shared = tangent.disentanglement_error(_affine, p0, [tau1, tau1], inputs, grid,
                                           distance="l2")
    assert float(jnp.max(shared)) > 0.1


def test_linearized_disentanglement_fast_path_equals_evaluating_f_lin():
    _, f, p0, tasks = _setup()
    inputs = [t["image"] for t in tasks]
    tvs = [tree.scale(0.4, rng_tree(s, p0)) for s in (11, 12, 13)]
    alphas = jnp.asarray(np.random.default_rng(1).uniform(-1, 2, size=(6, 3)))
    f_lin = tvj.linearize(f, p0)
    for distance in tangent.DISTANCES:
        fast = tangent.disentanglement_error(f, p0, tvs, inputs, alphas, distance=distance,
                                             linearized=True, per_task=True)
        slow = tangent.disentanglement_error(f_lin, p0, tvs, inputs, alphas,
                                             distance=distance, per_task=True, chunk_size=4)
        np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-10)


def test_disentanglement_errors():
    _, f, p0, tasks = _setup()
    inputs = [t["image"] for t in tasks[:2]]
    with pytest.raises(ValueError, match="task_inputs has 2 entries, task_vectors has 1"):
        tangent.disentanglement_error(f, p0, [p0], inputs, jnp.zeros((1, 1)))
    with pytest.raises(ValueError, match=r"alphas must have shape \[G, 2\]"):
        tangent.disentanglement_error(f, p0, [p0, p0], inputs, jnp.zeros((3,)))
    with pytest.raises(ValueError, match="distance must be one of"):
        tangent.disentanglement_error(f, p0, [p0, p0], inputs, jnp.zeros((1, 2)),
                                      distance="kl")
    bad = {**p0, "Dense_1": {"kernel": p0["Dense_1"]["kernel"]}}
    with pytest.raises(ValueError, match="task vector 1: .*'Dense_1/bias'"):
        tangent.disentanglement_error(f, p0, [p0, bad], inputs, jnp.zeros((1, 2)))


# --------------------------------------------------------------------------- diagnostics

def test_linear_path_and_interpolation_barrier():
    _, f, p0, tasks = _setup()
    loss = make_loss_fn(f)
    tau = rng_tree(14, p0)
    lambdas = jnp.array([0.0, 0.5, 1.5])
    path = tangent.linear_path(lambda p: (loss(p, tasks[0]), -loss(p, tasks[1])), p0, tau,
                               lambdas, chunk_size=2)
    for i, lam in enumerate(np.asarray(lambdas)):
        p = tree.add_scale(p0, lam, tau)
        assert abs(float(path[0][i]) - float(loss(p, tasks[0]))) <= TOL
        assert abs(float(path[1][i]) + float(loss(p, tasks[1]))) <= TOL
    a, b = p0, tree.add(p0, tau)
    # m(p) = -||p||^2 is concave: m(lambda) - chord = lambda (1 - lambda) ||b - a||^2
    bar = tangent.interpolation_barrier(lambda p: -tree.vdot(p, p), a, b, num_points=5)
    assert abs(float(bar.barrier) - float(tree.vdot(tau, tau)) / 4) <= 1e-10
    np.testing.assert_allclose(bar.lambdas, [0, 0.25, 0.5, 0.75, 1])
    # a convex metric has no barrier; "higher is better" flips the sign convention
    convex = tangent.interpolation_barrier(lambda p: tree.vdot(p, p), a, b)
    assert float(convex.barrier) <= 1e-12
    up = tangent.interpolation_barrier(lambda p: tree.vdot(p, p), a, b, num_points=5,
                                       higher_is_better=True)
    assert abs(float(up.barrier) - float(tree.vdot(tau, tau)) / 4) <= 1e-10
    with pytest.raises(ValueError, match="params_b: leaf 'Dense_0/bias'"):
        tangent.interpolation_path(loss, a, {**b, "Dense_0": {"kernel": b["Dense_0"]
                                                                ["kernel"],
                                                                "bias": jnp.zeros(2)}},
                                   lambdas)


def test_layer_table():
    _, _, p0, _ = _setup()
    tvs = [rng_tree(s, p0) for s in (15, 16, 17)]
    table = tangent.layer_table(tvs)
    leaves = [tree.leaves_with_paths(tv) for tv in tvs]
    assert table.paths == [p for p, _ in leaves[0]] == ["Dense_0/bias", "Dense_0/kernel",
                                                        "Dense_1/bias", "Dense_1/kernel"]
    for i in range(4):
        for s in range(3):
            assert abs(float(table.norms[i, s]) - float(jnp.linalg.norm(leaves[s][i][1]))) \
                <= TOL
            for t in range(3):
                want = float(tree.cosine(leaves[s][i][1], leaves[t][i][1]))
                assert abs(float(table.cosines[i, s, t]) - want) <= TOL
    assert abs(float(table.total_cosines[0, 2]) - float(tree.cosine(tvs[0], tvs[2]))) <= TOL
    np.testing.assert_allclose(table.total_norms, [float(tree.norm(t)) for t in tvs],
                               rtol=0, atol=TOL)
    assert len(table.rows()) == 4
    with pytest.raises(ValueError, match="task vector 1: .*'Dense_1/bias'"):
        tangent.layer_table([p0, {**p0, "Dense_1": {"kernel": p0["Dense_1"]["kernel"]}}])
