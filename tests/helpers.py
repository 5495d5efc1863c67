"""Small shared fixtures for the tests: real digits data and tiny float64 models."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def digits(n: int = 300, offset: int = 0):
    """scikit-learn's 8x8 digits (real data shipped with the package), scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = x[offset:offset + n].reshape(-1, 8, 8, 1) / 16.0
    return {"image": jnp.asarray(x, jnp.float64), "label": jnp.asarray(y[offset:offset + n],
                                                                       jnp.int32)}


def init(model, data, seed: int = 0):
    return model.init(jax.random.key(seed), data["image"][:1])["params"]


def max_abs_diff(a, b) -> float:
    """Largest ``|a - b|`` over the leaves, computed in numpy: the same IEEE arithmetic,
    and no XLA program compiled per leaf shape."""
    return float(max(np.max(np.abs(np.asarray(x) - np.asarray(y))) for x, y in
                     zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def rng_tree(seed: int, like):
    leaves, treedef = jax.tree.flatten(like)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(treedef, [jnp.asarray(rng.normal(size=np.shape(x)), x.dtype)
                                        for x in leaves])


def json_numbers(x):
    """Every number in a JSON-like tree of dicts and lists (bools excluded), depth first."""
    if isinstance(x, dict):
        for v in x.values():
            yield from json_numbers(v)
    elif isinstance(x, list):
        for v in x:
            yield from json_numbers(v)
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield x
