"""A small Vision Transformer (Dosovitskiy et al., 2021) in flax linen.

Pre-LayerNorm encoder blocks, a learned class token and position embeddings, and a linear
head on the class token: the architecture of the CLIP image towers the paper finetunes, at
a size that trains on a CPU.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class EncoderBlock(nn.Module):
    """``x + MHA(LN(x))`` then ``x + MLP(LN(x))``."""

    num_heads: int
    mlp_dim: int
    param_dtype: Any = jnp.float32
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(param_dtype=self.param_dtype, dtype=self.dtype)
        y = nn.LayerNorm(**kw)(x)
        y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, **kw)(y, y)
        x = x + y
        y = nn.LayerNorm(**kw)(x)
        y = nn.Dense(self.mlp_dim, **kw)(y)
        y = nn.gelu(y)
        y = nn.Dense(x.shape[-1], **kw)(y)
        return x + y


class ViT(nn.Module):
    """Vision Transformer classifier.

    Attributes:
      num_classes: number of outputs.
      patch_size: side of the square patches.
      width: token dimension.
      depth: number of encoder blocks.
      num_heads: attention heads (must divide ``width``).
      mlp_dim: hidden width of each block's MLP (default ``4 * width``).
      include_head: if false, return the normalized class token (``[B, width]``, the
        encoder's features) and create no ``head`` parameters.
      param_dtype: dtype of the parameters.
      dtype: computation dtype.
    """

    num_classes: int
    patch_size: int = 4
    width: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int | None = None
    include_head: bool = True
    param_dtype: Any = jnp.float32
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.width % self.num_heads:
            raise ValueError(f"ViT: num_heads={self.num_heads} must divide "
                             f"width={self.width}")
        if x.ndim == 3:
            x = x[..., None]
        h, w = x.shape[1:3]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"ViT: image size {h}x{w} is not a multiple of "
                             f"patch_size={self.patch_size}")
        kw = dict(param_dtype=self.param_dtype, dtype=self.dtype)
        p = self.patch_size
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", name="embedding",
                    **kw)(x)
        x = x.reshape((x.shape[0], -1, self.width))
        cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width),
                         self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width))
                             .astype(x.dtype), x], axis=1)
        pos = self.param("pos_embedding", nn.initializers.normal(0.02),
                         (1, x.shape[1], self.width), self.param_dtype)
        x = x + pos
        for i in range(self.depth):
            x = EncoderBlock(self.num_heads, self.mlp_dim or 4 * self.width,
                             name=f"block_{i}", **kw)(x)
        x = nn.LayerNorm(name="final_norm", **kw)(x[:, 0])
        if not self.include_head:
            return x
        return nn.Dense(self.num_classes, name="head", **kw)(x)
