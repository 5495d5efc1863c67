"""Sharded runs equal single-device runs, on 8 fake CPU devices.

This file runs in its own process with ``TVJ_TEST_DEVICES=8`` (conftest.py sets
XLA_FLAGS from it before JAX initializes); the default test run launches that process from
tests/test_sharded_subprocess.py. Run it alone with
``TVJ_TEST_DEVICES=8 python -m pytest tests/test_sharded.py``.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import taskvec_jax as tvj
from taskvec_jax import checkpoint
from taskvec_jax.training import sharded
from taskvec_jax.models import MLP, make_loss_fn
from tests.helpers import digits, init, max_abs_diff


def test_eight_fake_devices_are_present():
    assert len(jax.devices()) == 8, ("run with TVJ_TEST_DEVICES=8: conftest sets XLA_FLAGS "
                                     "before jax initializes")


def _setup(num_tasks, n=61):
    base = digits(num_tasks * n)
    model = MLP((8, 10), "tanh", param_dtype=jnp.float64)
    tasks = [jax.tree.map(lambda x: x[i * n:(i + 1) * n], base) for i in range(num_tasks)]
    return make_loss_fn(model), init(model, base), tasks


@pytest.mark.parametrize("num_tasks", [8, 5, 1])
@pytest.mark.parametrize("shape", [(8, 1), (4, 2)], ids=["8x1", "4x2"])
def test_sharded_finetune_tasks_equals_single_device(num_tasks, shape):
    loss_fn, params, tasks = _setup(num_tasks)
    mesh = sharded.make_mesh(*shape)
    full = dict(keep_epochs="all", record_gradients=True)
    on_mesh = tvj.finetune_tasks(loss_fn, params, tasks, optax.sgd(0.3), 3, mesh=mesh,
                                 **full)
    single = tvj.finetune_tasks(loss_fn, params, tasks, optax.sgd(0.3), 3, **full)
    assert len(on_mesh) == num_tasks
    for a, b in zip(on_mesh, single):
        assert max_abs_diff(a.params, b.params) <= 1e-12
        assert max_abs_diff(a.epoch_gradients, b.epoch_gradients) <= 1e-12
        np.testing.assert_allclose(a.losses, b.losses, rtol=1e-12)


def test_sharded_minibatch_finetune_tasks_equals_single_device():
    loss_fn, params, tasks = _setup(5)
    mesh = sharded.make_mesh(4, 2)
    key = jax.random.key(2)
    on_mesh = tvj.finetune_tasks(loss_fn, params, tasks, optax.adam(1e-2), 2, mesh=mesh,
                                 batch_size=8, key=key)
    single = tvj.finetune_tasks(loss_fn, params, tasks, optax.adam(1e-2), 2, batch_size=8,
                                key=key)
    for a, b in zip(on_mesh, single):
        assert max_abs_diff(a.params, b.params) <= 1e-12


@pytest.mark.parametrize("n", [61, 5, 64])
def test_data_parallel_gradient_equals_unsharded(n):
    # One task, all 8 devices on the data axis; N = 61 and 5 are not multiples of 8.
    loss_fn, params, tasks = _setup(1, n)
    mesh = sharded.make_mesh(1, 8)
    lr = 0.5
    (traj,) = tvj.finetune_tasks(loss_fn, params, tasks, optax.sgd(lr), 1, mesh=mesh,
                                 record_gradients=True)
    grad = jax.grad(loss_fn)(params, tasks[0])
    assert max_abs_diff(jax.tree.map(lambda g: g[0], traj.epoch_gradients), grad) <= 1e-12
    assert max_abs_diff(tvj.task_vector(traj.at(1), params),
                        tvj.tree.scale(-lr, grad)) <= 1e-12


@pytest.mark.parametrize("shape", [(8, 1), (2, 4)], ids=["8x1", "2x4"])
def test_sharded_multitask_equals_single_device(shape):
    loss_fn, params, tasks = _setup(5)
    mesh = sharded.make_mesh(*shape)
    w = jnp.array([1.0, 0.5, 2.0, 1.0, 0.25])
    on_mesh = tvj.multitask_finetune(loss_fn, params, tasks, optax.sgd(0.2), 3, mesh=mesh,
                                     weights=w, keep_epochs="all")
    single = tvj.multitask_finetune(loss_fn, params, tasks, optax.sgd(0.2), 3, weights=w,
                                    keep_epochs="all")
    assert max_abs_diff(on_mesh.params, single.params) <= 1e-12
    np.testing.assert_allclose(on_mesh.losses, single.losses, rtol=1e-12)


def test_sharded_program_compiles_once():
    base = digits(8 * 20)
    model = MLP((4, 10), param_dtype=jnp.float64)
    inner = make_loss_fn(model)
    traces = []

    def loss_fn(p, batch):
        traces.append(1)
        return inner(p, batch)

    tasks = [jax.tree.map(lambda x: x[i * 20:(i + 1) * 20], base) for i in range(8)]
    params = init(model, base)
    mesh = sharded.make_mesh(4, 2)
    opt = optax.sgd(0.1)
    tvj.finetune_tasks(loss_fn, params, tasks, opt, 30, mesh=mesh)
    first = len(traces)
    assert first <= 4  # not one trace per epoch
    tvj.finetune_tasks(loss_fn, tvj.tree.scale(0.5, params), tasks, opt, 30, mesh=mesh)
    assert len(traces) == first


def test_sharded_arrays_roundtrip_through_orbax_with_their_sharding(tmp_path):
    mesh = sharded.make_mesh(4, 2)
    sharding = NamedSharding(mesh, P("tasks", "data"))
    x = jax.device_put(jnp.arange(8 * 6, dtype=jnp.float64).reshape(8, 6), sharding)
    tree = {"w": x, "b": jax.device_put(jnp.ones(4), NamedSharding(mesh, P("tasks")))}
    path = checkpoint.save(tmp_path / "sharded", tree)
    back = checkpoint.restore(path, like=tree)
    assert back["w"].sharding == sharding
    assert back["b"].sharding == tree["b"].sharding
    np.testing.assert_array_equal(back["w"], x)
    # and the stacked output of a sharded finetune
    loss_fn, params, tasks = _setup(8, 16)
    stacked, _ = sharded.stack_tasks(tasks, 4)
    traj = sharded.finetune_stacked(loss_fn, params, stacked, optax.sgd(0.1), 2, mesh)
    path = checkpoint.save(tmp_path / "traj", traj.params)
    back = checkpoint.restore(path, like=traj.params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(traj.params)):
        assert a.sharding == b.sharding and len(a.sharding.device_set) == 8
        np.testing.assert_array_equal(a, b)


def test_process_local_assembly_single_process():
    mesh = sharded.make_mesh(4, 2)
    assert sharded.process_task_indices(mesh, 6) == list(range(8))  # 6 padded to 8
    local = {"x": np.arange(8 * 3.0).reshape(8, 3)}
    glob = sharded.global_task_array(mesh, local, 8)
    np.testing.assert_array_equal(glob["x"], local["x"])
    assert glob["x"].sharding.spec == P("tasks")


def test_mesh_and_shape_errors():
    loss_fn, params, tasks = _setup(2)
    with pytest.raises(ValueError, match="needs 16 devices; only 8"):
        sharded.make_mesh(8, 2)
    with pytest.raises(ValueError, match="task 1 has"):
        tvj.finetune_tasks(loss_fn, params, [tasks[0], jax.tree.map(lambda x: x[:7],
                                                                    tasks[1])],
                           optax.sgd(0.1), 1, mesh=sharded.make_mesh(2, 1))
    bad = jax.make_mesh((8,), ("devices",))
    with pytest.raises(ValueError, match=r"mesh must be a jax.sharding.Mesh with axes"):
        tvj.finetune_tasks(loss_fn, params, tasks, optax.sgd(0.1), 1, mesh=bad)
    with pytest.raises(ValueError, match="minibatch multitask runs without a mesh"):
        tvj.multitask_finetune(loss_fn, params, tasks, optax.sgd(0.1), 1, batch_size=4,
                               key=jax.random.key(0), mesh=sharded.make_mesh(2, 1))


@pytest.mark.parametrize("num_tasks,shape", [(5, (4, 2)), (8, (8, 1))], ids=["5on4x2", "8on8x1"])
def test_sharded_theory_equals_unsharded(num_tasks, shape):
    loss_fn, params, tasks = _setup(num_tasks)
    mesh = sharded.make_mesh(*shape)
    a = tvj.theory.second_order_term(loss_fn, params, tasks, 0.01, 0.5, 4, all_epochs=True,
                                     mesh=mesh)
    b = tvj.theory.second_order_term(loss_fn, params, tasks, 0.01, 0.5, 4, all_epochs=True)
    assert max_abs_diff(a, b) <= 1e-12 * float(tvj.tree.norm(b))
    g1 = tvj.theory.task_arithmetic_gap(loss_fn, params, tasks, 0.01, 0.5, 3, mesh=mesh)
    g2 = tvj.theory.task_arithmetic_gap(loss_fn, params, tasks, 0.01, 0.5, 3)
    assert max_abs_diff(g1.gap, g2.gap) <= 1e-12


def test_sharded_second_order_term_really_spans_the_devices():
    loss_fn, params, tasks = _setup(4)
    mesh = sharded.make_mesh(4, 2)
    lowered = jax.jit(lambda p: tvj.theory.second_order_term(
        loss_fn, p, tasks, 0.01, 0.5, 3, mesh=mesh)).lower(params)
    text = lowered.compile().as_text()
    assert "all-reduce" in text  # per-task means reduced across the data axis
    assert "num_partitions=8" in text


def test_atm_accepts_a_mesh_and_gives_the_same_rounds():
    loss_fn, params, tasks = _setup(5)
    mesh = sharded.make_mesh(4, 2)
    a = tvj.merging.atm(loss_fn, params, tasks, optax.sgd(0.2), 3, mesh=mesh)
    b = tvj.merging.atm(loss_fn, params, tasks, optax.sgd(0.2), 3)
    assert max_abs_diff(a.params, b.params) <= 1e-12


def test_sharded_progress_bars_one_per_real_task(capsys):
    # 5 tasks on 4 task shards (padded to 8): bars for tasks 0..4 only, each counting its
    # 2 epochs x 3 steps (10 examples, batch 4: 2 steps and the leftover one)
    def loss(p, b):
        return jnp.mean(0.5 * jnp.sum(b["a"] * p["w"] ** 2, axis=-1))

    rng = np.random.default_rng(0)
    tasks = [{"a": jnp.asarray(rng.uniform(0.5, 1.5, size=(10, 3)))} for _ in range(5)]
    params, key = {"w": jnp.ones(3)}, jax.random.key(1)
    mesh = sharded.make_mesh(4, 2)
    trajs = tvj.finetune_tasks(loss, params, tasks, optax.sgd(0.1), 2, batch_size=4,
                               key=key, mesh=mesh, progress="steps")
    err = capsys.readouterr().err
    for t in range(5):
        assert f"task {t}: 100%" in err and "6/6" in err, t
    assert "task 5" not in err and "task 7" not in err
    single = tvj.finetune_tasks(loss, params, tasks, optax.sgd(0.1), 2, batch_size=4,
                                key=key)
    for a, b in zip(trajs, single):
        assert max_abs_diff(a.params, b.params) <= 1e-12


# --- merges of sharded trees (taskvec_jax/merging/_shards.py) ---------------------------

_MERGE_SHAPES = {"w": ((16, 12), P("a", "b")), "v": ((3, 8, 6), P(None, "a")),
                 "b": ((8,), P(("a", "b"))), "d": ((8, 5), P("a")), "r": ((5, 4), P()),
                 "i": ((4,), P())}


def _merge_inputs(num_tasks=3):
    """Task vectors and a base on a 4 x 2 mesh: leaves split along one, two or no
    dimensions (one along both axes at once), a float64 leaf, a non-float position
    (``None`` in the task vectors, ints in the base) and magnitudes on a 0.5 grid, so that
    many entries tie and the kernel's position tie-break is exercised."""
    mesh = jax.make_mesh((4, 2), ("a", "b"))
    rng = np.random.default_rng(0)

    def tree(task):
        out = {}
        for k, (shape, _) in _MERGE_SHAPES.items():
            if k == "i":
                out[k] = None if task else np.arange(4)
                continue
            dtype = np.float64 if k == "d" else np.float32
            out[k] = np.asarray(np.round(rng.normal(size=shape) * 2) / 2, dtype)
        return out

    def put(t):
        return {k: x if x is None else
                jax.device_put(x, NamedSharding(mesh, _MERGE_SHAPES[k][1]))
                for k, x in t.items()}
    base, taus = tree(False), [tree(True) for _ in range(num_tasks)]
    return (base, taus), (put(base), [put(t) for t in taus])


