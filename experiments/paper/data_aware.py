"""Data-aware merging on the reproduction's suite: AdaMerging, Fisher and RegMean next to
task arithmetic with alpha chosen on validation.

    python -m experiments.paper.data_aware --config quick --workdir /tmp/data_aware

Reuses experiments/paper/setup.py (data, cached base model, frozen per-task heads) and
finetunes every task with the reproduction's minibatch optimizer. Then, on the same task
vectors:

* task arithmetic, ``alpha`` chosen by mean validation accuracy over ``merging.alphas``;
* AdaMerging, task-wise and layer-wise, coefficients learned on the tasks' *unlabeled test
  inputs* (the paper's test-time setting: no test label is read until evaluation);
* Fisher merging with each task's empirical diagonal Fisher on its training data;
* RegMean with each finetuned encoder's input Grams on its own training data.

Every method reports per-task test accuracy and its mean; ``best`` names the winner,
whichever it is. The lead wires this into the main job's merging study.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import taskvec_jax as tvj
from experiments.configs import reproduce as reproduce_configs
from experiments.paper.setup import build, log, minibatch_optimizer
from taskvec_jax.training import finetune_tasks

__all__ = ["get_config", "run"]


def get_config(name: str = "quick") -> ml_collections.ConfigDict:
    """The reproduction's config ``name`` plus a ``data_aware`` block."""
    c = reproduce_configs.get_config(name)
    c.data_aware = ml_collections.ConfigDict(dict(
        granularities=("task", "layer"), num_steps=500, learning_rate=1e-3, init=0.3,
        batch_size=16, fisher_examples=256, fisher_microbatch_size=64,
        regmean_reduction=0.9, methods=("task_arithmetic", "adamerging", "fisher",
                                        "regmean")))
    return c


def _accuracies(setup, params, split) -> list[float]:
    return [float(setup.accuracy(params, d)) for d in split]


def _unlabeled(split) -> list[dict]:
    return [{"image": d["image"], "task": d["task"]} for d in split]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the comparison; writes ``data_aware.json`` under ``workdir`` and returns it."""
    start = time.time()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    setup = build(config, workdir)
    f, d = config.finetune, config.data_aware
    log(f"finetuning {len(setup.train)} tasks: minibatch {f.minibatch_optimizer}, "
        f"{f.minibatch_epochs} epochs")
    trajs = finetune_tasks(setup.loss_fn, setup.base, setup.train,
                           minibatch_optimizer(config), f.minibatch_epochs,
                           batch_size=f.batch_size, key=jax.random.key(config.seed + 3),
                           keep_epochs=[f.minibatch_epochs], record_gradients=False)
    finetuned = [t.final_params for t in trajs]
    taus = [tvj.task_vector(p, setup.base) for p in finetuned]
    results: dict = {"tasks": setup.task_names,
                     "base_test": _accuracies(setup, setup.base, setup.test),
                     "finetuned_test": [float(setup.accuracy(p, t))
                                        for p, t in zip(finetuned, setup.test)],
                     "methods": {}}

    def report(name, params, **extra):
        test = _accuracies(setup, params, setup.test)
        results["methods"][name] = {"test_accuracy": test,
                                    "avg_accuracy": float(np.mean(test)), **extra}
        log(f"  {name:24s} mean test accuracy {np.mean(test):.4f}")

    methods = tuple(d.methods)
    if "task_arithmetic" in methods:
        alphas = [float(a) for a in config.merging.alphas]
        val = [float(np.mean(_accuracies(setup, tvj.merging.task_arithmetic(
            setup.base, taus, a), setup.validation))) for a in alphas]
        best = alphas[int(np.argmax(val))]
        report("task_arithmetic", tvj.merging.task_arithmetic(setup.base, taus, best),
               alpha=best, validation_by_alpha=dict(zip(map(str, alphas), val)))

    if "adamerging" in methods:
        heads = setup.heads

        def apply_fn(params, batch):
            return heads.logits(setup.encode(params, batch["image"]), batch["task"])

        for granularity in d.granularities:
            t0 = time.time()
            out = tvj.merging.adamerging(
                setup.base, taus, apply_fn, _unlabeled(setup.test), granularity=granularity,
                num_steps=d.num_steps, optimizer=optax.adam(d.learning_rate), init=d.init,
                batch_size=d.batch_size, key=jax.random.key(config.seed + 13))
            coefficients = jax.tree.map(lambda c: np.asarray(c).tolist(), out.coefficients)
            report(f"adamerging_{granularity}", out.params,
                   entropy_first=float(out.losses[0]), entropy_last=float(out.losses[-1]),
                   coefficients=coefficients if granularity == "task" else None,
                   seconds=time.time() - t0)

    if "fisher" in methods:
        t0 = time.time()
        fishers = [tvj.merging.diagonal_fisher(
            setup.loss_fn, p, tr, num_examples=min(d.fisher_examples,
                                                   int(tr["label"].shape[0])),
            microbatch_size=d.fisher_microbatch_size) for p, tr in zip(finetuned, setup.train)]
        report("fisher", tvj.merging.fisher(finetuned, fishers), seconds=time.time() - t0)

    if "regmean" in methods:
        t0 = time.time()
        grams = [tvj.merging.regmean_grams(setup.encode, p, tr["image"],
                                           microbatch_size=d.fisher_microbatch_size)
                 for p, tr in zip(finetuned, setup.train)]
        merged = tvj.merging.regmean(finetuned, grams, reduction=d.regmean_reduction)
        finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(merged))
        report("regmean", merged, reduction=d.regmean_reduction, finite=finite,
               seconds=time.time() - t0)

    ranked = sorted(results["methods"].items(), key=lambda kv: -kv[1]["avg_accuracy"])
    results["best"] = ranked[0][0]
    results["elapsed_s"] = time.time() - start
    with open(os.path.join(workdir, "data_aware.json"), "w") as fh:
        json.dump({"config": config.to_dict(), **results}, fh, indent=1, default=list)
    return results


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="quick")
    parser.add_argument("--workdir", default="/tmp/taskvec_jax_data_aware")
    args = parser.parse_args(argv)
    res = run(get_config(args.config), args.workdir)
    print(json.dumps({k: {"avg_accuracy": v["avg_accuracy"]} for k, v in
                      res["methods"].items()}, indent=1))
    print("best:", res["best"])


if __name__ == "__main__":
    main(sys.argv[1:])
