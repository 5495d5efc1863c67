"""Data statistics of the data-aware merges: chunked sums, shape checks (private)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from taskvec_jax.merging import _common

PyTree = Any


def take(data: PyTree, start: int, size: int) -> PyTree:
    """Examples ``start .. start + size - 1`` of every leaf (static bounds)."""
    return jax.tree.map(lambda x: x[start:start + size], data)


def chunked_sum(stat_fn: Callable[[PyTree, jax.Array], PyTree], data: PyTree, n: int,
                microbatch_size: int | None) -> PyTree:
    """``sum over chunks c of stat_fn(chunk_c, indices_c)`` over the first ``n`` examples.

    ``stat_fn(chunk, indices)`` returns a pytree of SUMS over the chunk's examples (never
    means), so the result does not depend on how the examples are split: ``microbatch_size``
    changes memory, not the value (up to floating-point summation order). The ``n // m``
    full chunks run in one ``lax.scan``; the ``n % m`` remaining examples are one more call
    of their own size (no padding: a padded example would add its own statistics).
    ``indices`` holds the examples' positions in ``data`` (for per-example PRNG keys).
    """
    data = take(data, 0, n)
    if microbatch_size is None or microbatch_size >= n:
        return stat_fn(data, jnp.arange(n))
    m = microbatch_size
    full = n // m
    body = jax.tree.map(lambda x: x[:full * m].reshape((full, m) + x.shape[1:]), data)

    shapes = jax.eval_shape(stat_fn, take(data, 0, m), jnp.arange(m))
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    acc, _ = jax.lax.scan(lambda a, xs: (jax.tree.map(jnp.add, a, stat_fn(*xs)), None),
                          zero, (body, jnp.arange(full * m).reshape(full, m)))
    rest = n - full * m
    if rest:
        acc = jax.tree.map(jnp.add, acc, stat_fn(take(data, full * m, rest),
                                                 jnp.arange(full * m, n)))
    return acc


def check_statistics(like: PyTree, stats: Sequence[PyTree], name: str, what: str, *,
                     square: bool) -> list[bool]:
    """Each ``stats[t]`` is shaped like ``like`` (or ``[in, in]`` where ``square``) or
    ``None`` per leaf, with ``None`` at the same leaves for every ``t``. Returns, per leaf
    of ``like``, whether it has a statistic."""
    leaves, treedef = _common.flatten(like)
    paths = _common.leaf_paths(like)
    has = None
    for t, s in enumerate(stats):
        s_leaves, s_def = _common.flatten(s)
        if s_def != treedef:
            raise ValueError(f"{name}[{t}] is not shaped like the models: structure "
                             f"{s_def} vs {treedef}")
        mine = []
        for path, x, f in zip(paths, leaves, s_leaves):
            if f is None:
                mine.append(False)
                continue
            if not _common.is_param(x):
                raise ValueError(f"{name}[{t}]: leaf '{path}' has a {what}, but the models' "
                                 f"leaf has dtype {jnp.result_type(x)} (not a parameter)")
            if square and jnp.ndim(x) != 2:
                raise ValueError(f"{name}[{t}]: leaf '{path}' has a {what}, but only 2-D "
                                 f"kernels [in, out] can have one; the leaf has shape "
                                 f"{jnp.shape(x)}")
            want = ((jnp.shape(x)[0],) * 2 if square else jnp.shape(x))
            if jnp.shape(f) != want:
                raise ValueError(f"{name}[{t}]: leaf '{path}' has shape {jnp.shape(f)}, "
                                 f"expected {want}")
            mine.append(True)
        if has is None:
            has = mine
        elif mine != has:
            bad = next(p for p, a, b in zip(paths, has, mine) if a != b)
            raise ValueError(f"{name}[{t}] and {name}[0] disagree on which leaves have a "
                             f"{what}: leaf '{bad}'")
    return has
