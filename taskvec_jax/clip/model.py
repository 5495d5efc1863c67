"""CLIP (Radford et al., 2021): the image and text towers, in flax linen.

The paper and its peers (Ilharco et al. 2023, "Editing Models with Task Arithmetic";
Yadav et al. 2023, TIES; Yang et al. 2024, AdaMerging) finetune the *image* tower of CLIP
ViT-B/32, ViT-B/16 or ViT-L/14 with a frozen zero-shot classification head per task, and
merge the finetuned image towers. This module is that architecture, written so that the
weights of the public Hugging Face checkpoints load into it unchanged
(:mod:`taskvec_jax.clip.convert`) and give the same embeddings.

Both towers are stacks of pre-LayerNorm residual blocks::

    x = x + out_proj(attention(q_proj(LN1(x)), k_proj(LN1(x)), v_proj(LN1(x))))
    x = x + fc2(act(fc1(LN2(x))))              act = quick_gelu(z) = z * sigmoid(1.702 z)

* image: ``x = [class_embedding; patches @ W_patch] + position_embedding``, then
  ``pre_norm``, the blocks, ``post_norm`` of the class token, and ``projection`` (no bias);
* text: ``x = token_embedding[ids] + position_embedding``, causal blocks, ``final_norm``,
  the state at the end-of-text token, and ``projection`` (no bias).

Parameter tree of :class:`CLIP` (the names follow Hugging Face's, so a converted tree reads
like the checkpoint it came from)::

    {"vision": {"patch_embedding": {"kernel"}, "class_embedding", "position_embedding",
                "pre_norm", "layers_0" ... "layers_{L-1}", "post_norm", "projection"},
     "text":   {"token_embedding": {"embedding"}, "position_embedding",
                "layers_0" ... , "final_norm", "projection"},
     "logit_scale"}
    layers_i = {"layer_norm1", "attn": {"q_proj", "k_proj", "v_proj", "out_proj"},
                "layer_norm2", "mlp": {"fc1", "fc2"}}

The *image encoder* whose task vectors are merged is ``params["vision"]`` applied with
:class:`CLIPVisionTransformer`. Images are NHWC floats, already resized and normalized
(:func:`preprocess`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "ACTIVATIONS", "Attention", "CLIP", "CLIPConfig", "CLIPMLP", "CLIPTextTransformer",
    "CLIPVisionTransformer", "CONFIGS", "IMAGE_MEAN", "IMAGE_STD", "ResidualBlock",
    "TextConfig", "VisionConfig", "attention", "classification_logits", "get_config",
    "image_classifier", "normalize", "preprocess", "quick_gelu",
]

PyTree = Any

# The normalization the CLIP image processors apply (OpenAI CLIP, Hugging Face
# CLIPImageProcessor), per RGB channel of x / 255. The one definition in the library:
# taskvec_jax.data's "clip" normalization reads these.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def quick_gelu(x: jax.Array) -> jax.Array:
    """``x * sigmoid(1.702 * x)``, the activation of the OpenAI CLIP models."""
    return x * jax.nn.sigmoid(1.702 * x)


# Names as Hugging Face's ``hidden_act`` spells them.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Shape of a CLIP image tower.

    Attributes:
      image_size: side of the square input image.
      patch_size: side of the square patches.
      width: token dimension.
      layers: number of residual blocks.
      heads: attention heads (must divide ``width``).
      mlp_dim: hidden width of each block's MLP.
      embed_dim: output dimension of the projection; ``None`` for a tower without one
        (a Hugging Face ``CLIPVisionModel``).
      channels: input channels.
      act: activation (a key of :data:`ACTIVATIONS`).
      layer_norm_eps: LayerNorm epsilon.
    """

    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    embed_dim: int | None = 512
    channels: int = 3
    act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Shape of a CLIP text tower.

    Attributes:
      vocab_size: number of token ids.
      context_length: number of position embeddings (77 for OpenAI CLIP).
      width, layers, heads, mlp_dim, embed_dim, act, layer_norm_eps: as in
        :class:`VisionConfig`.
      eos_token_id: the end-of-text id whose state is pooled (its first occurrence);
        ``None`` pools at the arg-max id, the OpenAI convention (end-of-text is the
        largest id), which Hugging Face also follows for configs with ``eos_token_id=2``.
    """

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    embed_dim: int | None = 512
    act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int | None = None


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Both towers and the initial ``logit_scale`` (``log(1 / 0.07)``)."""

    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    logit_scale_init: float = math.log(1 / 0.07)


