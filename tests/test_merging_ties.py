"""Tests for TIES-merging (merging.ties_merging): ties and ties_task_vector.

References: tests/merging_refs.py.
"""

import itertools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.merging_refs import (COVER_SETTINGS, SETTINGS, TRANSFORMS, M, assert_same_under,
                          assert_trees_close, assert_trees_equal, class_trees, inputs,
                          ref_ties)

from taskvec_jax.merging import _select, ties_merging

# --------------------------------------------------------------------------- TIES

TAUS_HAND = [jnp.array([1.0, -1.0, 2.0, 0.0, 1.0]),
             jnp.array([-1.0, -2.0, 2.0, 0.0, -1.0]),
             jnp.array([-1.0, 4.0, -1.0, 0.0, 0.0])]


@pytest.mark.parametrize("density, merge, expected", [
    # No trimming. Column sums 1-1-1 = -1, -1-2+4 = 1, 2+2-1 = 3, 0, 1-1+0 = 0.
    # Elected signs -, +, +, 0, 0; agreeing values {-1, -1}, {4}, {2, 2}, {}, {}.
    (1.0, "mean", [-1.0, 4.0, 2.0, 0.0, 0.0]),
    (1.0, "sum", [-2.0, 4.0, 4.0, 0.0, 0.0]),
    # density 0.4 keeps k = ceil(2.0) = 2 per task (ties to the earlier position):
    # tau_1 -> [1, 0, 2, 0, 0], tau_2 -> [0, -2, 2, 0, 0], tau_3 -> [-1, 4, 0, 0, 0].
    # Column 0 now sums to 0: no sign is elected and it merges to 0.
    (0.4, "mean", [0.0, 4.0, 2.0, 0.0, 0.0]),
    (0.4, "sum", [0.0, 4.0, 4.0, 0.0, 0.0]),
])
def test_ties_hand_worked(density, merge, expected):
    taus = [{"v": t} for t in TAUS_HAND]
    merged = M.ties_task_vector(taus, density=density, merge=merge)
    np.testing.assert_array_equal(merged["v"], expected)
    base = {"v": jnp.full(5, 10.0)}
    out = M.ties(base, taus, density=density, merge=merge, alpha=0.5)
    np.testing.assert_array_equal(out["v"], 10.0 + 0.5 * np.array(expected))


# (scope, density, merge, consensus): every scope with both merges and both elections.
TIES_CONFIGS = [("global", 0.07, "mean", "mass"), ("global", 1.0, "sum", "count"),
                ("leaf", 0.25, "sum", "mass"), ("leaf", 0.55, "mean", "count"),
                ("row", 0.55, "sum", "mass"), ("row", 0.25, "mean", "count")]


@COVER_SETTINGS
@given(taus=st.integers(1, 4).flatmap(lambda t: st.lists(class_trees(ints=True),
                                                         min_size=t, max_size=t)))
def test_ties_matches_reference(taus):
    for scope, density, merge, consensus in TIES_CONFIGS:
        merged = M.ties_task_vector(taus, density=density, scope=scope, merge=merge,
                                    consensus=consensus)
        assert_trees_close(merged, ref_ties(taus, density, scope, merge, consensus),
                           rtol=1e-15, atol=0)


@SETTINGS
@given(signs=hnp.arrays(np.float64, (3, 4), elements=st.sampled_from([-1.0, 1.0])),
       mags=hnp.arrays(np.float64, (5, 3, 4), elements=st.floats(0.1, 10.0)),
       num_tasks=st.integers(1, 5))
def test_ties_density_one_on_same_signed_vectors_is_mean_or_sum(signs, mags, num_tasks):
    taus = [{"w": jnp.asarray(signs * mags[t])} for t in range(num_tasks)]
    stacked = signs * mags[:num_tasks]
    np.testing.assert_allclose(M.ties_task_vector(taus, density=1.0, merge="mean")["w"],
                               stacked.mean(0), rtol=1e-14)
    np.testing.assert_allclose(M.ties_task_vector(taus, density=1.0, merge="sum")["w"],
                               stacked.sum(0), rtol=1e-14)
    base = {"w": jnp.ones((3, 4))}
    np.testing.assert_allclose(M.ties(base, taus, density=1.0, alpha=0.3)["w"],
                               1.0 + 0.3 * stacked.mean(0), rtol=1e-14)


def test_ties_keeps_base_at_non_float_leaves_and_float32():
    base = {"w": jnp.ones((2, 3), jnp.float32), "step": jnp.array(5)}
    taus = [{"w": jnp.array([[1.0, -2.0, 3.0], [0.5, 0.0, -1.0]], jnp.float32), "step": None},
            {"w": jnp.array([[-1.0, -1.0, 2.0], [1.5, 1.0, -1.0]], jnp.float32), "step": None}]
    out = M.ties(base, taus, density=1.0)
    assert out["w"].dtype == jnp.float32
    assert int(out["step"]) == 5
    expected = ref_ties([{"w": np.asarray(t["w"], np.float64)} for t in taus], 1.0,
                        "global", "mean")["w"]
    np.testing.assert_allclose(out["w"], 1.0 + expected, rtol=1e-6)



