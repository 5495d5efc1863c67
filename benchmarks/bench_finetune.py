"""Finetuning speed: achieved FLOP/s vs peak, scan vs Python loop vs PyTorch, vmapped tasks."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import taskvec_jax as tvj
from benchmarks.harness import Stats, peak_matmul_flops, ratio, times
from taskvec_jax.models import CNN, MLP, make_loss_fn


def _images(n: int, shape=(28, 28, 1), classes: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    return {"image": jnp.asarray(rng.normal(size=(n,) + shape), jnp.float32),
            "label": jnp.asarray(rng.integers(0, classes, n), jnp.int32)}


def flops_fraction(quick: bool = False) -> dict[str, Any]:
    """Achieved FLOP/s of a full-batch GD epoch on a wide MLP over measured matmul peak."""
    n, d_in, width = (1024, 512, 1024) if quick else (2048, 1024, 2048)
    if jax.devices()[0].platform != "cpu" and not quick:
        n, d_in, width = 16384, 4096, 4096   # an accelerator needs large matmuls to fill
    data = {"image": jnp.asarray(np.random.default_rng(0).normal(size=(n, d_in)),
                                 jnp.float32),
            "label": jnp.asarray(np.random.default_rng(1).integers(0, 10, n), jnp.int32)}
    feats = (width, width, 10)
    model = MLP(feats, "relu")
    params = model.init(jax.random.key(0), data["image"][:1])["params"]
    loss_fn = make_loss_fn(model)
    opt = optax.sgd(1e-3)
    epochs = 5
    dims = [d_in, *feats]
    mm = [a * b for a, b in zip(dims[:-1], dims[1:])]
    # forward 2*N*sum, weight gradients 2*N*sum, input gradients of layers 2..L 2*N*sum
    flops_per_epoch = 2 * n * sum(mm) + 2 * n * sum(mm) + 2 * n * sum(mm[1:])
    run = lambda: tvj.finetune(loss_fn, params, data, opt, epochs,  # noqa: E731
                               record_gradients=False, keep_epochs=[epochs]).params
    t = times(run, repeats=3 if quick else 5, warmup=1)
    peak = peak_matmul_flops(1024 if quick else 2048)
    achieved = Stats(flops_per_epoch * epochs / t.max, flops_per_epoch * epochs / t.median,
                     flops_per_epoch * epochs / t.min)
    frac = Stats(achieved.min / peak.max, achieved.median / peak.median,
                 achieved.max / peak.min)
    return {"name": "finetune FLOP/s / matmul peak",
            "setting": f"MLP {d_in}-{width}-{width}-10 relu, N={n}, full batch, float32, "
                       f"{epochs} epochs",
            "ratio": frac, "target": ">= 0.5", "ok": frac.median >= 0.5,
            "extra": {"achieved_gflops": achieved.median / 1e9,
                      "peak_gflops": peak.median / 1e9}}


def _python_loop_epoch(loss_fn, opt, params, data, batch_size, key):
    n = tvj.num_examples(data)
    step = _jitted_step(loss_fn, opt)
    perm = jax.random.permutation(jax.random.fold_in(key, 1), n)
    opt_state = opt.init(params)
    for s in range(n // batch_size):
        idx = perm[s * batch_size:(s + 1) * batch_size]
        params, opt_state = step(params, opt_state, data, idx)
    return params


@functools.lru_cache(maxsize=None)
def _jitted_step(loss_fn, opt):
    @jax.jit
    def step(params, opt_state, data, idx):
        batch = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), data)
        grads = jax.grad(loss_fn)(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state
    return step


def _torch_model(kind: str):
    import torch
    if kind == "mlp":
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 256),
                                   torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                   torch.nn.ReLU(), torch.nn.Linear(256, 10))
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * 7 * 7, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, 10))


def _torch_epoch(model, x, y, batch_size, lr):
    import torch
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    perm = torch.randperm(x.shape[0], device=x.device)
    for s in range(x.shape[0] // batch_size):
        idx = perm[s * batch_size:(s + 1) * batch_size]
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
    if x.is_cuda:
        torch.cuda.synchronize()
    return None


def scan_vs_loop_vs_torch(quick: bool = False) -> list[dict[str, Any]]:
    """One minibatch epoch of the same MLP / CNN: tvj.finetune, a jitted-step loop, torch."""
    n, b = (1024, 32) if quick else (4096, 32)
    data = _images(n)
    key = jax.random.key(0)
    out = []
    for kind in ("mlp", "cnn"):
        model = MLP((256, 256, 10), "relu") if kind == "mlp" else CNN(10, (16, 32), 64)
        params = model.init(jax.random.key(0), data["image"][:1])["params"]
        loss_fn = make_loss_fn(model)
        opt = optax.sgd(0.01)
        scan = lambda: tvj.finetune(loss_fn, params, data, opt, 1,  # noqa: E731
                                    batch_size=b, key=key, record_gradients=False).params
        loop = lambda: _python_loop_epoch(loss_fn, opt, params, data, b, key)  # noqa: E731
        r, t_loop, t_scan = ratio(loop, scan, repeats=3 if quick else 5)
        entry = {"name": f"Python loop / tvj.finetune ({kind})",
                 "setting": f"{kind.upper()}, N={n}, B={b}, one SGD epoch, float32",
                 "ratio": r, "target": "> 1 (informational)", "ok": None,
                 "extra": {"scan_s": t_scan.median, "loop_s": t_loop.median}}
        out.append(entry)
        try:
            import torch
        except ImportError:
            out.append({"name": f"PyTorch eager / tvj.finetune ({kind})",
                        "setting": "torch not installed (pip install -e '.[bench]')",
                        "ratio": None, "target": ">= 1.5", "ok": None})
            continue
        torch.manual_seed(0)
        torch.set_num_threads(max(1, len(__import__("os").sched_getaffinity(0))))
        dev = "cuda" if torch.cuda.is_available() else "cpu"  # the same kind of device as JAX
        tm = _torch_model(kind).to(dev)
        x = torch.from_numpy(np.asarray(data["image"]).transpose(0, 3, 1, 2).copy()).to(dev)
        y = torch.from_numpy(np.asarray(data["label"]).astype(np.int64)).to(dev)
        r, t_torch, t_scan = ratio(lambda: _torch_epoch(tm, x, y, b, 0.01), scan,
                                   repeats=3 if quick else 5)
        out.append({"name": f"PyTorch eager / tvj.finetune ({kind})",
                    "setting": f"{kind.upper()}, N={n}, B={b}, one SGD epoch, float32, "
                               f"torch {torch.__version__} on {dev}",
                    "ratio": r, "target": ">= 1.5", "ok": r.median >= 1.5,
                    "extra": {"scan_s": t_scan.median, "torch_s": t_torch.median}})
    return out


def many_tasks(quick: bool = False) -> dict[str, Any]:
    """finetune_tasks for T = 8 equal-shaped tasks (vmapped) vs a loop of finetune calls."""
    t_count, n = 8, 256 if quick else 512
    tasks = [_images(n, (8, 8, 1), seed=s) for s in range(t_count)]
    model = MLP((64, 64, 10), "tanh")
    params = model.init(jax.random.key(0), tasks[0]["image"][:1])["params"]
    loss_fn = make_loss_fn(model)
    opt = optax.sgd(0.1)
    k = 20
    kw = dict(record_gradients=False, keep_epochs=[k])
    vm = lambda: [t.params for t in tvj.finetune_tasks(loss_fn, params, tasks, opt, k,  # noqa
                                                       **kw)]
    loop = lambda: [tvj.finetune(loss_fn, params, d, opt, k, **kw).params  # noqa: E731
                    for d in tasks]
    r, t_vm, t_loop = ratio(vm, loop, repeats=3 if quick else 7)
    return {"name": "finetune_tasks (vmapped) / loop of finetune",
            "setting": f"T={t_count}, MLP 64-64-64-10, N={n} each, {k} full-batch epochs",
            "ratio": r, "target": "<= 0.8", "ok": r.median <= 0.8,
            "extra": {"vmapped_s": t_vm.median, "loop_s": t_loop.median}}


def run(quick: bool = False) -> list[dict[str, Any]]:
    return [flops_fraction(quick), *scan_vs_loop_vs_torch(quick), many_tasks(quick)]
