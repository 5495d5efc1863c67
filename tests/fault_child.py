"""Child processes for the fault tests: a zygote that forks one worker per command.

Run by path (``python tests/fault_child.py``). It imports JAX, orbax and the library once
(seconds) but never initializes a JAX backend, then for each JSON command read from stdin
forks the workers it names, prints their pids, waits for them and prints their exit
statuses. The test
SIGKILLs workers at random moments; a fork costs milliseconds where a fresh interpreter
costs a JAX import.

Every worker reports progress by appending lines to ``progress`` (one ``write`` each, so
a kill never leaves half a line that matters); ``_durable.crash_point`` is replaced by a
hook that records the stage and pauses a seeded random time, so that kills land between
the critical steps (staging written, flushed, committed, pruned).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
import optax  # noqa: E402

from taskvec_jax import _durable, checkpoint  # noqa: E402
from taskvec_jax.training import resumable  # noqa: E402

if os.environ.get("FAULT_CHILD_DATA"):
    import PIL.Image  # noqa: E402,F401
    import tensorflow_datasets  # noqa: E402,F401

    from taskvec_jax import data  # noqa: E402,F401


def _log(progress: str, line: str) -> None:
    fd = os.open(progress, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _slow_hook(progress: str, seed: int, max_pause: float, label=lambda: ""):
    rng = random.Random(seed)

    def crash_point(stage: str) -> None:
        _log(progress, f"stage {stage}{label()}")
        time.sleep(rng.uniform(0.0, max_pause))

    return crash_point


def save_tree(i: int) -> dict:
    """Tree number ``i``: every leaf determined by ``i``, an optax state and ``None``
    included. Numpy only: no JAX computation, so nothing compiles in a worker."""
    rng = np.random.default_rng(i)
    params = {"w": rng.normal(size=(6, 5)), "b": rng.normal(size=(5,)).astype(np.float32)}
    state = (optax.ScaleByAdamState(count=np.asarray(i, np.int32),
                                    mu=jax.tree.map(lambda x: x * 0.5, params),
                                    nu=jax.tree.map(np.square, params)),
             optax.EmptyState())
    return {"i": np.asarray(i, np.int64), "params": params, "opt_state": state,
            "none": None}


def save_loop(path: str, progress: str, start: int, seed: int, max_pause: float) -> None:
    """Saves trees start, start+1, ... to ``path`` forever (until killed), after one
    warm-up save elsewhere (orbax's first save in a process is several times slower)."""
    checkpoint.save(path + ".warm", save_tree(start), overwrite=True)
    _durable.crash_point = _slow_hook(progress, seed, max_pause)
    _log(progress, "ready")
    i = start
    while True:
        _log(progress, f"start {i}")
        checkpoint.save(path, save_tree(i), overwrite=True)
        _log(progress, f"done {i}")
        i += 1


def save_once(path: str, progress: str, i: int, release: str) -> None:
    """One save of tree ``i`` that, once its staging is written (the lock held), waits
    until the file ``release`` exists (at most 30 s)."""
    def crash_point(stage: str) -> None:
        if stage == "written":
            _log(progress, f"written {i}")
            deadline = time.monotonic() + 30
            while not os.path.exists(release) and time.monotonic() < deadline:
                time.sleep(0.005)

    _durable.crash_point = crash_point
    _log(progress, f"start {i}")
    try:
        checkpoint.save(path, save_tree(i), overwrite=True)
    except BlockingIOError as e:
        _log(progress, f"refused {i} {json.dumps(str(e))}")
        return
    _log(progress, f"done {i}")


def _regression():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 8))
    y = x @ rng.normal(size=(8, 3)) + 0.1 * rng.normal(size=(24, 3))
    params = {"w": np.zeros((8, 3)), "b": np.zeros((3,))}

    def loss_fn(p, batch):
        pred = batch["x"] @ p["w"] + p["b"]
        return jax.numpy.mean((pred - batch["y"]) ** 2)

    return loss_fn, params, {"x": x, "y": y}


def finetune_run(directory: str, progress: str, num_epochs: int, seed: int,
                 max_pause: float) -> None:
    """``resumable_finetune`` (Adam, minibatches, one save per epoch) to ``num_epochs``."""
    loss_fn, params, batches = _regression()
    epoch = [0]
    _durable.crash_point = _slow_hook(progress, seed, max_pause,
                                      label=lambda: f" epoch {epoch[0]}")
    orig_save = resumable.save  # the name resumable_finetune calls

    def save(path, tree, **kw):
        epoch[0] = kw["metadata"]["epoch"]
        return orig_save(path, tree, **kw)

    resumable.save = save
    state, losses = resumable.resumable_finetune(
        loss_fn, params, batches, optax.adam(5e-2), num_epochs, directory, save_every=1,
        batch_size=8, key=jax.random.key(3))
    _log(progress, f"finished {state.epoch}")


def import_loop(folders: list[str], data_dir: str, progress: str, start: int, seed: int,
                max_pause: float) -> None:
    """Imports folders[start % 2], folders[(start+1) % 2], ... as gtsrb, forever, after
    a warm-up import elsewhere."""
    data.import_folder(folders[0], "gtsrb", data_dir=data_dir + ".warm", overwrite=True)
    _durable.crash_point = _slow_hook(progress, seed, max_pause)
    _log(progress, "ready")
    i = start
    while True:
        _log(progress, f"start {i}")
        data.import_folder(folders[i % 2], "gtsrb", data_dir=data_dir, overwrite=True)
        _log(progress, f"done {i}")
        i += 1


WORKERS = {"save_loop": save_loop, "save_once": save_once, "finetune_run": finetune_run,
           "import_loop": import_loop}


def main() -> None:
    """Per stdin line ``{"workers": [{"fn": name, "args": {...}}, ...]}``: forks them all,
    prints ``pids <pid> ...``, waits for all, prints ``exits <status> ...``."""
    print("ready", flush=True)
    while line := sys.stdin.readline():
        pids = []
        for command in json.loads(line)["workers"]:
            pid = os.fork()
            if pid == 0:  # the worker; its prints go to the log, never to the protocol
                os.dup2(2, 1)
                code = 0
                try:
                    WORKERS[command["fn"]](**command["args"])
                except BaseException as e:  # noqa: BLE001 - reported to the test
                    _log(command["args"]["progress"], f"error {type(e).__name__}: {e}")
                    code = 1
                os._exit(code)
            pids.append(pid)
        print("pids " + " ".join(map(str, pids)), flush=True)
        statuses = [os.waitpid(pid, 0)[1] for pid in pids]
        print("exits " + " ".join(map(str, statuses)), flush=True)


if __name__ == "__main__":
    main()