def _finetuned(base, taus):
    """``base + tau_t`` per task (the base's non-float leaf kept)."""
    return [jax.tree.map(lambda b, t: b if t is None else b + t, base, tau,
                         is_leaf=lambda x: x is None) for tau in taus]


_MERGES = {
    "ties_global": lambda b, ts: tvj.merging.ties(b, ts, alpha=[0.7, 0.2, -1.0], density=0.3),
    "ties_leaf_count_sum": lambda b, ts: tvj.merging.ties(
        b, ts, density=0.4, scope="leaf", consensus="count", merge="sum"),
    "ties_task_vector": lambda b, ts: tvj.merging.ties_task_vector(ts, density=0.3),
    "ties_row": lambda b, ts: tvj.merging.ties(b, ts, alpha=0.5, density=0.3, scope="row"),
    "breadcrumbs_row": lambda b, ts: tvj.merging.breadcrumbs(
        b, ts, alpha=[0.7, 0.2, -1.0], density=0.4, outliers=0.1),
    "breadcrumbs_global": lambda b, ts: tvj.merging.breadcrumbs(
        b, ts, density=0.4, outliers=0.1, scope="global"),
    "trim_leaf": lambda b, ts: tvj.merging.trim(ts[0], density=0.3, scope="leaf",
                                                outliers=0.05),
    "magnitude_mask_global": lambda b, ts: tvj.merging.magnitude_mask(ts[0], density=0.3),
    "dare": lambda b, ts: tvj.merging.dare(ts[0], drop_rate=0.4, key=jax.random.key(3)),
    "dare_raw_key": lambda b, ts: tvj.merging.dare(ts[1], drop_rate=0.4,
                                                   key=jax.random.PRNGKey(3)),
    "dare_task_arithmetic": lambda b, ts: tvj.merging.dare_task_arithmetic(
        b, ts, alpha=0.3, drop_rate=0.4, key=jax.random.key(5)),
    # Keys of other implementations draw with jax.random.bernoulli over the whole leaf,
    # partitioned by XLA like the inputs.
    "dare_rbg_key": lambda b, ts: tvj.merging.dare(ts[2], drop_rate=0.4,
                                                   key=jax.random.key(3, impl="rbg")),
    "dare_task_arithmetic_unsafe_rbg_key": lambda b, ts: tvj.merging.dare_task_arithmetic(
        b, ts, alpha=0.3, drop_rate=0.4, key=jax.random.key(5, impl="unsafe_rbg")),
    "task_arithmetic": lambda b, ts: tvj.merging.task_arithmetic(b, ts, alpha=[1.0, -0.5, 2.0]),
    # soups and geometric merges of the finetuned models base + tau_t (elementwise, and
    # per-leaf or whole-tree norms and dot products)
    "uniform_soup": lambda b, ts: tvj.merging.uniform_soup(_finetuned(b, ts)),
    "fisher": lambda b, ts: tvj.merging.fisher(
        _finetuned(b, ts), [jax.tree.map(lambda x: x * x + 0.5, t) for t in ts]),
    "slerp_leaf": lambda b, ts: tvj.merging.slerp(*_finetuned(b, ts)[:2], t=0.3, base=b),
    "slerp_global": lambda b, ts: tvj.merging.slerp(*_finetuned(b, ts)[1:], t=0.6,
                                                    scope="global"),
    # the subspace merges (each matrix gathered for its SVDs, the result laid out back)
    "iso_c": lambda b, ts: tvj.merging.iso_c(b, ts, alpha=[0.7, 0.2, -1.0]),
    "iso_cts": lambda b, ts: tvj.merging.iso_cts(b, ts, common_space_fraction=0.5),
    "tsv": lambda b, ts: tvj.merging.tsv(b, ts, alpha=0.6),
    # elementwise merges, and DELLA (its rankings on the blocks: _shards.group_ranks)
    "magmax": lambda b, ts: tvj.merging.magmax(b, ts, alpha=0.5),
    "consensus": lambda b, ts: tvj.merging.consensus(b, ts, mask_lambda=0.3),
    "tall_masks": lambda b, ts: tvj.merging.tall_masks(ts, mask_lambda=0.3)[1],
    "della": lambda b, ts: tvj.merging.della(b, ts, key=jax.random.key(2), density=0.5,
                                             alpha=0.8, weights=[0.7, 0.2, 1.0]),
    "della_linear_probability": lambda b, ts: tvj.merging.della_linear(
        b, ts, key=jax.random.key(4), density=0.4, epsilon=0.1, rescale="probability"),
    "della_keep_probabilities": lambda b, ts: tvj.merging.della_keep_probabilities(
        ts[1], density=0.6, epsilon=0.2),
}


