"""Theorems 1 and 2 of "On Task Vectors and Gradients" (arXiv 2508.16082), measured.

On the embedded digits tasks (:func:`taskvec_jax.data.permuted_digits_tasks`), for several
MLPs and numbers of tasks (``config.runs``):

1. Theorem 1: ``||theta_TA^(k) - theta_MT^(k)||`` against the step ``lr`` on log-log
   axes for ``k = 1..K`` (``k = 1``: zero up to rounding; ``k >= 2``: slope 2), and the
   residual ``||theta_TA^(k) - theta_MT^(k) - lr^2 C_k||`` (slope 3) for both Hessian
   indexings (:mod:`.measure`);
2. Theorem 2: the measured ``||C_k||`` next to the project's bound and the paper summary's
   stated form, with the measured gradient and Hessian norms next to ``G_max``, ``H_max``;
3. beyond the theorem: how the one-epoch equality breaks under minibatch SGD.

:func:`run` writes ``results.json``, four PNG figures (:mod:`.plots`) and ``report.md``
(:mod:`.report`). The command line is ``experiments/theorem.py``; the config
``experiments/configs/theorem.py``.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import ml_collections

from experiments.cli import write_json
from experiments.paper.numerics import plots, report
from experiments.paper.numerics.measure import run_label, sgd_breakdown, theorem1, theorem2
from taskvec_jax import data
from taskvec_jax.models import MLP, make_loss_fn

__all__ = ["run"]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs every entry of ``config.runs``, then writes results.json, figures, report.md.

    Raises:
      RuntimeError: if float64 is off (``jax_enable_x64``): the slopes over a decade of
        ``lr`` down to 1e-3 need it (the residual is ~1e-9 of the parameters).
    """
    if not jax.config.jax_enable_x64:
        raise RuntimeError("the Theorem 1/2 experiment runs in float64: call "
                           "jax.config.update('jax_enable_x64', True) first")
    start = time.time()
    os.makedirs(workdir, exist_ok=True)
    key = jax.random.key(config.seed)
    results: dict = {"config": config.to_dict(), "runs": []}
    first = None
    h0 = config.hessian_at[0]
    for i, run_cfg in enumerate(config.runs):
        run_cfg = dict(run_cfg)
        features = (run_cfg["width"],) * (run_cfg["depth"] - 1) + (10,)
        model = MLP(features=features, activation=run_cfg["activation"],
                    param_dtype=jnp.float64)
        loss_fn = make_loss_fn(model, config.loss)
        tasks = [jax.tree.map(jnp.asarray, t) for t in data.permuted_digits_tasks(
            run_cfg["num_tasks"], config.examples_per_task, config.seed)]
        params = model.init(jax.random.fold_in(key, i), tasks[0]["image"][:1])["params"]
        t0 = time.time()
        t1 = theorem1(loss_fn, params, tasks, config)
        t2 = theorem2(loss_fn, params, tasks, run_cfg, config,
                      jax.random.fold_in(key, 100 + i))
        results["runs"].append({"run": run_cfg, "theorem1": t1, "theorem2": t2,
                                "wall_time_s": time.time() - t0})
        print(f"[theorem] {run_label(run_cfg)}: k=1 gap {t1['k1_max_abs_gap']:.2e}, slopes "
              + ", ".join(f"k={k}: {s:.3f}/{t1['slopes'][f'residual_{h0}'][k]:.3f}"
                          for k, s in t1["slopes"]["gap"].items())
              + f"  ({time.time() - t0:.1f} s)", flush=True)
        if first is None:
            first = (loss_fn, params, tasks, run_cfg)
    loss_fn, params, tasks, run_cfg = first
    sgd = sgd_breakdown(loss_fn, params, tasks, config, jax.random.fold_in(key, 999))
    sgd["run_label"] = run_label(run_cfg)
    results["sgd"] = sgd
    results["wall_time_s"] = time.time() - start
    results["figures"] = [os.path.basename(f) for f in plots.plot_all(results, workdir)]
    write_json(os.path.join(workdir, "results.json"), results)
    report.write(results, workdir)
    return results
