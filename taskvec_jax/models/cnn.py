"""A small convolutional network (flax linen) for 28x28 / 32x32 image tasks."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from taskvec_jax.models.mlp import get_activation


class CNN(nn.Module):
    """Conv(3x3) -> act -> avg-pool(2) blocks, then a dense hidden layer and the classifier.

    Inputs are ``[batch, height, width, channels]`` (a 3-D ``[batch, h, w]`` gets a channel
    axis). Average pooling keeps the network twice differentiable, which the Hessian-based
    theory needs.

    Attributes:
      num_classes: number of outputs.
      channels: output channels of each conv block.
      hidden: width of the dense layer before the classifier (0 for none).
      activation: activation name or callable.
      include_head: if false, return the features before the classifier (the hidden
        layer's activations, or the flattened conv output when ``hidden=0``).
      param_dtype: dtype of the parameters.
      dtype: computation dtype.
    """

    num_classes: int
    channels: Sequence[int] = (16, 32)
    hidden: int = 64
    activation: str = "relu"
    include_head: bool = True
    param_dtype: Any = jnp.float32
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = get_activation(self.activation)
        if x.ndim == 3:
            x = x[..., None]
        for c in self.channels:
            x = nn.Conv(c, (3, 3), padding="SAME", param_dtype=self.param_dtype,
                        dtype=self.dtype)(x)
            x = act(x)
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        if self.hidden:
            x = act(nn.Dense(self.hidden, param_dtype=self.param_dtype, dtype=self.dtype)(x))
        if not self.include_head:
            return x
        return nn.Dense(self.num_classes, param_dtype=self.param_dtype, dtype=self.dtype)(x)
