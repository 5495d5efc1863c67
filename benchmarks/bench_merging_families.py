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
* TIES with count consensus: mergekit's generalized task arithmetic with
  ``consensus: count`` and magnitude sparsification (its ``ties`` with ``consensus:
  count``), tensor by tensor, against ``ties(..., scope="leaf", consensus="count")``;
* Model Stock: mergekit's ``model_stock``; SLERP: FusionBench's per-tensor ``slerp``.

Figures: time / PyTorch time (median over repeats) and peak memory in model copies
(inputs: ``T + 1`` models, plus the call's rise in VmHWM). Targets: time <= 1x the
reference, peak <= T + 3 model copies (as benchmarks/bench_merging.py).

Sizes. Every leaf has ViT-B/32's shape, and every method works leaf by leaf, so both
figures are per-leaf quantities that do not depend on the number of blocks. The SVD
methods (Iso-C, Iso-CTS, TSV-M: several SVDs of every 768 x 3072 matrix per task) run on
one block of the 12 (9.9M parameters) and time their first call on both sides (the
compilation inside it is under 1 s of tens of seconds); the others run on two blocks
(17.0M parameters) with a warm-up call excluded from the timing.

FusionBench's ``iso_cts`` calls LAPACK's float32 SVD on rank-deficient matrices (the task
vectors with the common subspace projected out), which at these shapes fails to converge
on about one matrix in fifty (``torch._C._LinAlgError``); the benchmark retries exactly
those SVDs in float64 (cast back to float32) and reports how many it retried.

    python -m benchmarks.bench_merging_families            # full form (see Sizes)
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

from benchmarks.bench_merging import (jax_inputs, reset_peak, rss, torch_inputs,
                                      vit_b32_shapes)

METHODS = ("iso_c", "iso_cts", "tsv", "magmax", "consensus", "della", "ties_count",
           "model_stock", "slerp")
SVD_METHODS = ("iso_c", "iso_cts", "tsv")


def sizes(method: str, quick: bool) -> tuple[int, int, int]:
    """``(blocks, repeats, warmup calls)`` of one method's worker (see the module doc)."""
    if method in SVD_METHODS:
        return 1, 1, 0
    return (1, 1, 1) if quick else (2, 2, 1)


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
        "ties_count": lambda: M.ties(base, taus, density=0.2, scope="leaf",
                                     consensus="count"),
        "model_stock": lambda: M.model_stock(base, taus),
        "slerp": lambda: M.slerp(taus[0], taus[1], t=0.5),
    }
    return table[method]


_SVD_RETRIES = [0]


def _svd_with_float64_retry():
    """``torch.linalg.svd`` that redoes a float32 SVD LAPACK fails to converge on in
    float64 (cast back): FusionBench's ``iso_cts`` otherwise stops on such a matrix."""
    import torch
    svd = torch.linalg.svd

    def wrapped(a, *args, **kwargs):
        try:
            return svd(a, *args, **kwargs)
        except torch.linalg.LinAlgError:
            _SVD_RETRIES[0] += 1
            return tuple(r.to(a.dtype) for r in svd(a.double(), *args, **kwargs))

    return wrapped


def _torch_fn(method, base, taus):
    import torch

    from tests import reference_impls as R

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

    def ties_count():
        from mergekit.merge_methods.generalized_task_arithmetic import (
            ConsensusMethod, GeneralizedTaskArithmeticMerge)
        from mergekit.sparsify import SparsificationMethod
        count = GeneralizedTaskArithmeticMerge(
            consensus_method=ConsensusMethod.count,
            sparsification_method=SparsificationMethod.magnitude, default_normalize=True,
            default_rescale=False, method_name="ties_count", method_pretty_name=None,
            method_reference_url=None)
        return mergekit(count, density=0.2, weight=1.0)

    if method == "iso_cts":
        iso = R.fusion_bench_module("iso")
        iso.torch = _TorchWithRetry(torch, _svd_with_float64_retry())

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
        "ties_count": ties_count,
        "model_stock": lambda: mergekit("model_stock"),
        "slerp": lambda: {k: R.fusion_bench_slerp()(0.5, taus[0][k], taus[1][k])
                          for k in base},
    }
    return table[method]


