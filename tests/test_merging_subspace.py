"""Iso-C, Iso-CTS, TSV-M and the task-interference measure: closed forms and conventions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import taskvec_jax as tvj

M = tvj.merging
TOL = dict(rtol=1e-10, atol=1e-12)


def rand(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


def polar_np(a):
    """Independent polar factor: a (a^T a)^{-1/2} via an eigendecomposition."""
    w, v = np.linalg.eigh(a.T @ a)
    return a @ (v / np.sqrt(w)) @ v.T


def test_iso_c_of_one_task_vector_is_its_isotropic_version():
    x = np.asarray(rand(0, 7, 5))
    out = np.asarray(M.iso_c_task_vector([{"w": jnp.asarray(x)}])["w"])
    s = np.linalg.svd(x, compute_uv=False)
    np.testing.assert_allclose(out, s.mean() * polar_np(x), **TOL)
    np.testing.assert_allclose(np.linalg.svd(out, compute_uv=False), np.full(5, s.mean()),
                               **TOL)


def test_iso_c_of_several_is_the_isotropic_sum_and_other_leaves_the_mean():
    taus = [{"w": rand(t, 6, 4), "b": rand(10 + t, 4)} for t in range(3)]
    out = M.iso_c_task_vector(taus)
    total = np.asarray(sum(t["w"] for t in taus))
    np.testing.assert_allclose(out["w"], np.linalg.svd(total, compute_uv=False).mean()
                               * polar_np(total), **TOL)
    np.testing.assert_allclose(out["b"], sum(t["b"] for t in taus) / 3, **TOL)


def orthogonal_tasks(num_tasks=3, rank=2, m=9, n=8, seed=0):
    """Task vectors whose row and column spaces are mutually orthogonal across tasks."""
    rng = np.random.default_rng(seed)
    q_left, _ = np.linalg.qr(rng.normal(size=(m, m)))
    q_right, _ = np.linalg.qr(rng.normal(size=(n, n)))
    taus = []
    for t in range(num_tasks):
        cols = slice(t * rank, (t + 1) * rank)
        s = np.diag(rng.uniform(1, 3, size=rank))
        taus.append(q_left[:, cols] @ s @ q_right[:, cols].T)
    return taus


def test_tsv_of_orthogonal_row_and_column_spaces_is_the_sum():
    # min(9, 8) = 8 directions, T = 3: k = 2 = each task's rank, so nothing is cut and
    # the polar factors change nothing.
    taus = orthogonal_tasks()
    out = M.tsv_task_vector([{"w": jnp.asarray(t)} for t in taus])["w"]
    np.testing.assert_allclose(out, sum(taus), **TOL)
    assert float(M.task_interference([{"w": jnp.asarray(t)} for t in taus])) < 1e-10


def test_tsv_keeps_each_tasks_top_singular_triplets():
    # One task: k = min(m, n) // 1 = all of them: the task vector itself.
    x = rand(1, 5, 6)
    np.testing.assert_allclose(M.tsv_task_vector([{"w": x}])["w"], x, **TOL)


def test_interference_grows_with_overlap():
    x = rand(2, 6, 5)
    same = float(M.task_interference([{"w": x}, {"w": x}]))
    other = float(M.task_interference([{"w": x}, {"w": rand(3, 6, 5)}]))
    assert same > other > 0.0
    per_leaf = M.task_interference([{"w": x, "b": x[0]}, {"w": x, "b": x[0]}], reduce=False)
    assert set(per_leaf) == {"w"}


@pytest.mark.parametrize("method", ["iso_c", "tsv"])
def test_transpose_equivariant(method):
    # PyTorch [out, in] converted to flax [in, out] merges to the converted merge.
    fn = getattr(M, method + "_task_vector")
    taus = [rand(20 + t, 7, 5) for t in range(3)]
    a = fn([{"w": t} for t in taus])["w"]
    b = fn([{"w": t.T} for t in taus])["w"]
    np.testing.assert_allclose(a, b.T, **TOL)


def test_iso_cts_with_the_whole_space_common_is_iso_c():
    # fraction 1: c = min(m, n), no task-specific directions: the isotropic sum. (Iso-CTS's
    # orientation, flax [in, out] = PyTorch's [out, in] transposed, is checked against
    # the reference in test_merging_parity_refs.py.)
    taus = [{"w": rand(30 + t, 8, 6)} for t in range(3)]
    np.testing.assert_allclose(M.iso_cts_task_vector(taus, common_space_fraction=1.0)["w"],
                               M.iso_c_task_vector(taus)["w"], **TOL)


def test_3d_attention_kernels_merge_as_their_2d_matrices():
    q = [rand(40 + t, 6, 2, 3) for t in range(2)]
    out3 = M.tsv_task_vector([{"attn": {"query": {"kernel": k}}} for k in q])
    out2 = M.tsv_task_vector([{"w": k.reshape(6, 6)} for k in q])
    np.testing.assert_allclose(out3["attn"]["query"]["kernel"].reshape(6, 6), out2["w"],
                               **TOL)
    o = [rand(50 + t, 2, 3, 6) for t in range(2)]
    out3 = M.iso_c_task_vector([{"attn": {"out": {"kernel": k}}} for k in o])
    out2 = M.iso_c_task_vector([{"w": k.reshape(6, 6)} for k in o])
    np.testing.assert_allclose(out3["attn"]["out"]["kernel"].reshape(6, 6), out2["w"], **TOL)


def test_conv_kernels_are_averaged_by_default_and_matrices_on_request():
    convs = [rand(60 + t, 3, 3, 2, 4) for t in range(2)]
    taus = [{"conv": {"kernel": c}} for c in convs]
    np.testing.assert_allclose(M.iso_c_task_vector(taus)["conv"]["kernel"],
                               (convs[0] + convs[1]) / 2, **TOL)
    rule = lambda path, x: 3 if x.ndim == 4 else M.matrices.default_is_matrix(path, x)
    out = M.iso_c_task_vector(taus, is_matrix=rule)["conv"]["kernel"]
    ref = M.iso_c_task_vector([{"w": c.reshape(18, 4)} for c in convs])["w"]
    np.testing.assert_allclose(out.reshape(18, 4), ref, **TOL)
    # a predicate on paths: exclude a leaf from the matrix treatment
    skip = lambda path, x: None if path.startswith("head") else x.ndim == 2
    w = [rand(70 + t, 4, 3) for t in range(2)]
    out = M.tsv_task_vector([{"head": t, "body": t} for t in w], is_matrix=skip)
    np.testing.assert_allclose(out["head"], (w[0] + w[1]) / 2, **TOL)
    np.testing.assert_allclose(out["body"], M.tsv_task_vector([{"x": t} for t in w])["x"],
                               **TOL)


@pytest.mark.parametrize("method", ["iso_c", "iso_cts", "tsv"])
def test_model_form_alpha_scalar_and_per_task_none_leaves_and_dtype(method):
    fn = getattr(M, method)
    taus = [{"w": rand(80 + t, 5, 4), "step": None} for t in range(2)]
    base = {"w": rand(90, 5, 4), "step": jnp.int32(7)}
    tv = getattr(M, method + "_task_vector")(taus)
    out = fn(base, taus, alpha=0.5)
    np.testing.assert_allclose(out["w"], base["w"] + 0.5 * tv["w"], **TOL)
    assert out["step"] == 7 and tv["step"] is None
    per = fn(base, taus, alpha=jnp.array([2.0, -1.0]))
    scaled = [{"w": 2.0 * taus[0]["w"], "step": None}, {"w": -taus[1]["w"], "step": None}]
    np.testing.assert_allclose(per["w"], fn(base, scaled)["w"], **TOL)
    jitted = jax.jit(lambda b, t, a: fn(b, t, alpha=a))(base, taus, jnp.float64(0.5))
    np.testing.assert_allclose(jitted["w"], out["w"], **TOL)
    if method != "iso_c":
        return        # the low-precision path is the shared driver's: checked once
    low = fn(jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float64
                          else x, base),
             [{"w": t["w"].astype(jnp.bfloat16), "step": None} for t in taus])
    assert low["w"].dtype == jnp.bfloat16


def test_bad_input_names_the_argument_and_leaf():
    taus = [{"w": rand(0, 4, 3)}, {"w": rand(1, 4, 3)}]
    with pytest.raises(ValueError, match="task vector 1.*'w'"):
        M.iso_c({"w": jnp.zeros((4, 3))}, [taus[0], {"w": jnp.zeros((3, 3))}])
    with pytest.raises(ValueError, match="alpha"):
        M.tsv({"w": jnp.zeros((4, 3))}, taus, alpha=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="is_matrix returned True for leaf 'w'"):
        M.iso_c_task_vector([{"w": rand(0, 2, 2, 2)}], is_matrix=lambda p, x: True)
    with pytest.raises(ValueError, match="common_space_fraction"):
        M.iso_cts_task_vector(taus, common_space_fraction=1.5)
    with pytest.raises(ValueError, match="leaf 'w'.*rounds the task-specific space up"):
        M.iso_cts_task_vector([{"w": rand(t, 3, 3)} for t in range(2)],
                              common_space_fraction=0.0)
