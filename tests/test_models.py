import jax
import jax.numpy as jnp
import numpy as np
import pytest

from taskvec_jax.models import CNN, MLP, ViT, accuracy, make_loss_fn, mse
from tests.helpers import digits, init


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu", "softplus", "sigmoid",
                                        "identity"])
def test_mlp_depth_widths_dtype(activation):
    data = digits(16)
    model = MLP((7, 5, 10), activation, param_dtype=jnp.float64)
    params = init(model, data)
    assert [params[f"Dense_{i}"]["kernel"].shape for i in range(3)] == [(64, 7), (7, 5),
                                                                         (5, 10)]
    assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(params))
    out = model.apply({"params": params}, data["image"])
    assert out.shape == (16, 10)


def test_mlp_identity_activation_is_a_linear_map():
    data = digits(8)
    model = MLP((6, 10), "identity", use_bias=False, param_dtype=jnp.float64)
    p = init(model, data)
    x = data["image"].reshape(8, -1)
    np.testing.assert_allclose(model.apply({"params": p}, data["image"]),
                               x @ p["Dense_0"]["kernel"] @ p["Dense_1"]["kernel"],
                               rtol=1e-12)


def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match="unknown activation 'swishy'"):
        MLP((3,), "swishy").init(jax.random.key(0), jnp.zeros((1, 4)))


def test_cnn_and_vit_shapes_and_dtypes():
    data = digits(4)
    cnn = CNN(10, channels=(4,), hidden=8, param_dtype=jnp.float64)
    p = init(cnn, data)
    assert cnn.apply({"params": p}, data["image"]).shape == (4, 10)
    vit = ViT(10, patch_size=4, width=8, depth=1, num_heads=2, param_dtype=jnp.float64)
    p = init(vit, data)
    assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(p))
    assert vit.apply({"params": p}, data["image"]).shape == (4, 10)
    with pytest.raises(ValueError, match="patch_size=3"):
        ViT(10, patch_size=3, width=8, num_heads=2).init(jax.random.key(0), data["image"])


def test_cross_entropy_loss_matches_manual_log_softmax():
    data = digits(32)
    model = MLP((10,), param_dtype=jnp.float64)
    p = init(model, data)
    logits = model.apply({"params": p}, data["image"])
    manual = -np.mean(np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)),
                                         np.asarray(data["label"])[:, None], 1))
    np.testing.assert_allclose(make_loss_fn(model)(p, data), manual, rtol=1e-12)


def test_mse_is_half_squared_error_with_one_hot_labels():
    out = jnp.array([[1.0, 2.0], [0.0, 0.0]])
    # one-hot targets [[0, 1], [1, 0]]: squared errors 1+1 and 1+0
    assert float(mse(out, jnp.array([1, 0]))) == pytest.approx(0.5 * (2.0 + 1.0) / 2)
    assert float(mse(out, jnp.array([[1.0, 2.0], [0.0, 0.0]]))) == 0.0


def test_accuracy_chunked_equals_unchunked_and_counts():
    data = digits(50)
    model = MLP((16, 10), param_dtype=jnp.float64)
    p = init(model, data)
    preds = np.argmax(model.apply({"params": p}, data["image"]), -1)
    expected = np.mean(preds == np.asarray(data["label"]))
    assert float(accuracy(model, p, data)) == pytest.approx(expected)
    assert float(accuracy(model, p, data, batch_size=7)) == pytest.approx(expected)


def test_loss_fn_rejects_unknown_loss():
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        make_loss_fn(MLP((2,)), "hinge")


# --------------------------------------------------------------------------- conv as dot

@pytest.mark.parametrize("kernel, padding", [((3, 3), "SAME"), ((3, 3), "VALID"),
                                             ((2, 3), "SAME"), ((3, 1), ((2, 0), (1, 1)))])
def test_conv_as_dot_equals_lax_conv_and_its_gradients(kernel, padding):
    from jax import lax
    from taskvec_jax.models.cnn import conv_as_dot
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 7, 6, 3)))
    w = jnp.asarray(rng.normal(size=(*kernel, 3, 4)))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))

    def ref(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=dn)

    def ours(x, w):
        return conv_as_dot(x, w, (1, 1), padding, dimension_numbers=dn)

    np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=0, atol=1e-13)
    cot = jnp.asarray(rng.normal(size=ref(x, w).shape))
    g_ref = jax.grad(lambda x, w: jnp.sum(ref(x, w) * cot), argnums=(0, 1))(x, w)
    g_ours = jax.grad(lambda x, w: jnp.sum(ours(x, w) * cot), argnums=(0, 1))(x, w)
    for a, b in zip(g_ours, g_ref):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    # strided convolutions are lax's own
    np.testing.assert_array_equal(
        conv_as_dot(x, w, (2, 2), padding, dimension_numbers=dn),
        lax.conv_general_dilated(x, w, (2, 2), padding, dimension_numbers=dn))


def test_conv_as_dot_hands_other_layouts_to_lax():
    # dimension_numbers=None is lax's NCHW x OIHW, not the layout the dot handles
    from jax import lax
    from taskvec_jax.models.cnn import conv_as_dot
    rng = np.random.default_rng(1)
    x, w = jnp.asarray(rng.normal(size=(2, 3, 7, 6))), jnp.asarray(rng.normal(size=(4, 3, 3, 3)))
    np.testing.assert_array_equal(conv_as_dot(x, w, (1, 1), "SAME"),
                                  lax.conv_general_dilated(x, w, (1, 1), "SAME"))


def test_cnn_conv_impls_share_parameters_and_agree():
    x = digits(8)["image"].reshape(8, 8, 8, 1).astype(jnp.float64)
    models = {impl: CNN(10, (4, 6), 16, param_dtype=jnp.float64, conv_impl=impl)
              for impl in ("lax", "dot", "auto")}
    params = {k: m.init(jax.random.key(0), x)["params"] for k, m in models.items()}
    for k in ("dot", "auto"):
        assert jax.tree.structure(params[k]) == jax.tree.structure(params["lax"])
        for a, b in zip(jax.tree.leaves(params[k]), jax.tree.leaves(params["lax"])):
            np.testing.assert_array_equal(a, b)
    out = {k: m.apply({"params": params["lax"]}, x) for k, m in models.items()}
    np.testing.assert_allclose(out["dot"], out["lax"], rtol=0, atol=1e-12)
    if jax.default_backend() == "cpu":     # auto is the dot on CPU
        np.testing.assert_array_equal(out["auto"], out["dot"])
    with pytest.raises(ValueError, match="conv_impl must be one of"):
        CNN(10, conv_impl="fft").init(jax.random.key(0), x)
