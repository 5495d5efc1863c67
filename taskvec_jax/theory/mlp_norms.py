"""Layer norms of a :class:`taskvec_jax.models.MLP` parameter tree, for Theorem 2.

:func:`mlp_weight_norms` reads the ``{"Dense_0": {"kernel", "bias"}, ...}`` layout (or a
flax nnx state of ``nnx.Linear`` layers) and returns the spectral norms of the kernels and
the Euclidean norms of the biases, the ``w_l`` and ``beta_l`` that
:func:`taskvec_jax.theory.feedforward_bound` takes.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any

__all__ = ["mlp_weight_norms"]


def _spectral_norms(kernels: list[jax.Array]) -> list[jax.Array]:
    """The largest singular value of each kernel (leading batch axes kept).

    Kernels of one shape and dtype share one batched SVD, and the SVDs of different shapes
    run one after another (``lax.optimization_barrier`` orders them): XLA:CPU's LAPACK SVD
    spreads its batch over the intra-op thread pool and blocks a pool thread until it is
    done, so two SVDs scheduled at once on a two-thread pool (a two-core machine) can wait
    on each other forever (seen on a vmapped sweep of four-layer MLPs)."""
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(kernels):
        groups.setdefault((w.shape, jnp.result_type(w)), []).append(i)
    out: list[Any] = [None] * len(kernels)
    previous = None
    for members in groups.values():
        stacked = jnp.stack([kernels[i] for i in members])
        if previous is not None:
            previous, stacked = jax.lax.optimization_barrier((previous, stacked))
        previous = jnp.linalg.svd(stacked, compute_uv=False)[..., 0]
        for j, i in enumerate(members):
            out[i] = previous[j]
    return out


def _layer_index(name: Any) -> int | None:
    """``3`` for an nnx layer named ``3``, ``"l3"``, ``"linear_3"``; ``None`` otherwise."""
    if isinstance(name, int):
        return name
    match = re.fullmatch(r"\D*?_?(\d+)", str(name))
    return int(match.group(1)) if match else None


def _nested_dict(tree: Any) -> dict:
    """A tree as nested dicts keyed by its path entries, nnx's ``.value`` dropped (what
    ``nnx.to_pure_dict`` gives, without importing flax)."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path]
        if len(keys) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) \
                and keys[-1] == "value":
            keys = keys[:-1]
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = leaf
    return out


def _ordered_layers(params: Any) -> tuple[list[Any], dict]:
    """The layer names of a linen ``Dense_i`` dict or an nnx state, in layer order."""
    if type(params).__module__.startswith("flax.nnx"):    # an nnx State: plain dicts
        params = _nested_dict(params)
    if not isinstance(params, dict) or not params:
        raise ValueError("expected an MLP parameter dict {'Dense_0': {...}, ...} or an nnx "
                         f"state of Linear layers, got {type(params).__name__}")
    if len(params) == 1:
        (only,) = params.values()
        if isinstance(only, dict) and "kernel" not in only and only and all(
                isinstance(v, dict) for v in only.values()):
            params = only                         # nnx: self.layers = nnx.List([...])
    names = list(params)
    if any(str(n).startswith("Dense_") for n in names):    # flax linen MLP
        names = sorted(names, key=lambda n: int(n.split("_")[-1])
                       if str(n).startswith("Dense_") and n.split("_")[-1].isdigit() else -1)
        for i, name in enumerate(names):
            if name != f"Dense_{i}":
                raise ValueError(f"expected layers Dense_0..Dense_{len(names) - 1}, found "
                                 f"'{name}'")
    else:                                                 # nnx Linear layers
        unindexed = [n for n in names if _layer_index(n) is None]
        if unindexed:
            raise ValueError(f"cannot tell the layer order of {names}: layer '{unindexed[0]}' "
                             "has no index; name the Linear layers with a trailing index "
                             "(l0, l1, ...) or keep them in an nnx.List")
        names = sorted(names, key=_layer_index)
    for name in names:
        if not isinstance(params[name], dict) or "kernel" not in params[name]:
            entries = sorted(params[name]) if isinstance(params[name], dict) else []
            raise ValueError(f"layer '{name}' has no 'kernel' (entries: {entries})")
    return names, params


def mlp_weight_norms(params: PyTree) -> tuple[jax.Array, jax.Array | None]:
    """Spectral norms of the kernels and Euclidean norms of the biases of an MLP.

    ``params`` is a :class:`taskvec_jax.models.MLP` parameter tree
    (``{"Dense_0": {"kernel": [in, out], "bias": [out]}, ...}``) or a flax nnx state of
    ``nnx.Linear`` layers (``nnx.split(model, nnx.Param, ...)[1]``; kernels are
    ``[in, out]`` there too), its layers ordered by the index their names end with
    (``l0``, ``l1``, ... or an ``nnx.List``). Every leaf may carry leading batch axes (a
    trajectory, a vmapped batch of models).

    Returns:
      ``(weight_norms, bias_norms)``, each ``[..., L]`` in layer order; ``bias_norms`` is
      ``None`` when the layers have no biases.

    Raises:
      ValueError: naming the offending entry when the tree is not an MLP's.
    """
    names, params = _ordered_layers(params)
    weights = jnp.stack(_spectral_norms([params[n]["kernel"] for n in names]), axis=-1)
    has_bias = ["bias" in params[n] for n in names]
    if any(has_bias) and not all(has_bias):
        missing = names[has_bias.index(False)]
        raise ValueError(f"layer '{missing}' has no bias while others do")
    if not all(has_bias):
        return weights, None
    biases = jnp.stack([jnp.linalg.norm(params[n]["bias"], axis=-1) for n in names],
                       axis=-1)
    return weights, biases
