"""Figures of the tangent-space experiment (matplotlib, Agg): disentanglement heatmaps
(nonlinear and linearized side by side, as in 2305.12827 fig. 3) and linear paths."""

from __future__ import annotations

import os

import numpy as np

__all__ = ["disentanglement_heatmaps", "linear_paths"]


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def disentanglement_heatmaps(dis: dict, out_dir: str) -> list[str]:
    """One PNG per task pair: xi(alpha_1, alpha_2), nonlinear | linearized, one colour scale.

    Args:
      dis: ``{"values": [A], "pairs": [{"pair": [name_1, name_2], "nonlinear": [A, A],
        "linearized": [A, A]}, ...]}`` (``[i, j]`` is ``(values[i], values[j])``).
      out_dir: where the files go (``disentanglement_<i>.png``).

    Returns:
      The paths written.
    """
    plt = _plt()
    os.makedirs(out_dir, exist_ok=True)
    values = np.asarray(dis["values"])
    extent = (values[0], values[-1], values[0], values[-1])
    paths = []
    for i, p in enumerate(dis["pairs"]):
        vmax = max(float(np.max(p["nonlinear"])), float(np.max(p["linearized"])), 1e-12)
        fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.8), constrained_layout=True)
        for ax, kind in zip(axes, ("nonlinear", "linearized")):
            xi = np.asarray(p[kind])
            im = ax.imshow(xi.T, origin="lower", extent=extent, vmin=0, vmax=vmax,
                           cmap="viridis", aspect="auto")
            ax.set_title(f"{kind}: mean xi {xi.mean():.3f}", fontsize=9)
            ax.set_xlabel(f"alpha_1 ({p['pair'][0]})")
            ax.set_ylabel(f"alpha_2 ({p['pair'][1]})")
            ax.plot([0], [0], "w+")
        fig.colorbar(im, ax=axes, label="xi (prediction disagreement)")
        fig.suptitle("Weight disentanglement error (2305.12827 eq. 4)", fontsize=10)
        path = os.path.join(out_dir, f"disentanglement_{i}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def linear_paths(diag: dict, task_names, out_dir: str) -> str:
    """Accuracy on the task itself and on the other tasks along theta_0 + lambda tau_t."""
    plt = _plt()
    os.makedirs(out_dir, exist_ok=True)
    lam = np.asarray(diag["lambdas"])
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.6), sharey=True, constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, kind in zip(axes, ("nonlinear", "linearized")):
        for k, row in enumerate(diag["paths"][kind]):
            c = colors[k % len(colors)]
            ax.plot(lam, row["own"], "o-", color=c, ms=3, label=f"{task_names[k]}: own")
            ax.plot(lam, row["others"], "s:", color=c, ms=3, label="others")
        ax.set_title(f"{kind} task vectors ({kind} evaluation)", fontsize=9)
        ax.set_xlabel("lambda")
    axes[0].set_ylabel("validation accuracy")
    axes[1].legend(fontsize=6, ncol=2)
    path = os.path.join(out_dir, "linear_paths.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
