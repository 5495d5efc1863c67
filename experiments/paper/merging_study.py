"""Merging task vectors after k epochs vs at convergence; ATM vs task arithmetic.

:data:`METHODS` is the one list of the merges the study runs (the report's method table,
``results.json`` and the figures all follow it; ``config.merging.methods`` may pick a
subset, ``None`` = all). Three kinds:

* ``"alpha"``: ``alpha -> merged encoder``; ``alpha`` is chosen on the validation splits
  from ``config.merging.alphas`` (the same grid for every such method). Each of these
  merges is homogeneous of degree 1 in a scalar ``alpha > 0``:
  ``merge(base, taus, alpha=a) = base + a * (merge(base, taus, alpha=1) - base)`` (the
  selections, masks, sign elections and spectra are scale-invariant; tested in
  tests/test_paper_merging_study.py), so the grid costs one merge per method;
* ``"fixed"``: no coefficient (Model Stock: its ratio comes from the angles);
* ``"data"``: data-aware (Fisher, RegMean, AdaMerging), with the statistics each paper
  uses: Fisher and RegMean on each task's training split, AdaMerging's coefficients
  learned by entropy minimization on the tasks' unlabeled test inputs (the paper's
  test-time setting; no test label is read before evaluation).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import taskvec_jax as tvj
from experiments.paper.setup import minibatch_optimizer, steps_per_epoch
from taskvec_jax import merging, plotting

__all__ = ["METHODS", "Method", "atm_vs_task_arithmetic", "merge_and_evaluate", "merge_fns",
           "method_names", "multitask_reference", "normalized_accuracy", "run"]


def _accuracies(setup, params, split) -> np.ndarray:
    return np.asarray([float(setup.accuracy(params, d)) for d in split])


def normalized_accuracy(merged, finetuned) -> float:
    """``mean_t merged[t] / finetuned[t]``: merged accuracy over the individually
    finetuned model's, per task, averaged (the literature's "normalized accuracy").

    Raises:
      ValueError: for lengths that differ or a finetuned accuracy that is not > 0.
    """
    merged, finetuned = np.asarray(merged, np.float64), np.asarray(finetuned, np.float64)
    if merged.shape != finetuned.shape or merged.ndim != 1:
        raise ValueError(f"merged {merged.shape} and finetuned {finetuned.shape} must be "
                         "one accuracy per task each")
    if not np.all(finetuned > 0):
        raise ValueError(f"finetuned accuracies must be > 0, got {finetuned.tolist()}")
    return float(np.mean(merged / finetuned))


class _Context:
    """What a merge may need for one set of task vectors (statistics built lazily)."""

    def __init__(self, setup, taus, key, finetuned=None):
        self.setup, self.taus, self.key = setup, taus, key
        self.cfg = setup.config.merging
        self._finetuned = finetuned

    @property
    def finetuned(self) -> list:
        """The finetuned encoders (given, or ``base + tau_t``)."""
        if self._finetuned is None:
            self._finetuned = [tvj.apply(self.setup.base, tau) for tau in self.taus]
        return self._finetuned

    @property
    def apply_fn(self):
        """``(encoder params, {"image", "task"}) -> logits`` through the frozen heads: one
        function object per setup, so AdaMerging's program (``apply_fn`` is static there)
        compiles once for every epoch's task vectors."""
        s = self.setup
        cached = _APPLY_FNS.get(id(s.encode))
        if cached is None or cached[0] is not s.encode:
            def apply_fn(params, batch, encode=s.encode, heads=s.heads):
                return heads.logits(encode(params, batch["image"]), batch["task"])
            cached = _APPLY_FNS[id(s.encode)] = (s.encode, apply_fn)
        return cached[1]


_APPLY_FNS: dict = {}


@functools.lru_cache(maxsize=None)
def _adam(learning_rate: float) -> optax.GradientTransformation:
    # one optimizer object per rate: AdaMerging's optimizer is a static argument
    return optax.adam(learning_rate)


class Method(NamedTuple):
    """One merge of the study.

    Attributes:
      kind: ``"alpha"`` (``build(ctx)`` returns ``alpha -> model``), ``"fixed"`` or
        ``"data"`` (``build(ctx)`` returns the merged model).
      build: ``build(ctx) -> callable or model`` (ctx: the setup, task vectors, key).
      settings: ``settings(config.merging) -> str``, the settings as the report prints them.
      reference: the paper or code it follows.
    """

    kind: str
    build: Callable
    settings: Callable
    reference: str


