"""Tests for taskvec_jax.merging.soups: uniform, greedy and learned soups."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import taskvec_jax as tvj

M = tvj.merging
TRANSFORMS = [pytest.param(jax.jit, id="jit"), pytest.param(lambda f: f, id="eager")]


def _models(rng, num, shapes=((3, 2), (2,))):
    return [{"w": jnp.asarray(rng.normal(size=shapes[0])), "b": jnp.asarray(rng.normal(size=shapes[1]))}
            for _ in range(num)]


# --------------------------------------------------------------------------- uniform

@pytest.mark.parametrize("transform", TRANSFORMS)
def test_uniform_soup_is_the_mean(transform):
    models = _models(np.random.default_rng(0), 4)
    soup = transform(M.uniform_soup)(models)
    for k in ("w", "b"):
        np.testing.assert_allclose(soup[k], np.mean([np.asarray(m[k]) for m in models], 0),
                                   rtol=1e-15)


def test_uniform_soup_keeps_dtypes_and_non_float_leaves_of_model_zero():
    models = [{"w": jnp.array([1.0, 2.0], jnp.bfloat16), "n": jnp.array(3)},
              {"w": jnp.array([2.0, 5.0], jnp.bfloat16), "n": jnp.array(4)}]
    soup = M.uniform_soup(models)
    assert soup["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(soup["w"].astype(np.float32), [1.5, 3.5])
    assert int(soup["n"]) == 3


# --------------------------------------------------------------------------- greedy

def test_greedy_soup_hand_worked():
    # score = -(soup - 0)^2. Individual scores: -1, -1, -9, -0.25. Offer order: 3, 0, 1
    # (tie with 0 broken by index), 2. Soups: {3} = -0.5 -> add 0: 0.25 (-0.0625, kept)
    # -> add 1: -1/6 (-1/36, kept) -> add 2: 0.625 (-0.39, rejected).
    models = [{"x": jnp.array(v)} for v in (1.0, -1.0, 3.0, -0.5)]
    result = M.greedy_soup(models, lambda p: -p["x"] ** 2)
    np.testing.assert_array_equal(result.order, [3, 0, 1, 2])
    np.testing.assert_array_equal(result.selected, [True, True, False, True])
    np.testing.assert_allclose(result.individual_scores, [-1.0, -1.0, -9.0, -0.25])
    np.testing.assert_allclose(result.params["x"], -1.0 / 6.0, rtol=1e-15)
    np.testing.assert_allclose(result.score, -1.0 / 36.0, rtol=1e-14)


TARGET = np.array([0.5, -1.0, 2.0])
# Module-level score functions: greedy_soup compiles once per function and model count.
SCORE_FNS = {1: lambda p: -jnp.sum(jnp.abs(p["x"] - TARGET)),
             2: lambda p: -jnp.sum((p["x"] - TARGET) ** 2),
             "max": lambda p: -jnp.max(jnp.abs(p["x"] - TARGET))}


@settings(max_examples=30, deadline=None)
@given(points=hnp.arrays(np.float64, st.tuples(st.integers(1, 6), st.just(3)),
                         elements=st.floats(-5, 5, allow_nan=False)),
       norm=st.sampled_from(sorted(SCORE_FNS, key=str)))
def test_greedy_soup_never_scores_below_the_best_single_model(points, norm):
    models = [{"x": jnp.asarray(p)} for p in points]
    score_fn = SCORE_FNS[norm]
    result = M.greedy_soup(models, score_fn)
    singles = [float(score_fn(m)) for m in models]
    np.testing.assert_allclose(result.individual_scores, singles, rtol=1e-14, atol=1e-14)
    assert float(result.score) >= float(jnp.max(result.individual_scores))
    # The soup is the uniform average of the selected models and its score is reported.
    chosen = np.asarray(points)[np.asarray(result.selected)]
    np.testing.assert_allclose(result.params["x"], chosen.mean(0), rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(result.score, score_fn(result.params), rtol=1e-14, atol=1e-14)
    assert bool(result.selected[result.order[0]])


def test_greedy_soup_under_jit_with_non_float_leaves():
    models = [{"x": jnp.array([v, 2 * v]), "step": jnp.array(i)}
              for i, v in enumerate((0.5, -0.25, 4.0))]
    score_fn = lambda p: -jnp.sum(p["x"] ** 2)
    eager = M.greedy_soup(models, score_fn)
    jitted = jax.jit(lambda ms: M.greedy_soup(ms, score_fn))(models)
    np.testing.assert_array_equal(eager.selected, jitted.selected)
    np.testing.assert_allclose(eager.params["x"], jitted.params["x"], rtol=1e-15)
    assert int(eager.params["step"]) == 0


# --------------------------------------------------------------------------- learned

def _target_loss(target):
    def loss_fn(params, data):
        del data
        return sum(jnp.sum((params[k] - target[k]) ** 2) for k in target)
    return loss_fn


def test_learned_soup_recovers_the_optimal_model_weights():
    rng = np.random.default_rng(1)
    models = _models(rng, 2)
    target = jax.tree.map(lambda a, b: 0.8 * a + 0.2 * b, *models)
    result = M.learned_soup(models, _target_loss(target), None,
                            optimizer=optax.adam(0.1), num_steps=400)
    np.testing.assert_allclose(result.weights, [0.8, 0.2], atol=1e-4)
    assert float(result.losses[-1]) < 1e-7
    # losses[0] is the uniform soup's loss: learning lowered it.
    uniform_loss = _target_loss(target)(M.uniform_soup(models), None)
    np.testing.assert_allclose(result.losses[0], uniform_loss, rtol=1e-12)
    assert float(result.losses[-1]) < 1e-6 * float(uniform_loss)
    np.testing.assert_allclose(result.params["w"], target["w"], atol=1e-3)


def test_learned_soup_per_leaf_beats_whole_model_and_uniform():
    rng = np.random.default_rng(2)
    models = _models(rng, 3)
    # Each leaf wants a different mix, so one weight vector for the whole model cannot fit.
    mix_w, mix_b = np.array([0.7, 0.2, 0.1]), np.array([0.1, 0.3, 0.6])
    target = {"w": sum(a * m["w"] for a, m in zip(mix_w, models)),
              "b": sum(a * m["b"] for a, m in zip(mix_b, models))}
    loss_fn = _target_loss(target)
    by_leaf = M.learned_soup(models, loss_fn, None, granularity="leaf",
                             optimizer=optax.adam(0.1), num_steps=600)
    whole = M.learned_soup(models, loss_fn, None, optimizer=optax.adam(0.1), num_steps=600)
    uniform_loss = float(loss_fn(M.uniform_soup(models), None))
    assert float(whole.losses[-1]) < uniform_loss
    assert float(by_leaf.losses[-1]) < 1e-4 * float(whole.losses[-1])
    np.testing.assert_allclose(by_leaf.weights["w"], mix_w, atol=2e-3)
    np.testing.assert_allclose(by_leaf.weights["b"], mix_b, atol=2e-3)
    assert by_leaf.logits["w"].shape == (3,)


def test_learned_soup_lowers_a_classification_loss_below_the_uniform_soup():
    # Two linear classifiers, one right and one wrong on held-out data; their uniform
    # average is useless, the learned soup puts its weight on the right one.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 2))
    data = {"image": jnp.asarray(x), "label": jnp.asarray((x[:, 0] > 0).astype(np.int32))}
    good = {"w": jnp.array([[-2.0, 2.0], [0.0, 0.0]])}
    bad = {"w": jnp.array([[2.0, -2.0], [0.0, 0.0]])}
    loss_fn = tvj.models.make_loss_fn(lambda p, x: x @ p["w"])
    result = jax.jit(lambda ms, d: M.learned_soup(ms, loss_fn, d, num_steps=100))(
        [good, bad], data)
    assert float(result.losses[-1]) < 0.5 * float(loss_fn(M.uniform_soup([good, bad]), data))
    assert float(result.weights[0]) > 0.9


# --------------------------------------------------------------------------- errors

def test_bad_input_raises_a_clear_value_error():
    models = _models(np.random.default_rng(4), 2)
    loss_fn = _target_loss(models[0])
    score_fn = lambda p: -jnp.sum(p["w"])
    for call in (lambda: M.uniform_soup([]), lambda: M.greedy_soup([], score_fn),
                 lambda: M.learned_soup([], loss_fn, None)):
        with pytest.raises(ValueError, match="at least one model"):
            call()
    bad = {"w": jnp.zeros((3, 3)), "b": jnp.zeros(2)}
    with pytest.raises(ValueError, match=r"model 1: leaf 'w' has shape \(3, 3\)"):
        M.uniform_soup([models[0], bad])
    with pytest.raises(ValueError, match=r"model 2: .*missing leaf 'b'"):
        M.greedy_soup([models[0], models[1], {"w": models[0]["w"]}], score_fn)
    with pytest.raises(ValueError, match="unknown granularity 'layer'"):
        M.learned_soup(models, loss_fn, None, granularity="layer")
    with pytest.raises(ValueError, match="init_logits must be shaped like"):
        M.learned_soup(models, loss_fn, None, init_logits=jnp.zeros(3))
    with pytest.raises(ValueError, match="num_steps"):
        M.learned_soup(models, loss_fn, None, num_steps=-1)
    with pytest.raises(ValueError, match="score_fn must be callable"):
        M.greedy_soup(models, 3.0)
