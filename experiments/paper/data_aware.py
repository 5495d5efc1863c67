"""Data-aware merging on the reproduction's suite: AdaMerging, Fisher and RegMean next to
task arithmetic with alpha chosen on validation, on converged task vectors only.

    python -m experiments.paper.data_aware --config quick --workdir /tmp/data_aware

A shortcut into the main job's merging study (experiments/paper/merging_study.py, whose
``METHODS`` defines every merge and its settings, ``config.merging``): it reuses
experiments/paper/setup.py (data, cached base model, frozen per-task heads), finetunes
every task with the reproduction's minibatch optimizer, and evaluates the data-aware
methods and task arithmetic on the final task vectors; ``best`` names the winner,
whichever it is. The full comparison (every family, after k epochs and at convergence)
is part of ``python -m experiments.reproduce``.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import ml_collections
import numpy as np

import taskvec_jax as tvj
from experiments.configs import reproduce as reproduce_configs
from experiments.paper import merging_study
from experiments.paper.setup import build, log, minibatch_optimizer
from taskvec_jax.training import finetune_tasks

__all__ = ["METHODS", "get_config", "run"]

METHODS = ("task_arithmetic", "fisher", "regmean", "adamerging_task", "adamerging_layer")


def get_config(name: str = "quick") -> ml_collections.ConfigDict:
    """The reproduction's config ``name`` with ``merging.methods`` set to :data:`METHODS`
    (AdaMerging with the paper's 500 steps)."""
    c = reproduce_configs.get_config(name)
    c.merging.methods = METHODS
    c.merging.adamerging_steps = 500
    return c


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the comparison; writes ``data_aware.json`` under ``workdir`` and returns it."""
    start = time.time()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    setup = build(config, workdir)
    f = config.finetune
    log(f"finetuning {len(setup.train)} tasks: minibatch {f.minibatch_optimizer}, "
        f"{f.minibatch_epochs} epochs")
    trajs = finetune_tasks(setup.loss_fn, setup.base, setup.train,
                           minibatch_optimizer(config), f.minibatch_epochs,
                           batch_size=f.batch_size, key=jax.random.key(config.seed + 3),
                           keep_epochs=[f.minibatch_epochs], record_gradients=False)
    finetuned = [t.final_params for t in trajs]
    taus = [tvj.task_vector(p, setup.base) for p in finetuned]
    ft_val = np.asarray([float(setup.accuracy(p, d))
                         for p, d in zip(finetuned, setup.validation)])
    ft_test = np.asarray([float(setup.accuracy(p, d)) for p, d in zip(finetuned, setup.test)])
    res = merging_study.merge_and_evaluate(setup, taus, ft_val, ft_test,
                                           jax.random.key(config.seed + 13),
                                           finetuned=finetuned)
    for name, row in res.items():
        row.pop("merged")
        log(f"  {name:24s} mean test accuracy {row['avg_accuracy']:.4f} (normalized "
            f"{row['avg_normalized']:.4f})")
    results = {"tasks": setup.task_names,
               "base_test": [float(setup.accuracy(setup.base, d)) for d in setup.test],
               "finetuned_test": ft_test.tolist(), "methods": res,
               "best": max(res, key=lambda n: res[n]["avg_normalized"]),
               "elapsed_s": time.time() - start}
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