# --------------------------------------------------------------------------- consensus / alpha

def test_count_consensus_closed_form_where_count_and_mass_disagree():
    # Three tasks, no trimming. Column 0: values 1, 1, -5: mass -3 elects -, count 2:1
    # elects +. Column 1: 2, -1, -3: mass -2 and count 1:2 both elect -. Column 2:
    # 1, -1, 0: count 1:1 elects nothing (0), mass 0 nothing either. Column 3: 3, -1, 0:
    # count 1:1 elects nothing, mass +2 elects +.
    taus = [{"v": jnp.array([1.0, 2.0, 1.0, 3.0])}, {"v": jnp.array([1.0, -1.0, -1.0, -1.0])},
            {"v": jnp.array([-5.0, -3.0, 0.0, 0.0])}]
    cases = {("mass", "mean"): [-5.0, -2.0, 0.0, 3.0], ("mass", "sum"): [-5.0, -4.0, 0.0, 3.0],
             ("count", "mean"): [1.0, -2.0, 0.0, 0.0], ("count", "sum"): [2.0, -4.0, 0.0, 0.0]}
    for (consensus, merge), expected in cases.items():
        merged = M.ties_task_vector(taus, density=1.0, merge=merge, consensus=consensus)
        np.testing.assert_array_equal(merged["v"], expected)
        np.testing.assert_array_equal(
            ref_ties(taus, 1.0, "global", merge, consensus)["v"], expected)
        out = M.ties({"v": jnp.ones(4)}, taus, density=1.0, merge=merge, consensus=consensus,
                     alpha=2.0)
        np.testing.assert_array_equal(out["v"], 1.0 + 2.0 * np.array(expected))


@pytest.mark.parametrize("consensus", ["mass", "count"])
def test_per_task_alpha_equal_to_a_scalar_alpha_is_todays_result(consensus):
    # Scaling every task vector by alpha before trim / elect / disjoint merge equals
    # scaling the merged vector by alpha, for either sign: exactly, since powers of two
    # scale integer-valued task vectors without rounding.
    rng = np.random.default_rng(12)
    base = {"w": jnp.asarray(rng.normal(size=(3, 4)))}
    taus = [{"w": jnp.asarray(rng.integers(-3, 4, size=(3, 4)).astype(np.float64))}
            for _ in range(3)]
    for alpha, (density, scope, merge) in itertools.product(
            [0.5, -2.0, 0.25, -1.0], [(0.5, "global", "mean"), (0.4, "row", "sum"),
                                      (1.0, "leaf", "mean")]):
        opts = dict(density=density, scope=scope, merge=merge, consensus=consensus)
        scalar = M.ties(base, taus, alpha=alpha, **opts)
        per_task = M.ties(base, taus, alpha=[alpha] * 3, **opts)
        assert_trees_equal(per_task, scalar)
        np.testing.assert_array_equal(
            scalar["w"], np.asarray(base["w"]) + alpha * np.asarray(
                M.ties_task_vector(taus, **opts)["w"]))


def test_per_task_alpha_scales_each_task_vector_before_the_election():
    # alpha = (1, 1, -1) flips task 2: on column 0 the values become 1, 1, 5 (all agree).
    taus = [{"v": jnp.array([1.0, 2.0])}, {"v": jnp.array([1.0, -1.0])},
            {"v": jnp.array([-5.0, -3.0])}]
    out = M.ties({"v": jnp.zeros(2)}, taus, density=1.0, alpha=[1.0, 1.0, -1.0])
    np.testing.assert_array_equal(out["v"], [7.0 / 3.0, 2.5])
    rng = np.random.default_rng(13)
    base = {"w": jnp.zeros((3, 4))}
    taus = [{"w": jnp.asarray(rng.normal(size=(3, 4)))} for _ in range(3)]
    alphas = np.array([0.3, -1.7, 2.0])
    for consensus in ("mass", "count"):
        out = M.ties(base, taus, density=0.5, alpha=alphas, consensus=consensus)
        assert_trees_close(out, ref_ties(taus, 0.5, "global", "mean", consensus, alphas),
                           rtol=1e-14, atol=1e-15)
        traced = jax.jit(lambda a, c=consensus: M.ties(base, taus, density=0.5, alpha=a,
                                                       consensus=c))(jnp.asarray(alphas))
        assert_trees_close(traced, out, rtol=1e-15, atol=1e-15)


