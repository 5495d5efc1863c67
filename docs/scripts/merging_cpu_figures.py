"""CPU figures quoted in docs/merging.md (timings are rough on a shared machine).

Run from the repository root:  python docs/scripts/merging_cpu_figures.py
"""
import time

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

import taskvec_jax as tvj
from taskvec_jax.merging import _select, ties_merging

P, T = 4_000_000, 8
SHAPES = {"a": (1000, 2000), "b": (2000, 900), "c": (200_000,)}
MODEL_BYTES = 4 * P


def make_taus():
    keys = jax.random.split(jax.random.key(0), T)
    return [{k: jax.random.normal(jax.random.fold_in(key, i), s, jnp.float32)
             for i, (k, s) in enumerate(SHAPES.items())} for key in keys]


@jax.jit
def sort_trim(tau):
    """The textbook global trim: one sort of the concatenated magnitudes."""
    flat, unravel = jax.flatten_util.ravel_pytree(tau)
    k = int(np.ceil(0.2 * flat.size))
    thr = jnp.sort(jnp.abs(flat))[flat.size - k]
    return unravel(jnp.where(jnp.abs(flat) >= thr, flat, 0))


def best_of(fn, reps=3):
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    taus = make_taus()
    print(f"{P / 1e6:.0f}M float32 parameters, T = {T} task vectors, density 0.2")
    print(f"trim, global, radix select : {best_of(lambda: tvj.merging.trim(taus[0], density=0.2)):.3f} s")
    print(f"trim, global, one jnp.sort  : {best_of(lambda: sort_trim(taus[0])):.3f} s")
    print(f"trim, row, bit bisection    : {best_of(lambda: tvj.merging.trim(taus[0], density=0.2, scope='row')):.3f} s")
    for scope in ("global", "row"):
        t = best_of(lambda: tvj.merging.ties_task_vector(taus, density=0.2, scope=scope), reps=2)
        print(f"ties_task_vector, {scope:6s}   : {t:.3f} s")
    print(f"task_arithmetic             : {best_of(lambda: tvj.merging.task_arithmetic(taus[0], taus, alpha=0.3)):.3f} s")
    # The compiled programs behind ties_task_vector (private: measured, not API).
    leaves = jax.tree.leaves(taus[0])
    rank = _select._band_thresholds_jit.lower(leaves, 0.2, 0.0,
                                              "global").compile().memory_analysis()
    thresholds = [_select._band_thresholds_jit(jax.tree.leaves(t), 0.2, 0.0, "global")
                  for t in taus]
    merge = ties_merging._ties_merge_jit.lower(
        tuple(taus), thresholds, None, None, None, density=0.2, scope="global",
        merge="mean", consensus="mass").compile().memory_analysis()
    graph = ties_merging._ties_graph.lower(tuple(taus), None, None, None, density=0.2,
                                           scope="global", merge="mean",
                                           consensus="mass").compile().memory_analysis()
    print(f"ties ranking of one task (global): temp "
          f"{rank.temp_size_in_bytes / MODEL_BYTES:.2f} models")
    print(f"ties merge over {T} tasks: temp {merge.temp_size_in_bytes / MODEL_BYTES:.2f} "
          "models")
    print(f"ties as one program over {T} tasks: temp "
          f"{graph.temp_size_in_bytes / MODEL_BYTES:.2f} models")


if __name__ == "__main__":
    main()
