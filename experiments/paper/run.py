"""The whole reproduction: one function from a config to a report."""

from __future__ import annotations

import os
import platform
import time

import jax
import optax

import taskvec_jax as tvj
from experiments.cli import write_json
from experiments.paper import (dominance, merging_study, regime, report, theorem,
                               trajectories)
from experiments.paper.setup import build, log, minibatch_optimizer, steps_per_epoch


def finetune_all(setup):
    """Every task: full-batch GD and minibatch SGD, whole trajectories with gradients."""
    f = setup.config.finetune
    log(f"finetuning {len(setup.train)} tasks: full-batch GD, {f.full_batch_epochs} epochs "
        f"(lr {f.full_batch_lr})")
    full = tvj.finetune_tasks(setup.loss_fn, setup.base, setup.train,
                              optax.sgd(f.full_batch_lr), f.full_batch_epochs,
                              keep_epochs="all", record_gradients=True, progress=f.progress)
    log(f"finetuning {len(setup.train)} tasks: minibatch {f.minibatch_optimizer}, "
        f"{f.minibatch_epochs} epochs (lr {f.minibatch_lr}, batch {f.batch_size})")
    # one schedule length for every task: the largest task's number of steps
    steps = max(steps_per_epoch(d["label"].shape[0], f.batch_size) for d in setup.train)
    mini = tvj.finetune_tasks(setup.loss_fn, setup.base, setup.train,
                              minibatch_optimizer(setup.config, steps * f.minibatch_epochs),
                              f.minibatch_epochs,
                              batch_size=f.batch_size,
                              key=jax.random.key(setup.config.seed + 3),
                              keep_epochs="all", record_gradients=True, progress=f.progress)
    return {"full_batch": full, "minibatch": mini}


def run(config, workdir: str) -> dict:
    """Runs every finding and writes report.md, results.json, config.json, figures/ and
    checkpoints/ under ``workdir``."""
    start = time.time()
    workdir = os.path.abspath(workdir)
    os.makedirs(os.path.join(workdir, "figures"), exist_ok=True)
    write_json(os.path.join(workdir, "config.json"), config)
    setup = build(config, workdir)
    key = jax.random.key(config.seed + 11)
    trajs = finetune_all(setup)

    log("Theorem 1 on this model (float64)")
    th = theorem.run(setup, workdir)
    for row in th["rows"]:
        log(f"  k={row['k']}: max gap {row['max_gap']:.2e}" + (
            f", slope {row['slope_gap']:.2f}, residual slope {row['slope_residual']:.2f}"
            if "slope_gap" in row else ""))

    log("first-epoch dominance")
    dom = dominance.run(setup, trajs, workdir)
    for mode, d in dom.items():
        log(f"  {mode}: mean first-epoch share {d['mean_first_epoch_share']:.3f}, mean cos "
            f"(first 5 epochs) {d['mean_cos_first5']:.3f}")

    g = config.regime
    log(f"regime map: {len(g.learning_rates)} learning rates (vmapped) x "
        f"{len(g.batch_sizes)} batch sizes, {g.num_tasks} tasks, {g.epochs} epochs")
    reg = regime.run(setup, workdir)

    log("merging after k epochs vs at convergence")
    merge_res, merged_models = merging_study.run(setup, trajs, workdir, key)
    multitask, mt_trajs = {}, {}
    for mode in ("full_batch", "minibatch"):
        multitask[mode], mt_trajs[mode] = merging_study.multitask_reference(setup, mode)
    log(f"  multitask references: full batch {multitask['full_batch']['avg_accuracy']:.3f}, "
        f"minibatch {multitask['minibatch']['avg_accuracy']:.3f}")

    log(f"ATM: {config.atm.rounds} rounds vs task arithmetic at the same budget")
    atm_res, atm_result = merging_study.atm_vs_task_arithmetic(
        setup, trajs["minibatch"], merge_res["minibatch"]["finetuned_test"], workdir, key)
    log(f"  final round: ATM {atm_res['atm_avg_accuracy'][-1]:.3f}, task arithmetic "
        f"{atm_res['task_arithmetic_avg_accuracy'][-1]:.3f}")

    log("trajectories in parameter space (PCA)")
    ta_by_epoch = {e: models["task_arithmetic"] for (mode, e), models in merged_models.items()
                   if mode == "minibatch" and "task_arithmetic" in models}
    traj_res = trajectories.run(setup, trajs["minibatch"], ta_by_epoch, atm_result,
                                mt_trajs["minibatch"], workdir)

    log("saving checkpoints")
    ck = os.path.join(workdir, "checkpoints")
    tvj.checkpoint.save(os.path.join(ck, "finetuned_minibatch"),
                        [t.final_params for t in trajs["minibatch"]], overwrite=True)
    tvj.checkpoint.save(os.path.join(ck, "finetuned_full_batch"),
                        [t.final_params for t in trajs["full_batch"]], overwrite=True)
    tvj.checkpoint.save(os.path.join(ck, "atm"), atm_result.params, overwrite=True)

    def acc(params_list, split):
        return [float(setup.accuracy(p, d)) for p, d in zip(params_list, split)]

    results = {
        "config": config.to_dict(),
        "setup": {"tasks": setup.task_names,
                  "source": config.data.source or tvj.data.SUITES[config.data.suite].source,
                  "model": f"{config.model.kind} {tuple(config.model.widths)} "
                           f"{config.model.activation}",
                  "machine": f"{jax.devices()[0].platform} x{jax.device_count()}, "
                             f"{platform.machine()}",
                  "train_sizes": [int(d["label"].shape[0]) for d in setup.train],
                  "test_sizes": [int(d["label"].shape[0]) for d in setup.test],
                  "base_test": merge_res["base_test"],
                  "finetuned_test": {m: acc([t.final_params for t in trajs[m]], setup.test)
                                     for m in trajs}},
        "theorem": th, "dominance": dom, "regime": reg, "merging": merge_res,
        "multitask": multitask,
        "atm": atm_res, "trajectories": traj_res,
    }
    results["elapsed_s"] = time.time() - start
    # the timing depends on what else the machine runs: say how loaded it was
    results["setup"]["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") \
        else None
    results["findings"] = report.findings(results)
    # allow_nan: a failed fit (e.g. a slope over zero gaps) is written as NaN and shown as
    # n/a in the report, rather than losing the whole run.
    results = write_json(os.path.join(workdir, "results.json"), results, allow_nan=True)
    path = report.write(results, workdir)
    log(f"done in {results['elapsed_s']:.0f} s: {path}")
    return results
