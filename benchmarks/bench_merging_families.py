"""The merging families against their reference PyTorch forms, at ViT-B/32 shapes (T = 8).

Each method runs in its own process (peak resident memory ``VmHWM`` is its own), as in
benchmarks/bench_merging.py, whose shapes and memory probes this reuses. The PyTorch side
is the reference implementation's own function on the same shapes and CPU:

* Iso-C / Iso-CTS: FusionBench's ``iso_c`` / ``iso_cts``;
* TSV-M: FusionBench's ``compute_and_sum_svd_mem_reduction``;
* MagMax: FusionBench's ``_magmax_select`` plus the base;
* Consensus: FusionBench's ``generate_task_masks`` on the stacked flat ``[T, P]`` vectors
  (its TALL-mask form), the count threshold and the masked sum;
* DELLA: mergekit's ``della`` through ``merge_tensors``, tensor by tensor;
* Model Stock: mergekit's ``model_stock``; SLERP: FusionBench's per-tensor ``slerp``.

Figures: time / PyTorch time (median over repeats, compile excluded by a warm-up call) and
peak memory in model copies (inputs: ``T + 1`` models, plus the call's rise in VmHWM).

    python -m benchmarks.bench_merging_families            # 12 blocks, T = 8
    python -m benchmarks.bench_merging_families --quick    # 1 block, 1 repeat

The references are loaded as in the parity tests (tests/reference_impls.py).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

from benchmarks.bench_merging import reset_peak, rss, vit_b32_shapes

METHODS = ("iso_c", "iso_cts", "tsv", "magmax", "consensus", "della", "model_stock",
           "slerp")


def _device_peak(side: str) -> int | None:
    """Peak accelerator bytes in use, if the run is on one (else ``None``: host RSS)."""
    if side == "torch":
        import torch
        return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None
    import jax
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return None
    stats = dev.memory_stats() or {}
    return int(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else None


def _jax_fn(method, base, taus):
    import jax
    from taskvec_jax import merging as M
    key = jax.random.key(0)
    table = {
        "iso_c": lambda: M.iso_c(base, taus, alpha=1.0),
        "iso_cts": lambda: M.iso_cts(base, taus, common_space_fraction=0.8),
        "tsv": lambda: M.tsv(base, taus),
        "magmax": lambda: M.magmax(base, taus, alpha=0.5),
        "consensus": lambda: M.consensus(base, taus, min_tasks=2, mask_lambda=0.4),
        "della": lambda: M.della(base, taus, key=key, density=0.5, epsilon=0.1),
        "model_stock": lambda: M.model_stock(base, taus),
        "slerp": lambda: M.slerp(taus[0], taus[1], t=0.5),
    }
    return table[method]


def _torch_fn(method, base, taus):
    import torch
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    import reference_impls as R

    def quiet(fn, *a, **k):
        with contextlib.redirect_stdout(io.StringIO()):
            return fn(*a, **k)

    def add(merged, scale=1.0):
        return {k: base[k] + scale * merged[k] for k in base}

    def consensus():
        tall = R.fusion_bench_module("tall_mask")
        keys = list(base)
        flat = torch.stack([torch.cat([t[k].reshape(-1) for k in keys]) for t in taus])
        ptm = torch.cat([base[k].reshape(-1) for k in keys])
        masks = quiet(tall.generate_task_masks, flat, flat + ptm, ptm,
                      tall_mask_lambda=0.4)
        merged = flat.sum(0) * (masks.float().sum(0) >= 2)
        out, start = {}, 0
        for k in keys:
            n = base[k].numel()
            out[k] = base[k] + merged[start:start + n].view_as(base[k])
            start += n
        return out

    def mergekit(name, **params):
        from mergekit.merge_methods.api import merge_tensors
        ids = ["base"] + [f"t{i}" for i in range(len(taus))]
        return {k: merge_tensors([base[k]] + [base[k] + t[k] for t in taus], name,
                                 parameters=params or None, ids=ids, base_index=0)
                for k in base}

    table = {
        "iso_c": lambda: add(quiet(R.fusion_bench_module("iso").iso_c, taus,
                                   accelerator="cpu")),
        "iso_cts": lambda: add(quiet(R.fusion_bench_module("iso").iso_cts, taus, 0.8,
                                     accelerator="cpu")),
        "tsv": lambda: add(quiet(R.fusion_bench_module("tsvm")
                                 .compute_and_sum_svd_mem_reduction, taus,
                                 accelerator="cpu")),
        "magmax": lambda: add(R.fusion_bench_module("magmax")._magmax_select(taus), 0.5),
        "consensus": consensus,
        "della": lambda: mergekit("della", density=0.5, epsilon=0.1, weight=1.0),
        "model_stock": lambda: mergekit("model_stock"),
        "slerp": lambda: {k: R.fusion_bench_slerp()(0.5, taus[0][k], taus[1][k])
                          for k in base},
    }
    return table[method]


def worker(method: str, side: str, num_tasks: int, blocks: int,
           repeats: int) -> dict[str, Any]:
    shapes = vit_b32_shapes(blocks)
    n_params = int(sum(np.prod(s) for s in shapes.values()))
    model_bytes = 4 * n_params
    start_rss = rss("VmRSS")
    if side == "torch":
        import torch
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        torch.set_grad_enabled(False)
        torch.manual_seed(0)
        base = {k: torch.randn(s) for k, s in shapes.items()}
        taus = [{k: torch.randn(s).mul_(1e-3) for k, s in shapes.items()}
                for _ in range(num_tasks)]
        fn = _torch_fn(method, base, taus)
        block = lambda x: x  # noqa: E731
    else:
        import jax
        key = jax.random.key(0)
        normal = jax.jit(jax.random.normal, static_argnums=1)
        base = {k: normal(jax.random.fold_in(key, i), s)
                for i, (k, s) in enumerate(shapes.items())}
        taus = [{k: normal(jax.random.fold_in(key, 1000 * (t + 1) + i), s) * 1e-3
                 for i, (k, s) in enumerate(shapes.items())} for t in range(num_tasks)]
        fn = _jax_fn(method, base, taus)
        block = jax.block_until_ready
    inputs_rss = rss("VmRSS")
    block(fn())                              # warm-up (compilation)
    seconds, extra = [], []
    for _ in range(repeats):
        before = rss("VmRSS")
        reset_peak()
        t0 = time.perf_counter()
        out = block(fn())
        seconds.append(time.perf_counter() - t0)
        extra.append(rss("VmHWM") - before)
        del out
    device_peak = _device_peak(side)
    if device_peak is not None:
        extra = [device_peak - (num_tasks + 1) * model_bytes]
    return {"method": method, "side": side, "num_tasks": num_tasks, "params": n_params,
            "model_bytes": model_bytes, "seconds": seconds,
            "inputs_bytes": inputs_rss - start_rss,
            "peak_bytes": (num_tasks + 1) * model_bytes + max(extra)}


def run(quick: bool = False, methods=None) -> list[dict[str, Any]]:
    blocks, repeats, t = (1, 1, 8) if quick else (12, 3, 8)
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    results = {}
    for method in methods or METHODS:
        for side in ("jax", "torch"):
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.bench_merging_families", "--worker",
                 method, "--side", side, "--tasks", str(t), "--blocks", str(blocks),
                 "--repeats", str(repeats)],
                cwd=root, capture_output=True, text=True,
                env={**os.environ, "XLA_FLAGS": os.environ.get("BENCH_XLA_FLAGS", ""),
                     "PYTHONPATH": root})
            if proc.returncode:
                raise RuntimeError(f"{method}/{side} failed:\n{proc.stderr[-3000:]}")
            results[(method, side)] = json.loads(proc.stdout.strip().splitlines()[-1])
    return summarize(results)


def summarize(results: dict) -> list[dict[str, Any]]:
    from benchmarks.harness import Stats
    out = []
    for (method, side), r in results.items():
        if side != "jax" or (method, "torch") not in results:
            continue
        tr = results[(method, "torch")]
        mb, t = r["model_bytes"], r["num_tasks"]
        js, ts = Stats.of(r["seconds"]), Stats.of(tr["seconds"])
        setting = (f"T={t}, {r['params'] / 1e6:.1f}M float32 params (ViT-B/32 shapes), "
                   "torch CPU reference on the same machine")
        out.append({"name": f"{method}: time / reference PyTorch time", "setting": setting,
                    "ratio": Stats(js.min / ts.max, js.median / ts.median,
                                   js.max / ts.min),
                    "target": "(informational)", "ok": None,
                    "extra": {"seconds": js.median, "torch_seconds": ts.median}})
        peak, tpeak = r["peak_bytes"] / mb, tr["peak_bytes"] / mb
        out.append({"name": f"{method}: peak memory / model bytes", "setting":
                    f"inputs T+1 = {t + 1} models + the call's VmHWM rise; reference "
                    f"{tpeak:.1f}", "ratio": Stats(peak, peak, peak),
                    "target": f"<= reference ({tpeak:.1f})", "ok": peak <= tpeak + 0.25,
                    "extra": {"torch_peak_models": tpeak}})
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker")
    parser.add_argument("--side", default="jax")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--methods", default=None)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.side, args.tasks, args.blocks,
                                args.repeats)))
    else:
        methods = args.methods.split(",") if args.methods else None
        for e in run(args.quick, methods):
            print(f"{e['name']:45s} {e['ratio'].fmt()}  target {e['target']}  "
                  f"{json.dumps(e['extra'])}")