def _dare(ctx):
    m = ctx.cfg
    taus = [merging.dare(tau, drop_rate=m.dare_drop_rate, key=jax.random.fold_in(ctx.key, t))
            for t, tau in enumerate(ctx.taus)]
    return lambda a: merging.task_arithmetic(ctx.setup.base, taus, alpha=a)


def _fisher(ctx):
    s, m = ctx.setup, ctx.cfg
    fishers = [merging.diagonal_fisher(
        s.loss_fn, p, tr, num_examples=min(int(m.fisher_examples), int(tr["label"].shape[0])),
        microbatch_size=int(m.microbatch_size)) for p, tr in zip(ctx.finetuned, s.train)]
    return merging.fisher(ctx.finetuned, fishers)


def _regmean(ctx):
    s, m = ctx.setup, ctx.cfg
    grams = [merging.regmean_grams(s.encode, p, tr["image"],
                                   microbatch_size=int(m.microbatch_size))
             for p, tr in zip(ctx.finetuned, s.train)]
    return merging.regmean(ctx.finetuned, _ridge(grams, float(m.regmean_ridge)),
                           reduction=float(m.regmean_reduction))


def _ridge(grams: list, scale: float) -> list:
    """Every task's Gram plus ``scale * mean_t mean(diag G_t) * I`` (one ridge per layer,
    the same for every task).

    An input feature no task's data ever sets (a pixel outside every digit) has a zero
    row in every Gram, which leaves RegMean's system singular and that weight row NaN;
    with the ridge that row is the plain mean of the models' rows, and the other rows
    move by O(scale).
    """
    leaves = [jax.tree.leaves(g) for g in grams]
    eps = [scale * sum(jnp.mean(jnp.diagonal(ls[i])) for ls in leaves) / len(leaves)
           for i in range(len(leaves[0]))]

    def add(g):
        it = iter(eps)
        return jax.tree.map(lambda x: x + next(it) * jnp.eye(x.shape[0], dtype=x.dtype), g)
    return [add(g) for g in grams]


def _adamerging(granularity):
    def build(ctx):
        s, m = ctx.setup, ctx.cfg
        unlabeled = [{"image": d["image"], "task": d["task"]} for d in s.test]
        out = merging.adamerging(
            s.base, ctx.taus, ctx.apply_fn, unlabeled, granularity=granularity,
            num_steps=int(m.adamerging_steps),
            optimizer=_adam(float(m.adamerging_learning_rate)),
            init=float(m.adamerging_init), batch_size=int(m.adamerging_batch_size),
            key=jax.random.fold_in(ctx.key, 5))
        return out.params
    return build


def _adamerging_settings(granularity):
    return lambda m: (f"{granularity}-wise coefficients, {m.adamerging_steps} Adam steps "
                      f"(lr {m.adamerging_learning_rate:g}) from {m.adamerging_init:g}, "
                      f"batch {m.adamerging_batch_size} unlabeled test inputs per task")


