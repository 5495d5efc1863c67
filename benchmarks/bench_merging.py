"""Merging at real scale: 8 task vectors of ViT-B/32 size (~88M float32 parameters).

Each method runs in its own process so that its peak resident memory (``VmHWM``) is its
own. Times are compared with the memory-copy floor (bytes read + written / measured copy
bandwidth), memory with model sizes, and each method with its PyTorch form written the
way the peer repositories do it (state-dict arithmetic; TIES on the stacked flat
``[T, P]`` matrix with ``kthvalue``, as in ties-merging).

    python -m benchmarks.bench_merging             # full ViT-B/32 size, T = 8
    python -m benchmarks.bench_merging --quick     # 2 of the 12 blocks
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

JAX_METHODS = ("task_arithmetic", "ties_global", "ties_leaf", "dare", "breadcrumbs")
TORCH_METHODS = ("torch_task_arithmetic", "torch_ties_global", "torch_dare",
                 "torch_breadcrumbs")


def vit_b32_shapes(blocks: int = 12) -> dict[str, tuple[int, ...]]:
    """Leaf shapes of CLIP ViT-B/32's image tower (87.8M parameters with 12 blocks)."""
    w, mlp = 768, 3072
    shapes = {"conv1": (w, 3, 32, 32), "class_embedding": (w,), "positional": (50, w),
              "ln_pre/scale": (w,), "ln_pre/bias": (w,), "ln_post/scale": (w,),
              "ln_post/bias": (w,), "proj": (w, 512)}
    for b in range(blocks):
        p = f"block{b}/"
        shapes.update({p + "ln1/scale": (w,), p + "ln1/bias": (w,), p + "qkv/kernel": (w, 3 * w),
                       p + "qkv/bias": (3 * w,), p + "out/kernel": (w, w), p + "out/bias": (w,),
                       p + "ln2/scale": (w,), p + "ln2/bias": (w,),
                       p + "fc/kernel": (w, mlp), p + "fc/bias": (mlp,),
                       p + "proj/kernel": (mlp, w), p + "proj/bias": (w,)})
    return shapes


