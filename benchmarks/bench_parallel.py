"""Throughput of sharded finetune_tasks against the number of devices.

Each device count runs in its own process (XLA fixes the device count at start-up). On a
CPU the devices are faked with ``--xla_force_host_platform_device_count`` and share the
machine's cores, so the figure measures overhead, not speed-up; on a multi-GPU or TPU host
the real devices are used.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

WORKER = r"""
import json, sys, time
import jax, jax.numpy as jnp, numpy as np, optax
import taskvec_jax as tvj
from taskvec_jax.training import sharded
from taskvec_jax.models import MLP, make_loss_fn
devices, tasks, n, epochs = map(int, sys.argv[1:5])
rng = np.random.default_rng(0)
data = [{"image": jnp.asarray(rng.normal(size=(n, 28, 28, 1)), jnp.float32),
         "label": jnp.asarray(rng.integers(0, 10, n), jnp.int32)} for _ in range(tasks)]
model = MLP((256, 256, 10), "tanh")
params = model.init(jax.random.key(0), data[0]["image"][:1])["params"]
loss_fn = make_loss_fn(model)
mesh = sharded.make_mesh(devices, 1, devices=jax.devices()[:devices])
opt = optax.sgd(0.05)
run = lambda: jax.block_until_ready([t.params for t in tvj.finetune_tasks(
    loss_fn, params, data, opt, epochs, mesh=mesh, record_gradients=False,
    keep_epochs=[epochs])])
run()
best = min((lambda t0: (run(), time.perf_counter() - t0)[1])(time.perf_counter())
           for _ in range(5))
print(json.dumps({"devices": devices, "seconds": best,
                  "task_epochs_per_s": tasks * epochs / best,
                  "platform": jax.devices()[0].platform}))
"""


def run(quick: bool = False) -> list[dict[str, Any]]:
    from benchmarks.harness import Stats
    import jax
    platform = jax.devices()[0].platform
    available = jax.device_count() if platform != "cpu" else 8
    counts = [c for c in (1, 2, 4, 8) if c <= available]
    tasks, n, epochs = 8, (256 if quick else 1024), (10 if quick else 30)
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    rows = []
    for c in counts:
        env = dict(os.environ)
        if platform == "cpu":
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={c}"
        proc = subprocess.run([sys.executable, "-c", WORKER, str(c), str(tasks), str(n),
                               str(epochs)], cwd=root, env=env, capture_output=True,
                              text=True)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = rows[0]["task_epochs_per_s"]
    return [{"name": f"sharded finetune_tasks throughput, {r['devices']} device(s) / 1",
             "setting": f"T={tasks} tasks, MLP 784-256-256-10, N={n}, {epochs} full-batch "
                        f"epochs, mesh ({r['devices']} tasks x 1 data)"
                        + (", fake CPU devices sharing the machine's cores"
                           if r["platform"] == "cpu" else ""),
             "ratio": Stats(*(3 * [r["task_epochs_per_s"] / base])),
             "target": "(informational)", "ok": None,
             "extra": {"task_epochs_per_s": r["task_epochs_per_s"]}} for r in rows]
