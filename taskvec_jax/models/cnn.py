"""A small convolutional network (flax linen) for 28x28 / 32x32 image tasks."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from taskvec_jax.models.mlp import get_activation

__all__ = ["CNN", "conv_as_dot"]

CONV_IMPLS = ("auto", "dot", "lax")


def _nhwc_hwio(nd: int) -> lax.ConvDimensionNumbers:
    spatial = tuple(range(1, nd + 1))
    return lax.ConvDimensionNumbers(lhs_spec=(0, nd + 1, *spatial),
                                    rhs_spec=(nd + 1, nd, *range(nd)),
                                    out_spec=(0, nd + 1, *spatial))


def conv_as_dot(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """``lax.conv_general_dilated`` of a 2-D NHWC x HWIO convolution as one dot (im2col).

    The ``kh * kw`` shifted slices of the padded input are concatenated along channels
    (``[B, H', W', kh * kw * C]``, ordered like the HWIO kernel's leading axes) and
    contracted with the kernel reshaped to ``[kh * kw * C, O]``: the same sum, in another
    order (equal up to float rounding). Its gradients are slices, pads and dots, which
    XLA:CPU runs fast inside loop bodies, where a convolution's gradient takes a slow
    generic path (jax-ml/jax#12868; see :class:`CNN`). Strided, dilated or grouped
    convolutions and other layouts go to ``lax.conv_general_dilated`` unchanged. Accepts
    ``lax.conv_general_dilated``'s arguments (flax ``nn.Conv(conv_general_dilated=...)``).
    """
    nd = rhs.ndim - 2
    # None (lax's default) means NCHW x OIHW: normalized, it is not the layout handled here
    simple = (nd == 2 and feature_group_count == 1 and not kwargs
              and all(s == 1 for s in window_strides)
              and all(d == 1 for d in (lhs_dilation or ()))
              and all(d == 1 for d in (rhs_dilation or ()))
              and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
              == _nhwc_hwio(nd))
    if not simple:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision, **kwargs)
    kh, kw, c, o = rhs.shape
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), (1, 1), padding)
    else:
        pads = [tuple(p) for p in padding]
    x = jnp.pad(lhs, [(0, 0), *pads, (0, 0)])
    h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    patches = jnp.concatenate([x[:, i:i + h, j:j + w, :] for i in range(kh)
                               for j in range(kw)], axis=-1)
    return lax.dot_general(patches, rhs.reshape(kh * kw * c, o), (((3,), (0,)), ((), ())),
                           precision=precision)


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
      conv_impl: how the convolutions are computed: ``"lax"``
        (``lax.conv_general_dilated``), ``"dot"`` (:func:`conv_as_dot`, im2col), or
        ``"auto"`` (the default): ``"dot"`` on CPU, where XLA compiles a convolution's
        gradient inside a loop body (the engine's scanned epochs) to a slow generic path
        (jax-ml/jax#12868), ``"lax"`` elsewhere. The parameters are the same either way.
    """

    num_classes: int
    channels: Sequence[int] = (16, 32)
    hidden: int = 64
    activation: str = "relu"
    include_head: bool = True
    param_dtype: Any = jnp.float32
    dtype: Any = None
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = get_activation(self.activation)
        if self.conv_impl not in CONV_IMPLS:
            raise ValueError(f"CNN.conv_impl must be one of {CONV_IMPLS}, got "
                             f"{self.conv_impl!r}")
        dot = self.conv_impl == "dot" or (self.conv_impl == "auto"
                                          and jax.default_backend() == "cpu")
        if x.ndim == 3:
            x = x[..., None]
        for c in self.channels:
            x = nn.Conv(c, (3, 3), padding="SAME", param_dtype=self.param_dtype,
                        dtype=self.dtype, conv_general_dilated=conv_as_dot if dot else None)(x)
            x = act(x)
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        if self.hidden:
            x = act(nn.Dense(self.hidden, param_dtype=self.param_dtype, dtype=self.dtype)(x))
        if not self.include_head:
            return x
        return nn.Dense(self.num_classes, param_dtype=self.param_dtype, dtype=self.dtype)(x)
