"""Real processes SIGKILLed at random moments: no checkpoint, run or dataset is ever lost.

One zygote child (tests/fault_child.py) imports JAX, orbax and the library once and forks a
worker per trial, so a trial costs a fork, not a JAX import. Kill moments are drawn from a
seeded generator, counted in the worker's own progress lines (the n-th line, then a short
random delay) so that where kills land does not depend on the machine's speed or load; the
workers pause a seeded random time at each critical step (staging written, flushed,
committed by rename, old versions pruned; dataset prepared, moved away, swapped in) so
kills land between renames. Each test prints its trials, kills landed
(by the step they interrupted) and losses, and asserts no loss.
"""

import collections
import contextlib
import io
import json
import os
import select
import signal
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import PIL.Image
import pytest

from taskvec_jax import checkpoint, data
from taskvec_jax.data import __main__ as data_cli
from tests.fault_child import save_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = os.path.join(ROOT, "tests", "fault_child.py")


class Zygote:
    """The forking child: ``start(*workers)`` -> pids, ``wait()`` -> wait statuses."""

    def __init__(self, log_path: str):
        env = dict(os.environ, FAULT_CHILD_DATA="1",
                   PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
                   # workers share compiled programs: the finetune compiles once, not per kill
                   JAX_COMPILATION_CACHE_DIR=os.path.join(os.path.dirname(log_path), "xla"),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, CHILD], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log)
        self._buffer = b""
        assert self._line(120) == "ready"

    def _line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError(f"the fault-test child said nothing for {timeout} s")
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError("the fault-test child exited; see its log")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def start(self, *workers: tuple[str, dict]) -> list[int]:
        command = {"workers": [{"fn": fn, "args": args} for fn, args in workers]}
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        self.proc.stdin.flush()
        kind, *pids = self._line(30).split()
        assert kind == "pids"
        return [int(p) for p in pids]

    def wait(self, timeout: float = 60) -> list[int]:
        kind, *statuses = self._line(timeout).split()
        assert kind == "exits"
        return [int(s) for s in statuses]

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(os.fspath(tmp_path_factory.mktemp("zygote") / "child.log"))
    yield z
    z.close()


def _lines(progress) -> list[str]:
    if not os.path.exists(progress):
        return []
    with open(progress) as fh:
        return [line.rstrip("\n") for line in fh if line.endswith("\n")]


