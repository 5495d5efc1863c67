"""Tests for taskvec_jax.merging.coefficient_search."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import taskvec_jax as tvj

M = tvj.merging


def _setup():
    # Two tasks on a 2-D parameter; task t's "accuracy" 1 - |w_t - g_t| peaks where its
    # coordinate hits its target g_t. Task arithmetic moves the base along tau_1 + tau_2.
    base = {"w": jnp.zeros(2)}
    taus = [{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 1.0])}]
    targets = [0.6, 0.4]
    score_fns = [lambda p, t=t, g=g: 1.0 - jnp.abs(p["w"][t] - g)
                 for t, g in enumerate(targets)]
    finetuned = np.array([0.9, 0.8])
    return base, taus, targets, score_fns, finetuned


def _reference(alphas, targets, finetuned):
    scores = np.array([[1.0 - abs(a - g) for g in targets] for a in alphas])
    normalized = scores / finetuned
    return scores, normalized, normalized.mean(1)


@pytest.mark.parametrize("jit", [True, False])
def test_table_and_argmax_match_an_independent_computation(jit):
    base, taus, targets, score_fns, finetuned = _setup()
    alphas = np.linspace(0.0, 1.0, 11)
    result = M.coefficient_search(lambda a: M.task_arithmetic(base, taus, alpha=a), alphas,
                                  score_fns, finetuned, jit=jit)
    scores, normalized, mean = _reference(alphas, targets, finetuned)
    np.testing.assert_allclose(result.scores, scores, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(result.normalized, normalized, rtol=1e-14)
    np.testing.assert_allclose(result.mean_normalized, mean, rtol=1e-14)
    assert result.scores.shape == (11, 2)
    # Mean normalized: ((1 - |a - .6|) / .9 + (1 - |a - .4|) / .8) / 2 rises until
    # a = 0.4 (slope 1/.9 + 1/.8 > 0), then falls (1/.9 - 1/.8 < 0): best alpha 0.4.
    assert int(result.best_index) == int(np.argmax(mean)) == 4
    np.testing.assert_allclose(result.best_alpha, alphas[int(np.argmax(mean))])
    np.testing.assert_array_equal(result.finetuned_scores, finetuned)


def test_ties_pick_the_first_and_nan_rows_never_win():
    base, taus, _, _, _ = _setup()
    flat = [lambda p: jnp.asarray(0.5), lambda p: jnp.asarray(0.5)]
    result = M.coefficient_search(lambda a: M.task_arithmetic(base, taus, alpha=a),
                                  jnp.array([0.1, 0.2, 0.3]), flat, [1.0, 1.0])
    assert int(result.best_index) == 0
    nan_first = [lambda p: jnp.where(p["w"][0] < 0.15, jnp.nan, p["w"][0]),
                 lambda p: jnp.asarray(1.0)]
    result = M.coefficient_search(lambda a: M.task_arithmetic(base, taus, alpha=a),
                                  jnp.array([0.1, 0.2, 0.3]), nan_first, [1.0, 1.0])
    assert int(result.best_index) == 2
    assert np.isnan(result.mean_normalized[0])


def test_per_task_coefficient_grids_and_other_merges():
    base, taus, targets, score_fns, finetuned = _setup()
    grid = jnp.array([[0.6, 0.4], [0.5, 0.5], [1.0, 0.0]])
    result = M.coefficient_search(lambda a: M.task_arithmetic(base, taus, alpha=a), grid,
                                  score_fns, finetuned)
    assert int(result.best_index) == 0                 # hits both targets exactly
    np.testing.assert_allclose(result.scores[0], [1.0, 1.0])
    np.testing.assert_array_equal(result.best_alpha, [0.6, 0.4])
    # Any merge: TIES with its coefficient searched.
    result = M.coefficient_search(
        lambda a: M.ties(base, taus, density=1.0, alpha=a), jnp.linspace(0.0, 1.0, 5),
        score_fns, finetuned)
    assert result.scores.shape == (5, 2)


def test_coefficient_search_under_jit():
    base, taus, _, score_fns, finetuned = _setup()
    fn = jax.jit(lambda grid: M.coefficient_search(
        lambda a: M.task_arithmetic(base, taus, alpha=a), grid, score_fns, finetuned))
    grid = jnp.linspace(0.0, 1.0, 6)
    got = fn(grid)
    want = M.coefficient_search(lambda a: M.task_arithmetic(base, taus, alpha=a), grid,
                                score_fns, finetuned, jit=False)
    np.testing.assert_allclose(got.mean_normalized, want.mean_normalized, rtol=1e-14)
    assert int(got.best_index) == int(want.best_index)


def test_bad_input_raises_a_clear_value_error():
    base, taus, _, score_fns, finetuned = _setup()
    merge = lambda a: M.task_arithmetic(base, taus, alpha=a)
    with pytest.raises(ValueError, match="non-empty grid"):
        M.coefficient_search(merge, [], score_fns, finetuned)
    with pytest.raises(ValueError, match="non-empty grid"):
        M.coefficient_search(merge, 0.5, score_fns, finetuned)
    with pytest.raises(ValueError, match="score_fns is empty"):
        M.coefficient_search(merge, [0.5], [], [])
    with pytest.raises(ValueError, match=r"one entry per task \(2\)"):
        M.coefficient_search(merge, [0.5], score_fns, [0.9])
    with pytest.raises(ValueError, match="must be positive"):
        M.coefficient_search(merge, [0.5], score_fns, [0.9, 0.0])
    with pytest.raises(ValueError, match=r"score_fns\[1\] is not callable"):
        M.coefficient_search(merge, [0.5], [score_fns[0], 3], finetuned)
