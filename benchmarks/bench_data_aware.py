"""Data-aware merging at ViT-B/32 shapes: Gram collection, Fisher, AdaMerging vs torch.

The model is the linear skeleton of CLIP ViT-B/32's image tower: per block
``x + out(qkv(ln(x))[..., :768])`` then ``x + proj(gelu(fc(ln(x))))`` with the real layer
shapes (768 -> 2304, 768 -> 768, 768 -> 3072, 3072 -> 768), 50 tokens per image, a 768 -> 512
projection of the class token and a 512 -> 10 head; attention's softmax mixing is left out
(it has no parameters and does not touch what is measured). The same model is written in
flax linen and in torch, with the same weights, and each JAX figure is timed in alternation
with the torch form FusionBench uses (fusion_bench/method/{regmean,fisher_merging,
adamerging}):

* Gram collection per example: ``regmean_grams`` vs forward hooks on every ``nn.Linear``
  accumulating ``x^T x`` (FusionBench's ``compute_regmean_weights`` hook);
* diagonal Fisher per example: ``diagonal_fisher`` (vmapped per-example gradients) vs a
  torch loop of per-example ``backward()`` + squared ``.grad`` (FusionBench's
  ``get_param_squared_gradients`` at batch size 1: the exact per-example Fisher);
* AdaMerging step: ``adamerging`` (one scan step, layer-wise, T task vectors) vs
  ``torch.func.functional_call`` on ``base + sum_t lambda_t tau_t`` built per step, entropy,
  ``backward`` and an Adam step (FusionBench's layer-wise AdaMerging).

    python -m benchmarks.bench_data_aware            # 12 blocks (88M parameters; AdaMerging 4)
    python -m benchmarks.bench_data_aware --quick    # 2 blocks

Register in benchmarks/run.py as suite ``"data_aware"`` (``run(quick) -> entries``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np

WIDTH, MLP_WIDTH, TOKENS, EMBED, CLASSES = 768, 3072, 50, 512, 10
ADAMERGING_BLOCKS = 4


def _jax_model(blocks: int):
    import flax.linen as nn

    class Skeleton(nn.Module):
        @nn.compact
        def __call__(self, x):                       # x: [B, TOKENS, WIDTH]
            for b in range(blocks):
                h = nn.LayerNorm(name=f"ln1_{b}")(x)
                h = nn.Dense(3 * WIDTH, name=f"qkv_{b}")(h)[..., :WIDTH]
                x = x + nn.Dense(WIDTH, name=f"out_{b}")(h)
                h = nn.gelu(nn.Dense(MLP_WIDTH, name=f"fc_{b}")(nn.LayerNorm(name=f"ln2_{b}")(x)))
                x = x + nn.Dense(WIDTH, name=f"proj_{b}")(h)
            z = nn.Dense(EMBED, use_bias=False, name="embed")(x[:, 0])
            return nn.Dense(CLASSES, name="head")(z)

    return Skeleton()


def _torch_model(blocks: int):
    import torch
    from torch import nn

    class Skeleton(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.ModuleDict(dict(
                ln1=nn.LayerNorm(WIDTH, eps=1e-6), qkv=nn.Linear(WIDTH, 3 * WIDTH),
                out=nn.Linear(WIDTH, WIDTH), ln2=nn.LayerNorm(WIDTH, eps=1e-6),
                fc=nn.Linear(WIDTH, MLP_WIDTH), proj=nn.Linear(MLP_WIDTH, WIDTH)))
                for _ in range(blocks)])
            self.embed = nn.Linear(WIDTH, EMBED, bias=False)
            self.head = nn.Linear(EMBED, CLASSES)

        def forward(self, x):
            for blk in self.blocks:
                x = x + blk["out"](blk["qkv"](blk["ln1"](x))[..., :WIDTH])
                x = x + blk["proj"](torch.nn.functional.gelu(blk["fc"](blk["ln2"](x)),
                                                          approximate="tanh"))
            return self.head(self.embed(x[:, 0]))

    return Skeleton()


def _entries(quick: bool) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp
    import optax
    import torch

    import taskvec_jax as tvj
    from benchmarks.harness import Stats, ratio

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    blocks = 2 if quick else 12
    n_gram, n_fisher, batch, num_tasks = (8, 4, 2, 2) if quick else (16, 8, 4, 8)
    repeats = 3
    rng = np.random.default_rng(0)
    model = _jax_model(blocks)
    x = rng.normal(size=(n_gram, TOKENS, WIDTH)).astype(np.float32)
    labels = rng.integers(0, CLASSES, size=n_gram)
    params = model.init(jax.random.key(0), jnp.asarray(x[:1]))["params"]
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    tmodel = _torch_model(blocks)
    _copy_weights(params, tmodel, blocks)
    tx, tlabels = torch.from_numpy(x), torch.from_numpy(labels)
    with torch.no_grad():     # the two forms compute the same function
        np.testing.assert_allclose(tmodel(tx[:2]).numpy(),
                                   np.asarray(model.apply({"params": params}, x[:2])),
                                   rtol=2e-3, atol=2e-3)
    setting = f"{blocks} blocks, {n_params / 1e6:.1f}M params, {TOKENS} tokens, float32, CPU"
    out = []

    # Gram collection --------------------------------------------------------------
    apply = lambda p, b: model.apply({"params": p}, b)          # noqa: E731
    xj = jnp.asarray(x)
    jax_grams = lambda: tvj.merging.regmean_grams(apply, params, xj, microbatch_size=4)  # noqa

    def torch_grams():
        grams, counts, handles = {}, {}, []

        def hook(name):
            def fn(module, inputs, output):
                h = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
                g = h.T @ h
                grams[name] = g if name not in grams else grams[name] + g
                counts[name] = counts.get(name, 0) + h.shape[0]
            return fn

        for name, m in tmodel.named_modules():
            if isinstance(m, torch.nn.Linear):
                handles.append(m.register_forward_hook(hook(name)))
        with torch.no_grad():
            for i in range(0, n_gram, 4):
                tmodel(tx[i:i + 4])
        for h in handles:
            h.remove()
        return grams

    r, tj, tt = ratio(jax_grams, torch_grams, repeats=repeats)
    out.append({"name": "regmean_grams / torch forward hooks (time)", "setting":
                f"{setting}, {n_gram} examples in chunks of 4; per example "
                f"{1e3 * tj.median / n_gram:.0f} ms vs {1e3 * tt.median / n_gram:.0f} ms",
                "ratio": r,
                "target": "<= 1.5", "ok": r.median <= 1.5,
                "extra": {"jax_ms_per_example": 1e3 * tj.median / n_gram,
                          "torch_ms_per_example": 1e3 * tt.median / n_gram}})

    # Diagonal Fisher --------------------------------------------------------------
    data = {"x": xj[:n_fisher], "y": jnp.asarray(labels[:n_fisher])}

    def loss_fn(p, b):
        logp = jax.nn.log_softmax(apply(p, b["x"]))
        return -jnp.mean(jnp.take_along_axis(logp, b["y"][:, None], 1))

    jax_fisher = lambda: tvj.merging.diagonal_fisher(loss_fn, params, data,   # noqa: E731
                                                     microbatch_size=2)

    def torch_fisher():
        total = None
        for i in range(n_fisher):
            tmodel.zero_grad()
            logits = tmodel(tx[i:i + 1])
            torch.nn.functional.cross_entropy(logits, tlabels[i:i + 1]).backward()
            sq = [p.grad.detach() ** 2 for p in tmodel.parameters()]
            total = sq if total is None else [a + b for a, b in zip(total, sq)]
        return [t / n_fisher for t in total]

    r, tj, tt = ratio(jax_fisher, torch_fisher, repeats=repeats)
    out.append({"name": "diagonal_fisher / torch per-example backward (time)", "setting":
                f"{setting}, {n_fisher} examples, vmapped in chunks of 2; per example "
                f"{1e3 * tj.median / n_fisher:.0f} ms vs {1e3 * tt.median / n_fisher:.0f} ms",
                "ratio": r,
                "target": "<= 1.5", "ok": r.median <= 1.5,
                "extra": {"jax_ms_per_example": 1e3 * tj.median / n_fisher,
                          "torch_ms_per_example": 1e3 * tt.median / n_fisher}})

    # AdaMerging step --------------------------------------------------------------
    # On ADAMERGING_BLOCKS blocks (T task vectors of the whole 12-block model would need
    # 2 x T x 0.35 GB on the two sides); the step is per block, like the model.
    ada_blocks = min(blocks, ADAMERGING_BLOCKS)
    if ada_blocks != blocks:
        model = _jax_model(ada_blocks)
        params = model.init(jax.random.key(0), jnp.asarray(x[:1]))["params"]
        tmodel = _torch_model(ada_blocks)
        _copy_weights(params, tmodel, ada_blocks)
        apply = lambda p, b: model.apply({"params": p}, b)      # noqa: E731
    ada_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    taus = [jax.tree.map(lambda p: 1e-3 * jax.random.normal(jax.random.key(t), p.shape,
                                                             p.dtype), params)
            for t in range(num_tasks)]
    xa = rng.normal(size=(num_tasks * batch, TOKENS, WIDTH)).astype(np.float32)
    inputs = [jnp.asarray(xa[t * batch:(t + 1) * batch]) for t in range(num_tasks)]
    opt = optax.adam(1e-3)

    def jax_steps(k):
        return tvj.merging.adamerging(params, taus, apply, inputs, granularity="layer",
                                      num_steps=k, optimizer=opt).losses

    names = [n for n, _ in tmodel.named_parameters()]
    base_t = {n: p.detach().clone() for n, p in tmodel.named_parameters()}
    taus_t = [{n: 1e-3 * torch.randn_like(p) for n, p in base_t.items()}
              for _ in range(num_tasks)]
    lam = torch.full((num_tasks, len(names)), 0.3, requires_grad=True)
    topt = torch.optim.Adam([lam], lr=1e-3)
    tinputs = [torch.from_numpy(xa[t * batch:(t + 1) * batch]) for t in range(num_tasks)]

    def torch_steps(k):
        for _ in range(k):
            merged = {n: base_t[n] + sum(lam[t, j] * taus_t[t][n] for t in range(num_tasks))
                      for j, n in enumerate(names)}
            loss = 0.0
            for xt in tinputs:
                logits = torch.func.functional_call(tmodel, merged, (xt,))
                logp = torch.log_softmax(logits, -1)
                loss = loss + (-(logp.exp() * logp).sum(-1)).mean()
            topt.zero_grad()
            loss.backward()
            topt.step()
        return loss

    # Per-step time: (k = 3 steps) - (k = 1 step), which cancels compilation-free setup
    # (adamerging's program is compiled once per k by the warmup).
    steps = 3
    r3, j3, t3 = ratio(lambda: jax_steps(steps), lambda: torch_steps(steps), repeats=repeats)
    r1, j1, t1 = ratio(lambda: jax_steps(1), lambda: torch_steps(1), repeats=repeats)
    jstep = (j3.median - j1.median) / (steps - 1)
    tstep = (t3.median - t1.median) / (steps - 1)
    out.append({"name": "adamerging step / torch functional_call step (time)", "setting":
                f"{ada_blocks} blocks, {ada_params / 1e6:.1f}M params, {TOKENS} tokens, "
                f"float32, CPU, layer-wise, T={num_tasks}, {batch} inputs per task per step; "
                f"per step {1e3 * jstep:.0f} ms vs {1e3 * tstep:.0f} ms",
                "ratio": Stats.of([jstep / tstep]), "target": "<= 1.5",
                "ok": jstep / tstep <= 1.5,
                "extra": {"jax_step_ms": 1e3 * jstep, "torch_step_ms": 1e3 * tstep,
                          "ratio_at_3_steps_incl_setup": r3.median}})
    return out


def _copy_weights(params, tmodel, blocks: int) -> None:
    """The torch skeleton gets the flax weights (kernels transposed to [out, in])."""
    import torch

    def set_linear(lin, p):
        lin.weight.data = torch.from_numpy(np.asarray(p["kernel"]).T.copy())
        if "bias" in p:
            lin.bias.data = torch.from_numpy(np.asarray(p["bias"]).copy())

    for b in range(blocks):
        blk = tmodel.blocks[b]
        for name in ("qkv", "out", "fc", "proj"):
            set_linear(blk[name], params[f"{name}_{b}"])
        for name in ("ln1", "ln2"):
            ln = params[f"{name}_{b}"]
            blk[name].weight.data = torch.from_numpy(np.asarray(ln["scale"]).copy())
            blk[name].bias.data = torch.from_numpy(np.asarray(ln["bias"]).copy())
    set_linear(tmodel.embed, params["embed"])
    set_linear(tmodel.head, params["head"])


def run(quick: bool = False) -> list[dict[str, Any]]:
    return _entries(quick)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    for e in run(quick=args.quick):
        r = e["ratio"]
        print(json.dumps({"name": e["name"], "setting": e["setting"],
                          "ratio": {"median": r.median, "min": r.min, "max": r.max},
                          "target": e["target"], "ok": e["ok"], "extra": e["extra"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