def _b(patch_size: int) -> CLIPConfig:
    return CLIPConfig(VisionConfig(patch_size=patch_size), TextConfig())


# The OpenAI models as published (openai/clip-vit-*-patch* on Hugging Face), and a tiny
# configuration for tests.
CONFIGS: dict[str, CLIPConfig] = {
    "ViT-B-32": _b(32),
    "ViT-B-16": _b(16),
    "ViT-L-14": CLIPConfig(
        VisionConfig(patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096,
                     embed_dim=768),
        TextConfig(width=768, layers=12, heads=12, mlp_dim=3072, embed_dim=768)),
    "tiny": CLIPConfig(
        VisionConfig(image_size=16, patch_size=4, width=32, layers=2, heads=4, mlp_dim=64,
                     embed_dim=24),
        TextConfig(vocab_size=64, context_length=12, width=32, layers=2, heads=4,
                   mlp_dim=64, embed_dim=24)),
}


def get_config(name: str) -> CLIPConfig:
    """The :class:`CLIPConfig` called ``name`` (``"ViT-B-32"``, ``"ViT-B-16"``, ``"ViT-L-14"``,
    ``"tiny"``; ``"ViT-B/32"`` spellings are accepted)."""
    key = name.replace("/", "-")
    if key not in CONFIGS:
        raise ValueError(f"unknown CLIP config {name!r}; choose one of {sorted(CONFIGS)}")
    return CONFIGS[key]


