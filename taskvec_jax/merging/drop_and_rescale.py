"""DARE, Drop And REscale (Yu et al., "Language Models are Super Mario", ICML 2024).

:func:`dare` sparsifies one task vector at random; :func:`dare_task_arithmetic` is the
merge DARE + task arithmetic. DARE-TIES is
``ties(base, [dare(tau_t, ...) for t], density=1.0)``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.random import threefry2x32_p

from jax.sharding import PartitionSpec as P

from taskvec_jax.merging import _common, _leafwise, _shards, arithmetic

PyTree = Any

__all__ = ["dare", "dare_task_arithmetic"]


def dare(task_vector: PyTree, *, drop_rate: float | jax.Array, key: jax.Array,
         rescale: bool = True) -> PyTree:
    """DARE, Drop And REscale (Yu et al., 2024).

    Each entry is dropped independently with probability ``p = drop_rate``; survivors
    are divided by ``1 - p`` (``rescale=True``), so ``E[dare(tau)] = tau``:
    ``out = where(keep, tau / (1 - p), 0)`` with ``keep ~ Bernoulli(1 - p)``. With
    ``p = 0`` every entry survives and ``out == tau`` exactly.

    Randomness: the leaf at flattening position ``i`` (``None`` leaves counted) draws
    from ``jax.random.fold_in(key, i)``, so a leaf's mask does not depend on the others.

    Memory: the output tree plus one leaf's transient random bits.

    Args:
      task_vector: a pytree of arrays; ``None`` and non-float leaves are returned as is.
      drop_rate: ``p`` in ``[0, 1)``; may be traced (then it is not range-checked).
      key: a PRNG key.
      rescale: divide survivors by ``1 - p``.

    Returns:
      A tree shaped like ``task_vector`` with the same dtypes.

    Raises:
      ValueError: for a concrete drop_rate outside ``[0, 1)`` or a non-scalar one, or a
        NaN/Inf entry (naming the leaf; under ``jit`` such entries are never dropped).
    """
    _check_drop_rate(drop_rate)
    _common.check_finite([task_vector], names=["task_vector"])
    lay = _sharded_layout(task_vector, key)
    if lay is not None:     # each device drops its blocks' entries (see _shards)
        specs = _shards.tree_specs(task_vector, lay)
        return _shards.run(_drop_and_rescale, lay, (task_vector, drop_rate, key),
                           (specs, P(), P()), specs, rescale=bool(rescale),
                           shards=lay.shards)
    return _dare_jit(task_vector, drop_rate, key, rescale=bool(rescale))


def _sharded_layout(tree, key):
    """The tree's :class:`~taskvec_jax.merging._shards.Layout` when its blocks can draw
    their own entries' bits (threefry keys, leaves under 2**32 entries), else ``None``."""
    lay = _shards.layout(tree)
    if lay is None or str(jax.random.key_impl(key)) != "threefry2x32" or any(
            s is not None and s.size >= 2 ** 32 for s in lay.shards):
        return None
    return lay


def _check_drop_rate(drop_rate: Any) -> None:
    if not isinstance(drop_rate, jax.core.Tracer):
        p = _common.static_number(drop_rate, "drop_rate")
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop_rate must lie in [0, 1), got {drop_rate!r}")
    elif jnp.ndim(drop_rate) != 0:
        raise ValueError(f"drop_rate must be a scalar, got shape {jnp.shape(drop_rate)}")


def _drop_and_rescale(task_vector, drop_rate, key, rescale, shards=None):
    """The DARE map on one tree (traceable; no checks). ``shards``: inside
    ``jax.shard_map``, one :class:`~taskvec_jax.merging._shards.Shards` per leaf."""
    leaves, treedef = _common.flatten(task_vector)
    return jax.tree.unflatten(treedef, [
        _drop_leaf(x, drop_rate, key, i, rescale, None if shards is None else shards[i])
        if _common.is_param(x) else x for i, x in enumerate(leaves)])


def _drop_leaf(x, drop_rate, key, i, rescale, shards, unrolled=False):
    """Leaf ``i`` of :func:`dare` (its draws from ``fold_in(key, i)``; ``unrolled``: see
    :func:`_keep_mask`)."""
    keep = _keep_mask(jax.random.fold_in(key, i), 1.0 - drop_rate, jnp.shape(x), shards,
                      unrolled)
    # Non-finite entries are never dropped: under jit they propagate (eagerly they
    # were rejected by check_finite). A dropped entry is divided by 1, so the quotient
    # is finite exactly where x is, and x / q is computed once (XLA stores a value used
    # twice, a leaf-sized buffer per task in dare_task_arithmetic's fused sum).
    kept = keep | ~jnp.isfinite(x)
    if rescale:
        # A per-entry divisor: XLA on CPU turns division by a broadcast scalar into
        # multiplication by its reciprocal, which is off by an ulp; this way every
        # survivor is the correctly rounded x / (1 - p).
        one = jnp.ones((), x.dtype)
        x = x / jnp.where(keep, (1 - drop_rate).astype(x.dtype), one)
    return jnp.where(kept, x, jnp.zeros((), x.dtype))