# The one list of the study's merges (the report and results.json follow it).
METHODS: dict[str, Method] = {
    "task_arithmetic": Method(
        "alpha", lambda c: lambda a: merging.task_arithmetic(c.setup.base, c.taus, alpha=a),
        lambda m: "base + alpha sum_t tau_t", "Ilharco et al., ICLR 2023"),
    "ties": Method(
        "alpha", lambda c: lambda a: merging.ties(c.setup.base, c.taus,
                                                  density=c.cfg.ties_density, alpha=a),
        lambda m: f"density {m.ties_density:g}, mass sign election",
        "Yadav et al., NeurIPS 2023"),
    "dare": Method("alpha", _dare, lambda m: f"drop rate {m.dare_drop_rate:g}, rescaled, "
                   "then task arithmetic", "Yu et al., ICML 2024"),
    "breadcrumbs": Method(
        "alpha", lambda c: lambda a: merging.breadcrumbs(
            c.setup.base, c.taus, density=c.cfg.breadcrumbs_density,
            outliers=c.cfg.breadcrumbs_outliers, alpha=a),
        lambda m: f"density {m.breadcrumbs_density:g}, outliers {m.breadcrumbs_outliers:g}",
        "Davari & Belilovsky, ECCV 2024"),
    "iso_c": Method(
        "alpha", lambda c: lambda a: merging.iso_c(c.setup.base, c.taus, alpha=a),
        lambda m: "flat spectrum of sum_t tau_t per matrix", "Marczak et al., ICML 2025"),
    "iso_cts": Method(
        "alpha", lambda c: lambda a: merging.iso_cts(
            c.setup.base, c.taus, alpha=a,
            common_space_fraction=float(c.cfg.iso_cts_common_space_fraction)),
        lambda m: f"common space fraction {m.iso_cts_common_space_fraction:g}",
        "Marczak et al., ICML 2025"),
    "tsv": Method(
        "alpha", lambda c: lambda a: merging.tsv(c.setup.base, c.taus, alpha=a),
        lambda m: "top 1/T singular triplets per task, orthogonalized (TSV-M)",
        "Gargiulo et al., CVPR 2025"),
    "magmax": Method(
        "alpha", lambda c: lambda a: merging.magmax(c.setup.base, c.taus, alpha=a),
        lambda m: "per entry the largest-magnitude task vector value",
        "Marczak et al., ECCV 2024"),
    "consensus": Method(
        "alpha", lambda c: lambda a: merging.consensus(
            c.setup.base, c.taus, min_tasks=int(c.cfg.consensus_min_tasks),
            mask_lambda=float(c.cfg.consensus_mask_lambda), alpha=a),
        lambda m: f"TALL masks (lambda {m.consensus_mask_lambda:g}) kept by >= "
                  f"{m.consensus_min_tasks} tasks, on task arithmetic",
        "Wang et al., ICML 2024"),
    "della": Method(
        "alpha", lambda c: lambda a: merging.della(
            c.setup.base, c.taus, key=jax.random.fold_in(c.key, 3),
            density=float(c.cfg.della_density), epsilon=float(c.cfg.della_epsilon),
            alpha=a),
        lambda m: f"density {m.della_density:g}, epsilon {m.della_epsilon:g}, fixed key, "
                  "mass election", "Deep et al., 2024 (mergekit della)"),
    "model_stock": Method(
        "fixed", lambda c: merging.model_stock(c.setup.base, c.taus),
        lambda m: "ratio N cos / (1 + (N-1) cos) per leaf from the angles between the "
                  "T tasks' vectors (one finetune per task: applied across tasks)",
        "Jang et al., ECCV 2024"),
    "fisher": Method(
        "data", _fisher, lambda m: f"empirical diagonal Fisher on {m.fisher_examples} "
        "training examples per task", "Matena & Raffel, NeurIPS 2022"),
    "regmean": Method(
        "data", _regmean, lambda m: f"Dense-input Grams on each task's training split, "
        f"reduction {m.regmean_reduction:g}, ridge {m.regmean_ridge:g} x mean diagonal",
        "Jin et al., ICLR 2023"),
    "adamerging_task": Method("data", _adamerging("task"), _adamerging_settings("task"),
                              "Yang et al., ICLR 2024"),
    "adamerging_layer": Method("data", _adamerging("layer"), _adamerging_settings("layer"),
                               "Yang et al., ICLR 2024"),
}


def method_names(config, methods=None) -> tuple[str, ...]:
    """``methods``, or the methods ``config.merging.methods`` selects (``None``: every one
    of :data:`METHODS`, in its order).

    Raises:
      ValueError: for a name that is not in :data:`METHODS`.
    """
    chosen = config.merging.methods if methods is None else methods
    names = tuple(METHODS) if chosen is None else tuple(chosen)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown merging methods {unknown}; choose from {list(METHODS)}")
    return names


def merge_fns(setup, taus: list, key: jax.Array, methods=None) -> dict:
    """``{method: alpha -> merged encoder}`` for the ``"alpha"`` methods among ``methods``
    (default: the configured ones)."""
    ctx = _Context(setup, taus, key)
    return {name: METHODS[name].build(ctx) for name in method_names(setup.config, methods)
            if METHODS[name].kind == "alpha"}


def _row(setup, params, finetuned_test, **extra) -> dict:
    test = _accuracies(setup, params, setup.test)
    return {**extra, "test_accuracy": test.tolist(),
            "test_normalized": (test / finetuned_test).tolist(),
            "avg_accuracy": float(test.mean()),
            "avg_normalized": normalized_accuracy(test, finetuned_test), "merged": params}