def _assert_merged_like(got, want, staus, rtol=0.0):
    """``got`` (merged from the sharded inputs) equals ``want`` (bit for bit, or to
    ``rtol``) with its dtypes, and every block stays where its input's block was."""
    for k, (_, spec) in _MERGE_SHAPES.items():
        if want[k] is None:
            assert got[k] is None, k
            continue
        if rtol:
            np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=rtol,
                                       atol=rtol, err_msg=k)
        else:
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
        assert np.asarray(got[k]).dtype == np.asarray(want[k]).dtype, k
        if k != "i":
            assert got[k].sharding.is_equivalent_to(NamedSharding(staus[0][k].sharding.mesh,
                                                                  spec), got[k].ndim), k


@pytest.mark.parametrize("method", list(_MERGES))
def test_sharded_merge_equals_the_unsharded_merge_bit_for_bit(method):
    (base, taus), (sbase, staus) = _merge_inputs()
    _assert_merged_like(_MERGES[method](sbase, staus), _MERGES[method](base, taus), staus)


@pytest.mark.parametrize("method", ["ties_global", "ties_row", "breadcrumbs_row",
                                    "breadcrumbs_global", "trim_leaf", "dare_task_arithmetic"])
def test_sharded_merge_under_an_outer_jit_equals_the_unsharded_one_bit_for_bit(method):
    # Traced leaves whose types carry Explicit mesh axes take the per-device programs
    # inside the caller's program (before: the rankings raised ShardingTypeError or a
    # "resource axis not found" ValueError); compared with the same jit of unsharded
    # inputs, as jitted and eager programs may round fused expressions differently.
    (base, taus), (sbase, staus) = _merge_inputs()
    merge = jax.jit(_MERGES[method])
    _assert_merged_like(merge(sbase, staus), merge(base, taus), staus)


