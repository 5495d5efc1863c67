"""Merging task vectors after k epochs vs at convergence; ATM vs task arithmetic."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import taskvec_jax as tvj
from experiments.paper.setup import minibatch_optimizer, steps_per_epoch
from taskvec_jax import merging, plotting


def _accuracies(setup, params, split) -> np.ndarray:
    return np.asarray([float(setup.accuracy(params, d)) for d in split])


def merge_fns(setup, taus: list, key: jax.Array, methods=None) -> dict:
    """``{method: alpha -> merged encoder}`` for ``methods`` (default: the configured ones)."""
    m = setup.config.merging
    methods = tuple(m.methods if methods is None else methods)
    base = setup.base
    dare_taus = [merging.dare(tau, drop_rate=m.dare_drop_rate,
                              key=jax.random.fold_in(key, t)) for t, tau in enumerate(taus)
                 ] if "dare" in methods else None
    table = {
        "task_arithmetic": lambda a: merging.task_arithmetic(base, taus, a),
        "ties": lambda a: merging.ties(base, taus, density=m.ties_density, alpha=a),
        "dare": lambda a: merging.task_arithmetic(base, dare_taus, a),
        "breadcrumbs": lambda a: merging.breadcrumbs(base, taus, density=m.breadcrumbs_density,
                                                     outliers=m.breadcrumbs_outliers,
                                                     alpha=a),
    }
    unknown = set(methods) - set(table)
    if unknown:
        raise ValueError(f"unknown merging methods {sorted(unknown)}; choose from "
                         f"{sorted(table)}")
    return {name: table[name] for name in methods}


def merge_and_evaluate(setup, taus, finetuned_val, finetuned_test, key, methods=None
                       ) -> dict:
    """For every method: alpha chosen on validation (whole table kept), test accuracy.

    The grid is evaluated eagerly (``jit=False``): the merging functions and the accuracy
    are compiled once per shape and reused for every epoch's task vectors, where one
    program per (method, epoch) would recompile with the task vectors baked in.
    """
    alphas = jnp.asarray(setup.config.merging.alphas)
    score_fns = [lambda p, d=d: setup.accuracy(p, d) for d in setup.validation]
    out = {}
    for name, fn in merge_fns(setup, taus, key, methods).items():
        search = merging.coefficient_search(fn, alphas, score_fns, finetuned_val, jit=False)
        best = float(search.best_alpha)
        test = _accuracies(setup, fn(best), setup.test)
        out[name] = {"alpha": best, "test_accuracy": test.tolist(),
                     "test_normalized": (test / finetuned_test).tolist(),
                     "avg_accuracy": float(test.mean()),
                     "avg_normalized": float(np.mean(test / finetuned_test)),
                     "val_mean_normalized": np.asarray(search.mean_normalized).tolist(),
                     "merged": fn(best)}
    return out


def run(setup, trajectories: dict, workdir: str, key: jax.Array) -> tuple[dict, dict]:
    """Merging at each configured epoch and at convergence, for each trajectory kind."""
    cfg = setup.config
    results, merged_models = {}, {}
    base_test = _accuracies(setup, setup.base, setup.test)
    for mode in cfg.merging.trajectories:
        trajs = trajectories[mode]
        last = int(trajs[0].epochs[-1])
        epochs = sorted({e for e in cfg.merging.epochs if e <= last} | {last})
        finetuned = [t.final_params for t in trajs]
        ft_val = np.asarray([float(setup.accuracy(p, d))
                             for p, d in zip(finetuned, setup.validation)])
        ft_test = np.asarray([float(setup.accuracy(p, d))
                              for p, d in zip(finetuned, setup.test)])
        per_epoch = {}
        for e in epochs:
            taus = [tvj.task_vector(t.at(e), setup.base) for t in trajs]
            res = merge_and_evaluate(setup, taus, ft_val, ft_test, key)
            merged_models[(mode, e)] = {n: r.pop("merged") for n, r in res.items()}
            per_epoch[e] = res
            print(f"    {mode:10s} epoch {e:4d}: " + "  ".join(
                f"{n} {r['avg_accuracy']:.3f}" for n, r in res.items()), flush=True)
        results[mode] = {"epochs": epochs, "converged_epoch": last,
                         "finetuned_test": ft_test.tolist(), "finetuned_val": ft_val.tolist(),
                         "per_epoch": {str(e): r for e, r in per_epoch.items()}}
        curves = {n: [per_epoch[e][n]["avg_normalized"] for e in epochs]
                  for n in cfg.merging.methods}
        plotting.accuracy_curves(
            epochs, curves, references={"base (frozen heads)":
                                        float(np.mean(base_test / ft_test))},
            ylabel="average normalized test accuracy",
            title=f"merging task vectors after k epochs ({mode})",
            path=os.path.join(workdir, "figures", f"merging_{mode}.png"))
    results["base_test"] = base_test.tolist()
    return results, merged_models


def multitask_reference(setup, mode: str) -> tuple[dict, tvj.Trajectory]:
    """Multitask training on all tasks with the same optimizer and budget as the finetunes."""
    f = setup.config.finetune
    if mode == "full_batch":
        traj = tvj.multitask_finetune(setup.loss_fn, setup.base, setup.train,
                                      optax.sgd(f.full_batch_lr), f.full_batch_epochs,
                                      keep_epochs="all", progress=True)
    else:
        # each multitask step takes batch_size examples from every task
        n = max(int(d["label"].shape[0]) for d in setup.train)
        opt = minibatch_optimizer(setup.config,
                                  steps_per_epoch(n, f.batch_size) * f.minibatch_epochs)
        traj = tvj.multitask_finetune(setup.loss_fn, setup.base, setup.train,
                                      opt, f.minibatch_epochs,
                                      batch_size=f.batch_size,
                                      key=jax.random.key(setup.config.seed + 7),
                                      keep_epochs="all", progress=True)
    test = _accuracies(setup, traj.final_params, setup.test)
    return {"test_accuracy": test.tolist(), "avg_accuracy": float(test.mean())}, traj


def atm_vs_task_arithmetic(setup, minibatch_trajs, finetuned_test, workdir, key):
    """ATM (R rounds of one epoch) vs task arithmetic on R-epoch task vectors (same budget)."""
    cfg = setup.config
    f = cfg.finetune
    rounds = cfg.atm.rounds
    # each round is a fresh one-epoch finetune, so a schedule spans one epoch
    steps = max(steps_per_epoch(d["label"].shape[0], f.batch_size) for d in setup.train)
    result = merging.atm(setup.loss_fn, setup.base, setup.train,
                         minibatch_optimizer(cfg, steps),
                         rounds, num_epochs=1, alpha=cfg.atm.alpha, batch_size=f.batch_size,
                         key=jax.random.fold_in(key, 1))
    atm_acc = [float(np.mean(_accuracies(setup, result.at(r), setup.test)))
               for r in range(1, rounds + 1)]
    ft_val = np.asarray([float(setup.accuracy(t.final_params, d))
                         for t, d in zip(minibatch_trajs, setup.validation)])
    ta_acc = []
    for r in range(1, rounds + 1):
        taus = [tvj.task_vector(t.at(r), setup.base) for t in minibatch_trajs]
        res = merge_and_evaluate(setup, taus, ft_val, np.asarray(finetuned_test), key,
                                 methods=("task_arithmetic",))
        ta_acc.append(res["task_arithmetic"]["avg_accuracy"])
    plotting.accuracy_curves(list(range(1, rounds + 1)),
                             {"ATM (r rounds of 1 epoch)": atm_acc,
                              "task arithmetic (r-epoch task vectors)": ta_acc},
                             xlabel="budget: epochs of finetuning per task", logx=False,
                             ylabel="average test accuracy",
                             title="iterative task arithmetic vs task arithmetic",
                             path=os.path.join(workdir, "figures", "atm.png"))
    return {"rounds": list(range(1, rounds + 1)), "atm_avg_accuracy": atm_acc,
            "task_arithmetic_avg_accuracy": ta_acc,
            "atm_alpha": float(1.0 / len(setup.train) if cfg.atm.alpha is None
                               else cfg.atm.alpha),
            "gain_at_final_round": atm_acc[-1] - ta_acc[-1]}, result