class _TorchWithRetry:
    """The ``torch`` module as FusionBench's iso module sees it, with ``linalg.svd``
    retried in float64 where float32 fails (everything else is torch's own)."""

    def __init__(self, torch, svd):
        import types
        self._torch = torch
        self.linalg = types.SimpleNamespace(**{k: getattr(torch.linalg, k)
                                               for k in dir(torch.linalg)
                                               if not k.startswith("_")})
        self.linalg.svd = svd

    def __getattr__(self, name):
        return getattr(self._torch, name)


def worker(method: str, side: str, num_tasks: int, blocks: int, repeats: int,
           warmup: int = 1) -> dict[str, Any]:
    shapes = vit_b32_shapes(blocks)
    n_params = int(sum(np.prod(s) for s in shapes.values()))
    model_bytes = 4 * n_params
    start_rss = rss("VmRSS")
    if side == "torch":
        import torch
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        torch.set_grad_enabled(False)
        torch.manual_seed(0)
        base, taus = torch_inputs(shapes, num_tasks)
        fn = _torch_fn(method, base, taus)
        block = lambda x: x  # noqa: E731
    else:
        import jax
        base, taus = jax_inputs(shapes, num_tasks)
        fn = _jax_fn(method, base, taus)
        block = jax.block_until_ready
    inputs_rss = rss("VmRSS")
    for _ in range(warmup):                  # warm-up (compilation)
        block(fn())
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
            "inputs_bytes": inputs_rss - start_rss, "warmup": warmup,
            "svd_float64_retries": _SVD_RETRIES[0],
            "peak_bytes": (num_tasks + 1) * model_bytes + max(extra)}


def run(quick: bool = False, methods=None) -> list[dict[str, Any]]:
    t = 8
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    results = {}
    for method in methods or METHODS:
        blocks, repeats, warmup = sizes(method, quick)
        for side in ("jax", "torch"):
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.bench_merging_families", "--worker",
                 method, "--side", side, "--tasks", str(t), "--blocks", str(blocks),
                 "--repeats", str(repeats), "--warmup", str(warmup)],
                cwd=root, capture_output=True, text=True,
                env={**os.environ, "XLA_FLAGS": os.environ.get("BENCH_XLA_FLAGS", ""),
                     "PYTHONPATH": root})
            if proc.returncode:   # one failing side is reported as a row, not a crash
                last = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{method}/{side} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                results[(method, side)] = {"error": last[:200]}
                continue
            results[(method, side)] = json.loads(proc.stdout.strip().splitlines()[-1])
    return summarize(results) + (della_ranking(quick) if "della" in (methods or METHODS)
                                 else [])


def summarize(results: dict) -> list[dict[str, Any]]:
    from benchmarks.harness import Stats
    out = []
    for (method, side), r in results.items():
        if side != "jax" or (method, "torch") not in results:
            continue
        tr = results[(method, "torch")]
        failed = [f"{sd}: {x['error']}" for sd, x in (("jax", r), ("torch", tr))
                  if "error" in x]
        if failed:
            out.append({"name": f"{method}: time / reference PyTorch time",
                        "setting": "failed: " + "; ".join(failed), "ratio": None,
                        "target": "<= 1", "ok": False, "extra": {}})
            continue
        mb, t = r["model_bytes"], r["num_tasks"]
        js, ts = Stats.of(r["seconds"]), Stats.of(tr["seconds"])
        timing = (f"{len(r['seconds'])} repeat(s)"
                  + (", first call (compilation included)" if not r.get("warmup", 1)
                     else " after a warm-up call"))
        retries = tr.get("svd_float64_retries", 0)
        setting = (f"T={t}, {r['params'] / 1e6:.1f}M float32 params (ViT-B/32 leaf shapes, "
                   f"{_blocks(r['params'])} of 12 blocks), vs {REFERENCES[method]}, torch "
                   f"CPU, same machine; {timing}"
                   + (f"; {retries} reference SVD(s) redone in float64 (LAPACK float32 "
                      "did not converge)" if retries else ""))
        out.append({"name": f"{method}: time / reference PyTorch time", "setting": setting,
                    "ratio": Stats(js.min / ts.max, js.median / ts.median,
                                   js.max / ts.min),
                    "target": "<= 1", "ok": js.median <= ts.median,
                    "extra": {"seconds": js.median, "torch_seconds": ts.median,
                              "torch_svd_float64_retries": retries}})
        peak, tpeak = r["peak_bytes"] / mb, tr["peak_bytes"] / mb
        out.append({"name": f"{method}: peak memory / model bytes", "setting":
                    f"inputs T+1 = {t + 1} models + the call's VmHWM rise; the reference's "
                    f"peak {tpeak:.1f}", "ratio": Stats(peak, peak, peak),
                    "target": f"<= T+3 = {t + 3}", "ok": peak <= t + 3,
                    "extra": {"torch_peak_models": tpeak}})
    return out


