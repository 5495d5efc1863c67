"""One driver for merges computed leaf by leaf from all tasks at once (private).

``merge_leaves(base, task_vectors, alphas, leaf_fn)`` calls
``leaf_fn(path, ref, xs, alphas)`` for every float leaf (``ref`` the base's leaf or
``None``, ``xs`` the ``T`` task vectors' leaves). ``leaf_fn`` is
expected to be a jitted function of the leaf alone: called eagerly, each leaf is one small
compiled program, cached by shape, so models with repeated layer shapes compile each shape
once (one program for the whole tree would be recompiled for every new structure); under
an outer ``jax.jit`` the per-leaf programs are traced inline. Non-float leaves: ``None``
in a task vector, the base's own value in a model.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from taskvec_jax.merging import _common

__all__ = ["check_real", "finish", "merge_leaves", "scaled"]

PyTree = Any


def check_real(task_vectors: Sequence[PyTree], method: str, *,
               what: str = "task vector") -> None:
    """Raises for a complex leaf (the methods compare magnitudes, signs or angles) and,
    through :func:`_common.check_finite`, for NaN/Inf (never hidden by a merge)."""
    _common.check_finite(task_vectors, what=what)
    paths = _common.leaf_paths(task_vectors[0])
    for t, tau in enumerate(task_vectors):
        for path, x in zip(paths, _common.flatten(tau)[0]):
            if _common.is_param(x) and jnp.issubdtype(jnp.result_type(x),
                                                       jnp.complexfloating):
                raise ValueError(f"task vector {t}: leaf '{path}' is complex "
                                 f"({jnp.result_type(x)}); {method} needs real values")


def scaled(xs, alphas) -> list[jax.Array]:
    """``[alpha_t * x_t]`` in the accumulation dtype (float32 at least)."""
    adt = _common.accumulation_dtype(jnp.result_type(xs[0]))
    return [alphas[t].astype(adt) * jnp.asarray(x).astype(adt) for t, x in enumerate(xs)]


def finish(ref, merged, like):
    """``ref + merged`` (or ``merged`` without ``ref``), cast to ``ref``'s (``like``'s) dtype."""
    if ref is not None:
        return (jnp.asarray(ref).astype(merged.dtype) + merged).astype(jnp.result_type(ref))
    return merged.astype(jnp.result_type(like))


def merge_leaves(base: PyTree | None, task_vectors: Sequence[PyTree], alphas: jax.Array,
                 leaf_fn: Callable[..., jax.Array]) -> PyTree:
    reference = base if base is not None else task_vectors[0]
    ref_leaves, treedef = _common.flatten(reference)
    paths = _common.leaf_paths(reference)
    task_leaves = [_common.flatten(tau)[0] for tau in task_vectors]
    out = []
    for i, (path, ref) in enumerate(zip(paths, ref_leaves)):
        if not _common.is_param(task_leaves[0][i]):
            out.append(ref if base is not None else None)
            continue
        xs = tuple(leaves[i] for leaves in task_leaves)
        out.append(leaf_fn(path, ref if base is not None else None, xs, alphas))
    return jax.tree.unflatten(treedef, out)