def test_model_stock_of_sharded_models_equals_the_unsharded_one_to_rounding():
    # Model Stock's cosines sum over the devices' blocks, in another order than on one
    # device: equal to float32 rounding, laid out like the inputs.
    (base, taus), (sbase, staus) = _merge_inputs()
    _assert_merged_like(tvj.merging.model_stock(sbase, _finetuned(sbase, staus)),
                        tvj.merging.model_stock(base, _finetuned(base, taus)), staus,
                        rtol=1e-6)


@pytest.mark.parametrize("reduction", [1.0, 0.9])
def test_regmean_of_sharded_models_equals_the_unsharded_merge_bit_for_bit(reduction):
    # Each kernel and its Gram are gathered for the solve inside the leaf's program; the
    # merged kernel comes back laid out like the input's (before: ShardingTypeError).
    (base, taus), (sbase, staus) = _merge_inputs()
    mesh = staus[0]["w"].sharding.mesh
    rng = np.random.default_rng(1)
    grams = []
    for _ in taus:
        g = {k: None for k in _MERGE_SHAPES}
        for k in ("w", "d", "r"):
            x = rng.normal(size=(9, _MERGE_SHAPES[k][0][0]))
            g[k] = (x.T @ x).astype(base[k].dtype)
        grams.append(g)
    sgrams = [{k: None if v is None else jax.device_put(
        v, NamedSharding(mesh, P("a") if k != "r" else P())) for k, v in g.items()}
        for g in grams]
    want = tvj.merging.regmean(_finetuned(base, taus), grams, reduction=reduction)
    got = tvj.merging.regmean(_finetuned(sbase, staus), sgrams, reduction=reduction)
    _assert_merged_like(got, want, staus)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_adamerging_on_sharded_task_vectors_equals_the_unsharded_run_to_rounding(
        granularity):
    # The logits' matmul contracts w's sharded axis: its blocks are summed in another
    # order than on one device, so steps agree to float32 rounding, and the merged
    # model is laid out like the inputs.
    (base, taus), (sbase, staus) = _merge_inputs()
    rng = np.random.default_rng(2)
    inputs = [rng.normal(size=(12, 16)).astype(np.float32) for _ in taus]

    mix = rng.normal(size=(5, 12))

    def apply_fn(p, x):    # both sharded kernels shape the logits (float32 and float64)
        return x @ p["w"] + (x[:, :8] @ p["d"] @ mix).astype(jnp.float32)

    def run(b, ts):
        return tvj.merging.adamerging(b, ts, apply_fn, inputs, granularity=granularity,
                                      num_steps=4, optimizer=optax.adam(1e-2),
                                      batch_size=8, key=jax.random.key(3))
    want, got = run(base, taus), run(sbase, staus)
    _assert_merged_like(got.params, want.params, staus, rtol=2e-6)
    for g, w in zip(jax.tree.leaves(got.coefficients), jax.tree.leaves(want.coefficients)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-6, atol=2e-6)
    assert float(jnp.abs(want.losses[-1] - want.losses[0])) > 0     # the steps moved


