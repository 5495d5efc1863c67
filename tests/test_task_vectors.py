import jax
import jax.numpy as jnp
import numpy as np
import pytest

import taskvec_jax as tvj


def _model(seed=0):
    rng = np.random.default_rng(seed)
    return {"params": {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(4, 3))),
                                   "bias": jnp.asarray(rng.normal(size=3))}},
            "step": jnp.asarray(seed, jnp.int32)}


@pytest.mark.parametrize("transform", [jax.jit, lambda f: f])
def test_task_vector_apply_roundtrip_exact(transform):
    base, fin = _model(0), _model(1)
    tau = transform(tvj.task_vector)(fin, base)
    np.testing.assert_array_equal(tau["params"]["Dense_0"]["kernel"],
                                  fin["params"]["Dense_0"]["kernel"]
                                  - base["params"]["Dense_0"]["kernel"])
    back = transform(tvj.apply)(base, tau, 1.0)
    np.testing.assert_allclose(back["params"]["Dense_0"]["kernel"],
                               fin["params"]["Dense_0"]["kernel"], rtol=0, atol=1e-15)
    half = transform(tvj.apply)(base, tau, 0.5)
    np.testing.assert_allclose(half["params"]["Dense_0"]["bias"],
                               0.5 * (base["params"]["Dense_0"]["bias"]
                                      + fin["params"]["Dense_0"]["bias"]), atol=1e-15)


def test_non_float_leaves_are_never_differenced():
    base, fin = _model(0), _model(7)
    tau = tvj.task_vector(fin, base)
    # The integer step counter is not a parameter: None in the task vector ...
    assert tau["step"] is None
    # ... and apply keeps the base model's value (and dtype) there.
    out = tvj.apply(base, tau, alpha=3.0)
    assert out["step"].dtype == jnp.int32 and int(out["step"]) == 0
    # Sums of task vectors keep None in place.
    tau2 = tvj.tree.add(tau, tau)
    assert tau2["step"] is None


def test_apply_keeps_base_dtype():
    base = {"w": jnp.ones(3, jnp.float32)}
    tau = {"w": jnp.ones(3, jnp.float32)}
    assert tvj.apply(base, tau, jnp.float64(0.5))["w"].dtype == jnp.float32


def test_structure_mismatch_names_the_leaf():
    base = _model(0)
    fin = _model(1)
    fin["params"]["Dense_1"] = {"kernel": jnp.zeros((3, 2))}
    with pytest.raises(ValueError, match=r"unexpected leaf 'params/Dense_1/kernel'"):
        tvj.task_vector(fin, base)
    with pytest.raises(ValueError, match=r"missing leaf 'params/Dense_1/kernel'"):
        tvj.task_vector(base, fin)


def test_shape_mismatch_names_leaf_and_both_shapes():
    base, fin = _model(0), _model(1)
    fin["params"]["Dense_0"]["kernel"] = jnp.zeros((4, 5))
    with pytest.raises(ValueError, match=r"leaf 'params/Dense_0/kernel' has shape \(4, 5\), "
                                         r"base has \(4, 3\)"):
        tvj.task_vector(fin, base)


def test_dtype_mismatch_names_leaf_and_both_dtypes():
    base, fin = _model(0), _model(1)
    fin["params"]["Dense_0"]["bias"] = fin["params"]["Dense_0"]["bias"].astype(jnp.float32)
    with pytest.raises(ValueError, match=r"leaf 'params/Dense_0/bias' has dtype float32, "
                                         r"base has float64"):
        tvj.task_vector(fin, base)


def test_apply_rejects_mismatched_task_vector():
    base = _model(0)
    tau = tvj.task_vector(_model(1), base)
    tau["params"]["Dense_0"]["bias"] = jnp.zeros(4)
    with pytest.raises(ValueError, match=r"task vector: leaf 'params/Dense_0/bias' has shape"):
        tvj.apply(base, tau)


def test_check_task_vectors_names_the_task_index():
    base = _model(0)
    taus = [tvj.task_vector(_model(i), base) for i in (1, 2, 3)]
    taus[2]["params"]["Dense_0"]["kernel"] = jnp.zeros((1, 3))
    with pytest.raises(ValueError, match=r"task vector 2: leaf 'params/Dense_0/kernel'"):
        tvj.check_task_vectors(taus, base)
    with pytest.raises(ValueError, match="empty"):
        tvj.check_task_vectors([], base)
