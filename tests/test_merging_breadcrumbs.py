"""Tests for Model Breadcrumbs (merging.model_breadcrumbs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.merging_refs import (COVER_SETTINGS, MASK_CONFIGS, TRANSFORMS, M, assert_same_under,
                          assert_trees_close, assert_trees_equal, class_trees, inputs,
                          ref_mask)

from taskvec_jax.merging import model_breadcrumbs

# --------------------------------------------------------------------------- Breadcrumbs

def test_breadcrumbs_hand_worked():
    tau = {"w": jnp.array([[5.0, -1.0, 3.0, -2.0, 0.5], [0.1, 0.2, -9.0, 0.3, 4.0]]),
           "b": jnp.array([2.0, -3.0])}
    # Rows of n = 5: drop ceil(0.2 * 5) = 1 outlier, keep the next ceil(0.4 * 5) = 2.
    # Row 0 by magnitude: 5, 3, -2, -1, 0.5 -> keep 3, -2.  Row 1: -9, 4, 0.3, ... -> 4, 0.3.
    # b is one row of n = 2: drop ceil(0.4) = 1 (the -3), keep min(2, 1 + 1) - 1 = 1: 2.
    band = {"w": np.array([[0.0, 0.0, 3.0, -2.0, 0.0], [0.0, 0.0, 0.0, 0.3, 4.0]]),
            "b": np.array([2.0, 0.0])}
    base = {"w": jnp.ones((2, 5)), "b": jnp.zeros(2)}
    second = jax.tree.map(lambda x: -2.0 * x, tau)        # same band, scaled
    out = M.breadcrumbs(base, [tau, second], density=0.4, outliers=0.2, alpha=[1.0, 0.25])
    np.testing.assert_allclose(out["w"], 1.0 + 0.5 * band["w"], rtol=1e-15)
    np.testing.assert_allclose(out["b"], 0.5 * band["b"], rtol=1e-15)
    trimmed = M.trim(tau, density=0.4, outliers=0.2, scope="row")
    assert_trees_equal(trimmed, band)


@COVER_SETTINGS
@given(taus=st.integers(1, 3).flatmap(lambda t: st.lists(class_trees(), min_size=t,
                                                         max_size=t)))
def test_breadcrumbs_keeps_exactly_its_band(taus):
    # Breadcrumbs' band is the mask's band: the same covering configurations.
    base = jax.tree.map(jnp.zeros_like, taus[0])
    alphas = np.linspace(0.5, 1.5, len(taus))
    for scope, density, outliers in MASK_CONFIGS:
        out = M.breadcrumbs(base, taus, density=density, outliers=outliers, alpha=alphas,
                            scope=scope)
        expected = jax.tree.map(np.zeros_like, base)
        for a, tau in zip(alphas, taus):
            band = ref_mask(tau, density, outliers, scope)
            expected = jax.tree.map(lambda e, x, m, a=a: e + a * np.where(m, x, 0.0),
                                    expected, tau, band)
        assert_trees_close(out, expected, rtol=1e-14, atol=1e-14)


# --------------------------------------------------------------------------- jit / errors

@pytest.mark.parametrize("transform", TRANSFORMS)
def test_breadcrumbs_under_jit_equals_eager(transform):
    base, _ = inputs()
    assert_same_under(transform, {
        "breadcrumbs": lambda t: M.breadcrumbs(base, t, density=0.4, outliers=0.1,
                                               alpha=jnp.array([1.0, 0.5, 2.0])),
    }, exact=())


@pytest.mark.parametrize("call, match", [
    (lambda b, t: M.breadcrumbs(b, []), "empty"),
    (lambda b, t: M.breadcrumbs(b, t, scope="tensor"), "unknown scope 'tensor'"),
    (lambda b, t: M.breadcrumbs(b, t, density=0.5, outliers=0.6), "must not exceed 1"),
    (lambda b, t: M.breadcrumbs(b, t, outliers=1.0), r"outliers must lie in \[0, 1\)"),
    (lambda b, t: M.breadcrumbs(b, t, alpha=[1.0, 2.0]), "one entry per task"),
])
def test_bad_input_raises_a_clear_value_error(call, match):
    base, taus = inputs()
    with pytest.raises(ValueError, match=match):
        call(base, taus)


def test_mismatched_trees_name_the_task_and_path():
    base, taus = inputs()
    missing = {"w": taus[2]["w"], "n": None}
    with pytest.raises(ValueError, match=r"task vector 2: .*missing leaf 'b'"):
        M.breadcrumbs(base, [taus[0], taus[1], missing])


def test_breadcrumbs_memory_does_not_grow_with_the_number_of_tasks():
    # Under an outer jit the tasks run in a loop: temporaries are the same for 2 and 8
    # tasks up to the stacked per-task thresholds (the compiled program's memory_analysis,
    # CPU); one model-sized buffer per task would exceed the bound.
    base = {"w": jnp.zeros((500, 400), jnp.float32), "b": jnp.zeros(100_000, jnp.float32)}
    model_bytes = 300_000 * 4
    temps = {}
    for num_tasks in (2, 8):
        taus = tuple(base for _ in range(num_tasks))
        temps[num_tasks] = model_breadcrumbs._breadcrumbs_graph.lower(
            base, taus, jnp.ones(num_tasks), density=0.2, outliers=0.1,
            scope="row").compile().memory_analysis().temp_size_in_bytes
    # The tasks' thresholds (two [rows, 1] pairs of 32-bit values per leaf) are stacked in
    # the loop: that, not the transients, grows with the number of tasks.
    thresholds_bytes = 2 * 2 * 8 * (500 + 1)
    assert temps[8] <= temps[2] + 6 * thresholds_bytes + 0.01 * model_bytes
    assert temps[8] <= 6 * model_bytes
