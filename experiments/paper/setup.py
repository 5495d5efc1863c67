"""Data, base model, frozen heads and losses for the paper reproduction."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import taskvec_jax as tvj
from taskvec_jax import data as data_lib
from taskvec_jax.models import (CNN, MLP, ViT, fit_linear_head, make_loss_fn,
                                multihead_accuracy, multihead_loss_fn, stack_heads,
                                with_task_ids)

PyTree = Any


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Optimizer steps in one minibatch epoch (the engine keeps the last, smaller batch)."""
    return -(-int(num_examples) // int(batch_size))


def learning_rate_schedule(cfg, num_steps: int | None = None) -> optax.Schedule | float:
    """The minibatch learning rate: constant, or cosine decay to 0 over ``num_steps``, each
    after ``warmup_steps`` of linear warmup from 0 (``config.finetune.schedule``)."""
    f = cfg.finetune
    lr, warmup = float(f.minibatch_lr), int(f.warmup_steps)
    if f.schedule not in ("constant", "cosine"):
        raise ValueError(f"config.finetune.schedule must be 'constant' or 'cosine', got "
                         f"{f.schedule!r}")
    if warmup < 0:
        raise ValueError(f"config.finetune.warmup_steps must be >= 0, got {warmup}")
    if f.schedule == "constant" and warmup == 0:
        return lr
    if num_steps is None:
        raise ValueError(f"schedule {f.schedule!r} with warmup_steps={warmup} needs the run's "
                         "num_steps")
    if f.schedule == "cosine":
        if num_steps <= warmup:
            raise ValueError(f"config.finetune.warmup_steps={warmup} must be below the "
                             f"run's num_steps={num_steps}")
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, num_steps, end_value=0.0)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                 optax.constant_schedule(lr)], [warmup])


def minibatch_optimizer(cfg, num_steps: int | None = None) -> optax.GradientTransformation:
    """The optimizer of the minibatch runs (finetunes, multitask, ATM).

    ``optax.chain(clip_by_global_norm(clip_norm), adamw(schedule, weight_decay=...))`` for
    ``minibatch_optimizer="adamw"`` (the paper's AdamW with weight decay 0.1 and gradient
    clipping), ``adam``/``sgd`` without weight decay; clipping is left out when
    ``config.finetune.clip_norm`` is ``None``.

    Args:
      cfg: the reproduction config (``config.finetune``: ``minibatch_optimizer``,
        ``minibatch_lr``, ``weight_decay``, ``clip_norm``, ``schedule``, ``warmup_steps``).
      num_steps: the run's total optimizer steps; only a schedule other than a constant one
        (or a warmup) needs it.

    Raises:
      ValueError: for an unknown optimizer or schedule, weight decay with an optimizer that
        has none, a non-positive ``clip_norm``, or a schedule without ``num_steps``.
    """
    f = cfg.finetune
    table = {"sgd": optax.sgd, "adam": optax.adam, "adamw": optax.adamw}
    if f.minibatch_optimizer not in table:
        raise ValueError(f"unknown minibatch_optimizer {f.minibatch_optimizer!r}; choose "
                         f"{sorted(table)}")
    lr = learning_rate_schedule(cfg, num_steps)
    if f.minibatch_optimizer == "adamw":
        # set explicitly: optax's own default (1e-4) is not the paper's 0.1
        opt = optax.adamw(lr, weight_decay=float(f.weight_decay))
    elif f.weight_decay:
        raise ValueError(f"config.finetune.weight_decay={f.weight_decay} needs "
                         f"minibatch_optimizer='adamw' (got {f.minibatch_optimizer!r})")
    else:
        opt = table[f.minibatch_optimizer](lr)
    if f.clip_norm is None:
        return opt
    if not f.clip_norm > 0:
        raise ValueError(f"config.finetune.clip_norm must be > 0 or None, got {f.clip_norm}")
    return optax.chain(optax.clip_by_global_norm(float(f.clip_norm)), opt)


class Setup(NamedTuple):
    """Everything the findings share."""

    config: ml_collections.ConfigDict
    task_names: list[str]
    train: list[PyTree]        # per task, with "task" ids
    validation: list[PyTree]
    test: list[PyTree]
    base: PyTree               # encoder parameters of the pretrained base model
    encode: Callable[[PyTree, jax.Array], jax.Array]
    heads: Any                 # TaskHeads
    loss_fn: Callable[[PyTree, PyTree], jax.Array]
    accuracy: Callable[[PyTree, PyTree], jax.Array]   # jitted (params, data) -> accuracy


def _dtype(name: str):
    return {"float32": jnp.float32, "float64": jnp.float64, "bfloat16": jnp.bfloat16}[name]