def test_task_interference_of_sharded_task_vectors_equals_the_unsharded_one():
    (_, taus), (_, staus) = _merge_inputs()
    want = tvj.merging.task_interference(taus, reduce=False)
    got = tvj.merging.task_interference(staus, reduce=False)
    assert list(got) == list(want) and len(want) >= 2
    for path in want:
        assert float(got[path]) == float(want[path]), path


@pytest.mark.parametrize("method", ["ties_global", "ties_leaf_count_sum"])
def test_sharded_ranking_in_pieces_equals_the_unsharded_merge(monkeypatch, method):
    # A device's blocks are histogrammed in pieces of SHARDED_CHUNK entries (a fori_loop
    # and its remainder, at ViT sizes); here pieces of 3, so every block of the tree takes
    # that path, rows and columns alike.
    from taskvec_jax.merging import _select
    monkeypatch.setattr(_select, "SHARDED_CHUNK", 3)
    (base, taus), (sbase, staus) = _merge_inputs()
    want = _MERGES[method](base, taus)
    got = _MERGES[method](sbase, staus)
    for k in want:
        if want[k] is not None:
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


def test_sharded_merges_never_gather_a_leaf(monkeypatch):
    # Every program the merges run on the blocks (the rankings and the merge passes) is
    # compiled and read: no all-gather, all-to-all or permute, only the rankings'
    # all-reduces of integer histograms and counts (per-device memory: benchmarks/
    # bench_sharded_merging.py, at ViT-B/32 sizes).
    from taskvec_jax.merging import _shards
    calls = []
    run = _shards.run

    def recording(fn, lay, args, in_specs, out_specs, **static):
        calls.append((fn, lay, tuple(args), tuple(in_specs), out_specs, static))
        return run(fn, lay, args, in_specs, out_specs, **static)
    monkeypatch.setattr(_shards, "run", recording)
    _, (sbase, staus) = _merge_inputs()
    for method in ("ties_global", "breadcrumbs_row", "dare_task_arithmetic"):
        _MERGES[method](sbase, staus)
    assert {c[0].__name__ for c in calls} == {"_local_thresholds", "_ties_merge",
                                               "_breadcrumbs_merge", "_dare_task_arithmetic_leaf"}
    for fn, lay, args, in_specs, out_specs, static in calls:
        compiled = _shards._run.lower(args, fn=fn, mesh=lay.mesh,
                                      in_specs=_shards._Frozen(in_specs),
                                      out_specs=_shards._Frozen(out_specs),
                                      static=tuple(sorted(static.items()))).compile()
        text = compiled.as_text()
        for op in ("all-gather", "all-to-all", "collective-permute", "reduce-scatter"):
            assert op not in text, (fn.__name__, op)
        reduced = re.findall(r"= (\w+)\[[^\]]*\][^=]*? all-reduce(?:-start)?\(", text)
        if fn.__name__ != "_local_thresholds":
            assert not reduced, fn.__name__
        # what crosses devices is integer histograms and counts, never parameter values
        assert set(reduced) <= {"s32", "u32", "s64", "u64"}, (fn.__name__, reduced)
        # per device, a program's inputs are its arguments' blocks (no copy of a whole
        # leaf is made to enter it)
        blocks = sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                     for x in jax.tree.leaves(args) if isinstance(x, jax.Array)
                     and isinstance(x.sharding, NamedSharding))
        assert compiled.memory_analysis().argument_size_in_bytes <= blocks + 64, fn.__name__
    assert any(fn.__name__ == "_local_thresholds" for fn, *_ in calls)


