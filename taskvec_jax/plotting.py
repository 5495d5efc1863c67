"""Matplotlib figures shared by the experiments and notebooks.

Every figure function draws on a new figure, saves it when ``path`` is given (PNG, 120
dpi) and returns the figure. Inputs are plain arrays and dicts, so the functions know
nothing about how the numbers were produced. :func:`pyplot` and :func:`save` are the two
helpers for figures drawn elsewhere (experiments/paper/numerics/plots.py).
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

__all__ = ["accuracy_curves", "contribution_bars", "cosine_heatmaps", "loglog_slopes",
           "pca_paths", "pyplot", "save"]


def pyplot():
    """``matplotlib.pyplot``, on the headless Agg backend unless ``MPLBACKEND`` names one
    or this runs inside IPython/Jupyter (whose inline backend is kept)."""
    import matplotlib
    if os.environ.get("MPLBACKEND") is None and not _in_notebook():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: str, *, dpi: int = 120) -> str:
    """Saves ``fig`` as ``path`` (PNG), creating its folder; returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
        return get_ipython() is not None
    except ImportError:
        return False


def _finish(fig, path: str | None):
    fig.tight_layout()
    if path is not None:
        save(fig, path)
    return fig


def loglog_slopes(x: Sequence[float], curves: Mapping[str, Sequence[float]], *,
                  xlabel: str = "learning rate", ylabel: str = "norm",
                  title: str = "", path: str | None = None):
    """``curves`` on log-log axes, each labelled with its fitted slope."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    x = np.asarray(x, float)
    for label, y in curves.items():
        y = np.asarray(y, float)
        ok = (y > 0) & np.isfinite(y)
        slope = np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)[0] if ok.sum() >= 2 else np.nan
        ax.loglog(x[ok], y[ok], "o-", label=f"{label} (slope {slope:.2f})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return _finish(fig, path)


def contribution_bars(shares: Mapping[str, Sequence[float]], *, num_epochs: int = 10,
                      title: str = "normalized contribution of each epoch",
                      path: str | None = None):
    """Grouped bars: each task's share of the path length in its first epochs."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(shares)
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        s = np.asarray(shares[name], float)[:num_epochs]
        ax.bar(np.arange(1, len(s) + 1) + (i - (len(names) - 1) / 2) * width, s, width,
               label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("||theta^(e) - theta^(e-1)|| / path length")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    return _finish(fig, path)


def cosine_heatmaps(matrices: Mapping[str, np.ndarray], *, title: str = "",
                    path: str | None = None):
    """One heatmap per entry (e.g. per task), cosine between epoch gradients."""
    plt = pyplot()
    n = len(matrices)
    cols = min(n, 4)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.8 * rows), squeeze=False)
    im = None
    for ax, (name, m) in zip(axes.ravel(), matrices.items()):
        m = np.asarray(m, float)
        im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_title(name, fontsize=8)
        ticks = np.arange(m.shape[0])
        ax.set_xticks(ticks, ticks + 1, fontsize=6)
        ax.set_yticks(ticks, ticks + 1, fontsize=6)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
    fig.suptitle(title)
    if path is not None:   # no tight_layout: it would fight the shared colorbar
        save(fig, path)
    return fig


def accuracy_curves(x: Sequence[float], curves: Mapping[str, Sequence[float]], *,
                    references: Mapping[str, float] | None = None, xlabel: str = "epochs",
                    ylabel: str = "accuracy", title: str = "", logx: bool = True,
                    path: str | None = None):
    """Lines of accuracy against epochs/rounds, with horizontal reference lines."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, y in curves.items():
        ax.plot(x, y, "o-", label=label)
    for i, (label, y) in enumerate((references or {}).items()):
        ax.axhline(y, ls="--", lw=1, color=f"C{(i + len(curves)) % 10}", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    return _finish(fig, path)


def pca_paths(paths: Mapping[str, np.ndarray], *, points: Mapping[str, np.ndarray] | None
              = None, explained: Sequence[float] | None = None, title: str = "",
              path: str | None = None):
    """2-D paths (``[M, 2]`` each) and labelled points in a PCA plane."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5))
    colors = plt.get_cmap("tab20" if len(paths) > 10 else "tab10")
    for i, (label, xy) in enumerate(paths.items()):
        xy = np.asarray(xy)
        ax.plot(xy[:, 0], xy[:, 1], "-o", ms=3, lw=1, color=colors(i % colors.N),
                label=label)
    for i, (label, xy) in enumerate((points or {}).items()):
        xy = np.atleast_2d(np.asarray(xy))
        ax.scatter(xy[:, 0], xy[:, 1], marker="**Dsv^"[i % 6], s=90, zorder=5,
                   color="k", label=label)
    if explained is not None and len(explained) >= 2:
        ax.set_xlabel(f"PC1 ({100 * explained[0]:.1f}% of variance)")
        ax.set_ylabel(f"PC2 ({100 * explained[1]:.1f}% of variance)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    return _finish(fig, path)
