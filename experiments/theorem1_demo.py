"""Theorem 1 on real digits: one epoch of task arithmetic equals one multitask GD step.

Interim main job (the full reproduction lives in experiments/reproduce.py once built):

    python -m experiments.theorem1_demo

Splits scikit-learn's 8x8 digits into T tasks, finetunes one MLP on each with full-batch GD,
and prints ||theta_TA^(k) - theta_MT^(k)|| for k = 1..3 at several learning rates: zero (to
float64 rounding) at k = 1, and shrinking like lr^2 for k >= 2.
"""

from __future__ import annotations

import argparse

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import taskvec_jax as tvj  # noqa: E402
from taskvec_jax.models import MLP, make_loss_fn  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order] / 16.0, y[order]
    chunks = np.array_split(np.arange(600 if args.quick else 1500), args.tasks)
    tasks = [{"image": jnp.asarray(x[c]), "label": jnp.asarray(y[c])} for c in chunks]
    model = MLP((32, 10), "tanh", param_dtype=jnp.float64)
    params = model.init(jax.random.key(0), tasks[0]["image"][:1])["params"]
    loss_fn = make_loss_fn(model)
    k = 3
    print(f"T={args.tasks} tasks of {len(chunks[0])} digits, MLP 64-32-10 tanh, float64, "
          f"alpha={args.alpha}")
    print(f"{'lr':>8} " + " ".join(f"{'gap k=' + str(e):>12}" for e in range(1, k + 1)))
    lrs = [0.04, 0.02, 0.01, 0.005]
    gaps = []
    for lr in lrs:
        trajs = tvj.finetune_tasks(loss_fn, params, tasks, optax.sgd(lr), k)
        mt = tvj.multitask_finetune(loss_fn, params, tasks, optax.sgd(args.alpha * lr), k)
        row = []
        for e in range(1, k + 1):
            tau = tvj.tree.add(*[tvj.task_vector(t.at(e), params) for t in trajs]) \
                if len(trajs) > 1 else tvj.task_vector(trajs[0].at(e), params)
            ta = tvj.apply(params, tau, args.alpha)
            row.append(float(tvj.tree.norm(tvj.tree.sub(ta, mt.at(e)))))
        gaps.append(row)
        print(f"{lr:8.3f} " + " ".join(f"{g:12.3e}" for g in row))
    gaps = np.asarray(gaps)
    for e in range(2, k + 1):
        slope = np.polyfit(np.log(lrs), np.log(gaps[:, e - 1]), 1)[0]
        print(f"k={e}: log-log slope of the gap against lr = {slope:.3f} (theory: 2)")
    print(f"k=1: largest gap {gaps[:, 0].max():.2e} (theory: exactly 0)")


if __name__ == "__main__":
    main()