def della_ranking(quick: bool = False) -> list[dict[str, Any]]:
    """Where DELLA's time goes: ranking one weight's magnitudes per output, vs mergekit.

    ``della_keep_probabilities`` of a ViT-B/32 MLP kernel (flax ``[3072, 768]``: 768
    groups of 3072) against mergekit's ``della_magprune`` ranking
    (``argsort(argsort(|W|, dim=1), dim=1)`` on the torch ``[768, 3072]`` weight), and
    against the same ranking with a float-keyed ``jnp.argsort`` (the form before the
    integer-keyed sort), all in one process, timed in alternation.
    """
    import jax
    import jax.numpy as jnp
    import torch

    from benchmarks.harness import ratio
    from taskvec_jax import merging as M
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    shape = (768, 768) if quick else (3072, 768)
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    xj, xt = {"w": jnp.asarray(x)}, torch.from_numpy(x.T.copy())
    ours = lambda: M.della_keep_probabilities(xj, density=0.5, epsilon=0.1)  # noqa: E731

    @jax.jit
    def float_keyed(v):       # the previous ranking: stable float argsort + one scatter
        vt = v.T
        order = jnp.argsort(jnp.abs(vt), axis=-1, stable=True)
        rows = jnp.arange(vt.shape[0])[:, None]
        n = vt.shape[1]
        rank = jnp.zeros(vt.shape, jnp.int32).at[rows, order].set(
            jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None, :], vt.shape))
        return 0.4 + rank.T.astype(v.dtype) * (0.2 / (n - 1))

    def mergekit_rank():
        return torch.argsort(xt.abs(), dim=1).argsort(dim=1).to(torch.float32) + 1

    repeats = 3 if quick else 7
    r, tj, tt = ratio(ours, mergekit_rank, repeats=repeats)
    rf, tf, tj2 = ratio(lambda: float_keyed(xj["w"]), ours, repeats=repeats)
    setting = (f"one flax [{shape[0]}, {shape[1]}] float32 kernel ({shape[1]} groups of "
               f"{shape[0]}), torch CPU on the same machine")
    return [{"name": "della ranking / mergekit's two argsorts (time)", "setting": setting,
             "ratio": r, "target": "(informational)", "ok": None,
             "extra": {"jax_s": tj.median, "torch_s": tt.median}},
            {"name": "della ranking: float-keyed argsort / integer-keyed sort (time)",
             "setting": setting + "; the speed-up of the integer keys", "ratio": rf,
             "target": "(informational)", "ok": None,
             "extra": {"float_keyed_s": tf.median, "integer_keyed_s": tj2.median}}]


REFERENCES = {
    "iso_c": "FusionBench iso_c", "iso_cts": "FusionBench iso_cts",
    "tsv": "FusionBench compute_and_sum_svd_mem_reduction",
    "magmax": "FusionBench _magmax_select", "consensus": "FusionBench generate_task_masks",
    "della": "mergekit della", "ties_count": "mergekit ties, consensus: count",
    "model_stock": "mergekit model_stock", "slerp": "FusionBench slerp",
}


def _blocks(params: int) -> int:
    """The number of ViT-B/32 blocks a parameter count stands for."""
    per_block = sum(int(np.prod(s)) for k, s in vit_b32_shapes(1).items()
                    if k.startswith("block0/"))
    stem = sum(int(np.prod(s)) for s in vit_b32_shapes(0).values())
    return (params - stem) // per_block


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker")
    parser.add_argument("--side", default="jax")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--methods", default=None)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.side, args.tasks, args.blocks,
                                args.repeats, args.warmup)))
    else:
        methods = args.methods.split(",") if args.methods else None
        for e in run(args.quick, methods):
            print(f"{e['name']:45s} {e['ratio'].fmt()}  target {e['target']}  "
                  f"{json.dumps(e['extra'])}")