def rss(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes (Linux ``/proc/self/status``)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    """Resets ``VmHWM`` to the current RSS (writing 5 to clear_refs, Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def torch_inputs(shapes: dict, num_tasks: int, device: str = "cpu"):
    """A random base and ``num_tasks`` task vectors (scale 1e-3) as torch tensors, generated
    in place (no host temporaries that would inflate the RSS baseline)."""
    import torch
    base = {k: torch.randn(s, device=device) for k, s in shapes.items()}
    taus = [{k: torch.randn(s, device=device).mul_(1e-3) for k, s in shapes.items()}
            for _ in range(num_tasks)]
    return base, taus


def jax_inputs(shapes: dict, num_tasks: int):
    """The JAX twin of :func:`torch_inputs` (one jitted draw per leaf, on the device)."""
    import jax
    key = jax.random.key(0)
    normal = jax.jit(jax.random.normal, static_argnums=1)
    base = {k: normal(jax.random.fold_in(key, i), s) for i, (k, s) in enumerate(shapes.items())}
    taus = [{k: normal(jax.random.fold_in(key, 1000 * (t + 1) + i), s) * 1e-3
             for i, (k, s) in enumerate(shapes.items())} for t in range(num_tasks)]
    return base, taus


def worker(method: str, num_tasks: int, blocks: int, repeats: int) -> dict[str, Any]:
    shapes = vit_b32_shapes(blocks)
    n_params = int(sum(np.prod(s) for s in shapes.values()))
    model_bytes = 4 * n_params
    start_rss = rss("VmRSS")
    if method.startswith("torch_"):
        import torch
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        torch.manual_seed(0)
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        base, taus = torch_inputs(shapes, num_tasks, dev)
        fn = _torch_method(method, base, taus)

        def block(x):
            if dev == "cuda":
                torch.cuda.synchronize()
            return x
    else:
        import jax
        from taskvec_jax import merging
        base, taus = jax_inputs(shapes, num_tasks)
        key = jax.random.key(0)  # DARE's drop key
        table = {
            "task_arithmetic": lambda: merging.task_arithmetic(base, taus, alpha=0.3),
            "ties_global": lambda: merging.ties(base, taus, density=0.2, alpha=1.0,
                                                scope="global"),
            "ties_leaf": lambda: merging.ties(base, taus, density=0.2, alpha=1.0,
                                              scope="leaf"),
            # DARE + task arithmetic in one program (task t drops with fold_in(key, t)).
            "dare": lambda: merging.dare_task_arithmetic(base, taus, alpha=0.3,
                                                         drop_rate=0.9, key=key),
            "breadcrumbs": lambda: merging.breadcrumbs(base, taus, alpha=0.3),
        }
        fn = table[method]
        block = jax.block_until_ready
    inputs_rss = rss("VmRSS")
    block(fn())                              # warm-up (compilation)
    seconds = []
    extra = []
    for _ in range(repeats):
        before = rss("VmRSS")               # inputs + runtime (compiled code, caches)
        reset_peak()
        t0 = time.perf_counter()
        out = block(fn())
        seconds.append(time.perf_counter() - t0)
        extra.append(rss("VmHWM") - before)  # temporaries + output of this call
        del out
    device_peak = _device_peak(method)
    if device_peak is not None:   # on an accelerator: its allocator's peak, not host RSS
        extra = [device_peak - (num_tasks + 1) * model_bytes]
    return {"method": method, "num_tasks": num_tasks, "params": n_params,
            "model_bytes": model_bytes, "seconds": seconds,
            "inputs_bytes": inputs_rss - start_rss,
            "peak_bytes": (num_tasks + 1) * model_bytes + max(extra),
            "copy_gbps": _copy_bandwidth(method)}


def _device_peak(method: str) -> int | None:
    """Peak accelerator bytes in use (inputs + temporaries + outputs), if on one."""
    if method.startswith("torch_"):
        import torch
        return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None
    import jax
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return None
    stats = dev.memory_stats() or {}
    return int(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else None


def _copy_bandwidth(method: str) -> float:
    """Bytes read + written per second of a 512 MB elementwise pass (``x + 1``)."""
    n = 128 * 1024 * 1024
    if method.startswith("torch_"):
        import torch
        cuda = torch.cuda.is_available()
        x = torch.ones(n, device="cuda" if cuda else "cpu")
        f = lambda: x + 1.0  # noqa: E731
        block = (lambda y: (torch.cuda.synchronize(), y)[1]) if cuda else (lambda y: y)
    else:
        import jax
        import jax.numpy as jnp
        x = jnp.ones(n, jnp.float32)
        g = jax.jit(lambda x: x + 1.0)
        f, block = (lambda: g(x)), jax.block_until_ready
    block(f())
    best = min(_timed(f, block) for _ in range(5))
    return 2 * 4 * n / best / 1e9


def _timed(f, block) -> float:
    t0 = time.perf_counter()
    block(f())
    return time.perf_counter() - t0


def _torch_method(method, base, taus):
    """The peers' state-dict forms (mlfoundations/task_vectors, ties-merging, MergeLM)."""
    import torch

    def task_arithmetic():
        return {k: base[k] + 0.3 * sum(t[k] for t in taus) for k in base}

    def ties_global():
        keys = list(base)
        flat = torch.stack([torch.cat([t[k].reshape(-1) for k in keys]) for t in taus])
        k = int(flat.shape[1] * (1 - 0.2))
        thresh = flat.abs().kthvalue(k, dim=1, keepdim=True).values
        trimmed = flat * (flat.abs() >= thresh)
        sign = torch.sign(trimmed.sum(0))
        agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
        merged = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
        out, start = {}, 0
        for key in keys:
            size = base[key].numel()
            out[key] = base[key] + merged[start:start + size].view_as(base[key])
            start += size
        return out

    def dare():
        gen = torch.Generator(device=next(iter(base.values())).device).manual_seed(0)
        out = {k: v.clone() for k, v in base.items()}
        for t in taus:
            for k in base:
                keep = torch.rand(t[k].shape, generator=gen, device=t[k].device) >= 0.9
                out[k] += 0.3 * t[k] * keep / (1 - 0.9)
        return out

    def breadcrumbs():
        out = {k: v.clone() for k, v in base.items()}
        for t in taus:
            for k, v in t.items():
                rows = v.reshape(-1, v.shape[-1])
                n = rows.shape[1]
                top = max(1, int(round(0.006 * n)))
                keep = max(1, int(round(0.15 * n)))
                order = rows.abs().argsort(dim=1, descending=True)
                mask = torch.zeros_like(rows, dtype=torch.bool)
                mask.scatter_(1, order[:, top:top + keep], True)
                out[k] += 0.3 * (rows * mask).view_as(v)
        return out

    return {"torch_task_arithmetic": task_arithmetic, "torch_ties_global": ties_global,
            "torch_dare": dare, "torch_breadcrumbs": breadcrumbs}[method]


def run(quick: bool = False, methods=None) -> list[dict[str, Any]]:
    blocks, repeats, t = (2, 2, 8) if quick else (12, 3, 8)
    results = {}
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    try:
        import torch  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
    for method in methods or (JAX_METHODS + (TORCH_METHODS if have_torch else ())):
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.bench_merging", "--worker", method,
             "--tasks", str(t), "--blocks", str(blocks), "--repeats", str(repeats)],
            cwd=root, capture_output=True, text=True,
            env={**os.environ, "XLA_FLAGS": os.environ.get("BENCH_XLA_FLAGS", "")})
        if proc.returncode:
            raise RuntimeError(f"{method} failed:\n{proc.stderr[-3000:]}")
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    return summarize(results)