def _check_heads(width: int, heads: int, tower: str) -> None:
    if width % heads:
        raise ValueError(f"CLIP {tower} tower: heads={heads} must divide width={width}")


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown CLIP activation {name!r}; choose one of "
                         f"{sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False
              ) -> jax.Array:
    """``softmax(q k^T / sqrt(d) [+ causal mask]) v`` over ``[..., L, heads, d]`` arrays.

    The softmax runs in at least float32 (bfloat16 inputs) and in float64 for float64
    inputs. (``jax.nn.dot_product_attention`` always takes the softmax in float32, which
    would cap float64 checks at float32 accuracy.)
    """
    logits = jnp.einsum("...qhd,...khd->...hqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    if causal:
        length = q.shape[-3]
        mask = jnp.tril(jnp.ones((length, length), dtype=bool))
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("...hqk,...khd->...qhd", weights, v)


class Attention(nn.Module):
    """Multi-head self-attention with separate ``q/k/v/out`` projections (with bias).

    ``softmax(q k^T / sqrt(d_head) [+ causal mask]) v``, heads concatenated, then
    ``out_proj``.
    """

    heads: int
    causal: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        dense = functools.partial(nn.Dense, width, dtype=self.dtype,
                                  param_dtype=self.param_dtype)
        split = lambda y: y.reshape(y.shape[:-1] + (self.heads, width // self.heads))
        q = split(dense(name="q_proj")(x))
        k = split(dense(name="k_proj")(x))
        v = split(dense(name="v_proj")(x))
        out = attention(q, k, v, causal=self.causal)
        return dense(name="out_proj")(out.reshape(x.shape[:-1] + (width,)))


class CLIPMLP(nn.Module):
    """A block's feed-forward part: ``fc2(act(fc1(x)))`` (not :class:`taskvec_jax.models.MLP`,
    the stand-alone classifier)."""

    mlp_dim: int
    act: str = "quick_gelu"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = nn.Dense(self.mlp_dim, name="fc1", **kw)(x)
        y = _activation(self.act)(y)
        return nn.Dense(x.shape[-1], name="fc2", **kw)(y)


class ResidualBlock(nn.Module):
    """``x + attn(LN1(x))`` then ``x + mlp(LN2(x))``."""

    heads: int
    mlp_dim: int
    act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    causal: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(nn.LayerNorm, epsilon=self.layer_norm_eps,
                                 use_fast_variance=False, **kw)
        x = x + Attention(self.heads, self.causal, name="attn", **kw)(
            norm(name="layer_norm1")(x))
        return x + CLIPMLP(self.mlp_dim, self.act, name="mlp", **kw)(norm(name="layer_norm2")(x))


class CLIPVisionTransformer(nn.Module):
    """CLIP's image tower: ``images [B, H, W, C] -> embeddings [B, embed_dim]``.

    The embeddings are *not* normalized (normalize them to compare with text, as
    :func:`classification_logits` does). Without a projection (``embed_dim=None``) the
    output is the post-normed class token, ``[B, width]``.

    Attributes:
      config: a :class:`VisionConfig`.
      dtype: computation dtype (``None``: from the inputs and parameters).
      param_dtype: dtype of freshly initialized parameters.
    """

    config: VisionConfig
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        c = self.config
        _check_heads(c.width, c.heads, "vision")
        if images.ndim != 4 or images.shape[1:] != (c.image_size, c.image_size, c.channels):
            raise ValueError(
                f"CLIPVisionTransformer expects images [B, {c.image_size}, {c.image_size}, "
                f"{c.channels}] (NHWC, preprocessed), got shape {images.shape}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        p = c.patch_size
        x = nn.Conv(c.width, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                    name="patch_embedding", **kw)(images)
        x = x.reshape((x.shape[0], -1, c.width))
        cls = self.param("class_embedding", nn.initializers.normal(c.width ** -0.5),
                         (c.width,), self.param_dtype)
        pos = self.param("position_embedding", nn.initializers.normal(0.02),
                         (c.num_patches + 1, c.width), self.param_dtype)
        cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, c.width))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype)
        norm = functools.partial(nn.LayerNorm, epsilon=c.layer_norm_eps,
                                 use_fast_variance=False, **kw)
        x = norm(name="pre_norm")(x)
        for i in range(c.layers):
            x = ResidualBlock(c.heads, c.mlp_dim, c.act, c.layer_norm_eps,
                              name=f"layers_{i}", **kw)(x)
        pooled = norm(name="post_norm")(x[:, 0])
        if c.embed_dim is None:
            return pooled
        return nn.Dense(c.embed_dim, use_bias=False, name="projection", **kw)(pooled)


class CLIPTextTransformer(nn.Module):
    """CLIP's text tower: ``token ids [B, L] -> embeddings [B, embed_dim]`` (not normalized).

    Every row must contain its end-of-text token (the tokenizer in
    :mod:`taskvec_jax.clip.zeroshot` adds it); ``L <= context_length``. Attention is causal, so
    whatever follows the end-of-text token (padding) does not change the result.

    Attributes:
      config: a :class:`TextConfig`.
      dtype: computation dtype.
      param_dtype: dtype of freshly initialized parameters.
    """

    config: TextConfig
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        c = self.config
        _check_heads(c.width, c.heads, "text")
        if tokens.ndim != 2 or tokens.shape[1] > c.context_length:
            raise ValueError(f"CLIPTextTransformer expects token ids [B, L] with "
                             f"L <= {c.context_length}, got shape {tokens.shape}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Embed(c.vocab_size, c.width, embedding_init=nn.initializers.normal(0.02),
                     name="token_embedding", **kw)(tokens)
        pos = self.param("position_embedding", nn.initializers.normal(0.01),
                         (c.context_length, c.width), self.param_dtype)
        x = x + pos[:tokens.shape[1]].astype(x.dtype)
        for i in range(c.layers):
            x = ResidualBlock(c.heads, c.mlp_dim, c.act, c.layer_norm_eps, causal=True,
                              name=f"layers_{i}", **kw)(x)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, use_fast_variance=False,
                         name="final_norm", **kw)(x)
        if c.eos_token_id is None:
            eot = jnp.argmax(tokens, axis=-1)
        else:
            eot = jnp.argmax(tokens == c.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
        if c.embed_dim is None:
            return pooled
        return nn.Dense(c.embed_dim, use_bias=False, name="projection", **kw)(pooled)


class CLIP(nn.Module):
    """Both towers and ``logit_scale``; ``__call__`` gives the image-text logits.

    ``logits[i, j] = exp(logit_scale) * cos(image_i, text_j)``. Use
    ``model.apply(variables, images, method="encode_image")`` (or ``"encode_text"``) for
    one tower.
    """

    config: CLIPConfig
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.config.vision.embed_dim != self.config.text.embed_dim:
            raise ValueError(f"CLIP: image embed_dim={self.config.vision.embed_dim} differs "
                             f"from text embed_dim={self.config.text.embed_dim}")
        self.vision = CLIPVisionTransformer(self.config.vision, **kw)
        self.text = CLIPTextTransformer(self.config.text, **kw)
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(self.config.logit_scale_init), (),
            self.param_dtype)

    def encode_image(self, images: jax.Array) -> jax.Array:
        return self.vision(images)

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        return self.text(tokens)

    def __call__(self, images: jax.Array, tokens: jax.Array) -> jax.Array:
        image = normalize(self.encode_image(images))
        text = normalize(self.encode_text(tokens))
        return jnp.exp(self.logit_scale) * image @ text.T


def normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """``x / ||x||`` along ``axis``."""
    return x / jnp.linalg.norm(x, axis=axis, keepdims=True)


def classification_logits(features: jax.Array, head: jax.Array) -> jax.Array:
    """Zero-shot classification: ``logits = (features / ||features||) @ head.T``.

    ``head`` is ``[num_classes, embed_dim]``: unit class embeddings times
    ``exp(logit_scale)`` (:func:`taskvec_jax.clip.zeroshot_head`), the frozen
    ``ClassificationHead(normalize=True)`` of Ilharco et al. (2023).
    """
    return normalize(features) @ head.T.astype(features.dtype)


def image_classifier(encoder: CLIPVisionTransformer, head: jax.Array
                     ) -> Callable[[PyTree, jax.Array], jax.Array]:
    """``apply(vision_params, images) -> logits`` with ``head`` frozen (a closure constant).

    The result plugs into :func:`taskvec_jax.models.make_loss_fn` and
    :func:`taskvec_jax.models.accuracy`; gradients and task vectors then live on the image
    tower only, as in the task-arithmetic literature.
    """
    head = jnp.asarray(head)

    def apply(params: PyTree, images: jax.Array) -> jax.Array:
        return classification_logits(encoder.apply({"params": params}, images), head)

    return apply


def preprocess(images: jax.Array, image_size: int = 224) -> jax.Array:
    """CLIP's image preprocessing, in JAX: ``uint8 or [0, 1] [B, H, W, C] -> [B, S, S, 3]``.

    Resizes the shorter side to ``image_size`` (bicubic, antialiased), center-crops a
    square, scales ``uint8`` to ``[0, 1]``, repeats a single channel to three and
    normalizes with :data:`IMAGE_MEAN` / :data:`IMAGE_STD`. This follows the torchvision /
    Hugging Face transform (``Resize(S, bicubic)``, ``CenterCrop(S)``, ``Normalize``); the
    resampling kernels differ slightly from PIL's, so the pixels agree to interpolation
    accuracy, not bit for bit.
    """
    images = jnp.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"preprocess expects images [B, H, W, C], got shape {images.shape}")
    if jnp.issubdtype(images.dtype, jnp.integer):
        images = images.astype(jnp.float32) / 255.0
    if images.shape[-1] == 1:
        images = jnp.repeat(images, 3, axis=-1)
    if images.shape[-1] != 3:
        raise ValueError(f"preprocess expects 1 or 3 channels, got {images.shape[-1]}")
    b, h, w, _ = images.shape
    if (h, w) != (image_size, image_size):
        # torchvision's Resize(S): the shorter side becomes S, the longer int(S * long / short).
        nh, nw = ((image_size, int(image_size * w / h)) if h <= w
                  else (int(image_size * h / w), image_size))
        images = jax.image.resize(images, (b, nh, nw, 3), method="bicubic", antialias=True)
        # torchvision's CenterCrop offsets: int(round((size - crop) / 2)).
        top, left = int(round((nh - image_size) / 2)), int(round((nw - image_size) / 2))
        images = images[:, top:top + image_size, left:left + image_size]
    mean = jnp.asarray(IMAGE_MEAN, images.dtype)
    std = jnp.asarray(IMAGE_STD, images.dtype)
    return (images - mean) / std
