"""Tests for DARE (merging.drop_and_rescale): dare and dare_task_arithmetic."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.merging_refs import (SETTINGS, TRANSFORMS, M, assert_same_under, assert_trees_close,
                          assert_trees_equal, inputs, ref_ties, trees)


# --------------------------------------------------------------------------- DARE

@SETTINGS
@given(tree=trees(ints=False), seed=st.integers(0, 2**31 - 1))
def test_dare_with_drop_rate_zero_is_the_identity(tree, seed):
    out = M.dare(tree, drop_rate=0.0, key=jax.random.key(seed))
    assert_trees_equal(out, tree)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_dare_survivors_are_exactly_input_over_keep_rate(p, dtype):
    x = jnp.asarray(np.random.default_rng(2).normal(size=(40, 30)), dtype)
    out = M.dare({"x": x}, drop_rate=p, key=jax.random.key(3))["x"]
    assert out.dtype == dtype
    kept = np.asarray(out) != 0
    xn = np.asarray(x)
    # Correctly rounded division in the input's dtype, entry by entry.
    np.testing.assert_array_equal(np.asarray(out)[kept], (xn / np.dtype(dtype).type(1 - p))[kept])
    # The dropped fraction is Binomial(n, p): within 5 standard deviations.
    n = x.size
    assert abs((~kept).sum() - n * p) <= 5 * math.sqrt(n * p * (1 - p))
    unscaled = M.dare({"x": x}, drop_rate=p, key=jax.random.key(3), rescale=False)["x"]
    np.testing.assert_array_equal(np.asarray(unscaled)[kept], xn[kept])
    np.testing.assert_array_equal(np.asarray(unscaled) != 0, kept)


def _threefry2x32_np(k0, k1, x0, x1):
    """Threefry-2x32 with 20 rounds (Salmon et al., SC 2011), in numpy uint32."""
    def rotl(v, r):
        return (v << np.uint32(r)) | (v >> np.uint32(32 - r))
    ks = [np.uint32(k0), np.uint32(k1), np.uint32(k0) ^ np.uint32(k1) ^ np.uint32(0x1BD11BDA)]
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in ((13, 15, 26, 6), (17, 29, 16, 24))[i % 2]:
            x0 = x0 + x1
            x1 = rotl(x1, r) ^ x0
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


@pytest.mark.parametrize("shape", [(7, 5), (64,), (3, 1, 4)])
@pytest.mark.parametrize("q", [0.1, 0.5, 1.0])
def test_keep_mask_uses_both_words_of_each_threefry_hash(shape, q):
    # Counter j = (0, j) hashes to words (w1_j, w2_j): entry j of the flattened shape is
    # w1_j, entry j + ceil(n / 2) is w2_j; kept iff the top 24 bits / 2**24 < q.
    from taskvec_jax.merging.drop_and_rescale import _keep_mask
    key = jax.random.key(11)
    n = math.prod(shape)
    m = (n + 1) // 2
    k0, k1 = np.asarray(jax.random.key_data(key))
    with np.errstate(over="ignore"):
        w1, w2 = _threefry2x32_np(k0, k1, np.zeros(m, np.uint32), np.arange(m, dtype=np.uint32))
    words = np.concatenate([w1, w2])[:n]
    ref = ((words >> 8).astype(np.float64) * 2.0 ** -24 < q).reshape(shape)
    for k in (key, jax.random.key_data(key)):          # typed and raw keys
        np.testing.assert_array_equal(np.asarray(_keep_mask(k, q, shape)), ref)
        np.testing.assert_array_equal(np.asarray(jax.jit(_keep_mask, static_argnums=2)(
            k, q, shape)), ref)
    if q == 1.0:
        assert ref.all()
    # other key implementations draw with jax.random.bernoulli
    rbg = jax.random.key(11, impl="rbg")
    np.testing.assert_array_equal(np.asarray(_keep_mask(rbg, q, shape)),
                                  np.asarray(jax.random.bernoulli(rbg, q, shape)))


def test_written_out_threefry_gives_the_primitives_words():
    # dare_task_arithmetic hashes with _threefry2x32 (fusible into its sum), dare with
    # threefry2x32_p: the same words, hence the same masks; checked against the primitive
    # and against the numpy reference above, including counters with a high word.
    from jax.extend.random import threefry2x32_p
    from taskvec_jax.merging.drop_and_rescale import _keep_mask, _threefry2x32
    rng = np.random.default_rng(12)
    x1 = rng.integers(0, 2**32, 4096, dtype=np.uint32)
    x2 = rng.integers(0, 2**32, 4096, dtype=np.uint32)
    for seed in (0, 5, 2**31 - 1):
        k1, k2 = (jnp.asarray(w) for w in np.asarray(jax.random.key_data(jax.random.key(seed))))
        got = jax.jit(_threefry2x32)(k1, k2, jnp.asarray(x1), jnp.asarray(x2))
        want = threefry2x32_p.bind(k1, k2, jnp.asarray(x1), jnp.asarray(x2))
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        with np.errstate(over="ignore"):
            ref = _threefry2x32_np(np.uint32(k1), np.uint32(k2), x1, x2)
        for g, w in zip(got, ref):
            np.testing.assert_array_equal(np.asarray(g), w)
    key = jax.random.key(4)
    for shape in [(7, 5), (1000,)]:
        np.testing.assert_array_equal(np.asarray(_keep_mask(key, 0.3, shape, unrolled=True)),
                                      np.asarray(_keep_mask(key, 0.3, shape)))


def test_dare_task_arithmetic_stores_no_dropped_task_vector():
    # Each leaf is one program (shared by leaves of one shape): XLA's buffer assignment
    # holds its output and nothing leaf-sized besides (the T hashes, drops and the sum
    # are one fused pass). With the primitive's rolled hash loop, each task's words were
    # stored: 8 tasks' words and quotients, about 2 leaves per task.
    from taskvec_jax.merging import drop_and_rescale as D
    leaf = jax.ShapeDtypeStruct((3072, 768), jnp.float32)     # ViT-B/32's MLP weight
    nbytes = 3072 * 768 * 4
    compiled = D._dare_task_arithmetic_leaf_jit.lower(
        leaf, (leaf,) * 8, jnp.full(8, 0.3), 0.9, jax.random.key(0), jnp.uint32(3),
        rescale=True).compile()
    analysis = compiled.memory_analysis()
    assert analysis.output_size_in_bytes == nbytes
    assert analysis.temp_size_in_bytes < 0.01 * nbytes, analysis.temp_size_in_bytes


def test_dare_mean_over_keys_converges_to_the_input():
    p, num_keys = 0.6, 4000
    x = jnp.asarray(np.random.default_rng(4).normal(size=64))
    keys = jax.random.split(jax.random.key(5), num_keys)
    draws = jax.vmap(lambda k: M.dare({"x": x}, drop_rate=p, key=k)["x"])(keys)
    mean = np.asarray(draws.mean(0))
    # Each entry is x / (1 - p) * Bernoulli(1 - p): std |x| sqrt(p / (1 - p)).
    sigma = np.abs(np.asarray(x)) * math.sqrt(p / (1 - p)) / math.sqrt(num_keys)
    assert np.all(np.abs(mean - np.asarray(x)) <= 5 * sigma)
    # And the CLT scale is right (the error is not suspiciously small either).
    z = (mean - np.asarray(x)) / sigma
    assert 0.5 < np.std(z) < 1.5


def test_dare_is_deterministic_per_key_and_leaf_independent():
    tree = {"a": jnp.ones(50), "b": jnp.ones(50)}
    k = jax.random.key(7)
    out1, out2 = M.dare(tree, drop_rate=0.5, key=k), M.dare(tree, drop_rate=0.5, key=k)
    assert_trees_equal(out1, out2)
    assert not np.array_equal(out1["a"], out1["b"])   # leaves draw from different keys
    other = M.dare(tree, drop_rate=0.5, key=jax.random.key(8))
    assert not np.array_equal(out1["a"], other["a"])


def test_dare_ties_composes():
    base = {"w": jnp.zeros((4, 6))}
    rng = np.random.default_rng(9)
    taus = [{"w": jnp.asarray(rng.normal(size=(4, 6)))} for _ in range(3)]
    keys = jax.random.split(jax.random.key(10), 3)
    dropped = [M.dare(t, drop_rate=0.5, key=k) for t, k in zip(taus, keys)]
    out = M.ties(base, dropped, density=1.0)
    assert_trees_close(out, ref_ties(dropped, 1.0, "global", "mean"))



def test_dare_task_arithmetic_is_task_arithmetic_of_the_dropped_task_vectors():
    base, taus = inputs()
    key = jax.random.key(14)
    for alpha in (0.3, [1.0, -0.5, 2.0]):
        dropped = [M.dare(t, drop_rate=0.4, key=jax.random.fold_in(key, i))
                   for i, t in enumerate(taus)]
        want = M.task_arithmetic(base, dropped, alpha=alpha)
        got = M.dare_task_arithmetic(base, taus, alpha=alpha, drop_rate=0.4, key=key)
        assert_trees_close(got, want, rtol=1e-15, atol=1e-15)
        assert int(got["n"]) == 3
    # drop_rate 0 is plain task arithmetic, exactly.
    assert_trees_equal(M.dare_task_arithmetic(base, taus, alpha=0.5, drop_rate=0.0, key=key),
                       M.task_arithmetic(base, taus, alpha=0.5))


# --------------------------------------------------------------------------- jit / errors

@pytest.mark.parametrize("transform", TRANSFORMS)
def test_dare_under_jit_equals_eager(transform):
    base, _ = inputs()
    key = jax.random.key(0)
    assert_same_under(transform, {
        "dare": lambda t: M.dare(t[0], drop_rate=0.3, key=key),
        "dare_task_arithmetic": lambda t: M.dare_task_arithmetic(
            base, t, alpha=jnp.array([1.0, 0.5, 2.0]), drop_rate=0.3, key=key),
    }, exact=("dare",))


def test_dare_accepts_a_traced_drop_rate():
    x = {"x": jnp.arange(1.0, 41.0)}
    fn = jax.jit(lambda p: M.dare(x, drop_rate=p, key=jax.random.key(1)))
    assert_trees_equal(fn(0.25), M.dare(x, drop_rate=0.25, key=jax.random.key(1)))


@pytest.mark.parametrize("call, match", [
    (lambda b, t: M.dare(t[0], drop_rate=1.0, key=jax.random.key(0)),
     r"drop_rate must lie in \[0, 1\)"),
    (lambda b, t: M.dare(t[0], drop_rate=-0.1, key=jax.random.key(0)),
     r"drop_rate must lie in \[0, 1\)"),
    (lambda b, t: M.dare_task_arithmetic(b, t, drop_rate=1.0, key=jax.random.key(0)),
     r"drop_rate must lie in \[0, 1\)"),
    (lambda b, t: M.dare_task_arithmetic(b, [], drop_rate=0.5, key=jax.random.key(0)),
     "empty"),
    (lambda b, t: M.dare_task_arithmetic(b, t, alpha=[1.0, 2.0], drop_rate=0.5,
                                         key=jax.random.key(0)), "one entry per task"),
])
def test_bad_input_raises_a_clear_value_error(call, match):
    base, taus = inputs()
    with pytest.raises(ValueError, match=match):
        call(base, taus)