def test_sharded_della_ranks_on_the_blocks_and_never_gathers_a_leaf():
    # DELLA ranks whole columns (or a whole leaf): each device sorts its block and the
    # group's other blocks visit in a ring, as integer pairs (magnitude bits, position).
    # Its whole program (jitted as one) moves no parameter value between devices but the
    # L1 rescaling's scalar sums, and the merge equals the unsharded one bit for bit
    # (test_sharded_merge_equals_the_unsharded_merge_bit_for_bit).
    _, (sbase, staus) = _merge_inputs()
    for method in ("della", "della_linear_probability", "della_keep_probabilities"):
        text = jax.jit(_MERGES[method]).lower(sbase, staus).compile().as_text()
        for op in ("all-gather", "all-to-all", "reduce-scatter"):
            assert op not in text, (method, op)
        permuted = re.findall(r"= \(?(\w+)\[[^\]]*\][^=]*? collective-permute(?:-start)?\(",
                              text)
        # "w" ranks over the 4 devices of its rows' axis, "b" over all 8
        assert permuted and set(permuted) <= {"s32", "s64"}, (method, permuted)
        reduced = re.findall(r"= \(?(\w+\[[^\]]*\])[^=]*? all-reduce(?:-start)?\(", text)
        assert all(r.endswith("[]") for r in reduced), (method, reduced)


