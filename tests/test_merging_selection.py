"""MagMax, TALL masks / Consensus, DELLA: closed forms, randomness, conventions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import taskvec_jax as tvj

M = tvj.merging
TOL = dict(rtol=1e-12, atol=1e-12)


def rand(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


def test_magmax_of_non_overlapping_supports_is_the_sum():
    rng = np.random.default_rng(0)
    owner = rng.integers(0, 3, size=(6, 5))
    taus = [{"w": jnp.asarray(np.where(owner == t, rng.normal(size=(6, 5)), 0.0))}
            for t in range(3)]
    np.testing.assert_array_equal(M.magmax_task_vector(taus)["w"],
                                  sum(t["w"] for t in taus))
    base = {"w": rand(1, 6, 5)}
    np.testing.assert_allclose(M.magmax(base, taus, alpha=0.5)["w"],
                               base["w"] + 0.5 * sum(t["w"] for t in taus), **TOL)


def test_magmax_picks_the_largest_scaled_magnitude_per_task_alpha():
    taus = [{"v": jnp.array([1.0, -3.0])}, {"v": jnp.array([-2.0, 1.0])}]
    np.testing.assert_array_equal(M.magmax_task_vector(taus)["v"], [-2.0, -3.0])
    # alpha scales first: 4 * tau_1 now dominates the second entry
    np.testing.assert_array_equal(M.magmax_task_vector(taus, alpha=[1.0, 4.0])["v"],
                                  [-8.0, 4.0])


def test_tall_masks_hand_worked_and_models():
    t1, t2 = jnp.array([2.0, 0.1, -1.0]), jnp.array([0.1, 2.0, 1.0])
    # tau_MTL = [2.1, 2.1, 0]; |t1| > 1 * |tau_MTL - t1| = [0.1, 2.0, 1.0] -> [T, F, F]
    m1, m2 = M.tall_masks([{"v": t1}, {"v": t2}], mask_lambda=1.0)
    np.testing.assert_array_equal(m1["v"], [True, False, False])
    np.testing.assert_array_equal(m2["v"], [False, True, False])
    base = {"v": jnp.ones(3)}
    models = M.tall_mask_models(base, [{"v": t1}, {"v": t2}], mask_lambda=1.0)
    np.testing.assert_allclose(models[0]["v"], [3.1, 1.0, 1.0], **TOL)
    np.testing.assert_allclose(models[1]["v"], [1.0, 3.1, 1.0], **TOL)
    # a per-task lambda, and lambda 0 keeps every nonzero entry
    m1, _ = M.tall_masks([{"v": t1}, {"v": t2}], mask_lambda=[0.0, 1.0])
    np.testing.assert_array_equal(m1["v"], [True, True, True])


def test_consensus_keeps_entries_used_by_at_least_k_tasks():
    taus = [{"v": rand(t, 40), "step": None} for t in range(4)]
    masks = M.tall_masks(taus, mask_lambda=0.5)
    counts = sum(np.asarray(m["v"], int) for m in masks)
    base = {"v": rand(9, 40), "step": jnp.int32(2)}
    total = sum(t["v"] for t in taus)
    for k in (0, 2, 5):
        out = M.consensus(base, taus, min_tasks=k, mask_lambda=0.5)
        np.testing.assert_allclose(out["v"], base["v"] + np.where(counts >= k, total, 0),
                                   **TOL)
        assert out["step"] == 2
    # k = 0 is task arithmetic, k > T the base
    np.testing.assert_allclose(M.consensus(base, taus, min_tasks=0)["v"],
                               M.task_arithmetic(base, taus, alpha=1.0)["v"], **TOL)
    # a supplied multi-task vector (e.g. TIES) is what gets masked
    other = {"v": rand(11, 40), "step": None}
    out = M.consensus(base, taus, min_tasks=1, multitask_vector=other)
    c = sum(np.asarray(m["v"], int) for m in M.tall_masks(taus, multitask_vector=other))
    np.testing.assert_allclose(out["v"], base["v"] + np.where(c >= 1, other["v"], 0), **TOL)


def test_della_keep_probabilities_rank_each_output_column():
    x = jnp.array([[3.0, -1.0], [-1.0, 5.0], [2.0, 0.5]])   # flax [in=3, out=2]
    p = M.della_keep_probabilities({"w": x, "b": jnp.array([1.0, -4.0, 2.0, 0.0])},
                                   density=0.5, epsilon=0.2)
    # column 0 magnitudes [3, 1, 2] -> ranks [2, 0, 1] -> p = 0.3 + 0.4 * rank / 2
    np.testing.assert_allclose(p["w"][:, 0], [0.7, 0.3, 0.5], **TOL)
    np.testing.assert_allclose(p["w"][:, 1], [0.5, 0.7, 0.3], **TOL)
    np.testing.assert_allclose(p["b"], [0.3 + 0.4 / 3, 0.7, 0.3 + 0.8 / 3, 0.3], **TOL)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_della_ranks_equal_magnitudes_by_position_and_inf_highest(dtype):
    # The ranking sorts |x|'s integer bit pattern with the position: equal magnitudes of
    # either sign (and -0 next to +0) rank by position, earlier lower, as a stable argsort.
    col = np.array([2.0, -2.0, -0.0, 0.0, np.inf, 2.0, -1.5, 1e-30, -np.inf, 0.5])
    x = np.stack([col, col[::-1]], axis=1)                     # flax [in=10, out=2]
    p = M.della_keep_probabilities({"w": jnp.asarray(x, dtype)}, density=0.5,
                                   epsilon=0.25)["w"]
    assert p.dtype == dtype
    for j in range(2):
        rank = np.empty(10)
        rank[np.argsort(np.abs(x[:, j]), kind="stable")] = np.arange(10)
        np.testing.assert_allclose(np.asarray(p[:, j], np.float64),
                                   0.25 + 0.5 * rank / 9, rtol=1e-6, atol=0)


def test_della_prune_rescales_and_is_deterministic_per_key():
    x = {"w": rand(0, 30, 20)}
    key = jax.random.key(0)
    a = M.della_prune(x, key=key, density=0.5, epsilon=0.2)
    b = M.della_prune(x, key=key, density=0.5, epsilon=0.2)
    np.testing.assert_array_equal(a["w"], b["w"])
    kept = np.asarray(a["w"]) != 0
    assert 0.4 < kept.mean() < 0.6
    np.testing.assert_allclose(np.abs(a["w"]).sum(), np.abs(x["w"]).sum(), rtol=1e-12)
    ratio = np.asarray(a["w"])[kept] / np.asarray(x["w"])[kept]
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-12)       # one l1 factor
    # "probability": kept / p, unbiased; None: the raw kept entries
    p = M.della_keep_probabilities(x, density=0.5, epsilon=0.2)["w"]
    c = M.della_prune(x, key=key, density=0.5, epsilon=0.2, rescale="probability")["w"]
    np.testing.assert_allclose(np.asarray(c)[kept], (x["w"] / p)[kept], **TOL)
    d = M.della_prune(x, key=key, density=0.5, epsilon=0.2, rescale=None)["w"]
    np.testing.assert_array_equal(d, np.where(kept, x["w"], 0))
    assert (np.asarray(M.della_prune(x, key=jax.random.key(1), density=0.5)["w"]) !=
            np.asarray(a["w"])).any()
    np.testing.assert_array_equal(M.della_prune(x, key=key, density=1.0)["w"], x["w"])


def test_della_mean_over_keys_of_probability_rescale_is_unbiased():
    x = {"v": rand(3, 50)}
    keys = jax.random.split(jax.random.key(5), 400)
    f = jax.jit(jax.vmap(lambda k: M.della_prune(x, key=k, density=0.5, epsilon=0.3,
                                                 rescale="probability")["v"]))
    mean = np.asarray(f(keys)).mean(0)
    assert np.abs(mean - np.asarray(x["v"])).max() < 0.5 * np.abs(x["v"]).max()
    np.testing.assert_allclose(mean.mean(), np.asarray(x["v"]).mean(), atol=0.1)


def test_della_merge_hand_worked_with_density_one():
    # density 1 keeps everything: della is the weighted disjoint mean with + on ties.
    taus = [{"v": jnp.array([1.0, 2.0, -1.0])}, {"v": jnp.array([3.0, -2.0, -1.0])}]
    base = {"v": jnp.zeros(3)}
    key = jax.random.key(0)
    out = M.della(base, taus, key=key, density=1.0, weights=[1.0, 3.0])["v"]
    # mass: [+, -, -]; entry 0: (1 + 9) / 4; entry 1: -6 / 3; entry 2: (-1 - 3) / 4
    np.testing.assert_allclose(out, [2.5, -2.0, -1.0], **TOL)
    count = M.della(base, taus, key=key, density=1.0, weights=[1.0, 3.0],
                    consensus="count")["v"]
    np.testing.assert_allclose(count, [2.5, 2.0, -1.0], **TOL)      # count 1-1 ties: +
    lin = M.della_linear(base, taus, key=key, density=1.0, alpha=[1.0, 3.0])["v"]
    np.testing.assert_allclose(lin, [10.0, -4.0, -4.0], **TOL)


@pytest.mark.parametrize("method", ["magmax", "consensus", "della"])
def test_jit_equals_eager_and_non_float_leaves_kept(method):
    taus = [{"w": rand(t, 5, 4), "step": None} for t in range(3)]
    base = {"w": rand(7, 5, 4), "step": jnp.int32(3)}
    kw = {"key": jax.random.key(0)} if method.startswith("della") else {}
    fn = lambda b, t: getattr(M, method)(b, t, **kw)  # noqa: E731
    eager, jitted = fn(base, taus), jax.jit(fn)(base, taus)
    np.testing.assert_allclose(jitted["w"], eager["w"], **TOL)
    assert eager["step"] == 3 and jitted["step"] == 3
    if method.startswith("della"):
        return        # DELLA's sums are the shared driver's (checked on magmax/consensus)
    low = fn({"w": base["w"].astype(jnp.bfloat16), "step": base["step"]},
             [{"w": t["w"].astype(jnp.bfloat16), "step": None} for t in taus])
    assert low["w"].dtype == jnp.bfloat16


def test_bad_input_raises_clear_errors():
    taus = [{"w": rand(0, 3, 2)}, {"w": rand(1, 3, 2)}]
    base = {"w": jnp.zeros((3, 2))}
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="density \\+/- epsilon"):
        M.della(base, taus, key=key, density=0.1, epsilon=0.2)
    with pytest.raises(ValueError, match="consensus"):
        M.della(base, taus, key=key, consensus="sum")
    with pytest.raises(ValueError, match="alpha must be a scalar for della"):
        M.della(base, taus, key=key, alpha=[1.0, 2.0])
    with pytest.raises(ValueError, match="mask_lambda"):
        M.tall_masks(taus, mask_lambda=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="min_tasks"):
        M.consensus(base, taus, min_tasks=-1)
    with pytest.raises(ValueError, match="task vector 1.*'w'"):
        M.magmax(base, [taus[0], {"w": jnp.zeros((2, 2))}])
