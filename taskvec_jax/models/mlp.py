"""A multilayer perceptron with any depth, widths and activation (flax linen)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "tanh": jnp.tanh,
    "gelu": nn.gelu,
    "softplus": nn.softplus,
    "sigmoid": nn.sigmoid,
    "identity": lambda x: x,
}


def get_activation(activation: str | Callable) -> Callable[[jax.Array], jax.Array]:
    """Returns the activation function named ``activation`` (or ``activation`` itself)."""
    if callable(activation):
        return activation
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of "
                         f"{sorted(ACTIVATIONS)} or pass a callable")
    return ACTIVATIONS[activation]


class MLP(nn.Module):
    """``x -> W_L phi(... phi(W_1 x + b_1) ...) + b_L``; inputs are flattened first.

    Attributes:
      features: output width of each of the ``L = len(features)`` dense layers; the last
        entry is the number of outputs (classes). ``features=(10,)`` is linear regression.
      activation: name in :data:`ACTIVATIONS` or a callable; applied between layers.
      use_bias: whether dense layers have biases.
      activate_final: also apply the activation after the last layer (an encoder whose
        output features feed a separate head).
      param_dtype: dtype of the parameters (flax defaults to float32 even with x64 on).
      dtype: computation dtype (``None``: inferred from inputs and params).
    """

    features: Sequence[int]
    activation: str | Callable = "relu"
    use_bias: bool = True
    activate_final: bool = False
    param_dtype: Any = jnp.float32
    dtype: Any = None

    def setup(self):
        if len(self.features) == 0:
            raise ValueError("MLP needs at least one layer: features is empty")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = get_activation(self.activation)
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.features):
            x = nn.Dense(width, use_bias=self.use_bias, param_dtype=self.param_dtype,
                         dtype=self.dtype, name=f"Dense_{i}")(x)
            if i < len(self.features) - 1 or self.activate_final:
                x = act(x)
        return x