def _rotate_left(x, r: int):
    return lax.shift_left(x, jnp.uint32(r)) | lax.shift_right_logical(x, jnp.uint32(32 - r))


def _threefry2x32(k1, k2, x1, x2):
    """The Threefry-2x32 hash, 20 rounds (Salmon et al., SC 2011), written out in ``jnp``:
    the words of ``threefry2x32_p`` bit for bit (tests/test_merging_dare.py).

    On CPU JAX lowers ``threefry2x32_p`` as a rolled ``while`` loop, whose output words
    are materialized: in :func:`dare_task_arithmetic` every task's words of a leaf were
    alive at once (15 models of temporaries for ``T = 8`` at ViT-B/32 shapes, by XLA's
    ``memory_analysis()``). Written out, the rounds are elementwise and XLA fuses them
    into the merge's one pass (0.002 models).
    """
    ks = (k1, k2, k1 ^ k2 ^ jnp.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in ((13, 15, 26, 6), (17, 29, 16, 24))[i % 2]:
            x1 = x1 + x2
            x2 = _rotate_left(x2, r) ^ x1
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
    return x1, x2


def _keep_mask(key: jax.Array, keep_prob, shape: tuple[int, ...], shards=None,
               unrolled: bool = False) -> jax.Array:
    """``Bernoulli(keep_prob)`` draws of ``shape``, each from 24 uniform random bits.

    A threefry key (JAX's default) hashes each counter into two 32-bit words, and
    ``jax.random.bernoulli`` keeps one word per entry (it XORs the pair). Here both words
    are used: counter ``j`` gives entry ``j`` and entry ``j + ceil(n / 2)`` of the
    flattened shape, so the ``n`` draws cost ``ceil(n / 2)`` hashes (measured on two CPU
    cores, 87.8M draws: 0.78 s against 1.47 s; DARE's cost is almost all its draws).
    Entry ``j`` is kept iff ``(word_j >> 8) * 2**-24 < keep_prob``: the probability is
    ``keep_prob`` rounded up to a multiple of ``2**-24`` (``jax.random.bernoulli``:
    ``2**-23``), exactly 1 for ``keep_prob = 1``. Keys of other implementations (``rbg``,
    ``unsafe_rbg``) draw with ``jax.random.bernoulli``.

    ``shards``: ``shape`` is then the local block of a sharded leaf (threefry keys only),
    and each entry hashes the counter of its position in the whole leaf, taking the
    word the whole leaf's draw gives it: the block's mask is that block of the whole
    leaf's mask (each device computes both words of its entries' counters).

    ``unrolled``: the hash is :func:`_threefry2x32` (the same words, fusible) instead of
    ``threefry2x32_p`` (compact, compiled quickly).
    """
    hash_fn = _threefry2x32 if unrolled else threefry2x32_p.bind
    if shards is not None and shards.size >= 2:
        m = (shards.size + 1) // 2
        k1, k2 = jax.random.key_data(key)
        pos = shards.flat_position(lax.iota(jnp.uint32, math.prod(shape)))
        first = pos < m
        w1, w2 = hash_fn(k1, k2, jnp.zeros_like(pos),
                         jnp.where(first, pos, pos - jnp.uint32(m)))
        words = jnp.where(first, w1, w2)
        uniform = (words >> 8).astype(jnp.float32) * jnp.float32(2.0 ** -24)
        return (uniform < keep_prob).reshape(shape)
    n = math.prod(shape)
    m = (n + 1) // 2
    if n < 2 or m >= 2 ** 32 or str(jax.random.key_impl(key)) != "threefry2x32":
        return jax.random.bernoulli(key, keep_prob, shape)
    k1, k2 = jax.random.key_data(key)         # typed or raw (uint32[2]) keys alike
    hi = jnp.zeros((m,), jnp.uint32)          # the counters j < 2**32 fit the low word
    w1, w2 = hash_fn(k1, k2, hi, lax.iota(jnp.uint32, m))
    words = jnp.concatenate([w1, w2])[:n]
    uniform = (words >> 8).astype(jnp.float32) * jnp.float32(2.0 ** -24)
    return (uniform < keep_prob).reshape(shape)


_dare_jit = jax.jit(_drop_and_rescale, static_argnames=("rescale",))


def dare_task_arithmetic(base: PyTree, task_vectors: Sequence[PyTree], *,
                         alpha: float | Sequence[float] | jax.Array = 1.0,
                         drop_rate: float | jax.Array, key: jax.Array,
                         rescale: bool = True) -> PyTree:
    """DARE + task arithmetic: ``base + sum_t alpha_t * dare(tau_t, key_t)``.

    Task ``t`` draws its drop mask with ``key_t = jax.random.fold_in(key, t)`` (then leaf
    ``i`` within it with ``fold_in(key_t, i)``, see :func:`dare`), so the result equals
    ``task_arithmetic(base, [dare(tau_t, drop_rate=p, key=fold_in(key, t)) for t],
    alpha=alpha)`` (the same sum, leaf by leaf), computed without storing any dropped
    task vector.

    Memory: the output and nothing else model-sized: each leaf is one program whose one
    fused pass hashes, drops, rescales and adds the ``T`` task leaves (leaves of one
    shape share the compiled program; under an outer ``jax.jit`` the leaves are traced
    into the caller's program). On sharded task vectors each device does so for its
    blocks.

    Args:
      base: the pretrained model.
      task_vectors: a non-empty sequence of task vectors shaped like ``base``.
      alpha: a scalar or one coefficient per task (``[T]``); may be traced.
      drop_rate: ``p`` in ``[0, 1)``; may be traced.
      key: a PRNG key.
      rescale: divide survivors by ``1 - p``.

    Returns:
      The merged model, shaped like ``base`` with its dtypes.

    Raises:
      ValueError: for an empty sequence, a task vector that does not match ``base``
        (naming the task index and leaf path), a NaN/Inf entry (naming task and leaf),
        alpha of the wrong shape, or a concrete drop_rate outside ``[0, 1)``.
    """
    _common.flatten_tasks(task_vectors, base)
    _common.check_finite(task_vectors)
    alphas = _common.per_task_alpha(alpha, len(task_vectors))
    _check_drop_rate(drop_rate)
    rescale = bool(rescale)
    task_vectors = tuple(task_vectors)
    lay = _sharded_layout(task_vectors[0], key)
    if lay is None and _common.is_traced((base, task_vectors, alphas, drop_rate, key)):
        return _dare_task_arithmetic(base, task_vectors, alphas, drop_rate, key,
                                     rescale=rescale)
    # Eagerly (or sharded): one program per leaf, shared by the leaves of one shape and
    # layout (the leaf's index is an argument): T hashes written out per program compile
    # in seconds, where one program for a 150-leaf tree took minutes.
    index = {path: i for i, path in enumerate(_common.leaf_paths(base))}

    def merge_leaf(path, b, xs, alphas):
        i = index[path]
        args = (b, xs, alphas, drop_rate, key, jnp.asarray(i, jnp.uint32))
        if lay is None:
            return _dare_task_arithmetic_leaf_jit(*args, rescale=rescale)
        spec = lay.specs[i]     # each device drops and adds its blocks (see _shards)
        return _shards.run(_dare_task_arithmetic_leaf, lay, args,
                           (spec, (spec,) * len(xs), P(), P(), P(), P()), spec,
                           rescale=rescale, shards=lay.shards[i])
    return _leafwise.merge_leaves(base, task_vectors, alphas, merge_leaf)


def _dare_task_arithmetic_leaf(base, task_leaves, alphas, drop_rate, key, i, *, rescale,
                               shards=None):
    """Leaf ``i`` of the merge: ``base + sum_t alphas[t] * dare(task_leaves[t])``, the
    drops fused into :func:`~taskvec_jax.merging.arithmetic.add_weighted`'s sum (one pass,
    nothing leaf-sized stored; the hash written out, :func:`_threefry2x32`)."""
    dropped = [_drop_leaf(x, drop_rate, jax.random.fold_in(key, t), i, rescale, shards,
                          unrolled=True) for t, x in enumerate(task_leaves)]
    return arithmetic.add_weighted(base, dropped, alphas)


_dare_task_arithmetic_leaf_jit = jax.jit(_dare_task_arithmetic_leaf,
                                         static_argnames=("rescale",))


def _dare_task_arithmetic(base, task_vectors, alphas, drop_rate, key, *, rescale):
    """The whole merge in one traced function (the path under an outer ``jax.jit``)."""
    drop_rate = jnp.asarray(drop_rate)    # as a jitted function's argument would be
    index = {path: i for i, path in enumerate(_common.leaf_paths(base))}
    return _leafwise.merge_leaves(
        base, task_vectors, alphas,
        lambda path, b, xs, alphas: _dare_task_arithmetic_leaf(
            b, xs, alphas, drop_rate, key, index[path], rescale=rescale))
