"""The four figures of the Theorem 1/2 experiment (experiments/theorem.py)."""

from __future__ import annotations

import os

import numpy as np

from experiments.paper.numerics.measure import run_label
from taskvec_jax import plotting

__all__ = ["plot_all"]

# Line style per Hessian indexing of C_k (the residual figure's legend says which is which).
_STYLES = {"current": "o-", "previous": "s:"}


def plot_all(results: dict, workdir: str) -> list[str]:
    """The experiment's four figures, written into ``workdir``; returns their paths.

    ``gap_vs_lr.png`` (Theorem 1's gap, slope 2), ``residual_vs_lr.png`` (after
    subtracting ``lr^2 C_k``, slope 3, both Hessian indexings), ``bounds.png`` (Theorem 2:
    ``||C_k||`` and the bounds) and ``sgd.png`` (the one-epoch gap under minibatch SGD).
    """
    plt = plotting.pyplot()
    runs = results["runs"]
    files = []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def grid(title):
        fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.8),
                                 squeeze=False)
        fig.suptitle(title)
        return fig, axes[0]

    # 1. the gap against lr.
    fig, axes = grid("Theorem 1: ||theta_TA^(k) - theta_MT^(k)|| against lr")
    for ax, r in zip(axes, runs):
        t1 = r["theorem1"]
        lrs = t1["lrs"]
        ax.loglog(lrs, np.maximum(t1["gap_max_abs"][:, 0], 1e-18), "k.:",
                  label="k=1 (max |gap|; 1e-18 = exactly 0)")
        for k in range(2, t1["gap_norms"].shape[1] + 1):
            ax.loglog(lrs, t1["gap_norms"][:, k - 1], "o-", color=colors[k % 10], ms=3,
                      label=f"k={k}, slope {t1['slopes']['gap'][k]:.3f}")
        ref = t1["gap_norms"][0, -1] * (lrs / lrs[0]) ** 2
        ax.loglog(lrs, ref, "--", color="gray", lw=0.8, label="slope 2")
        ax.set_title(run_label(r["run"]), fontsize=9)
        ax.set_xlabel("lr")
        ax.legend(fontsize=6)
    axes[0].set_ylabel("norm")
    fig.tight_layout()
    files.append(_save(fig, workdir, "gap_vs_lr.png"))

    # 2. the residual after subtracting lr^2 C_k.
    fig, axes = grid("||gap - lr^2 C_k|| (solid: H at theta^(e); dotted: at theta^(e-1))")
    for ax, r in zip(axes, runs):
        t1 = r["theorem1"]
        lrs = t1["lrs"]
        for k in range(2, t1["gap_norms"].shape[1] + 1):
            for h in t1["residual_norms"]:
                style = _STYLES.get(h, "^-.")
                slope = t1["slopes"][f"residual_{h}"][k]
                ax.loglog(lrs, t1["residual_norms"][h][:, k - 1], style,
                          color=colors[k % 10], ms=3,
                          label=f"k={k} {h[:4]}, slope {slope:.3f}")
        first = next(iter(t1["residual_norms"].values()))
        ref = first[0, -1] * (lrs / lrs[0]) ** 3
        ax.loglog(lrs, ref, "--", color="gray", lw=0.8, label="slope 3")
        ax.set_title(run_label(r["run"]), fontsize=9)
        ax.set_xlabel("lr")
        ax.legend(fontsize=5, ncol=2)
    axes[0].set_ylabel("residual norm")
    fig.tight_layout()
    files.append(_save(fig, workdir, "residual_vs_lr.png"))

    # 3. Theorem 2.
    fig, axes = grid("Theorem 2: ||C_k|| and its bounds (lr = "
                     f"{runs[0]['theorem2']['lr']}, alpha = {runs[0]['theorem2']['alpha']})")
    for ax, r in zip(axes, runs):
        t2 = r["theorem2"]
        ks = t2["ks"][1:]
        ax.semilogy(ks, t2["c_norms"][1:], "ko-", label="measured ||C_k||")
        ax.semilogy(ks, t2["bound"][1:], "b^-", label="this bound (derived G, H)")
        ax.semilogy(ks, t2["bound_measured_sups"][1:], "b^:",
                    label="this bound (measured sup G, H)")
        ax.semilogy(ks, t2["paper_form_derived"][1:], "rv-",
                    label="paper form (derived G, H)")
        ax.semilogy(ks, t2["paper_form_measured_sups"][1:], "rv:",
                    label="paper form (measured sup G, H)")
        ax.set_title(run_label(r["run"]), fontsize=9)
        ax.set_xlabel("k")
        ax.set_xticks(ks)
        ax.legend(fontsize=6)
    fig.tight_layout()
    files.append(_save(fig, workdir, "bounds.png"))

    # 4. SGD.
    sgd = results["sgd"]
    fig, ax = plt.subplots(figsize=(5, 3.8))
    for lr, row in zip(sgd["lrs"], sgd["relative_gap"]):
        ax.loglog(sgd["batch_sizes"], np.maximum(row, 1e-18), "o-", label=f"lr={lr}")
    ax.set_xticks(sgd["batch_sizes"], [str(b) for b in sgd["batch_sizes"]])
    ax.minorticks_off()
    ax.set_xlabel("batch size (examples per task and step; largest = full batch)")
    ax.set_ylabel("||TA^(1) - MT^(1)|| / ||TA^(1) - theta_0||")
    ax.set_title(f"One epoch of minibatch SGD ({sgd['run_label']})", fontsize=9)
    ax.invert_xaxis()
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(_save(fig, workdir, "sgd.png"))
    return files


def _save(fig, workdir, name) -> str:
    path = plotting.save(fig, os.path.join(workdir, name), dpi=110)
    plotting.pyplot().close(fig)
    return path
