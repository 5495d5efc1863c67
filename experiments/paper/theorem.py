"""Theorem 1 on the reproduction's own model: the one-epoch equality and the eta^2 law."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments.paper.numerics.measure import loglog_slope, lr_sweep
from taskvec_jax import plotting
from taskvec_jax.models import multihead_loss_fn

__all__ = ["run"]


def run(setup, workdir: str) -> dict:
    """Gap ||theta_TA^(k) - theta_MT^(k)|| for k = 1..K over a decade of lr, in float64.

    The model and data are cast to float64 so the k = 1 equality is visible to rounding
    (the identity is exact; float32 would show ~1e-7 instead of ~1e-16).
    """
    c = setup.config.theorem
    to64 = lambda t: jax.tree.map(  # noqa: E731
        lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, t)
    params = to64(setup.base)
    tasks = [to64(jax.tree.map(lambda x: x[:400], d)) for d in setup.train[:c.num_tasks]]
    sweep = lr_sweep(_float64_loss(setup), params, tasks, c.lrs, c.alpha, c.epochs)
    lrs, gaps = sweep["lrs"], sweep["gap_norms"]
    residuals = sweep["residual_norms"]["current"]
    rows = []
    for k in range(1, c.epochs + 1):
        row = {"k": k, "max_gap": float(gaps[:, k - 1].max())}
        if k >= 2:
            row["slope_gap"] = loglog_slope(lrs, gaps[:, k - 1])
            row["slope_residual"] = loglog_slope(lrs, residuals[:, k - 1])
        rows.append(row)
    curves = {f"||TA - MT||, k={k}": gaps[:, k - 1] for k in range(2, c.epochs + 1)}
    curves.update({f"||TA - MT - lr^2 C_k||, k={k}": residuals[:, k - 1]
                   for k in range(2, c.epochs + 1)})
    plotting.loglog_slopes(lrs, curves, ylabel="parameter-space distance",
                           title=f"Theorem 1 on the base model (T={len(tasks)}, "
                                 f"alpha={c.alpha})",
                           path=os.path.join(workdir, "figures", "theorem1.png"))
    return {"lrs": lrs.tolist(), "alpha": c.alpha, "num_tasks": len(tasks),
            "gap_norm": gaps.tolist(), "residual_norm": np.asarray(residuals).tolist(),
            "rows": rows}


def _float64_loss(setup):
    """The multihead loss with the heads cast to float64 too."""
    heads = setup.heads._replace(kernel=setup.heads.kernel.astype(jnp.float64),
                                 bias=setup.heads.bias.astype(jnp.float64))
    return multihead_loss_fn(setup.encode, heads)
