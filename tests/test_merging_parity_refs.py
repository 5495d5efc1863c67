"""Parity, in float64, with the reference implementations' own code.

FusionBench 0.2.33 (``iso_c``, ``iso_cts``, TSV-M's ``compute_and_sum_svd_mem_reduction``,
MagMax's ``_magmax_select``/``magmax_merge``, TALL's ``generate_task_masks``) and mergekit
(DELLA's ``della_magprune`` inside its ``della``/``della_linear`` merges, TIES with
``consensus: count``) run on the same tensors as ours. The trees here are flax-shaped
(``[in, out]`` kernels, 3-D attention projections); the reference sees the PyTorch
state dict they convert from (``[out, in]``). Every reference quirk the docs name has a
test whose name says ``quirk``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import taskvec_jax as tvj

torch = pytest.importorskip("torch", reason="the parity extra is not installed")
if importlib.util.find_spec("fusion_bench") is None:   # not imported: see reference_impls
    pytest.skip("the parity extra is not installed", allow_module_level=True)
pytest.importorskip("mergekit", reason="the parity extra is not installed")

from tests import reference_impls  # noqa: E402

M = tvj.merging
TOL = dict(rtol=1e-10, atol=1e-10)
HEADS, HEAD_DIM, WIDTH = 2, 3, 6


@pytest.fixture(scope="module")
def fb():
    mods = {w: reference_impls.fusion_bench_module(w)
            for w in ("iso", "tsvm", "interference", "magmax", "tall_mask")}
    return mods


def quiet(fn, *args, **kwargs):
    """FusionBench prints a line per key; keep the test log readable."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


# --------------------------------------------------------------------------- conversion

def torch_state(seed, num_tasks):
    """``num_tasks`` PyTorch-layout task vectors (float64 state dicts)."""
    rng = np.random.default_rng(seed)
    shapes = {"fc.weight": (7, WIDTH), "fc.bias": (7,),
              "attn.q_proj.weight": (HEADS * HEAD_DIM, WIDTH),
              "attn.out_proj.weight": (WIDTH, HEADS * HEAD_DIM),
              "conv.weight": (4, 2, 3, 3), "ln.weight": (WIDTH,)}
    return [{k: torch.tensor(rng.normal(size=s)) for k, s in shapes.items()}
            for _ in range(num_tasks)]


def to_flax(sd):
    """The exact flax layout of the same weights (transposes and reshapes only)."""
    a = {k: jnp.asarray(v.numpy()) for k, v in sd.items()}
    return {"fc": {"kernel": a["fc.weight"].T, "bias": a["fc.bias"]},
            "attn": {"query": {"kernel": a["attn.q_proj.weight"].T.reshape(
                         WIDTH, HEADS, HEAD_DIM)},
                     "out": {"kernel": a["attn.out_proj.weight"].T.reshape(
                         HEADS, HEAD_DIM, WIDTH)}},
            "conv": {"kernel": a["conv.weight"].transpose(2, 3, 1, 0)},
            "ln": {"scale": a["ln.weight"]}}


