"""Counts mean what users write: density k / n keeps exactly k, decimals stay decimals."""

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import taskvec_jax as tvj
from taskvec_jax.merging import _common

M = tvj.merging


def test_the_issue_examples():
    assert 409 / 2040 == 0.20049019607843138
    assert _common.count_of(409 / 2040, 2040) == 409        # was 410
    assert _common.count_of(0.07, 100) == 7                  # not the float's 8
    assert _common.count_of(0.33, 3) == 1                    # a decimal, not 1/3
    assert _common.count_of(1e-9, 10) == 1 and _common.count_of(1.0, 10) == 10


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 10_000).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))))
def test_count_of_k_over_n_is_k(nk):
    n, k = nk
    assert _common.count_of(k / n, n) == k


def test_count_of_k_over_n_is_k_exhaustively_for_small_n():
    assert all(_common.count_of(k / n, n) == k for n in range(1, 200) for k in range(1, n + 1))


@settings(max_examples=6, deadline=None)
@given(st.integers(1, 10_000).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))))
def test_trim_keeps_exactly_k(nk):
    n, k = nk
    x = {"v": jnp.asarray(np.random.default_rng(n).permutation(n) + 1.0)}
    out = np.asarray(M.trim(x, density=k / n, scope="leaf")["v"])
    assert int((out != 0).sum()) == k
    assert (out[out != 0] > n - k).all()                   # the k largest
