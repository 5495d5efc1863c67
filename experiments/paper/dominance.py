"""First-epoch dominance (the paper's gradient analysis): norm share and direction.

Per task and finetuning mode: the first epoch's share of the path over the whole run, over
the run cut at ``E`` epochs (``config.dominance.prefixes``) and at the plateau epoch (the
first epoch whose validation accuracy is within ``config.dominance.plateau_tolerance`` of
the run's best: :func:`taskvec_jax.analysis.plateau_epoch`); the paper's ``cos(g_1, g_e)``
for ``e = 2..5`` beside the mean over all pairs of the first five epochs; and the relative
movement ``||tau|| / ||theta_0||``. A full-batch "epoch" is one GD step, so its share is
~``1/E`` by construction; the report keeps it apart.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from experiments.paper.setup import steps_per_epoch
from taskvec_jax import analysis, plotting


def validation_curve(setup, traj, data) -> np.ndarray:
    """Validation accuracy after every kept epoch of ``traj`` (index 0 = the base)."""
    return np.asarray(jax.vmap(setup.accuracy, in_axes=(0, None))(traj.params, data))


def task_row(setup, name, traj, val, prefixes, tolerance, cosine_epochs=5) -> dict:
    """The dominance numbers of one finetuning run (every epoch kept, gradients recorded)."""
    share = np.asarray(analysis.normalized_contributions(traj))
    num_epochs = int(share.size)
    curve = validation_curve(setup, traj, val)
    plateau = analysis.plateau_epoch(curve[1:], tolerance=tolerance)
    cuts = [e for e in prefixes if e <= num_epochs]
    at = dict(zip(cuts, np.asarray(analysis.prefix_first_epoch_shares(traj, cuts)).tolist()))
    k = min(cosine_epochs, num_epochs)
    cos = np.asarray(analysis.epoch_gradient_cosines(
        traj._replace(epoch_gradients=_first(traj.epoch_gradients, k))))
    off = cos[~np.eye(k, dtype=bool)]
    to_first = np.asarray(analysis.cosines_to_first_epoch(traj, k)) if k >= 2 else np.zeros(0)
    base = jax.tree.map(lambda x: x[0], traj.params)
    return {"task": name, "num_epochs": num_epochs,
            "first_epoch_share": float(share[0]), "top3_share": float(share[:3].sum()),
            "share_at": {str(e): v for e, v in at.items()},
            "plateau_epoch": plateau,
            "share_at_plateau": float(analysis.prefix_first_epoch_shares(traj, [plateau])[0]),
            "validation_curve": curve.tolist(),
            "cos_to_first": to_first.tolist(),
            "mean_cos_to_first5": float(to_first.mean()) if to_first.size else float("nan"),
            "mean_cos_first5": float(off.mean()), "min_cos_first5": float(off.min()),
            "relative_movement": float(analysis.relative_movement(traj.final_params, base))}


def summarize(rows: list[dict]) -> dict:
    """Means over tasks of every scalar in the rows (and of the per-prefix shares)."""
    mean = lambda key: float(np.mean([r[key] for r in rows]))  # noqa: E731
    prefixes = sorted({e for r in rows for e in r["share_at"]}, key=int)
    return {"mean_first_epoch_share": mean("first_epoch_share"),
            "mean_share_at": {e: float(np.mean([r["share_at"][e] for r in rows
                                                if e in r["share_at"]])) for e in prefixes},
            "mean_plateau_epoch": mean("plateau_epoch"),
            "median_plateau_epoch": float(np.median([r["plateau_epoch"] for r in rows])),
            "mean_share_at_plateau": mean("share_at_plateau"),
            "mean_cos_to_first": np.mean([r["cos_to_first"] for r in rows], 0).tolist(),
            "mean_cos_to_first5": mean("mean_cos_to_first5"),
            "mean_cos_first5": mean("mean_cos_first5"),
            "min_cos_first5": float(np.min([r["min_cos_first5"] for r in rows])),
            "mean_relative_movement": mean("relative_movement")}


def run(setup, trajectories: dict, workdir: str) -> dict:
    """Per task and finetuning mode: the numbers of :func:`task_row`, their means, figures.

    Args:
      trajectories: ``{"full_batch": [Trajectory per task], "minibatch": [...]}`` with
        every epoch kept and epoch gradients recorded.
    """
    d = setup.config.dominance
    k = d.cosine_epochs
    out = {}
    for mode, trajs in trajectories.items():
        shares, cosines, rows = {}, {}, []
        for name, traj, val in zip(setup.task_names, trajs, setup.validation):
            rows.append(task_row(setup, name, traj, val, tuple(d.prefixes),
                                 d.plateau_tolerance))
            share = np.asarray(analysis.normalized_contributions(traj))
            short = name.split("/")[-1]
            shares[short] = share
            cosines[short] = np.asarray(analysis.cosine_matrix(
                _first(traj.epoch_gradients, min(k, share.size))))
        plotting.contribution_bars(shares, num_epochs=min(10, len(next(iter(shares.values())))),
                                   title=f"normalized contribution per epoch ({mode})",
                                   path=os.path.join(workdir, "figures",
                                                     f"contributions_{mode}.png"))
        plotting.cosine_heatmaps(cosines, title=f"cos(g_i, g_j) over the first {k} epochs "
                                                f"({mode})",
                                 path=os.path.join(workdir, "figures", f"cosines_{mode}.png"))
        out[mode] = {"per_task": rows, **summarize(rows),
                     "steps_per_epoch": 1 if mode == "full_batch" else float(np.mean(
                         [steps_per_epoch(t["label"].shape[0], setup.config.finetune.batch_size)
                          for t in setup.train])),
                     "shares": {n: s.tolist() for n, s in shares.items()},
                     "cosines": {n: c.tolist() for n, c in cosines.items()}}
    return out


def _first(stacked, k):
    return jax.tree.map(lambda x: x[:k], stacked)