def zeros_like_flax(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def assert_matches(ours, ref_sd, tol=TOL):
    np.testing.assert_allclose(ours["fc"]["kernel"], ref_sd["fc.weight"].numpy().T, **tol)
    np.testing.assert_allclose(ours["fc"]["bias"], ref_sd["fc.bias"].numpy(), **tol)
    np.testing.assert_allclose(ours["attn"]["query"]["kernel"].reshape(WIDTH, -1),
                               ref_sd["attn.q_proj.weight"].numpy().T, **tol)
    np.testing.assert_allclose(ours["attn"]["out"]["kernel"].reshape(-1, WIDTH),
                               ref_sd["attn.out_proj.weight"].numpy().T, **tol)
    np.testing.assert_allclose(ours["conv"]["kernel"],
                               ref_sd["conv.weight"].numpy().transpose(2, 3, 1, 0), **tol)
    np.testing.assert_allclose(ours["ln"]["scale"], ref_sd["ln.weight"].numpy(), **tol)


# --------------------------------------------------------------------------- Iso-C / CTS

@pytest.mark.parametrize("num_tasks", [1, 3])
def test_iso_c_matches_fusion_bench(fb, num_tasks):
    sds = torch_state(0, num_tasks)
    ref = quiet(fb["iso"].iso_c, sds, accelerator="cpu")
    taus = [to_flax(sd) for sd in sds]
    assert_matches(M.iso_c_task_vector(taus), ref)
    # A scalar alpha scales the merged vector, as FusionBench's scaling_factor does.
    merged = M.iso_c(zeros_like_flax(taus[0]), taus, alpha=0.7)
    assert_matches(merged, {k: 0.7 * v for k, v in ref.items()})


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_iso_cts_matches_fusion_bench(fb, fraction):
    sds = torch_state(1, 3)
    ref = quiet(fb["iso"].iso_cts, sds, fraction, accelerator="cpu")
    taus = [to_flax(sd) for sd in sds]
    assert_matches(M.iso_cts_task_vector(taus, common_space_fraction=fraction), ref)


def test_per_task_alpha_scales_each_task_vector_before_the_svds(fb):
    # FusionBench's TSV-M class with a list of alphas scales the task vectors first; a
    # per-task alpha here does the same (for Iso-C and Iso-CTS as well).
    sds = torch_state(2, 3)
    alpha = np.array([0.5, -1.0, 2.0])
    scaled = [{k: a * v for k, v in sd.items()} for a, sd in zip(alpha, sds)]
    taus = [to_flax(sd) for sd in sds]
    base = zeros_like_flax(taus[0])
    assert_matches(M.tsv(base, taus, alpha=alpha),
                   quiet(fb["tsvm"].compute_and_sum_svd_mem_reduction, scaled,
                         accelerator="cpu"))
    assert_matches(M.iso_c(base, taus, alpha=alpha),
                   quiet(fb["iso"].iso_c, scaled, accelerator="cpu"))
    assert_matches(M.iso_cts(base, taus, alpha=alpha, common_space_fraction=0.5),
                   quiet(fb["iso"].iso_cts, scaled, 0.5, accelerator="cpu"))


def test_quirk_iso_c_flattens_to_the_mean_of_all_min_mn_singular_values(fb):
    # The spectrum is averaged over min(m, n) values, zeros included: a rank-1 task
    # vector becomes a full-rank matrix with every singular value s_1 / min(m, n).
    rng = np.random.default_rng(3)
    w = np.outer(rng.normal(size=7), rng.normal(size=5))
    ref = quiet(fb["iso"].iso_c, [{"w": torch.tensor(w)}], accelerator="cpu")["w"].numpy()
    ours = np.asarray(M.iso_c_task_vector([{"w": jnp.asarray(w.T)}])["w"]).T
    s1 = np.linalg.svd(w, compute_uv=False)[0]
    for out in (ref, ours):
        np.testing.assert_allclose(np.linalg.svd(out, compute_uv=False),
                                   np.full(5, s1 / 5), rtol=1e-10)


def test_quirk_iso_cts_rounds_the_task_space_half_to_even(fb):
    # min(10, 12) = 10, int(10 * 0.5) = 5 common, (10 - 5) / 2 = 2.5 per task: Python's
    # round gives 2 (half to even), so the task spaces total 4 and the common space is 6.
    assert M.subspace.subspace_sizes((10, 12), 2, 0.5) == (6, 2)
    assert M.subspace.subspace_sizes((10, 12), 2, 0.3) == (2, 4)      # 3.5 -> 4 (even)
    rng = np.random.default_rng(4)
    ws = [rng.normal(size=(12, 10)) for _ in range(2)]
    ref = quiet(fb["iso"].iso_cts, [{"w": torch.tensor(w)} for w in ws], 0.5,
                accelerator="cpu")["w"].numpy()
    ours = M.iso_cts_task_vector([{"w": jnp.asarray(w.T)} for w in ws],
                                 common_space_fraction=0.5)["w"]
    np.testing.assert_allclose(ours, ref.T, **TOL)


def test_quirk_iso_cts_projects_the_output_side_only(fb):
    # The common subspace is removed from the left (output) side of PyTorch's [out, in]
    # weight only, so the reference is not transpose-symmetric: merging W^T is not the
    # transpose of merging W. Ours follows the [out, in] reference for flax [in, out].
    rng = np.random.default_rng(5)
    ws = [rng.normal(size=(8, 6)) for _ in range(3)]
    run = lambda mats: quiet(fb["iso"].iso_cts, [{"w": torch.tensor(m)} for m in mats],
                             0.5, accelerator="cpu")["w"].numpy()
    assert np.abs(run([w.T for w in ws]).T - run(ws)).max() > 1e-3
    ours = M.iso_cts_task_vector([{"w": jnp.asarray(w.T)} for w in ws],
                                 common_space_fraction=0.5)["w"]
    np.testing.assert_allclose(ours, run(ws).T, **TOL)


# --------------------------------------------------------------------------- TSV-M

@pytest.mark.parametrize("num_tasks", [1, 3])
def test_tsv_matches_fusion_bench(fb, num_tasks):
    sds = torch_state(6, num_tasks)
    ref = quiet(fb["tsvm"].compute_and_sum_svd_mem_reduction, sds, accelerator="cpu")
    taus = [to_flax(sd) for sd in sds]
    assert_matches(M.tsv_task_vector(taus), ref)
    merged = M.tsv(zeros_like_flax(taus[0]), taus, alpha=1.5)
    assert_matches(merged, {k: 1.5 * v for k, v in ref.items()})


def test_quirk_tsv_keeps_min_mn_floor_div_T_triplets_per_task(fb):
    # r = min(9, 7) = 7 directions, T = 3 tasks: k = 7 // 3 = 2 each, so the merge has
    # rank 6 and one direction stays empty.
    rng = np.random.default_rng(7)
    ws = [rng.normal(size=(9, 7)) for _ in range(3)]
    ref = quiet(fb["tsvm"].compute_and_sum_svd_mem_reduction,
                [{"w": torch.tensor(w)} for w in ws], accelerator="cpu")["w"].numpy()
    ours = np.asarray(M.tsv_task_vector([{"w": jnp.asarray(w.T)} for w in ws])["w"]).T
    np.testing.assert_allclose(ours, ref, **TOL)
    assert np.linalg.matrix_rank(ref, tol=1e-8) == 6


def test_quirk_fusion_bench_task_interference_raises_paper_formula_used(fb):
    # FusionBench stacks U_t along rows and asks torch.linalg.norm for ord="1" (a string):
    # it raises for every input, so our measure follows the paper's formula instead.
    sds = [{"w": torch.tensor(np.random.default_rng(8).normal(size=(5, 4)))}]
    with pytest.raises(RuntimeError):
        fb["interference"].compute_task_singular_interference([sds[0]["w"]])
    with pytest.raises(RuntimeError):
        fb["interference"].compute_task_singular_interference([sds[0]["w"]] * 2)


# --------------------------------------------------------------------------- MagMax

def test_magmax_matches_fusion_bench(fb):
    sds = torch_state(9, 3)
    ref = fb["magmax"]._magmax_select(sds)
    taus = [to_flax(sd) for sd in sds]
    assert_matches(M.magmax_task_vector(taus), ref, tol=dict(rtol=0, atol=0))
    merged = M.magmax(zeros_like_flax(taus[0]), taus, alpha=0.3)
    assert_matches(merged, {k: 0.3 * v for k, v in ref.items()})


def test_quirk_magmax_ties_in_magnitude_go_to_the_later_task(fb):
    a = np.array([1.0, -2.0, 3.0, 0.0])
    b = np.array([-1.0, 2.0, 1.0, -0.0])
    ref = fb["magmax"]._magmax_select([{"v": torch.tensor(a)}, {"v": torch.tensor(b)}])
    ours = M.magmax_task_vector([{"v": jnp.asarray(a)}, {"v": jnp.asarray(b)}])["v"]
    np.testing.assert_array_equal(ref["v"].numpy(), [-1.0, 2.0, 3.0, 0.0])
    np.testing.assert_array_equal(ours, ref["v"].numpy())
    assert np.signbit(ours[3]) and np.signbit(ref["v"].numpy()[3])   # the later -0.0


# --------------------------------------------------------------------------- TALL masks

@pytest.mark.parametrize("mask_lambda", [0.2, 0.6, 1.0])
def test_tall_masks_match_fusion_bench_definition(fb, mask_lambda):
    rng = np.random.default_rng(10)
    num_tasks, n = 4, 50
    ptm = rng.normal(size=n)
    taus = rng.normal(size=(num_tasks, n)) * rng.uniform(0.1, 2, size=(num_tasks, 1))
    taus[:, :5] = 0.0                      # where tau_t = 0 the strict ">" keeps nothing
    ft = ptm + taus
    ref = quiet(fb["tall_mask"].generate_task_masks, torch.tensor(ft - ptm),
                torch.tensor(ft), torch.tensor(ptm), tall_mask_lambda=mask_lambda).numpy()
    ours = M.tall_masks([{"v": jnp.asarray(ft[t] - ptm)} for t in range(num_tasks)],
                        mask_lambda=mask_lambda)
    np.testing.assert_array_equal(np.stack([m["v"] for m in ours]), ref)
    # consensus: kept by at least k tasks, the reference's threshold on the mask counts
    for k in (0, 1, 2, num_tasks + 1):
        cons = M.consensus_mask([{"v": jnp.asarray(ft[t] - ptm)} for t in range(num_tasks)],
                                mask_lambda=mask_lambda, min_tasks=k)["v"]
        np.testing.assert_array_equal(cons, ref.sum(0) >= k)


def test_quirk_tall_mask_comparison_is_strict(fb):
    # |tau_t| > lambda |tau_MTL - tau_t| (the paper writes >=): an entry exactly on the
    # boundary is dropped. Here tau_1 = 1, tau_2 = 1 so tau_MTL - tau_1 = 1 = |tau_1|.
    ptm = torch.zeros(1, dtype=torch.float64)
    ft = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    ref = quiet(fb["tall_mask"].generate_task_masks, ft - ptm, ft, ptm,
                tall_mask_lambda=1.0).numpy()
    ours = M.tall_masks([{"v": jnp.ones(1)}, {"v": jnp.ones(1)}], mask_lambda=1.0)
    assert not ref.any() and not any(bool(m["v"][0]) for m in ours)


# --------------------------------------------------------------------------- mergekit

def _ids(num_tasks):
    return ["base"] + [f"t{t}" for t in range(num_tasks)]


def _della_reference(monkeypatch, base, taus, key, method, **params):
    """mergekit's own merge per tensor, its Bernoulli draws replaced by our uniforms.

    Our draw for task t, leaf i is ``uniform(fold_in(fold_in(key, t), i))`` in the flax
    layout; mergekit draws ``torch.bernoulli(probs)`` once per task per tensor, in the
    PyTorch layout, so the fake returns ``u.T < probs`` (for a 1-D tensor, ``u[None]``).
    """
    from mergekit.merge_methods.api import merge_tensors
    queue = []
    real = torch.bernoulli

    def fake(probs, *args, **kwargs):
        u = queue.pop(0)
        assert u.shape == probs.shape
        return (u < probs).to(probs.dtype)

    monkeypatch.setattr(torch, "bernoulli", fake)
    out = {}
    try:
        for i, name in enumerate(["b", "w"]):
            queue.clear()
            for t, tau in enumerate(taus):
                u = np.asarray(jax.random.uniform(
                    jax.random.fold_in(jax.random.fold_in(key, t), i), tau[name].shape,
                    jnp.float64))
                queue.append(torch.tensor(u.T if u.ndim == 2 else u[None]))
            tb = torch.tensor(np.asarray(base[name]).T)
            tensors = [tb] + [tb + torch.tensor(np.asarray(tau[name]).T) for tau in taus]
            res = merge_tensors(tensors, method, parameters=params, ids=_ids(len(taus)),
                                base_index=0)
            out[name] = res.numpy().T
            assert not queue
    finally:
        monkeypatch.setattr(torch, "bernoulli", real)
    return out


def _della_trees(seed, num_tasks):
    rng = np.random.default_rng(seed)
    base = {"b": jnp.asarray(rng.normal(size=9)), "w": jnp.asarray(rng.normal(size=(8, 5)))}
    taus = [{"b": jnp.asarray(rng.normal(size=9)),
             "w": jnp.asarray(rng.normal(size=(8, 5)))} for _ in range(num_tasks)]
    return base, taus


# mergekit's sparsification runs in float32 on CPU even for float64 tensors (its
# ``work_dtype``), so its DELLA results agree with float64 math to float32 precision.
F32 = dict(rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("consensus", ["mass", "count"])
def test_della_matches_mergekit(monkeypatch, consensus):
    from mergekit.merge_methods.generalized_task_arithmetic import (
        ConsensusMethod, GeneralizedTaskArithmeticMerge)
    from mergekit.sparsify import SparsificationMethod
    base, taus = _della_trees(11, 3)
    key = jax.random.key(3)
    weights = [1.0, 0.5, 2.0]
    method = GeneralizedTaskArithmeticMerge(
        consensus_method=ConsensusMethod.sum if consensus == "mass" else ConsensusMethod.count,
        sparsification_method=SparsificationMethod.della_magprune, default_normalize=True,
        default_rescale=True, method_name="della_test", method_pretty_name=None,
        method_reference_url=None)
    params = {"density": 0.6, "epsilon": 0.2, "lambda": 0.8,
              "weight": dict(zip(_ids(3)[1:], weights))}
    ref = _della_reference(monkeypatch, base, taus, key, method, **params)
    ours = M.della(base, taus, key=key, density=0.6, epsilon=0.2, alpha=0.8,
                   weights=weights, consensus=consensus)
    for name in ("b", "w"):
        np.testing.assert_allclose(ours[name], ref[name], **F32)


def test_della_linear_matches_mergekit(monkeypatch):
    base, taus = _della_trees(12, 2)
    key = jax.random.key(4)
    ref = _della_reference(monkeypatch, base, taus, key, "della_linear", density=0.4,
                           epsilon=0.1, weight={"t0": 0.7, "t1": 1.3})
    ours = M.della_linear(base, taus, key=key, density=0.4, epsilon=0.1, alpha=[0.7, 1.3])
    for name in ("b", "w"):
        np.testing.assert_allclose(ours[name], ref[name], **F32)


def test_quirk_mergekit_della_rescales_the_l1_norm_in_float32():
    # rescale: true multiplies the kept entries by ||tau||_1 / ||kept||_1 (not by 1/p as in
    # the DELLA paper), computed in float32 for a float64 CPU tensor.
    from mergekit.sparsify import della_magprune
    torch.manual_seed(0)
    x = torch.randn(4, 50, dtype=torch.float64)
    out = della_magprune(x, density=0.5, epsilon=0.2, rescale_norm="l1")
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.abs().sum().item(), x.abs().sum().item(), rtol=1e-6)
    kept = out != 0
    np.testing.assert_allclose((out[kept] / x[kept]).numpy(), (out[kept] / x[kept])[0].item(),
                               rtol=1e-6)                 # one factor for the whole tensor
    f32 = out.numpy().astype(np.float32).astype(np.float64)
    np.testing.assert_array_equal(out.numpy(), f32)       # float32 values, widened


def _mergekit_ties_count(base, taus, density):
    from mergekit.merge_methods.api import merge_tensors
    from mergekit.merge_methods.generalized_task_arithmetic import (
        ConsensusMethod, GeneralizedTaskArithmeticMerge)
    from mergekit.sparsify import SparsificationMethod
    method = GeneralizedTaskArithmeticMerge(
        consensus_method=ConsensusMethod.count,
        sparsification_method=SparsificationMethod.magnitude, default_normalize=True,
        default_rescale=False, method_name="ties_count_test", method_pretty_name=None,
        method_reference_url=None)
    tb = torch.tensor(np.asarray(base))
    tensors = [tb] + [tb + torch.tensor(np.asarray(t)) for t in taus]
    return merge_tensors(tensors, method, parameters={"density": density, "weight": 1.0},
                         ids=_ids(len(taus)), base_index=0).numpy()


@pytest.mark.parametrize("k", [3, 17, 40])
def test_ties_count_consensus_matches_mergekit(k):
    # mergekit's `ties` with `consensus: count`: trim each tensor to its k largest
    # magnitudes, elect the sign by the count of signs, mean of the agreeing values.
    # density = k / n keeps exactly k here (mergekit keeps int(density * n), equal to k
    # for these k; see the next test for where it is not).
    rng = np.random.default_rng(13)
    n, num_tasks = 60, 4
    base = rng.normal(size=n)
    taus = [rng.normal(size=n) for _ in range(num_tasks)]
    density = k / n
    assert int(density * n) == k
    ref = _mergekit_ties_count(base, taus, density)
    ours = np.asarray(M.ties({"v": jnp.asarray(base)}, [{"v": jnp.asarray(t)} for t in taus],
                             density=density, scope="leaf", consensus="count")["v"])
    trimmed = np.stack([np.asarray(M.trim({"v": jnp.asarray(t)}, density=density,
                                          scope="leaf")["v"]) for t in taus])
    untied = np.sign(trimmed).sum(0) != 0
    np.testing.assert_allclose(ours[untied], ref[untied], **TOL)
    # A tied count (as many + as -) elects + in mergekit: the mean of the positive values.
    pos = np.where(trimmed > 0, trimmed, 0).sum(0) / np.maximum((trimmed > 0).sum(0), 1)
    np.testing.assert_allclose(ref[~untied], base[~untied] + pos[~untied], **TOL)


def test_quirk_mergekit_magnitude_keeps_int_of_density_times_n():
    # mergekit keeps max(1, int(density * n)): for density = k / n the float product can
    # land just below k and keep k - 1; our count rule reads k / n and keeps exactly k.
    n, k = next((n, k) for n in range(2, 200) for k in range(1, n)
                if int((k / n) * n) == k - 1)
    from mergekit.sparsify import magnitude
    x = torch.tensor(np.random.default_rng(14).normal(size=n))
    assert int((magnitude(x, density=k / n) != 0).sum()) == max(1, k - 1)
    ours = M.trim({"v": jnp.asarray(x.numpy())}, density=k / n, scope="leaf")["v"]
    assert int((np.asarray(ours) != 0).sum()) == k


# --------------------------------------------------------------------------- geometric

def test_slerp_matches_fusion_bench_per_tensor():
    slerp_ref = reference_impls.fusion_bench_slerp()
    rng = np.random.default_rng(15)
    a, b = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    for t in (0.0, 0.3, 1.0):
        ref = slerp_ref(t, torch.tensor(a), torch.tensor(b)).numpy()
        ours = M.slerp({"w": jnp.asarray(a.T)}, {"w": jnp.asarray(b.T)}, t=t)["w"]
        np.testing.assert_allclose(ours, ref.T, **TOL)
    # nearly collinear: both fall back to linear interpolation
    ref = slerp_ref(0.3, torch.tensor(a), torch.tensor(2 * a + 1e-6)).numpy()
    ours = M.slerp({"w": jnp.asarray(a)}, {"w": jnp.asarray(2 * a + 1e-6)}, t=0.3)["w"]
    np.testing.assert_allclose(ours, ref, **TOL)


def test_model_stock_matches_mergekit():
    from mergekit.merge_methods.api import merge_tensors
    rng = np.random.default_rng(16)
    base = rng.normal(size=(6, 4))
    taus = [0.5 * rng.normal(size=(6, 4)) + rng.normal(size=(1, 4)) for _ in range(3)]
    ref = merge_tensors([torch.tensor(base)] + [torch.tensor(base + t) for t in taus],
                        "model_stock", ids=_ids(3), base_index=0).numpy()
    ours = M.model_stock({"w": jnp.asarray(base.T)}, [{"w": jnp.asarray(t.T)} for t in taus])
    np.testing.assert_allclose(ours["w"], ref.T, **TOL)


def test_quirk_mergekit_slerp_interpolates_each_output_row_separately():
    # mergekit 0.1.5 slerps row by row of the leading axis: a 1-D tensor is a column of
    # scalars, each pair collinear, so it is the linear interpolation; ours (per tensor,
    # as FusionBench) follows the arc of the whole tensor.
    from mergekit.merge_methods.slerp import slerp as mergekit_slerp
    rng = np.random.default_rng(17)
    a, b = rng.normal(size=6), rng.normal(size=6)
    ref = mergekit_slerp(torch.tensor(0.3, dtype=torch.float64), torch.tensor(a), torch.tensor(b)).numpy()
    np.testing.assert_allclose(ref, 0.7 * a + 0.3 * b, **TOL)
    ours = np.asarray(M.slerp({"v": jnp.asarray(a)}, {"v": jnp.asarray(b)}, t=0.3)["v"])
    assert np.abs(ours - ref).max() > 1e-3
    w0, w1 = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    rows = mergekit_slerp(torch.tensor(0.3, dtype=torch.float64), torch.tensor(w0), torch.tensor(w1)).numpy()
    for i in range(3):
        np.testing.assert_allclose(rows[i], M.slerp({"v": jnp.asarray(w0[i])},
                                                    {"v": jnp.asarray(w1[i])}, t=0.3)["v"],
                                   **TOL)
