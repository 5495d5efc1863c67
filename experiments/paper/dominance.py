"""First-epoch dominance (the paper's gradient analysis): norm share and direction."""

from __future__ import annotations

import os

import numpy as np

from taskvec_jax import analysis, plotting


def run(setup, trajectories: dict, workdir: str) -> dict:
    """Per task and finetuning mode: epoch shares of the path length and gradient cosines.

    Args:
      trajectories: ``{"full_batch": [Trajectory per task], "minibatch": [...]}`` with
        every epoch kept and epoch gradients recorded.
    """
    k = setup.config.dominance.cosine_epochs
    out = {}
    for mode, trajs in trajectories.items():
        shares, cosines, rows = {}, {}, []
        for name, traj in zip(setup.task_names, trajs):
            share = np.asarray(analysis.normalized_contributions(traj))
            cos = np.asarray(analysis.cosine_matrix(
                _first(traj.epoch_gradients, min(k, share.size))))
            off = cos[~np.eye(cos.shape[0], dtype=bool)]
            c5 = cos[:5, :5][~np.eye(min(5, cos.shape[0]), dtype=bool)]
            short = name.split("/")[-1]
            shares[short] = share
            cosines[short] = cos
            rows.append({"task": name, "first_epoch_share": float(share[0]),
                         "top3_share": float(share[:3].sum()),
                         "mean_cos_first5": float(c5.mean()), "min_cos_first5": float(c5.min()),
                         "mean_cos_first_k": float(off.mean()),
                         "num_epochs": int(share.size)})
        plotting.contribution_bars(shares, num_epochs=min(10, len(next(iter(shares.values())))),
                                   title=f"normalized contribution per epoch ({mode})",
                                   path=os.path.join(workdir, "figures",
                                                     f"contributions_{mode}.png"))
        plotting.cosine_heatmaps(cosines, title=f"cos(g_i, g_j) over the first {k} epochs "
                                                f"({mode})",
                                 path=os.path.join(workdir, "figures", f"cosines_{mode}.png"))
        out[mode] = {"per_task": rows,
                     "mean_first_epoch_share": float(np.mean([r["first_epoch_share"]
                                                              for r in rows])),
                     "mean_cos_first5": float(np.mean([r["mean_cos_first5"] for r in rows])),
                     "min_cos_first5": float(np.min([r["min_cos_first5"] for r in rows])),
                     "shares": {n: s.tolist() for n, s in shares.items()},
                     "cosines": {n: c.tolist() for n, c in cosines.items()}}
    return out


def _first(stacked, k):
    import jax
    return jax.tree.map(lambda x: x[:k], stacked)
