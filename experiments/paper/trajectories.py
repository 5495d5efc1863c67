"""Parameter-space trajectories: finetunes, merges, ATM rounds and multitask GD in one PCA."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from taskvec_jax import analysis, plotting


def run(setup, trajs, merged_by_epoch: dict, atm_result, multitask_traj, workdir: str
        ) -> dict:
    """Fits a 2-D PCA on every point and draws each family as a path."""
    epochs = [e for e in setup.config.pca_epochs if e <= int(trajs[0].epochs[-1])]
    groups = {}
    for name, traj in zip(setup.task_names, trajs):
        groups[f"finetune {name.split('/')[-1]}"] = _stack([traj.at(e) for e in epochs])
    if merged_by_epoch:
        groups["task arithmetic (after k epochs)"] = _stack(
            [setup.base] + [merged_by_epoch[e] for e in sorted(merged_by_epoch)])
    if atm_result is not None:
        groups["ATM rounds"] = atm_result.params
    mt_epochs = [e for e in epochs if e <= int(multitask_traj.epochs[-1])]
    groups["multitask GD"] = _stack([multitask_traj.at(e) for e in mt_epochs])
    sizes = [jax.tree.leaves(g)[0].shape[0] for g in groups.values()]
    allpts = jax.tree.map(lambda *xs: jnp.concatenate(xs), *groups.values())
    p = analysis.pca(allpts, num_components=2)
    coords = np.asarray(p.coords)
    paths, start = {}, 0
    for name, n in zip(groups, sizes):
        paths[name] = coords[start:start + n]
        start += n
    base_xy = np.asarray(analysis.project(_stack([setup.base]), p))
    plotting.pca_paths(paths, points={"base model": base_xy},
                       explained=np.asarray(p.explained_variance_ratio),
                       title="trajectories in parameter space (PCA)",
                       path=os.path.join(workdir, "figures", "trajectories_pca.png"))
    return {"explained_variance_ratio": np.asarray(p.explained_variance_ratio).tolist(),
            "paths": {k: v.tolist() for k, v in paths.items()}, "epochs": epochs}


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