def _wait_for_lines(progress, n: int, timeout: float = 60) -> None:
    """Waits until ``progress`` holds ``n`` lines: a kill moment counted in the worker's own
    steps, so where kills land does not depend on how fast (or loaded) the machine is."""
    deadline = time.monotonic() + timeout
    while len(_lines(progress)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {n} lines in {progress}: {_lines(progress)[-5:]}")
        time.sleep(0.002)


def _killed(status: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _last_step(lines: list[str]) -> str:
    """What the worker was doing when killed: its last progress line, without numbers."""
    words = lines[-1].split() if lines else ["(before its first step)"]
    return " ".join(w for w in words[:2] if not w.lstrip("-").isdigit())


def _same_tree(a, b) -> bool:
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(np.asarray(x).dtype == np.asarray(y).dtype
               and np.asarray(x).tobytes() == np.asarray(y).tobytes()
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _report(name: str, trials: int, kills: int, steps: collections.Counter, losses: int):
    line = (f"{name}: {trials} trials, {kills} kills landed ("
            + ", ".join(f"{k}: {v}" for k, v in sorted(steps.items())) + f"), {losses} losses")
    print(line)
    return line


def test_sigkill_at_random_moments_of_saves_never_loses_the_checkpoint(zygote, tmp_path):
    """A worker overwrites one path in a loop; after each SIGKILL, restore returns, bit for
    bit, the last tree whose save returned or the one being saved; the next save works."""
    rng = np.random.default_rng(19)
    path = os.fspath(tmp_path / "ck")
    checkpoint.save(path, save_tree(0))
    committed, next_i = 0, 1
    trials, kills, losses, steps, seen = 24, 0, 0, collections.Counter(), []
    for trial in range(trials):
        progress = os.fspath(tmp_path / f"progress-{trial}")
        (pid,) = zygote.start(("save_loop", {"path": path, "progress": progress,
                                             "start": next_i, "seed": trial,
                                             "max_pause": 0.02}))
        _wait_for_lines(progress, int(rng.integers(2, 20)))  # "ready" is line 1
        time.sleep(rng.uniform(0.0, 0.02))
        os.kill(pid, signal.SIGKILL)
        (status,) = zygote.wait()
        lines = _lines(progress)
        assert not [l for l in lines if l.startswith("error")], lines
        kills += _killed(status)
        steps[_last_step(lines)] += 1
        done = [int(l.split()[1]) for l in lines if l.startswith("done")]
        started = [int(l.split()[1]) for l in lines if l.startswith("start")]
        allowed = {done[-1] if done else committed, started[-1]}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a fallback would mean a damaged version
                back = checkpoint.restore(path)
            k = int(back["i"])
            lost = k not in allowed or not _same_tree(back, save_tree(k))
        except Exception:  # noqa: BLE001 - any failure to restore is a loss
            lost, k = True, committed
        losses += lost
        seen.append(k)
        committed, next_i = k, started[-1] + 1
    checkpoint.save(path, save_tree(next_i), overwrite=True)  # a later save succeeds
    assert _same_tree(checkpoint.restore(path), save_tree(next_i))
    line = _report("checkpoint.save", trials, kills, steps, losses)
    print(f"  {next_i} trees saved in all, {len(set(seen))} distinct ones restored")
    assert set(os.listdir(path)) == {".lock", f"version-{_newest(path)}",
                                     f"version-{_newest(path) - 1}"}  # leftovers cleaned
    assert kills == trials and losses == 0, line
    assert sum(v for k, v in steps.items() if k.startswith("stage")) >= trials // 3, line


def _newest(path) -> int:
    return max(int(n.split("-")[1]) for n in os.listdir(path) if n.startswith("version-"))


def test_two_writing_processes_never_mix_one_wins_whole(zygote, tmp_path):
    """Two processes save to one path at once: the one holding the lock (kept while the
    other tries) writes its tree whole, the other is refused; nothing is mixed."""
    path = os.fspath(tmp_path / "ck")
    checkpoint.save(path, save_tree(0))
    for round_ in range(2):
        a, b = 2 * round_ + 1, 2 * round_ + 2
        release = os.fspath(tmp_path / f"release-{round_}")
        prog = {i: os.fspath(tmp_path / f"progress-{i}") for i in (a, b)}
        zygote.start(*[("save_once", {"path": path, "progress": prog[i], "i": i,
                                      "release": release}) for i in (a, b)])
        deadline = time.monotonic() + 30
        while not any(l.startswith("refused") for i in (a, b) for l in _lines(prog[i])):
            assert time.monotonic() < deadline, {i: _lines(prog[i]) for i in (a, b)}
            time.sleep(0.005)
        open(release, "w").close()
        assert zygote.wait() == [0, 0]
        outcome = {i: _lines(prog[i])[-1] for i in (a, b)}
        winners = [i for i, last in outcome.items() if last.startswith("done")]
        refused = [i for i, last in outcome.items() if last.startswith("refused")]
        assert len(winners) == 1 and len(refused) == 1, outcome
        assert "is being written by another process right now" in outcome[refused[0]]
        assert _same_tree(checkpoint.restore(path), save_tree(winners[0]))
    print("two writers: 2 rounds, each one writer won whole and the other was refused")


def test_sigkilled_resumable_finetune_ends_bit_for_bit_where_a_straight_run_ends(zygote,
                                                                                tmp_path):
    rng = np.random.default_rng(7)
    num_epochs = 8
    ref, run = os.fspath(tmp_path / "straight"), os.fspath(tmp_path / "killed")
    zygote.start(("finetune_run", {"directory": ref, "progress": os.fspath(tmp_path / "ref"),
                                   "num_epochs": num_epochs, "seed": 0, "max_pause": 0.0}))
    assert zygote.wait() == [0]
    trials, kills, epochs_killed = 0, 0, []
    for trial in range(4):
        progress = os.fspath(tmp_path / f"progress-{trial}")
        (pid,) = zygote.start(("finetune_run", {"directory": run, "progress": progress,
                                                "num_epochs": num_epochs, "seed": trial,
                                                "max_pause": 0.03}))
        _wait_for_lines(progress, int(rng.integers(1, 7)))  # compiled, saves under way
        time.sleep(rng.uniform(0.0, 0.03))
        os.kill(pid, signal.SIGKILL)
        (status,) = zygote.wait()
        trials += 1
        lines = _lines(progress)
        assert not [l for l in lines if l.startswith("error")], lines
        if not _killed(status):
            break  # finished before the kill landed
        kills += 1
        epochs_killed.append(int(lines[-1].split()[-1]))
    zygote.start(("finetune_run", {"directory": run, "progress": os.fspath(tmp_path / "end"),
                                   "num_epochs": num_epochs, "seed": 99, "max_pause": 0.0}))
    assert zygote.wait() == [0]
    straight, straight_log = checkpoint.restore(ref, return_metadata=True)
    resumed, resumed_log = checkpoint.restore(run, return_metadata=True)
    losses = int(not _same_tree(resumed, straight)) + int(resumed_log != straight_log)
    line = (f"resumable_finetune: {trials} trials, {kills} kills landed (at the saves of "
            f"epochs {epochs_killed}), {losses} losses")
    print(line)
    assert straight_log["epoch"] == num_epochs and kills >= 3 and losses == 0, line


def _image_folder(root, classes: int, per_class: int, seed: int) -> set[str]:
    rng = np.random.default_rng(seed)
    names = set()
    for c in range(classes):
        os.makedirs(os.path.join(root, f"{c:05d}"))
        for i in range(per_class):
            rel = os.path.join(f"{c:05d}", f"s{seed}_{i}.png")
            PIL.Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(
                os.path.join(root, rel))
            names.add(rel)
    return names


def _check_says(data_dir) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        data_cli.main(["check", "--data_dir", data_dir])
    (line,) = [l for l in out.getvalue().splitlines() if l.split()[:1] == ["gtsrb"]]
    return line.split()[1]


def _imported_names(data_dir) -> set[str]:
    names = set()
    for split in data.SPLITS:
        ts = data.open_split("gtsrb", split, data_dir=data_dir)
        for p in ts.positions:
            n = ts.records[int(p)]["filename"]
            names.add(n.decode() if isinstance(n, bytes) else n)
    return names


def test_sigkilled_folder_import_leaves_the_old_dataset_or_none(zygote, tmp_path):
    rng = np.random.default_rng(23)
    folders = [os.fspath(tmp_path / "a"), os.fspath(tmp_path / "b")]
    contents = [_image_folder(folders[0], 3, 3, 0), _image_folder(folders[1], 2, 4, 1)]
    data_dir = os.fspath(tmp_path / "dd")
    data.import_folder(folders[0], "gtsrb", data_dir=data_dir)
    trials, kills, losses, steps, states = 6, 0, 0, collections.Counter(), collections.Counter()
    next_i = 1
    for trial in range(trials):
        progress = os.fspath(tmp_path / f"progress-{trial}")
        (pid,) = zygote.start(("import_loop", {"folders": folders, "data_dir": data_dir,
                                               "progress": progress, "start": next_i,
                                               "seed": trial, "max_pause": 0.05}))
        _wait_for_lines(progress, int(rng.integers(2, 14)))  # "ready" is line 1
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(pid, signal.SIGKILL)
        (status,) = zygote.wait()
        lines = _lines(progress)
        assert not [l for l in lines if l.startswith("error")], lines
        kills += _killed(status)
        steps[_last_step(lines)] += 1
        started = [int(l.split()[1]) for l in lines if l.startswith("start")]
        next_i = started[-1] + 1
        status_word = _check_says(data_dir)
        if status_word == "ready":
            names = _imported_names(data_dir)
            losses += names not in contents  # a whole dataset, old or new, or it is lost
            states["a whole dataset"] += 1
        else:
            losses += status_word != "missing" or os.path.exists(
                os.path.join(data_dir, "local_gtsrb", "1.0.0", "dataset_info.json"))
            states["none"] += 1
    data.import_folder(folders[1], "gtsrb", data_dir=data_dir, overwrite=True)  # works later
    assert _check_says(data_dir) == "ready" and _imported_names(data_dir) == contents[1]
    assert sorted(n for n in os.listdir(data_dir) if "gtsrb" in n) == [".local_gtsrb.lock",
                                                                        "local_gtsrb"]
    line = _report("data.import_folder", trials, kills, steps, losses)
    print(f"  after the kills: {dict(states)}")
    assert kills == trials and losses == 0, line