def merge_and_evaluate(setup, taus, finetuned_val, finetuned_test, key, methods=None, *,
                       finetuned=None) -> dict:
    """For every method: its merged encoder, test accuracy (absolute and normalized).

    ``"alpha"`` methods get ``alpha`` chosen on validation over ``config.merging.alphas``
    (the whole validation table kept). The grid is evaluated eagerly (``jit=False``): the
    merging functions and the accuracy are compiled once per shape and reused for every
    epoch's task vectors, where one program per (method, epoch) would recompile with the
    task vectors baked in.

    Args:
      setup: the reproduction's :class:`~experiments.paper.setup.Setup`.
      taus: one task vector per task.
      finetuned_val, finetuned_test: ``[T]`` accuracies of the individually finetuned
        (converged) models, the normalizers.
      key: the PRNG key of the random merges (DARE, DELLA, AdaMerging's batches).
      methods: names in :data:`METHODS` (default: ``config.merging.methods``).
      finetuned: the finetuned encoders the data-aware merges start from (default
        ``base + tau_t``).

    Returns:
      ``{method: {"alpha", "test_accuracy", "test_normalized", "avg_accuracy",
      "avg_normalized", "merged", ...}}`` (``alpha`` is ``None`` for methods without one).
    """
    names = method_names(setup.config, methods)
    alphas = jnp.asarray(setup.config.merging.alphas)
    score_fns = [lambda p, d=d: setup.accuracy(p, d) for d in setup.validation]
    finetuned_test = np.asarray(finetuned_test)
    ctx = _Context(setup, taus, key, finetuned)
    out = {}
    for name in names:
        method = METHODS[name]
        start = time.time()
        built = method.build(ctx)
        if method.kind == "alpha":
            # every "alpha" merge is homogeneous in a scalar alpha (see METHODS), so the
            # grid scales one merged task vector instead of merging once per grid point
            vector = tvj.task_vector(built(1.0), setup.base)
            scaled = functools.partial(tvj.apply, setup.base, vector)
            search = merging.coefficient_search(scaled, alphas, score_fns, finetuned_val,
                                                jit=False)
            # the grid's own number (the search holds it as float32)
            best = float(setup.config.merging.alphas[int(search.best_index)])
            out[name] = _row(setup, scaled(best), finetuned_test, alpha=best,
                             val_mean_normalized=np.asarray(
                                 search.mean_normalized).tolist())
        else:
            out[name] = _row(setup, built, finetuned_test, alpha=None)
        out[name]["seconds"] = time.time() - start
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
            res = merge_and_evaluate(setup, taus, ft_val, ft_test, key,
                                     finetuned=[t.at(e) for t in trajs])
            merged_models[(mode, e)] = {n: r.pop("merged") for n, r in res.items()}
            per_epoch[e] = res
            print(f"    {mode:10s} epoch {e:4d}: " + "  ".join(
                f"{n} {r['avg_accuracy']:.3f}" for n, r in res.items()), flush=True)
        results[mode] = {"epochs": epochs, "converged_epoch": last,
                         "finetuned_test": ft_test.tolist(), "finetuned_val": ft_val.tolist(),
                         "per_epoch": {str(e): r for e, r in per_epoch.items()}}
        curves = {n: [per_epoch[e][n]["avg_normalized"] for e in epochs]
                  for n in per_epoch[epochs[0]]}
        plotting.accuracy_curves(
            epochs, curves, references={"base (frozen heads)":
                                        float(np.mean(base_test / ft_test))},
            ylabel="average normalized test accuracy",
            title=f"merging task vectors after k epochs ({mode})",
            path=os.path.join(workdir, "figures", f"merging_{mode}.png"))
    results["base_test"] = base_test.tolist()
    results["methods"] = {n: {"kind": METHODS[n].kind,
                              "settings": METHODS[n].settings(cfg.merging),
                              "reference": METHODS[n].reference}
                          for n in method_names(cfg)}
    return results, merged_models


def multitask_reference(setup, mode: str) -> tuple[dict, tvj.Trajectory]:
    """Multitask training on all tasks with the same optimizer and budget as the finetunes."""
    f = setup.config.finetune
    if mode == "full_batch":
        traj = tvj.multitask_finetune(setup.loss_fn, setup.base, setup.train,
                                      optax.sgd(f.full_batch_lr), f.full_batch_epochs,
                                      keep_epochs="all", progress=f.progress)
    else:
        # each multitask step takes batch_size examples from every task
        n = max(int(d["label"].shape[0]) for d in setup.train)
        opt = minibatch_optimizer(setup.config,
                                  steps_per_epoch(n, f.batch_size) * f.minibatch_epochs)
        traj = tvj.multitask_finetune(setup.loss_fn, setup.base, setup.train,
                                      opt, f.minibatch_epochs,
                                      batch_size=f.batch_size,
                                      key=jax.random.key(setup.config.seed + 7),
                                      keep_epochs="all", progress=f.progress)
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