@pytest.mark.parametrize("spec", [P("a", "b"), P("b", "a"), P(("a", "b"), None),
                                  P(None, ("b", "a"))])
@pytest.mark.parametrize("split", [1, None])
def test_group_ranks_on_blocks_equal_a_stable_argsort(spec, split):
    # four layouts of a matrix over both axes, ranked by columns and as a whole, with
    # magnitudes on a coarse grid (most entries tie: the position order decides)
    from taskvec_jax.merging import _shards
    mesh = jax.make_mesh((4, 2), ("a", "b"))
    x = np.round(np.random.default_rng(1).normal(size=(16, 8)) * 2) / 2
    x = x.astype(np.float32)
    groups = np.abs(x) if split else np.abs(x).reshape(-1, 1)
    want = np.argsort(np.argsort(groups, axis=0, kind="stable"), axis=0).reshape(x.shape)
    sx = jax.device_put(x, NamedSharding(mesh, spec))
    got = jax.jit(lambda v: _shards.group_ranks(v, split))(sx)
    np.testing.assert_array_equal(np.asarray(got), want)
    assert got.sharding.is_equivalent_to(sx.sharding, 2)
    assert _shards.group_ranks(jnp.asarray(x), split) is None      # unsharded: the sort


def test_sharded_breadcrumbs_releases_each_leafs_thresholds_once_merged(monkeypatch):
    # Row scope: every task is ranked first, then one merge program per leaf; a leaf's
    # thresholds (four numbers per row and task) are freed once it is merged, so that the
    # thresholds still held shrink while the merged output grows (per-device peak at
    # ViT-B/32 shapes: benchmarks/bench_sharded_merging.py).
    import weakref
    from taskvec_jax.merging import _shards
    thresholds, alive_at_merge = [], []
    run = _shards.run

    def recording(fn, lay, args, in_specs, out_specs, **static):
        if fn.__name__ == "_breadcrumbs_merge":
            alive_at_merge.append(sum(r() is not None for r in thresholds))
        out = run(fn, lay, args, in_specs, out_specs, **static)
        if fn.__name__ == "_local_thresholds":
            thresholds.extend(weakref.ref(x) for x in jax.tree.leaves(out))
        return out
    monkeypatch.setattr(_shards, "run", recording)
    (base, taus), (sbase, staus) = _merge_inputs()
    got = _MERGES["breadcrumbs_row"](sbase, staus)
    leaves = [k for k, x in base.items() if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    assert len(alive_at_merge) == len(leaves) > 1           # one merge program per leaf
    assert alive_at_merge[0] == len(thresholds)             # every ranking ran first
    assert all(a > b for a, b in zip(alive_at_merge, alive_at_merge[1:]))   # released
    assert sum(r() is not None for r in thresholds) == 0
    want = _MERGES["breadcrumbs_row"](base, taus)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


def test_sharded_merge_checks():
    mesh = jax.make_mesh((4, 2), ("a", "b"))
    other = jax.make_mesh((2, 4), ("a", "b"))
    x = jnp.arange(32.0).reshape(8, 4)
    tau = {"u": jax.device_put(x, NamedSharding(mesh, P("a"))),
           "v": jax.device_put(x, NamedSharding(other, P("a")))}
    with pytest.raises(ValueError, match=r"leaf 'v' is sharded over a different mesh than "
                                         r"leaf 'u'"):
        tvj.merging.trim(tau, density=0.5)
