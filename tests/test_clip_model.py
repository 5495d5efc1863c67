"""The CLIP towers: published sizes, causality, pooling, heads, preprocessing (no torch)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import taskvec_jax as tvj
from taskvec_jax import clip

TINY = clip.get_config("tiny")


@functools.lru_cache(maxsize=None)
def _init(config=TINY, seed=0):
    model = clip.CLIP(config, param_dtype=jnp.float64)
    images = jnp.zeros((1, config.vision.image_size, config.vision.image_size, 3))
    tokens = jnp.zeros((1, config.text.context_length), jnp.int32)
    return model, jax.jit(model.init)(jax.random.key(seed), images, tokens)["params"]


# One jitted program per tower and config, shared by the tests of this file (compiling
# dominates their cost; an un-jitted call compiles every primitive separately).
@functools.lru_cache(maxsize=None)
def _encode_image(config=TINY.vision):
    tower = clip.CLIPVisionTransformer(config)
    return jax.jit(lambda params, images: tower.apply({"params": params}, images))


def _images(n=3, seed=1, size=16):
    return jax.random.normal(jax.random.key(seed), (n, size, size, 3), jnp.float64)


@pytest.mark.parametrize("name, total, vision", [
    # Parameter counts of the published checkpoints (openai/clip-vit-*; logit_scale included).
    ("ViT-B/32", 151_277_313, 87_849_216),
    ("ViT-B/16", 149_620_737, 86_192_640),
    ("ViT-L/14", 427_616_513, 303_966_208),
])
def test_configs_have_the_published_sizes(name, total, vision):
    """Shapes only (jax.eval_shape): no big model is allocated."""
    config = clip.get_config(name)
    shapes = jax.eval_shape(
        clip.CLIP(config).init, jax.random.key(0),
        jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32),
        jax.ShapeDtypeStruct((1, 77), jnp.int32))["params"]
    assert sum(x.size for x in jax.tree.leaves(shapes)) == total
    assert sum(x.size for x in jax.tree.leaves(shapes["vision"])) == vision


def test_unknown_config_and_bad_shapes_are_named():
    with pytest.raises(ValueError, match="unknown CLIP config 'ViT-H-14'"):
        clip.get_config("ViT-H-14")
    model, params = _init()
    with pytest.raises(ValueError, match=r"expects images \[B, 16, 16, 3\].*got shape \(2, 8, 8, 3\)"):
        model.apply({"params": params}, jnp.zeros((2, 8, 8, 3)), method="encode_image")
    with pytest.raises(ValueError, match="L <= 12"):
        model.apply({"params": params}, jnp.zeros((2, 13), jnp.int32), method="encode_text")
    bad = clip.VisionConfig(image_size=16, patch_size=4, width=30, heads=4, layers=1, mlp_dim=8)
    with pytest.raises(ValueError, match="heads=4 must divide width=30"):
        clip.CLIPVisionTransformer(bad).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


@pytest.mark.parametrize("transform", [jax.jit, lambda f: f])
def test_logits_are_scaled_cosines(transform):
    """``CLIP(images, tokens) = exp(logit_scale) * cos(image_i, text_j)``, jitted or not."""
    model, params = _init()
    tokens = jnp.array([[1, 5, 63, 0], [1, 7, 8, 63]])
    logits = transform(lambda p: model.apply({"params": p}, _images(), tokens))(params)
    img = _encode_image()(params["vision"], _images())
    txt = clip.text_encoder(TINY.text)(params["text"], tokens)
    cos = np.asarray(img) @ np.asarray(txt).T / np.outer(np.linalg.norm(img, axis=1),
                                                          np.linalg.norm(txt, axis=1))
    np.testing.assert_allclose(logits, np.exp(TINY.logit_scale_init) * cos, rtol=1e-12)
    assert logits.shape == (3, 2)


def test_text_tower_is_causal_and_pools_at_the_end_token():
    """Tokens after the end token (padding) cannot change the embedding; tokens before it do."""
    _, params = _init()
    enc = lambda t: clip.text_encoder(TINY.text)(params["text"], jnp.array(t))
    a = enc([[1, 5, 6, 63, 0, 0, 0]])
    np.testing.assert_array_equal(a, enc([[1, 5, 6, 63, 9, 22, 63]]))
    assert float(jnp.abs(a - enc([[1, 5, 7, 63, 0, 0, 0]])).max()) > 1e-6
    # With eos_token_id set, the first occurrence of that id is pooled: the same state as
    # arg-max pooling when the end token is the largest id (CLIP's vocabulary).
    text2 = dataclasses.replace(TINY.text, eos_token_id=63)
    enc2 = lambda t: clip.text_encoder(text2)(params["text"], jnp.array(t))
    np.testing.assert_array_equal(enc2([[1, 50, 63, 60, 63, 0, 0]]),
                                  enc([[1, 50, 63, 0, 0, 0, 0]]))


def test_image_classifier_trains_the_vision_tower_only():
    """``image_classifier`` plugs into make_loss_fn / accuracy; gradients are finite and
    live on the image tower, and the logits are the head applied to unit features."""
    _, params = _init()
    head = 100.0 * clip.normalize(jax.random.normal(jax.random.key(3), (5, 24), jnp.float64))
    encoder = clip.CLIPVisionTransformer(TINY.vision)
    apply = clip.image_classifier(encoder, head)
    batch = {"image": _images(3), "label": jnp.array([0, 1, 3])}
    feats = _encode_image()(params["vision"], batch["image"])
    loss_fn = tvj.models.make_loss_fn(apply)

    @jax.jit   # one program: the logits, the loss and its gradient, the accuracy
    def run(p):
        return (apply(p, batch["image"]), *jax.value_and_grad(loss_fn)(p, batch),
                tvj.models.accuracy(apply, p, batch))

    logits, loss, grads, acc = run(params["vision"])
    np.testing.assert_allclose(logits, np.asarray(clip.normalize(feats)) @ np.asarray(head).T,
                               rtol=1e-12)
    assert np.isfinite(loss)
    assert jax.tree.structure(grads) == jax.tree.structure(params["vision"])
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(tvj.tree.norm(grads)) > 0
    assert 0.0 <= float(acc) <= 1.0


def test_quick_gelu():
    x = jnp.linspace(-4, 4, 9, dtype=jnp.float64)
    np.testing.assert_allclose(clip.quick_gelu(x), x / (1 + np.exp(-1.702 * np.asarray(x))),
                               rtol=1e-14)


def test_preprocess_normalizes_resizes_and_crops():
    # A constant image stays constant through resizing; the output is (v - mean) / std.
    img = jnp.full((2, 20, 30, 3), 128, jnp.uint8)
    out = clip.preprocess(img, image_size=16)
    assert out.shape == (2, 16, 16, 3)
    expected = (128 / 255 - np.array(clip.IMAGE_MEAN)) / np.array(clip.IMAGE_STD)
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), atol=1e-5)
    # Grayscale is repeated to three channels; an image of the right size is not resampled.
    gray = jax.random.uniform(jax.random.key(0), (1, 16, 16, 1))
    out = clip.preprocess(gray, image_size=16)
    np.testing.assert_allclose(out[..., 2], (gray[..., 0] - clip.IMAGE_MEAN[2]) / clip.IMAGE_STD[2],
                               rtol=1e-6)
    # Center crop: a left/right split image keeps its split in the middle column.
    half = jnp.concatenate([jnp.zeros((1, 16, 20, 3)), jnp.ones((1, 16, 20, 3))], axis=2)
    out = clip.preprocess(half, image_size=16)
    assert float(out[0, 8, 0, 0]) < float(out[0, 8, 15, 0])
    with pytest.raises(ValueError, match="1 or 3 channels"):
        clip.preprocess(jnp.zeros((1, 16, 16, 2)), image_size=16)
