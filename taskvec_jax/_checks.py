"""The one set of input validators, shared by every public entry point (private module).

Each check raises ``ValueError`` with a message written for a person: it names the argument,
the task (``task 3``) or the leaf path (``params/Dense_0/kernel``) and the offending shape or
dtype, so that a mistake never surfaces as a traceback from inside ``jax.tree.map``.

Modules of the library import these functions directly (``from taskvec_jax import _checks``);
they are not part of the public API and may change without notice.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from taskvec_jax import tree as tree_lib

PyTree = Any

__all__ = [
    "float_dtype", "loss_is_scalar", "non_empty_sequence", "num_examples", "positive_int",
    "renamed", "signature", "task_datasets",
]


def positive_int(value: Any, name: str, *, allow_none: bool = False) -> int | None:
    """Returns ``int(value)``; raises unless it is an integer ``>= 1`` (bools are not).

    Raises:
      ValueError: ``"{name} must be a positive integer, got {value!r}"``.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def non_empty_sequence(value: Any, name: str, *, item: str = "entry") -> tuple:
    """Returns ``tuple(value)``; raises for a non-sequence (a dict counts as one) or ``[]``.

    Args:
      value: the argument to check.
      name: its name in the message, e.g. ``"task_vectors"``.
      item: what one element is, e.g. ``"task vector"`` (``"pass at least one task vector"``).

    Raises:
      ValueError: naming ``name`` and the type received, or saying it is empty.
    """
    if isinstance(value, (dict, str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a sequence (one {item} each), got "
                         f"{type(value).__name__}")
    if len(value) == 0:
        raise ValueError(f"{name} is empty: pass at least one {item}")
    return tuple(value)


def num_examples(data: PyTree, *, name: str = "data") -> int:
    """Returns ``N``, the common leading-axis size of ``data``'s leaves.

    Raises:
      ValueError: if ``data`` has no leaves, a scalar leaf, zero examples, or leaves that
        disagree on ``N`` (naming both leaf paths).
    """
    leaves = tree_lib.leaves_with_paths(data)
    if not leaves:
        raise ValueError(f"{name} is empty: it has no array leaves")
    first_path, first = leaves[0]
    for path, leaf in leaves:
        if jnp.ndim(leaf) == 0:
            raise ValueError(f"{name}: leaf '{path}' is a scalar; every leaf needs a "
                             "leading example axis")
        if jnp.shape(leaf)[0] != jnp.shape(first)[0]:
            raise ValueError(f"{name}: leaf '{path}' has {jnp.shape(leaf)[0]} examples, "
                             f"leaf '{first_path}' has {jnp.shape(first)[0]}")
    n = int(jnp.shape(first)[0])
    if n == 0:
        raise ValueError(f"{name} is empty: leaf '{first_path}' has 0 examples")
    return n


def task_datasets(datasets: Any, name: str = "task_datasets") -> tuple:
    """Validates a non-empty sequence of per-task datasets; returns it as a tuple.

    Raises:
      ValueError: for a non-sequence, an empty sequence, or a task whose data is empty or
        inconsistent (naming the task and leaf).
    """
    out = non_empty_sequence(datasets, name, item="task's data")
    for t, d in enumerate(out):
        num_examples(d, name=f"task {t}")
    return out


def float_dtype(params: PyTree, *, name: str = "params",
                why: str = "every leaf is differentiated") -> Any:
    """Checks that every leaf of ``params`` is floating point; returns their common dtype.

    Raises:
      ValueError: for an empty tree, or naming the first non-float leaf and its dtype.
    """
    leaves = tree_lib.leaves_with_paths(params)
    if not leaves:
        raise ValueError(f"{name} is empty: it has no array leaves")
    for path, leaf in leaves:
        if not tree_lib.is_float(leaf):
            if _looks_like_nnx(params, path, leaf):
                hint = ("this looks like flax nnx state (RNG counters or keys, or other "
                        "non-parameter Variables): split the parameters out with "
                        "`graphdef, params, rest = nnx.split(model, nnx.Param, ...)`, "
                        "pass `params`, and rebuild the model inside loss_fn with "
                        "`nnx.merge(graphdef, params, rest)`")
            else:
                hint = "keep non-trainable state in the batch or a closure"
            raise ValueError(
                f"{name}: leaf '{path}' has dtype {jnp.result_type(leaf)}; {why}, so all "
                f"must be floating point ({hint})")
    return jnp.result_type(*[leaf for _, leaf in leaves])


def _looks_like_nnx(tree: PyTree, path: str, leaf: Any) -> bool:
    """A flax nnx ``State`` (found by its type's module: flax is never imported here), an
    RNG stream's ``rngs/.../count`` or ``key`` leaf, or a typed PRNG key."""
    if type(tree).__module__.startswith("flax.nnx"):
        return True
    parts = path.split("/")
    if parts and parts[-1] == "value":
        parts = parts[:-1]
    if "rngs" in parts or (parts and parts[-1] in ("count", "key")):
        return True
    return jnp.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key)


def loss_is_scalar(loss_fn: Callable, params: PyTree, data: PyTree, size: int,
                   name: str) -> None:
    """Checks, by shape evaluation only, that ``loss_fn`` returns a scalar on ``size`` examples.

    Raises:
      ValueError: ``"loss_fn must return a scalar mean loss; on {name} it returned shape ..."``.
    """
    sample = jax.tree.map(lambda x: jax.ShapeDtypeStruct((size,) + jnp.shape(x)[1:],
                                                         jnp.result_type(x)), data)
    out = jax.eval_shape(loss_fn, params, sample)
    if not hasattr(out, "shape") or out.shape != ():
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(f"loss_fn must return a scalar mean loss; on {name} it returned "
                         f"shape {shape}")


def signature(tree: PyTree) -> tuple:
    """A hashable ``(treedef, ((shape, dtype), ...))``: trees with equal signatures can be
    stacked and run through one compiled, ``vmap``-ed program."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(jnp.shape(x)), jnp.result_type(x)) for x in leaves)


def renamed(old_value: Any, old_name: str, new_value: Any, new_name: str,
            default: Any) -> Any:
    """Resolves a deprecated keyword alias: returns the value to use for ``new_name``.

    If the caller passed the old keyword (``old_value is not None``) a
    ``DeprecationWarning`` names the new one; passing both is an error.

    Raises:
      TypeError: if both ``old_name`` and ``new_name`` were given.
    """
    if old_value is None:
        return new_value
    if new_value != default:
        raise TypeError(f"pass {new_name}= only; {old_name}= is its deprecated alias")
    warnings.warn(f"{old_name}= is deprecated; use {new_name}=", DeprecationWarning,
                  stacklevel=3)
    return old_value
