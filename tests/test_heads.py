import jax
import jax.numpy as jnp
import numpy as np
import pytest

from taskvec_jax.models import (MLP, cross_entropy, fit_linear_head, multihead_accuracy,
                                multihead_loss_fn, stack_heads, with_task_ids)
from tests.helpers import digits, init


def test_padded_classes_never_count_and_loss_equals_per_task_loss():
    data = digits(60)
    enc = MLP((6,), "tanh", activate_final=True, param_dtype=jnp.float64)
    params = init(enc, data)
    encode = lambda p, x: enc.apply({"params": p}, x)  # noqa: E731
    rng = np.random.default_rng(0)
    heads = [(jnp.asarray(rng.normal(size=(6, c))), jnp.asarray(rng.normal(size=c)))
             for c in (10, 2, 3)]
    stacked = stack_heads(heads)
    assert stacked.kernel.shape == (3, 6, 10)
    np.testing.assert_array_equal(stacked.num_classes, [10, 2, 3])
    loss_fn = multihead_loss_fn(encode, stacked)
    for t, (k, b) in enumerate(heads):
        c = k.shape[1]
        d = with_task_ids({"image": data["image"], "label": data["label"] % c}, t)
        direct = cross_entropy(encode(params, d["image"]) @ k + b, d["label"])
        np.testing.assert_allclose(loss_fn(params, d), direct, rtol=1e-12)
        logits = stacked.logits(encode(params, d["image"]), d["task"])
        assert int(jnp.max(jnp.argmax(logits, -1))) < c
    # mixed batch: mean of the per-example losses under each example's own head
    mixed = jax.tree.map(lambda *xs: jnp.concatenate(xs),
                         *[with_task_ids({"image": data["image"][:10],
                                          "label": data["label"][:10] % k.shape[1]}, t)
                           for t, (k, _) in enumerate(heads)])
    per = [loss_fn(params, jax.tree.map(lambda x: x[i * 10:(i + 1) * 10], mixed))
           for i in range(3)]
    np.testing.assert_allclose(loss_fn(params, mixed), np.mean(per), rtol=1e-12)


def test_linear_probe_fits_real_features():
    data = digits(400)
    feats = data["image"].reshape(400, -1)
    k, b = fit_linear_head(feats, data["label"], 10, steps=200)
    acc = float(jnp.mean(jnp.argmax(feats @ k + b, -1) == data["label"]))
    assert acc > 0.9
    heads = stack_heads([(k, b)])
    assert float(multihead_accuracy(lambda p, x: x.reshape(x.shape[0], -1), heads, None,
                                    with_task_ids(data, 0))) == pytest.approx(acc)
    with pytest.raises(ValueError, match="head 1"):
        stack_heads([(k, b), (k[:3], b)])
