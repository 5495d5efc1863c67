"""Regime map: where first-epoch dominance holds, over learning rate and steps per epoch.

For every batch size (steps per epoch = ceil(N / batch_size)) and task, one compiled
program finetunes the task at every learning rate at once: the learning rate lives in the
optimizer state (``optax.inject_hyperparams``) and the run is ``jax.vmap``-ed over it.
Each setting gives the first-epoch share of the path, ``cos(g_1, g_e)`` for
``e = 2..5`` (the paper's direction curve) and the relative movement
``||tau|| / ||theta_0||``: small learning rates are the lazy regime (parameters barely move,
gradients stay aligned), large ones the rich regime.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.paper.setup import log, steps_per_epoch
from taskvec_jax import analysis, plotting

__all__ = ["regime_optimizer", "run", "sweep_learning_rates"]

SHARE_BAND = (0.3, 0.7)     # the paper's first-epoch share
COSINE_MIN = 0.8            # the paper's epoch-gradient cosine


def regime_optimizer(cfg) -> optax.GradientTransformation:
    """``config.finetune``'s optimizer (weight decay, clipping) with the learning rate in
    its state, so one compiled program serves every learning rate of the sweep (constant
    rate: the map varies the rate itself, not its schedule)."""
    f = cfg.finetune
    table = {"sgd": optax.sgd, "adam": optax.adam, "adamw": optax.adamw}
    kwargs = {"weight_decay": float(f.weight_decay)} if f.minibatch_optimizer == "adamw" \
        else {}
    opt = optax.inject_hyperparams(table[f.minibatch_optimizer])(learning_rate=0.0, **kwargs)
    return opt if f.clip_norm is None else optax.chain(
        optax.clip_by_global_norm(float(f.clip_norm)), opt)


def _with_learning_rate(state, lr):
    """The optimizer state with its injected learning rate replaced by ``lr``."""
    # (optax's injected states are NamedTuples with a `hyperparams` dict; their class
    # differs between optax versions, so match the field, not the class)
    def is_state(s):
        return isinstance(s, tuple) and hasattr(s, "hyperparams")

    def swap(s):
        return s._replace(hyperparams={**s.hyperparams, "learning_rate": lr}) \
            if is_state(s) else s
    return jax.tree.map(swap, state, is_leaf=is_state)


def sweep_learning_rates(loss_fn, params, data, optimizer, learning_rates, num_epochs, *,
                         batch_size, key, accuracy, validation, cosine_epochs=5):
    """Minibatch finetunes of ``params`` at every learning rate, ``vmap``-ed over them.

    Args:
      accuracy: ``accuracy(params, data) -> scalar``, evaluated on ``validation`` after
        every epoch (for the plateau epoch).

    Returns:
      ``(shares [L, E], cos_to_first [L, K-1], relative_movement [L],
      validation_accuracy [L, E + 1])`` as numpy arrays.
    """
    import taskvec_jax as tvj
    state0 = optimizer.init(params)

    def one(lr):
        traj = tvj.finetune(loss_fn, params, data, optimizer, num_epochs,
                            batch_size=batch_size, key=key,
                            opt_state=_with_learning_rate(state0, lr),
                            keep_epochs="all", record_gradients=True)
        return (analysis.normalized_contributions(traj),
                analysis.cosines_to_first_epoch(traj, min(cosine_epochs, num_epochs)),
                analysis.relative_movement(traj.final_params, params),
                jax.vmap(accuracy, in_axes=(0, None))(traj.params, validation))

    dtype = jax.tree.leaves(params)[0].dtype
    out = jax.vmap(one)(jnp.asarray(learning_rates, dtype))
    return tuple(np.asarray(x) for x in out)


def run(setup, workdir: str) -> dict:
    """The sweep of ``config.regime`` over its first ``num_tasks`` tasks, the figure and the
    per-setting numbers (means over tasks)."""
    cfg = setup.config
    g = cfg.regime
    opt = regime_optimizer(cfg)
    lrs = [float(x) for x in g.learning_rates]
    tasks = list(range(min(g.num_tasks, len(setup.train))))
    settings = []
    for b in g.batch_sizes:
        per_task = []
        for t in tasks:
            data = setup.train[t]
            per_task.append(sweep_learning_rates(
                setup.loss_fn, setup.base, data, opt, lrs, g.epochs, batch_size=int(b),
                key=jax.random.key(cfg.seed + 31 + t), accuracy=setup.accuracy,
                validation=setup.validation[t]))
        steps = float(np.mean([steps_per_epoch(setup.train[t]["label"].shape[0], b)
                               for t in tasks]))
        for i, lr in enumerate(lrs):
            share = float(np.mean([p[0][i, 0] for p in per_task]))
            cos = np.mean([p[1][i] for p in per_task], 0)
            move = float(np.mean([p[2][i] for p in per_task]))
            plateau = [analysis.plateau_epoch(p[3][i, 1:],
                                              tolerance=cfg.dominance.plateau_tolerance)
                       for p in per_task]
            at_plateau = float(np.mean([p[0][i, 0] / p[0][i, :e].sum()
                                        for p, e in zip(per_task, plateau)]))
            settings.append({"learning_rate": lr, "batch_size": int(b),
                             "steps_per_epoch": steps, "first_epoch_share": share,
                             "cos_to_first": cos.tolist(),
                             "mean_cos_to_first": float(cos.mean()),
                             "relative_movement": move,
                             "plateau_epoch": float(np.mean(plateau)),
                             "share_at_plateau": at_plateau,
                             "final_validation_accuracy": float(np.mean(
                                 [p[3][i, -1] for p in per_task])),
                             "share_in_band": SHARE_BAND[0] <= share <= SHARE_BAND[1],
                             "cosine_above": bool(cos.mean() > COSINE_MIN)})
        log(f"  regime map: batch {b} ({steps:.0f} steps/epoch) done")
    path = os.path.join(workdir, "figures", "regime_map.png")
    plot(settings, g.epochs, path)
    return {"epochs": int(g.epochs), "tasks": [setup.task_names[t] for t in tasks],
            "learning_rates": lrs, "batch_sizes": [int(b) for b in g.batch_sizes],
            "settings": settings, "summary": summarize(settings)}


def summarize(settings: list[dict]) -> dict:
    """Which settings satisfy each half of the claim, and the ranges that go with them."""
    band = [s for s in settings if s["share_in_band"]]
    high = [s for s in settings if s["cosine_above"]]
    both = [s for s in band if s["cosine_above"]]
    rng = lambda xs: [float(min(xs)), float(max(xs))] if xs else None  # noqa: E731
    plateau_band = [s for s in settings
                    if SHARE_BAND[0] <= s["share_at_plateau"] <= SHARE_BAND[1]]
    return {"num_settings": len(settings), "num_share_in_band": len(band),
            "num_share_at_plateau_in_band": len(plateau_band),
            "num_both_at_plateau": sum(s["cosine_above"] for s in plateau_band),
            "cosine_range_when_plateau_share_in_band": rng(
                [s["mean_cos_to_first"] for s in plateau_band]),
            "num_cosine_above": len(high), "num_both": len(both),
            "cosine_range_when_share_in_band": rng([s["mean_cos_to_first"] for s in band]),
            "movement_range_when_cosine_above": rng([s["relative_movement"] for s in high]),
            "share_range_when_cosine_above": rng([s["first_epoch_share"] for s in high]),
            "movement_range_when_share_in_band": rng([s["relative_movement"] for s in band])}


def plot(settings: list[dict], epochs: int, path: str) -> str:
    """Share against cosine and against relative movement, the paper's band shaded."""
    plt = plotting.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    batch_sizes = sorted({s["batch_size"] for s in settings})
    markers = "osD^v<>"
    lrs = np.array([s["learning_rate"] for s in settings])
    norm = plt.matplotlib.colors.LogNorm(lrs.min(), max(lrs.max(), lrs.min() * 1.0001))
    for ax, key, label in [(axes[0], "mean_cos_to_first", "mean cos(g_1, g_e), e = 2..5"),
                           (axes[1], "relative_movement", "||tau|| / ||theta_0||")]:
        ax.axhspan(*SHARE_BAND, color="tab:green", alpha=0.12, label="paper's share band")
        if key == "mean_cos_to_first":
            ax.axvspan(COSINE_MIN, 1.0, color="tab:blue", alpha=0.10,
                       label="paper's cosine > 0.8")
        else:
            ax.set_xscale("log")
            # minor-tick labels of a short log axis overlap each other
            ax.xaxis.set_minor_formatter(plt.matplotlib.ticker.NullFormatter())
        for j, b in enumerate(batch_sizes):
            pts = [s for s in settings if s["batch_size"] == b]
            sc = ax.scatter([s[key] for s in pts], [s["first_epoch_share"] for s in pts],
                            c=[s["learning_rate"] for s in pts], norm=norm, cmap="viridis",
                            marker=markers[j % len(markers)], s=60, edgecolors="k",
                            label=f"{pts[0]['steps_per_epoch']:.0f} steps/epoch")
        ax.set_ylim(0.0, 1.0)
        ax.set_xlabel(label)
        ax.set_ylabel(f"first-epoch share ({epochs} epochs)")
        ax.legend(fontsize=7)
    fig.colorbar(sc, ax=axes, label="learning rate")
    fig.suptitle("regime map: first-epoch dominance over learning rate and steps per epoch")
    plotting.save(fig, path)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    """The regime map alone (base model cached in the workdir), e.g. the measurement that
    chose the default main job::

        python -m experiments.paper.regime --workdir=results/regime \\
            --config.regime.batch_sizes='(16,)' --config.regime.epochs=12

    Writes ``regime.json`` and ``figures/regime_map.png`` under the workdir.
    """
    import sys

    from experiments import cli
    from experiments.paper.setup import build
    args = cli.parse(sys.argv[1:] if argv is None else argv,
                     default_config=cli.config_path("reproduce"),
                     description="The regime map of first-epoch dominance.")
    workdir = os.path.abspath(args.workdir or os.path.join("results", "regime"))
    os.makedirs(os.path.join(workdir, "figures"), exist_ok=True)
    setup = build(args.config, workdir)
    res = run(setup, workdir)
    cli.write_json(os.path.join(workdir, "regime.json"), res, allow_nan=True)
    from experiments.paper.report import regime_section
    print("\n".join(regime_section(res)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
