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
