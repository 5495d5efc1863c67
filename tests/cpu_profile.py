"""Where the suite's time goes, as CPU seconds per test (robust to a loaded machine).

A pytest plugin, off unless asked for::

    bash scripts/test.sh -p tests.cpu_profile                # whole suite, both workers
    .venv/bin/python -m pytest tests/test_theory.py -p tests.cpu_profile

Each test's CPU time is this process's user+system time during the test plus that of the
subprocesses it waited for (the notebook kernels, the 8-device run, the experiments), and
beside it the XLA backend-compilation time JAX reports. Every process writes one JSON
file into ``TVJ_CPU_PROFILE_DIR`` (default ``results/cpu_profile``) and prints its files'
totals, the slowest first; wall time is misleading on two shared cores, CPU time is not.
"""

from __future__ import annotations

import collections
import json
import os
import resource

import jax
import pytest

__all__ = ["pytest_runtest_protocol", "pytest_sessionfinish"]

_COMPILE = "/jax/core/compile/backend_compile_duration"
_events: collections.Counter = collections.Counter()
_rows: list[dict] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **_: _events.update({event: duration}))


def _cpu() -> tuple[float, float]:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    own, children = _cpu()
    compile_s = _events[_COMPILE]
    yield
    own2, children2 = _cpu()
    _rows.append({"test": item.nodeid, "cpu": own2 - own, "children_cpu": children2 - children,
                  "compile": _events[_COMPILE] - compile_s})


def pytest_sessionfinish(session):
    if not _rows:
        return
    out = os.environ.get("TVJ_CPU_PROFILE_DIR") or os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "cpu_profile")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"cpu_{os.getpid()}.json"), "w") as fh:
        json.dump(_rows, fh, indent=1)
    files = collections.defaultdict(lambda: [0.0, 0.0])
    for r in _rows:
        f = files[r["test"].split("::")[0]]
        f[0] += r["cpu"] + r["children_cpu"]
        f[1] += r["compile"]
    print(f"\nCPU seconds per file (process {os.getpid()}; rows in {out}):")
    for name, (cpu, comp) in sorted(files.items(), key=lambda kv: -kv[1][0])[:25]:
        print(f"  {cpu:7.1f} s CPU  {comp:7.1f} s compiling  {name}")
