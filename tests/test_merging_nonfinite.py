"""Merges never hide non-finite input (merging._common.check_finite, issue 13 item 4).

Eagerly, every merge raises ``ValueError`` naming the task (or model) and the leaf that
holds NaN/Inf. Under ``jit`` (where no check can raise) the kernels propagate: the merged
model is non-finite where the bad task vector was, never a finite, plausible model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from taskvec_jax import merging as M

BASE = {"a": {"w": jnp.zeros((4, 8))}, "b": jnp.zeros(8)}
GOOD = {"a": {"w": jnp.linspace(-1.0, 1.0, 32).reshape(4, 8)}, "b": jnp.linspace(1, 2, 8)}


def _bad(value, where=None):
    """GOOD with ``value`` everywhere in leaf 'a/w' (or only at one entry ``where``)."""
    w = GOOD["a"]["w"]
    w = jnp.full_like(w, value) if where is None else w.at[where].set(value)
    return {"a": {"w": w}, "b": GOOD["b"]}


KEY = jax.random.PRNGKey(0)

# Every merge, as f(base, task_vectors) -> tree.
MERGES = {
    "task_arithmetic": lambda b, tvs: M.task_arithmetic(b, tvs, alpha=0.5),
    "ties": lambda b, tvs: M.ties(b, tvs, density=0.5),
    "ties_count": lambda b, tvs: M.ties(b, tvs, density=0.5, consensus="count"),
    "ties_task_vector": lambda b, tvs: M.ties_task_vector(tvs, density=0.5),
    "breadcrumbs": lambda b, tvs: M.breadcrumbs(b, tvs, density=0.5, outliers=0.2),
    "dare_task_arithmetic": lambda b, tvs: M.dare_task_arithmetic(b, tvs, drop_rate=0.5,
                                                                  key=KEY),
    "dare": lambda b, tvs: M.dare(tvs[-1], drop_rate=0.5, key=KEY),
    "trim": lambda b, tvs: M.trim(tvs[-1], density=0.25),
    "trim_outliers": lambda b, tvs: M.trim(tvs[-1], density=0.25, outliers=0.25),
    "iso_c": lambda b, tvs: M.iso_c(b, tvs, alpha=0.5),
    "iso_cts": lambda b, tvs: M.iso_cts(b, tvs, alpha=0.5),
    "tsv": lambda b, tvs: M.tsv(b, tvs, alpha=0.5),
    "magmax": lambda b, tvs: M.magmax(b, tvs, alpha=0.5),
    "consensus": lambda b, tvs: M.consensus(b, tvs, alpha=0.5),
    "della": lambda b, tvs: M.della(b, tvs, key=KEY, density=0.5, epsilon=0.1),
    "model_stock": lambda b, tvs: M.model_stock(b, tvs),
}
SINGLE = {"dare", "trim", "trim_outliers"}


@pytest.mark.parametrize("name", sorted(MERGES))
def test_eager_merge_names_task_and_leaf(name):
    merge = MERGES[name]
    label = "task_vector" if name in SINGLE else "task vector 1"
    for value, kind in ((np.nan, "1 NaN and 0 Inf"), (-np.inf, "0 NaN and 1 Inf")):
        with pytest.raises(ValueError, match=f"{label}: leaf 'a/w' \\(shape \\(4, 8\\)\\) "
                                             f"holds {kind}"):
            merge(BASE, [GOOD, _bad(value, where=(0, 0))])


def test_magnitude_mask_rejects_nan():
    with pytest.raises(ValueError, match="task_vector: leaf 'a/w'.* 32 NaN"):
        M.magnitude_mask(_bad(np.nan), density=0.5)


# One of each kernel (the variants share them), to keep compilations few.
@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "breadcrumbs", "dare",
                                  "trim_outliers"])
def test_under_jit_non_finite_propagates(name):
    """The issue's case, an all-NaN task vector next to a healthy one, under jit: the bad
    leaf comes out non-finite everywhere the bad task vector reaches (TIES/Breadcrumbs
    used to return a finite model); one NaN entry, which TIES would out-vote and
    Breadcrumbs would drop as an outlier, also survives at its position."""
    merge = jax.jit(MERGES[name])
    all_nan = merge(BASE, [GOOD, _bad(np.nan)])
    w = np.asarray(all_nan["a"]["w"])
    assert np.isnan(w).all(), w
    assert np.isfinite(np.asarray(all_nan["b"])).all()     # the healthy leaf stays finite
    one_nan = merge(BASE, [GOOD, _bad(np.nan, where=(3, 7))])
    assert np.isnan(np.asarray(one_nan["a"]["w"])[3, 7])


def test_ties_inf_against_minus_inf_is_nan_under_jit():
    out = jax.jit(lambda tvs: M.ties_task_vector(tvs, density=1.0))(
        [_bad(np.inf, where=(0, 0)), _bad(-np.inf, where=(0, 0))])
    assert np.isnan(np.asarray(out["a"]["w"])[0, 0])


def _score(params):
    return -jnp.sum(params["b"] ** 2)


@pytest.mark.parametrize("soup", ["uniform", "greedy", "learned"])
def test_soups_name_the_model(soup):
    models = [GOOD, _bad(np.nan, where=(1, 2))]
    calls = {"uniform": lambda: M.uniform_soup(models),
             "greedy": lambda: M.greedy_soup(models, _score),
             "learned": lambda: M.learned_soup(models, lambda p, d: -_score(p), None,
                                               num_steps=1)}
    with pytest.raises(ValueError, match="model 1: leaf 'a/w'.* 1 NaN"):
        calls[soup]()


def test_coefficient_search_names_the_grid_point_and_leaf():
    bad = _bad(np.nan, where=(0, 0))

    def merge_fn(alpha):     # the grid point alpha = 1 picks up the NaN task vector
        return M.task_arithmetic(BASE, [GOOD, bad], alpha=jnp.stack([1.0, alpha]))

    for jit in (True, False):
        if not jit:   # eager merge: task_arithmetic itself rejects the NaN
            with pytest.raises(ValueError, match="task vector 1: leaf 'a/w'"):
                M.coefficient_search(merge_fn, jnp.array([0.0, 1.0]), [_score], [1.0],
                                     jit=False)
            continue
        zeroed = lambda a: jax.tree.map(lambda x: jnp.where(a > 0.5, x * jnp.nan, x),  # noqa: E731
                                        M.task_arithmetic(BASE, [GOOD], alpha=a))
        with pytest.raises(ValueError, match=r"merge_fn\(alphas\[1\]\): leaf 'a/w'"):
            M.coefficient_search(zeroed, jnp.array([0.0, 1.0]), [_score], [1.0], jit=True)


def test_atm_rejects_nan_params():
    def loss(p, batch):
        return jnp.mean((batch["x"] @ p["w"]) ** 2)

    data = [{"x": jnp.ones((4, 3))}]
    with pytest.raises(ValueError, match="params: leaf 'w'.* 1 NaN"):
        M.atm(loss, {"w": jnp.zeros(3).at[1].set(jnp.nan)}, data, optax.sgd(0.1), 1)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64,
                                   jnp.complex64, jnp.complex128])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_the_cheap_test_finds_one_bad_entry_in_every_float_dtype(dtype, value):
    """The one-pass flag (sum(x * 0)) fires for a single NaN/Inf entry, in every float
    dtype (complex ones in either part), and not for finite entries at the dtype's
    extremes; the message then counts exactly (1 NaN or 1 Inf, at the leaf and task it
    names)."""
    from taskvec_jax.merging import _common
    big = float(jnp.finfo(dtype).max)
    finite = {"a": {"w": jnp.array([[big, -big, 1e-30, -0.0]] * 3, dtype)},
              "b": jnp.ones(5, dtype)}
    entries = [value]
    if jnp.issubdtype(dtype, jnp.complexfloating):
        entries.append(complex(1.0, value))     # non-finite in the imaginary part only
    nan, inf = (1, 0) if np.isnan(value) else (0, 1)
    for entry in entries:
        bad = {"a": finite["a"], "b": finite["b"].at[3].set(entry)}
        assert not np.isnan(np.asarray(_common._nonfinite_flags(finite))).any()
        assert np.isnan(np.asarray(_common._nonfinite_flags(bad))).tolist() == [False, True]
        _common.check_finite([finite, finite])     # finite trees pass
        with pytest.raises(ValueError, match=rf"^task vector 1: leaf 'b' \(shape \(5,\)\) "
                                             rf"holds {nan} NaN and {inf} Inf values"):
            _common.check_finite([finite, bad])