def encoder_and_classifier(cfg: ml_collections.ConfigDict, num_classes: int):
    """(encoder, classifier, strip) where the classifier is the encoder plus a linear layer
    and ``strip(classifier_params)`` returns the encoder's parameters."""
    m = cfg.model
    dtype = _dtype(m.param_dtype)
    if m.kind == "mlp":
        enc = MLP(tuple(m.widths), m.activation, activate_final=True, param_dtype=dtype)
        clf = MLP(tuple(m.widths) + (num_classes,), m.activation, param_dtype=dtype)
        head = f"Dense_{len(m.widths)}"
    elif m.kind == "vit":
        clf = ViT(num_classes, patch_size=m.patch_size, width=m.widths[0], depth=m.depth,
                  num_heads=m.num_heads, param_dtype=dtype)
        enc, head = clf.clone(include_head=False), "head"
    elif m.kind == "cnn":
        clf = CNN(num_classes, channels=tuple(m.widths), hidden=64,
                  activation=m.activation, param_dtype=dtype)
        enc, head = clf.clone(include_head=False), "Dense_1"
    else:
        raise ValueError(f"unknown model kind {m.kind!r}; choose mlp, cnn or vit")
    return enc, clf, lambda p: {k: v for k, v in p.items() if k != head}


def load_data(cfg: ml_collections.ConfigDict):
    d = cfg.data
    kwargs = {k: v for k, v in dict(data_dir=d.data_dir, image_size=d.image_size,
                                    channels=d.channels, normalization=d.normalization
                                    ).items() if v is not None}
    suite = data_lib.SUITES[d.suite] if d.suite in data_lib.SUITES else None
    names = list(d.tasks) if d.tasks else list(suite.tasks)
    source = d.source or (suite.source if suite else None)
    if source is None:
        raise ValueError(f"suite {d.suite!r} has no source split: set config.data.source "
                         "to the task the base model is pretrained on")
    log(f"loading {len(names)} tasks ({d.suite}) and the source split {source}")
    splits = {}
    for name in names:
        splits[name] = {s: data_lib.load_task(
            name, s, max_examples=d.max_train_examples if s == "train" else None, **kwargs)
            for s in ("train", "validation", "test")}
    src = {s: data_lib.load_task(source, s, **kwargs) for s in ("train", "validation")}
    return names, splits, src


def _to_jax(batch: dict, dtype) -> dict:
    return {"image": jnp.asarray(batch["image"], dtype), "label": jnp.asarray(batch["label"])}


def pretrain_base(cfg, source: dict, workdir: str, dtype) -> tuple[PyTree, Any, Any]:
    """Trains encoder + source head on the source split; cached under workdir/checkpoints."""
    num_classes = int(np.max(source["train"]["label"])) + 1
    enc, clf, strip = encoder_and_classifier(cfg, num_classes)
    train = _to_jax(source["train"], dtype)
    init = clf.init(jax.random.key(cfg.seed), train["image"][:1])["params"]
    path = os.path.join(workdir, "checkpoints", "base")
    meta = {"model": cfg.model.to_dict(), "pretrain": cfg.pretrain.to_dict(),
            "data": cfg.data.to_dict(), "seed": cfg.seed}
    meta_path = path + ".json"
    if os.path.isdir(path) and os.path.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f) == json.loads(json.dumps(meta)):
                log(f"reusing the cached base model {path}")
                # restored arrays are committed to their device, freshly trained ones are
                # not, and jit compiles (and caches) a program per kind: the host round
                # trip makes a re-run compile exactly the programs of a first run
                base = tvj.checkpoint.restore(path, like=init)
                return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), base), enc, strip
    p = cfg.pretrain
    log(f"pretraining the base model on {train['image'].shape[0]} source examples "
        f"({p.epochs} epochs of Adam, batch {p.batch_size})")
    traj = tvj.finetune(make_loss_fn(clf), init, train, optax.adam(p.learning_rate),
                        p.epochs, batch_size=p.batch_size, key=jax.random.key(cfg.seed + 1),
                        keep_epochs=[p.epochs], record_gradients=False)
    params = traj.final_params
    acc = float(tvj.models.accuracy(clf, params, _to_jax(source["validation"], dtype)))
    log(f"base model: source validation accuracy {acc:.3f}")
    tvj.checkpoint.save(path, params, overwrite=True)
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    return params, enc, strip


def build(cfg: ml_collections.ConfigDict, workdir: str) -> Setup:
    """Loads data, pretrains (or restores) the base model, fits the frozen heads."""
    dtype = _dtype(cfg.model.param_dtype)
    names, splits, source = load_data(cfg)
    full, enc, strip = pretrain_base(cfg, source, workdir, dtype)
    base = strip(full)

    def encode(params, x):
        return enc.apply({"params": params}, x)

    log(f"fitting frozen linear heads on the base features of {len(names)} tasks")
    heads = []
    train, val, test = [], [], []
    for t, name in enumerate(names):
        tr = _to_jax(splits[name]["train"], dtype)
        c = int(max(np.max(splits[name][s]["label"]) for s in splits[name])) + 1
        feats = jax.jit(encode)(base, tr["image"])
        heads.append(fit_linear_head(feats, tr["label"], c, steps=cfg.heads.steps,
                                     learning_rate=cfg.heads.learning_rate,
                                     weight_decay=cfg.heads.weight_decay))
        train.append(with_task_ids(tr, t))
        val.append(with_task_ids(_to_jax(splits[name]["validation"], dtype), t))
        test.append(with_task_ids(_to_jax(splits[name]["test"], dtype), t))
    heads = stack_heads(heads)
    loss_fn = multihead_loss_fn(encode, heads)
    accuracy = jax.jit(lambda p, d: multihead_accuracy(encode, heads, p, d))
    return Setup(cfg, names, train, val, test, base, encode, heads, loss_fn, accuracy)
