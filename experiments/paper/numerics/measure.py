"""The measurements of the Theorem 1/2 experiment, and the one Theorem 1 step-size sweep.

:func:`lr_sweep` is the sweep every Theorem 1 check runs (this experiment, the
reproduction's "Theorem 1 on this model", notebook 01): for each step ``lr``, the gap
``theta_TA^(k) - theta_MT^(k)`` for ``k = 1..K`` and the residual
``gap - lr^2 C_k`` (arXiv 2508.16082, Theorem 1: the gap is ``O(lr^2)``, the residual
``O(lr^3)``, and the gap at ``k = 1`` is zero).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import taskvec_jax as tvj

__all__ = ["loglog_slope", "lr_sweep", "run_label", "sgd_breakdown", "theorem1",
           "theorem2"]


def loglog_slope(xs, ys) -> float:
    """The least-squares slope of ``log ys`` against ``log xs``."""
    return float(np.polyfit(np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float)),
                            1)[0])


def lr_sweep(loss_fn, params, task_datasets, learning_rates: Sequence[float], alpha: float,
             num_epochs: int, *, hessian_at: Sequence[str] = ("current",)) -> dict:
    """Theorem 1's gap and residual norms over a sweep of step sizes (full-batch GD).

    For every ``lr``: ``gap = theta_TA^(k) - theta_MT^(k)`` from
    :func:`taskvec_jax.theory.task_arithmetic_gap` and, for each Hessian indexing ``h``,
    ``C_k`` from :func:`taskvec_jax.theory.second_order_term` and the residual
    ``gap - lr^2 C_k``; ``k = 1..num_epochs``. Cost per ``lr``: one gap run and
    ``len(hessian_at)`` second-order terms (``T (K - 1)`` HVPs each).

    Returns:
      ``{"lrs": [L], "gap_norms": [L, K], "gap_max_abs": [L, K],
      "c_norms": {h: [L, K]}, "residual_norms": {h: [L, K]}}`` as numpy arrays.
    """
    lrs = np.asarray(learning_rates, float)
    gap_norms, gap_max_abs = [], []
    c_norms = {h: [] for h in hessian_at}
    residuals = {h: [] for h in hessian_at}
    for lr in lrs:
        # Step size and alpha positionally: the same call before and after `lr` is
        # renamed `learning_rate` in taskvec_jax.theory.
        gap = tvj.theory.task_arithmetic_gap(loss_fn, params, task_datasets, float(lr),
                                             alpha, num_epochs)
        gap_norms.append(np.asarray(gap.gap_norms))
        gap_max_abs.append(np.asarray(gap.gap_max_abs))
        for h in hessian_at:
            c = tvj.theory.second_order_term(loss_fn, params, task_datasets, float(lr),
                                             alpha, num_epochs, hessian_at=h,
                                             all_epochs=True)
            c_norms[h].append(np.asarray(jax.vmap(tvj.tree.norm)(c)))
            res = tvj.tree.sub(gap.gap, tvj.tree.scale(float(lr) ** 2, c))
            residuals[h].append(np.asarray(jax.vmap(tvj.tree.norm)(res)))
    return {"lrs": lrs, "gap_norms": np.array(gap_norms),
            "gap_max_abs": np.array(gap_max_abs),
            "c_norms": {h: np.array(v) for h, v in c_norms.items()},
            "residual_norms": {h: np.array(v) for h, v in residuals.items()}}


def theorem1(loss_fn, params, tasks, config) -> dict:
    """:func:`lr_sweep` over ``config``'s log-spaced steps, with slopes fitted over
    ``[lr_min, fit_lr_max]`` for every ``k >= 2``."""
    lrs = np.logspace(np.log10(config.lr_min), np.log10(config.lr_max), config.num_lrs)
    sweep = lr_sweep(loss_fn, params, tasks, lrs, config.alpha, config.num_epochs,
                     hessian_at=tuple(config.hessian_at))
    fit = lrs <= config.fit_lr_max * (1 + 1e-9)
    slopes = {"gap": {}, **{f"residual_{h}": {} for h in config.hessian_at}}
    for k in range(2, config.num_epochs + 1):
        slopes["gap"][k] = loglog_slope(lrs[fit], sweep["gap_norms"][fit, k - 1])
        for h in config.hessian_at:
            slopes[f"residual_{h}"][k] = loglog_slope(
                lrs[fit], sweep["residual_norms"][h][fit, k - 1])
    return {**sweep, "fit_lrs": lrs[fit], "slopes": slopes,
            "k1_max_abs_gap": float(np.max(sweep["gap_max_abs"][:, 0]))}


def theorem2(loss_fn, params, tasks, run, config, key) -> dict:
    """Measured gradient/Hessian norms and ||C_k|| against G_max, H_max and both bounds."""
    theory = tvj.theory
    lr, alpha, num_epochs = config.bound_lr, config.alpha, config.num_epochs
    curv = theory.trajectory_curvature(loss_fn, params, tasks, lr, alpha, num_epochs, key,
                                       tol=config.power_iteration_tol,
                                       max_steps=config.power_iteration_max_steps)
    c = theory.second_order_term(loss_fn, params, tasks, lr, alpha, num_epochs,
                                 all_epochs=True)
    c_norms = np.asarray(jax.vmap(tvj.tree.norm)(c))
    w, b = theory.mlp_weight_norms(curv.params)
    x_norm = max(float(jnp.max(jnp.linalg.norm(d["image"], axis=-1))) for d in tasks)
    ks = np.arange(1, num_epochs + 1)
    hidden = [run["width"]] * (run["depth"] - 1)
    bound = theory.feedforward_bound(np.asarray(w).max(0), x_norm,
                                     activation=run["activation"], num_tasks=len(tasks),
                                     alpha=alpha, num_epochs=ks, loss=config.loss,
                                     bias_norms=np.asarray(b).max(0), widths=hidden)
    g, h = np.asarray(curv.grad_norms), np.asarray(curv.hessian_norms)
    g_sup = np.array([g[:k].max() for k in ks])
    h_sup = np.array([h[:k].max() for k in ks])
    return {
        "lr": lr, "alpha": alpha, "ks": ks, "c_norms": c_norms,
        "grad_norm_max": float(g.max()), "hessian_norm_max": float(h.max()),
        "power_iteration_converged": float(np.asarray(curv.converged).mean()),
        "weight_norms_max": np.asarray(w).max(0), "bias_norms_max": np.asarray(b).max(0),
        "input_norm_max": x_norm,
        "G_max": float(bound.grad_norm), "H_max": float(bound.hessian_norm),
        "bound": np.asarray(bound.second_order),
        "paper_form_derived": np.asarray(bound.paper_form),
        "bound_measured_sups": np.asarray(theory.second_order_bound(
            g_sup, h_sup, len(tasks), alpha, ks)),
        "paper_form_measured_sups": np.asarray(theory.paper_second_order_bound(
            g_sup, h_sup, len(tasks), alpha, ks)),
    }


def sgd_breakdown(loss_fn, params, tasks, config, key) -> dict:
    """The one-epoch gap relative to the merged update, as the minibatch shrinks."""
    out = {"batch_sizes": list(config.sgd_batch_sizes), "lrs": list(config.sgd_lrs),
           "relative_gap": []}
    n = int(tasks[0]["label"].shape[0])
    for lr in config.sgd_lrs:
        row = []
        for bs in config.sgd_batch_sizes:
            kwargs = {} if bs >= n else {"batch_size": int(bs), "key": key,
                                         "drop_remainder": True}
            gap = tvj.theory.task_arithmetic_gap(loss_fn, params, tasks, float(lr),
                                                 config.alpha, 1, **kwargs)
            moved = tvj.tree.sub(jax.tree.map(lambda x: x[0], gap.task_arithmetic), params)
            row.append(float(gap.gap_norms[0]) / float(tvj.tree.norm(moved)))
        out["relative_gap"].append(row)
    out["relative_gap"] = np.array(out["relative_gap"])
    return out


def run_label(run) -> str:
    """How tables and figures name one entry of ``config.runs``."""
    if run["depth"] == 1:
        return f"linear, T={run['num_tasks']}"
    return (f"depth {run['depth']} x {run['width']} {run['activation']}, "
            f"T={run['num_tasks']}")
