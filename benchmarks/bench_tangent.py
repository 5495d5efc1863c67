"""Cost of the tangent space: a linearized epoch vs a nonlinear one, and the NTK Gram.

1. ``time(epoch of tvj.finetune on f_lin) / time(epoch on f)``, same data, optimizer and
   batch size (full batch and minibatch). A linearized forward is one jvp (primal and
   tangent together, ~2 forward passes); its gradient transposes that linear map, so the
   floor is ~2x and the target 2.5x.
2. ``time(empirical_ntk on a batch of B) / time(B * O batched jvps over the batch)``: the
   Gram's jvp stage alone is those B * O jvps over B examples (B^2 * O example-jvps); the
   rest is the B * O per-example vjps that build J's rows. Target <= 3 (informational).

    python -m benchmarks.bench_tangent [--quick]
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import taskvec_jax as tvj
from benchmarks.harness import ratio
from taskvec_jax.models import MLP, make_loss_fn


def _data(n: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return {"image": jnp.asarray(rng.normal(size=(n, d)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, 10, n), jnp.int32)}


def epoch_ratio(quick: bool = False) -> list[dict[str, Any]]:
    """Linearized / nonlinear epoch time of an MLP, full batch and minibatch."""
    n, d, width = (1024, 256, 256) if quick else (4096, 784, 512)
    if jax.devices()[0].platform != "cpu" and not quick:
        n, d, width = 16384, 1024, 2048
    data = _data(n, d)
    model = MLP((width, width, 10), "tanh")
    params = model.init(jax.random.key(0), data["image"][:1])["params"]
    apply_fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    nonlinear = make_loss_fn(apply_fn)
    linearized = make_loss_fn(tvj.linearize(apply_fn, params))
    opt = optax.sgd(1e-3)
    out = []
    for mode, kw, epochs in (("full batch", {}, 5),
                             ("minibatch B=128", {"batch_size": 128,
                                                  "key": jax.random.key(1)}, 1)):
        def run(loss_fn, kw=kw, epochs=epochs):
            return tvj.finetune(loss_fn, params, data, opt, epochs, record_gradients=False,
                                keep_epochs=[epochs], **kw).params
        r, t_lin, t_nl = ratio(lambda: run(linearized), lambda: run(nonlinear),
                               repeats=3 if quick else 7, warmup=1)
        out.append({"name": f"linearized / nonlinear epoch time ({mode})",
                    "setting": f"MLP {d}-{width}-{width}-10 tanh, N={n}, {mode}, float32",
                    "ratio": r, "target": "<= 2.5", "ok": r.median <= 2.5,
                    "extra": {"linearized_s": t_lin.median, "nonlinear_s": t_nl.median}})
    return out


def ntk_ratio(quick: bool = False) -> dict[str, Any]:
    """NTK Gram of a batch of B vs the B * O batched jvps its jvp stage needs."""
    b, d, width, o = (32, 64, 128, 10) if quick else (64, 256, 256, 10)
    x = _data(b, d)["image"]
    model = MLP((width, width, o), "tanh")
    params = model.init(jax.random.key(0), x[:1])
    params = params["params"]
    apply_fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    tangents = jax.tree.map(lambda a: jnp.broadcast_to(a, (b * o,) + a.shape),
                            tvj.tree.scale(1e-2, params))
    # B * O jvps over the whole batch, one vmapped program (the Gram's jvp stage).
    jvps = jax.jit(lambda p, v: jax.vmap(
        lambda t: jax.jvp(lambda q: apply_fn(q, x), (p,), (t,))[1])(v))
    gram = lambda: tvj.tangent.empirical_ntk(apply_fn, params, x)  # noqa: E731
    r, t_gram, t_jvp = ratio(gram, lambda: jvps(params, tangents),
                             repeats=3 if quick else 7, warmup=1)
    return {"name": "NTK Gram / (B * O batched jvps)",
            "setting": f"MLP {d}-{width}-{width}-{o} tanh, B={b}, traced Gram [B, B], "
                       "float32",
            "ratio": r, "target": "<= 3 (informational)", "ok": None,
            "extra": {"gram_s": t_gram.median, "jvps_s": t_jvp.median}}


def run(quick: bool = False) -> list[dict[str, Any]]:
    return [*epoch_ratio(quick), ntk_ratio(quick)]


if __name__ == "__main__":
    for e in run(quick="--quick" in sys.argv[1:]):
        r = e["ratio"]
        print(f"{e['name']}: {r.fmt()}  target {e['target']}  [{e['setting']}]  "
              + "  ".join(f"{k}={v:.4g}" for k, v in e["extra"].items()))