def test_ties_merge_is_a_deprecated_alias_of_ties_task_vector():
    _, taus = inputs()
    with pytest.warns(DeprecationWarning, match="ties_task_vector"):
        old = M.ties_merge(taus, density=0.5, scope="row", merge="sum")
    assert_trees_equal(old, M.ties_task_vector(taus, density=0.5, scope="row", merge="sum"))
    from taskvec_jax.merging import sparsify
    with pytest.warns(DeprecationWarning, match="moved to taskvec_jax.merging.ties_merging"):
        assert sparsify.ties is M.ties


# --------------------------------------------------------------------------- jit / errors

@pytest.mark.parametrize("transform", TRANSFORMS)
def test_ties_under_jit_equals_eager(transform):
    base, _ = inputs()
    assert_same_under(transform, {
        "ties_task_vector": lambda t: M.ties_task_vector(t, density=0.5, scope="row"),
        "ties": lambda t: M.ties(base, t, density=0.5, alpha=jnp.asarray(0.7)),
    }, exact=())


@pytest.mark.parametrize("call, match", [
    (lambda b, t: M.ties(b, [], density=0.5), "empty"),
    (lambda b, t: M.ties_task_vector([], density=0.5), "empty"),
    (lambda b, t: M.ties(b, t, density=0.0), r"density must lie in \(0, 1\]"),
    (lambda b, t: M.ties(b, t, density=1.5), r"density must lie in \(0, 1\]"),
    (lambda b, t: M.ties(b, t, scope="column"), "unknown scope 'column'"),
    (lambda b, t: M.ties(b, t, merge="median"), "unknown merge 'median'"),
    (lambda b, t: M.ties(b, t, consensus="vote"), "unknown consensus 'vote'"),
    # alpha is per task since the redesign: three task vectors take a scalar or [3].
    (lambda b, t: M.ties(b, t, alpha=[1.0, 2.0]), "one entry per task"),
    (lambda b, t: M.ties(b, t, alpha=jnp.ones((3, 1))), "one entry per task"),
])
def test_bad_input_raises_a_clear_value_error(call, match):
    base, taus = inputs()
    with pytest.raises(ValueError, match=match):
        call(base, taus)


def test_mismatched_trees_name_the_task_and_path():
    base, taus = inputs()
    bad = dict(taus[1], w=jnp.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"task vector 1: leaf 'w' has shape \(3, 5\)"):
        M.ties(base, [taus[0], bad], density=0.5)
    with pytest.raises(ValueError, match=r"task vector 1: leaf 'w' has shape \(3, 5\)"):
        M.ties_task_vector([taus[0], bad])
    cplx = [{"w": jnp.ones(3, jnp.complex64)}]
    with pytest.raises(ValueError, match=r"task vector 0: leaf 'w' is complex"):
        M.ties_task_vector(cplx)


MEMORY_BASE = {"w": jnp.zeros((500, 400), jnp.float32), "b": jnp.zeros(100_000, jnp.float32)}
MODEL_BYTES = 300_000 * 4


def test_ties_memory_does_not_grow_with_the_number_of_tasks():
    # The documented memory claims, checked on the compiled programs (CPU). Eagerly, each
    # task's ranking is one program returning only thresholds (temporaries within 3 model
    # sizes), and the merge stores nothing but its output (every output leaf is one fused
    # pass over the tasks). Under an outer jit the rankings run in a fori_loop:
    # temporaries are the same for 2 and 8 tasks.
    base = MEMORY_BASE
    for scope in ("global", "row"):
        # Eagerly the global scope is ranked in one program, the row scope leaf by leaf;
        # the leaves here fit in one histogram block, whose index and update buffers XLA
        # materializes (64-bit under x64), plus the histogram (at most 2**17 bins).
        groups = [list(base.values())] if scope == "global" else [[x] for x in base.values()]
        for leaves in groups:
            stats = _select._band_thresholds_jit.lower(
                leaves, 0.2, 0.0, scope).compile().memory_analysis()
            assert stats.temp_size_in_bytes <= 5 * sum(x.nbytes for x in leaves) + 2 ** 20
        thresholds = [jax.eval_shape(lambda b: ties_merging._thresholds(
            b, density=0.2, scope=scope), base)] * 8
        stats = ties_merging._ties_merge_jit.lower(
            (base,) * 8, thresholds, None, base, jnp.asarray(1.0), density=0.2,
            scope=scope, merge="mean", consensus="mass").compile().memory_analysis()
        assert stats.temp_size_in_bytes <= 0.01 * MODEL_BYTES
        assert stats.output_size_in_bytes <= 1.01 * MODEL_BYTES
    temps = {}
    for num_tasks in (2, 8):
        taus = tuple(base for _ in range(num_tasks))
        temps[num_tasks] = ties_merging._ties_graph.lower(
            taus, None, None, None, density=0.2, scope="global", merge="mean",
            consensus="mass").compile().memory_analysis().temp_size_in_bytes
    assert temps[8] <= temps[2] + 0.01 * MODEL_BYTES
    assert temps[8] <= 6 * MODEL_BYTES
