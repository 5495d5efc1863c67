"""Task arithmetic in the tangent space (Ortiz-Jimenez et al., arXiv 2305.12827), measured.

On the embedded suite, with the paper reproduction's base model and frozen heads
(:func:`experiments.paper.setup.build`):

1. nonlinear vs linearized finetuning of every task (same optimizer, key and epochs), and
   the "nonlinear advantage" (single-task accuracy of nonlinear minus linearized);
2. task arithmetic of each kind of task vector, alpha chosen on validation, evaluated
   nonlinearly and in the tangent space (the paper's conversion between the two);
3. the weight disentanglement error xi(alpha_1, alpha_2) (eq. 4) for task pairs, as
   heatmaps, nonlinear and linearized side by side;
4. the empirical NTK at theta_0: how much the tasks' kernels overlap, and kernel-target
   alignment per task;
5. linear-path diagnostics: accuracy along theta_0 + lambda tau_t, the interpolation
   barrier between the two merges, per-layer norms and cosines of the task vectors.

``run(config, workdir)`` writes results.json, figures/*.png and report.md (a paragraph per
finding saying whether it agrees with 2305.12827). The entry point is
``experiments/tangent.py``; the config ``experiments/configs/tangent.py``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import taskvec_jax as tvj
from taskvec_jax import tangent, tree
from taskvec_jax.models import multihead_accuracy, multihead_loss_fn
from taskvec_jax.training import finetune_tasks

from experiments.paper.setup import build, log

PyTree = Any


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, jax.Array)):
        return _jsonable(np.asarray(x).tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        if not np.isfinite(x):
            raise ValueError(f"non-finite number {x} in the results")
        return x
    if isinstance(x, np.integer):
        return int(x)
    return x


def _subset(data: dict, n: int) -> dict:
    return jax.tree.map(lambda a: a[:n], data)


class _Models:
    """The two encoders (nonlinear, linearized around the base) and their evaluators."""

    def __init__(self, setup):
        self.setup = setup
        self.encode = {"nonlinear": setup.encode,
                       "linearized": tvj.linearize(setup.encode, setup.base)}
        heads = setup.heads
        self.loss = {k: multihead_loss_fn(e, heads) for k, e in self.encode.items()}
        self.accuracy = {k: jax.jit(lambda p, d, e=e: multihead_accuracy(e, heads, p, d))
                         for k, e in self.encode.items()}
        self.logits = {k: (lambda p, b, e=e: heads.logits(e(p, b["image"]), b["task"]))
                       for k, e in self.encode.items()}

    def task_accuracies(self, kind: str, params: PyTree, split: list) -> np.ndarray:
        return np.array([float(self.accuracy[kind](params, d)) for d in split])


def finetune_both(models: _Models, config) -> dict:
    """Per task: nonlinear and linearized finetuning with the same optimizer and key."""
    s, t = models.setup, config.tangent
    out = {}
    for kind in ("nonlinear", "linearized"):
        start = time.time()
        trajs = finetune_tasks(models.loss[kind], s.base, s.train,
                               optax.adam(t.learning_rate), t.num_epochs,
                               batch_size=t.batch_size, key=jax.random.key(config.seed + 7),
                               keep_epochs=[t.num_epochs], record_gradients=False)
        out[kind] = {"task_vectors": [tvj.task_vector(tr.final_params, s.base)
                                      for tr in trajs],
                     "final_loss": [float(tr.losses[-1]) for tr in trajs],
                     "seconds": time.time() - start}
        log(f"{kind} finetuning: {out[kind]['seconds']:.1f} s")
    return out


def single_task(models: _Models, tvs: dict) -> dict:
    s = models.setup
    res = {"zero_shot": models.task_accuracies("nonlinear", s.base, s.test)}
    for kind in ("nonlinear", "linearized"):
        res[kind] = np.array([float(models.accuracy[kind](tree.add(s.base, tau), d))
                              for tau, d in zip(tvs[kind]["task_vectors"], s.test)])
    res["nonlinear_advantage"] = res["nonlinear"] - res["linearized"]
    return res


def task_arithmetic(models: _Models, tvs: dict, single: dict, config) -> dict:
    """alpha on validation, then test accuracy; each vector kind in each evaluation."""
    s = models.setup
    out = {}
    for vec in ("nonlinear", "linearized"):
        total = tree.weighted_sum(tvs[vec]["task_vectors"])
        for ev in ("nonlinear", "linearized"):
            val = []
            for a in config.tangent.alphas:
                merged = tree.add_scale(s.base, a, total)
                val.append(float(np.mean(models.task_accuracies(ev, merged, s.validation))))
            best = float(config.tangent.alphas[int(np.argmax(val))])
            merged = tree.add_scale(s.base, best, total)
            acc = models.task_accuracies(ev, merged, s.test)
            out[f"{vec}_vectors/{ev}_eval"] = {
                "alpha": best, "validation": val, "test": acc,
                "avg_accuracy": float(np.mean(acc)),
                "avg_normalized": float(np.mean(acc / single[vec]))}
    return out


def disentanglement(models: _Models, tvs: dict, config) -> dict:
    s, t = models.setup, config.tangent
    values = np.linspace(t.grid[0], t.grid[1], t.grid_points)
    grid = tangent.alpha_grid(values)
    out = {"values": values, "pairs": []}
    for i, j in t.pairs:
        inputs = [_subset(s.validation[i], t.disentanglement_examples),
                  _subset(s.validation[j], t.disentanglement_examples)]
        entry = {"pair": [s.task_names[i], s.task_names[j]]}
        for kind in ("nonlinear", "linearized"):
            pair = [tvs[kind]["task_vectors"][i], tvs[kind]["task_vectors"][j]]
            xi = tangent.disentanglement_error(
                models.logits["nonlinear"], s.base, pair, inputs, grid,
                distance="prediction", linearized=(kind == "linearized"), chunk_size=11)
            entry[kind] = np.asarray(xi).reshape(len(values), len(values))
            if "l2" in t.distances:
                l2 = tangent.disentanglement_error(
                    models.logits["nonlinear"], s.base, pair, inputs, grid, distance="l2",
                    linearized=(kind == "linearized"), chunk_size=11)
                entry[f"{kind}_l2"] = np.asarray(l2).reshape(len(values), len(values))
        out["pairs"].append(entry)
    return out


def kernels(models: _Models, config) -> dict:
    s, t = models.setup, config.tangent
    inputs = [_subset(d, t.ntk_examples) for d in s.validation]
    overlap, gram = tangent.cross_task_kernel(models.logits["nonlinear"], s.base, inputs,
                                              chunk_size=t.ntk_chunk_size)
    n = t.ntk_examples
    kta = []
    for k, d in enumerate(inputs):
        block = gram[k * n:(k + 1) * n, k * n:(k + 1) * n]
        kta.append(float(tangent.kernel_target_alignment(
            block, d["label"], int(s.heads.num_classes[k]))))
    return {"overlap": np.asarray(overlap), "kernel_target_alignment": np.array(kta)}


def diagnostics(models: _Models, tvs: dict, ta: dict, config) -> dict:
    s, t = models.setup, config.tangent
    lambdas = jnp.asarray(t.path_lambdas)
    paths = {}
    for kind in ("nonlinear", "linearized"):
        acc = models.accuracy[kind]

        # One metric object per kind: every task's path reuses one compiled program.
        def per_task(p, acc=acc):
            return jnp.stack([acc(p, d) for d in s.validation])

        rows = []
        for k, tau in enumerate(tvs[kind]["task_vectors"]):
            path = np.asarray(tangent.linear_path(per_task, s.base, tau, lambdas))  # [M, T]
            others = np.delete(path, k, axis=1).mean(1)
            rows.append({"own": path[:, k], "others": others})
        paths[kind] = rows
    merges = {}
    for kind in ("nonlinear", "linearized"):
        alpha = ta[f"{kind}_vectors/{kind}_eval"]["alpha"]
        merges[kind] = tree.add_scale(s.base, alpha,
                                      tree.weighted_sum(tvs[kind]["task_vectors"]))
    val_all = jax.tree.map(lambda *a: jnp.concatenate(a), *s.validation)
    barrier = tangent.interpolation_barrier(
        lambda p: models.accuracy["nonlinear"](p, val_all), merges["nonlinear"],
        merges["linearized"], num_points=t.barrier_points, higher_is_better=True)
    loss_barrier = tangent.interpolation_barrier(
        lambda p: models.loss["nonlinear"](p, val_all), merges["nonlinear"],
        merges["linearized"], num_points=t.barrier_points)
    table = tangent.layer_table(tvs["nonlinear"]["task_vectors"]
                                + tvs["linearized"]["task_vectors"])
    return {"lambdas": np.asarray(lambdas), "paths": paths,
            "barrier": {"lambdas": np.asarray(barrier.lambdas),
                        "accuracy": np.asarray(barrier.values),
                        "accuracy_barrier": float(barrier.barrier),
                        "loss": np.asarray(loss_barrier.values),
                        "loss_barrier": float(loss_barrier.barrier)},
            "layers": {"paths": table.paths, "norms": np.asarray(table.norms),
                       "cosines": np.asarray(table.cosines),
                       "total_norms": np.asarray(table.total_norms),
                       "total_cosines": np.asarray(table.total_cosines)}}


# --------------------------------------------------------------------------- report

def _agree(ok: bool, margin: float | None = None, noise: float = 0.01) -> str:
    """The verdict; a difference smaller than ``noise`` is called weak either way."""
    if margin is not None and abs(margin) < noise:
        side = "agrees" if ok else "does not agree"
        return (f"**{side} only weakly** with 2305.12827 (the difference, {margin:+.3f}, "
                f"is below {noise}, within run-to-run noise at this size)")
    return "**agrees** with 2305.12827" if ok else "**does not agree** with 2305.12827"


def write_report(results: dict, workdir: str) -> str:
    names = results["task_names"]
    st, ta, dis, ker, diag = (results[k] for k in ("single_task", "task_arithmetic",
                                                   "disentanglement", "kernels",
                                                   "diagnostics"))
    t_count = len(names)
    lines = ["# Task arithmetic in the tangent space (2305.12827) on the embedded suite", "",
             f"{t_count} tasks ({', '.join(names)}), base model and frozen heads of the "
             "paper reproduction, minibatch Adam for both kinds of finetuning. "
             f"Wall time {results['wall_time_s']:.0f} s; "
             f"linearized/nonlinear finetuning time "
             f"{results['finetune_seconds']['linearized']:.1f} / "
             f"{results['finetune_seconds']['nonlinear']:.1f} s.", "",
             "## 1. Single-task accuracy: the nonlinear advantage", "",
             "| task | zero-shot | nonlinear FT | linearized FT | nonlinear advantage |",
             "|---|---|---|---|---|"]
    for k, n in enumerate(names):
        lines.append(f"| {n} | {st['zero_shot'][k]:.3f} | {st['nonlinear'][k]:.3f} | "
                     f"{st['linearized'][k]:.3f} | {st['nonlinear_advantage'][k]:+.3f} |")
    adv = float(np.mean(st["nonlinear_advantage"]))
    lines += ["", f"Mean nonlinear advantage {adv:+.3f}. The paper reports that linearized "
              "finetuning reaches somewhat lower single-task accuracy than nonlinear "
              f"finetuning (a positive advantage): this run {_agree(adv > 0, adv)}.", "",
              "## 2. Task arithmetic (alpha on validation, test accuracy)", "",
              "| task vectors | evaluated | alpha | avg accuracy | avg normalized |",
              "|---|---|---|---|---|"]
    for key, r in ta.items():
        vec, ev = key.split("/")
        lines.append(f"| {vec.split('_')[0]} | {ev.split('_')[0]} | {r['alpha']} | "
                     f"{r['avg_accuracy']:.3f} | {r['avg_normalized']:.3f} |")
    nl = ta["nonlinear_vectors/nonlinear_eval"]
    li = ta["linearized_vectors/linearized_eval"]
    better = li["avg_normalized"] > nl["avg_normalized"]
    lines += ["", "Normalized accuracy is the merged model's accuracy over the single-task "
              "accuracy of the same kind of finetuning. The paper finds linearized task "
              "arithmetic better in both absolute and normalized accuracy (its Table 1, "
              f"CLIP ViTs): normalized {li['avg_normalized']:.3f} (linearized) vs "
              f"{nl['avg_normalized']:.3f} (nonlinear), absolute {li['avg_accuracy']:.3f} "
              f"vs {nl['avg_accuracy']:.3f}; this run "
              f"{_agree(better, li['avg_normalized'] - nl['avg_normalized'])} on normalized "
              "accuracy. Rows with a mixed evaluation are the paper's conversion: the same "
              "task vectors evaluated with the other model.", "",
              "## 3. Weight disentanglement", "",
              f"xi(alpha_1, alpha_2) (eq. 4, prediction disagreement summed over the two "
              f"tasks, so in [0, 2]) on a {len(dis['values'])}x{len(dis['values'])} grid "
              f"over [{dis['values'][0]}, {dis['values'][-1]}]^2 (figures/"
              "disentanglement_*.png).", "",
              "| pair | mean xi nonlinear | mean xi linearized | mean l2 nonlinear | "
              "mean l2 linearized |", "|---|---|---|---|---|"]
    wins = 0
    for p in dis["pairs"]:
        a, b = float(np.mean(p["nonlinear"])), float(np.mean(p["linearized"]))
        wins += b < a
        l2 = [f"{float(np.mean(p[k])):.3f}" if k in p else "n/a"
              for k in ("nonlinear_l2", "linearized_l2")]
        lines.append(f"| {' + '.join(p['pair'])} | {a:.3f} | {b:.3f} | {l2[0]} | {l2[1]} |")
    lines += ["", f"Linearized task vectors are less entangled on {wins} of "
              f"{len(dis['pairs'])} pairs. The paper's central claim is that linearized "
              "finetuning yields weight disentanglement over a larger region: this run "
              f"{_agree(wins * 2 > len(dis['pairs']))}.", "",
              "## 4. Kernels at theta_0", "",
              "Cross-task NTK overlap A[s, t] = ||K_st|| / sqrt(||K_ss|| ||K_tt||) over "
              "each task's head logits (1 on the diagonal), and kernel-target alignment:",
              "", "| task | " + " | ".join(names) + " | kernel-target alignment |",
              "|---|" + "---|" * (t_count + 1)]
    ov = np.asarray(ker["overlap"])
    for k, n in enumerate(names):
        lines.append(f"| {n} | " + " | ".join(f"{v:.3f}" for v in ov[k])
                     + f" | {ker['kernel_target_alignment'][k]:.3f} |")
    off = ov[~np.eye(t_count, dtype=bool)]
    localized = off.mean() <= 0.5
    lines += ["", f"Mean off-diagonal overlap {float(off.mean()):.3f}. 2305.12827 (sec. 5) "
              "explains disentanglement by NTK eigenfunctions localized on each task's "
              "inputs, i.e. small cross-task blocks. The kernel here is over each task's "
              "own frozen head, so the heads' differences count towards the localization "
              "as well as the encoder's tangent features. The cross-task blocks are "
              f"{'small' if localized else 'not small'}: this finding "
              f"{_agree(localized)}.", "",
              "## 5. Linear paths and the barrier between the merges", ""]
    lam = diag["lambdas"]
    lines += ["| vectors | task | " + " | ".join(f"own acc at {x:g}" for x in lam) + " |",
              "|---|---|" + "---|" * len(lam)]
    for kind in ("nonlinear", "linearized"):
        for k, row in enumerate(diag["paths"][kind]):
            lines.append(f"| {kind} | {names[k]} | "
                         + " | ".join(f"{v:.3f}" for v in row["own"]) + " |")
    b = diag["barrier"]
    connected = ("linearly connected (accuracy barrier below 0.02)"
                 if b["accuracy_barrier"] < 0.02 else "separated by a barrier")
    lines += ["", f"On the segment from the nonlinear merge to the linearized merge "
              f"(evaluated nonlinearly) the accuracy barrier is {b['accuracy_barrier']:.4f} "
              f"and the loss barrier {b['loss_barrier']:.4f}: the two merges are "
              f"{connected}."
              " (2305.12827 does not measure this; it is reported for completeness.)", "",
              "Per-layer norms of the task vectors (nonlinear, then linearized):", "",
              "| layer | " + " | ".join(f"NL {n}" for n in names)
              + " | " + " | ".join(f"lin {n}" for n in names) + " |",
              "|---|" + "---|" * (2 * t_count)]
    lay = diag["layers"]
    for i, path in enumerate(lay["paths"]):
        lines.append(f"| {path} | " + " | ".join(f"{v:.3g}" for v in lay["norms"][i]) + " |")
    tc = np.asarray(lay["total_cosines"])
    same = [tc[k, t_count + k] for k in range(t_count)]
    lines += ["", "Cosine between the nonlinear and the linearized task vector of the same "
              "task: " + ", ".join(f"{n} {v:.3f}" for n, v in zip(names, same)) + ".", ""]
    path = os.path.join(workdir, "report.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines))
    return path


def run(config, workdir: str) -> dict:
    """Runs every finding; writes results.json, figures/ and report.md under ``workdir``."""
    from experiments.paper import tangent_plots

    start = time.time()
    workdir = os.path.abspath(workdir)
    os.makedirs(os.path.join(workdir, "figures"), exist_ok=True)
    setup = build(config, workdir)
    models = _Models(setup)
    tvs = finetune_both(models, config)
    log("single-task accuracy")
    single = single_task(models, tvs)
    log("task arithmetic")
    ta = task_arithmetic(models, tvs, single, config)
    log("weight disentanglement")
    dis = disentanglement(models, tvs, config)
    log("empirical NTK")
    ker = kernels(models, config)
    log("linear-path diagnostics")
    diag = diagnostics(models, tvs, ta, config)
    results = {"task_names": list(setup.task_names), "single_task": single,
               "task_arithmetic": ta, "disentanglement": dis, "kernels": ker,
               "diagnostics": diag,
               "finetune_seconds": {k: tvs[k]["seconds"] for k in tvs},
               "finetune_final_loss": {k: tvs[k]["final_loss"] for k in tvs}}
    figures = tangent_plots.disentanglement_heatmaps(dis, os.path.join(workdir, "figures"))
    figures.append(tangent_plots.linear_paths(diag, setup.task_names,
                                              os.path.join(workdir, "figures")))
    results["figures"] = [os.path.basename(f) for f in figures]
    results["wall_time_s"] = time.time() - start
    with open(os.path.join(workdir, "results.json"), "w") as fh:
        json.dump(_jsonable(results), fh, indent=1)
    with open(os.path.join(workdir, "config.json"), "w") as fh:
        json.dump(config.to_dict(), fh, indent=1, default=list)
    write_report(results, workdir)
    log(f"wrote {workdir}/report.md, results.json and {len(figures)} figures in "
        f"{results['wall_time_s']:.0f} s")
    return results
