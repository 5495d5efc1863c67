"""Compile cost of a learning-rate sweep: ``for lr in lrs: tvj.finetune(..., optax.adam(lr))``.

A new optimizer object per value (plain optax constructors). Prints the wall time of each
call and the backend compilations it triggered (``jax.monitoring`` compile events).
Run it against two checkouts to compare (issue 13, item 1):

    PYTHONPATH=/path/to/checkout python benchmarks/sweep_compile.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import taskvec_jax as tvj
from taskvec_jax.models import MLP, make_loss_fn

EVENT = "/jax/core/compile/backend_compile_duration"


def main(lrs=(1e-1, 3e-2, 1e-2, 3e-3), num_epochs: int = 50) -> list[tuple[float, int]]:
    compiles: list[float] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **_: compiles.append(secs) if name == EVENT else None)
    rng = np.random.default_rng(0)
    data = {"image": jnp.asarray(rng.normal(size=(256, 8, 8, 1)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, 10, 256), jnp.int32)}
    model = MLP((64, 10))
    params = model.init(jax.random.key(0), data["image"][:1])["params"]
    loss_fn = make_loss_fn(model)
    rows = []
    for lr in lrs:
        before = len(compiles)
        t = time.perf_counter()
        traj = tvj.finetune(loss_fn, params, data, optax.adam(lr), num_epochs)
        jax.block_until_ready(traj.params)
        rows.append((time.perf_counter() - t, len(compiles) - before))
        print(f"lr {lr:g}: {rows[-1][0]:.3f} s, {rows[-1][1]} compilations "
              f"({sum(compiles[before:]):.3f} s compiling)", flush=True)
    total = sum(r[0] for r in rows)
    print(f"sweep of {len(lrs)}: {total:.3f} s total; calls after the first "
          f"{sum(r[0] for r in rows[1:]):.3f} s")
    return rows


if __name__ == "__main__":
    main()