# The goals of the performance issue (CPU, T = 8, ViT-B/32 shapes): time / copy floor,
# time / PyTorch form (peak memory: at most T+2 model copies for every method).
FLOOR_GOALS = {"task_arithmetic": 2, "ties_global": 10}
TORCH_GOALS = {"ties_global": 0.5, "dare": 1, "breadcrumbs": 0.5}


def summarize(results: dict) -> list[dict[str, Any]]:
    from benchmarks.harness import Stats
    out = []
    for method, r in results.items():
        if method.startswith("torch_"):
            continue
        mb, t = r["model_bytes"], r["num_tasks"]
        secs = Stats.of(r["seconds"])
        floor = (t + 2) * mb / (r["copy_gbps"] * 1e9)
        entry = {"name": f"{method}: time / copy floor",
                 "setting": f"T={t}, {r['params'] / 1e6:.1f}M float32 params "
                            f"(ViT-B/32 shapes), floor = (T+2) x model bytes / "
                            f"{r['copy_gbps']:.1f} GB/s",
                 "ratio": Stats(secs.min / floor, secs.median / floor, secs.max / floor),
                 "target": (f"<= {FLOOR_GOALS[method]}" if method in FLOOR_GOALS
                            else "(informational)"),
                 "ok": (secs.median / floor <= FLOOR_GOALS[method]
                        if method in FLOOR_GOALS else None),
                 "extra": {"seconds": secs.median}}
        out.append(entry)
        peak = r["peak_bytes"] / mb
        out.append({"name": f"{method}: peak memory / model bytes",
                    "setting": f"inputs (T+1 = {t + 1} models; RSS grew by "
                               f"{r['inputs_bytes'] / mb:.1f}) + the call's temporaries and "
                               "output (VmHWM rise during the call)",
                    "ratio": Stats(peak, peak, peak), "target": f"<= T+2 = {t + 2}",
                    "ok": peak <= t + 2, "extra": {}})
        twin = "torch_" + method.replace("ties_leaf", "none")
        if twin in results:
            tt = Stats.of(results[twin]["seconds"])
            out.append({"name": f"{method}: time / PyTorch form",
                        "setting": f"{twin}, torch CPU, same shapes",
                        "ratio": Stats(secs.min / tt.max, secs.median / tt.median,
                                       secs.max / tt.min),
                        "target": (f"<= {TORCH_GOALS[method]}" if method in TORCH_GOALS
                                   else "(informational)"),
                        "ok": (secs.median / tt.median <= TORCH_GOALS[method]
                               if method in TORCH_GOALS else None),
                        "extra": {"torch_seconds": tt.median,
                                  "torch_peak_models": results[twin]["peak_bytes"] / mb}})
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.tasks, args.blocks, args.repeats)))
    else:
        for e in run(args.quick):
            print(e["name"], e["ratio"].fmt(), e["target"])
