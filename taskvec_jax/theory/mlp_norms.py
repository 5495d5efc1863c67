"""Layer norms of a :class:`taskvec_jax.models.MLP` parameter tree, for Theorem 2.

:func:`mlp_weight_norms` reads the ``{"Dense_0": {"kernel", "bias"}, ...}`` layout and
returns the spectral norms of the kernels and the Euclidean norms of the biases, the
``w_l`` and ``beta_l`` that :func:`taskvec_jax.theory.feedforward_bound` takes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any

__all__ = ["mlp_weight_norms"]


def _spectral_norm(w: jax.Array) -> jax.Array:
    return jnp.linalg.svd(w, compute_uv=False)[..., 0]


def mlp_weight_norms(params: PyTree) -> tuple[jax.Array, jax.Array | None]:
    """Spectral norms of the kernels and Euclidean norms of the biases of an MLP.

    ``params`` is a :class:`taskvec_jax.models.MLP` parameter tree
    (``{"Dense_0": {"kernel": [in, out], "bias": [out]}, ...}``), optionally with leading
    batch axes on every leaf (a trajectory, a vmapped batch of models).

    Returns:
      ``(weight_norms, bias_norms)``, each ``[..., L]`` in layer order; ``bias_norms`` is
      ``None`` when the layers have no biases.

    Raises:
      ValueError: naming the offending entry when the tree is not an MLP's.
    """
    if not isinstance(params, dict) or not params:
        raise ValueError("expected an MLP parameter dict {'Dense_0': {...}, ...}, got "
                         f"{type(params).__name__}")
    names = sorted(params, key=lambda n: int(n.split("_")[-1])
                   if n.startswith("Dense_") and n.split("_")[-1].isdigit() else -1)
    for i, name in enumerate(names):
        if name != f"Dense_{i}":
            raise ValueError(f"expected layers Dense_0..Dense_{len(names) - 1}, found "
                             f"'{name}'")
        if "kernel" not in params[name]:
            raise ValueError(f"layer '{name}' has no 'kernel' (entries: "
                             f"{sorted(params[name])})")
    weights = jnp.stack([_spectral_norm(params[n]["kernel"]) for n in names], axis=-1)
    has_bias = ["bias" in params[n] for n in names]
    if any(has_bias) and not all(has_bias):
        missing = names[has_bias.index(False)]
        raise ValueError(f"layer '{missing}' has no bias while others do")
    if not all(has_bias):
        return weights, None
    biases = jnp.stack([jnp.linalg.norm(params[n]["bias"], axis=-1) for n in names],
                       axis=-1)
    return weights, biases
