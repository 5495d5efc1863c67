"""Timing helpers: every figure is a ratio of two things timed in alternation.

This machine is shared and noisy, so absolute times drift; timing A and B back to back in
each repeat and reporting the min / median / max of the per-repeat ratio cancels most of it.
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np


def block(x: Any) -> Any:
    return jax.block_until_ready(x)


def time_once(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    block(fn())
    return time.perf_counter() - start


@dataclasses.dataclass
class Stats:
    min: float
    median: float
    max: float

    @classmethod
    def of(cls, values) -> "Stats":
        values = [float(v) for v in values]
        return cls(min(values), statistics.median(values), max(values))

    def fmt(self, spec: str = ".3g") -> str:
        return f"{self.median:{spec}} ({self.min:{spec}} - {self.max:{spec}})"


def times(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> Stats:
    for _ in range(warmup):
        block(fn())
    return Stats.of(time_once(fn) for _ in range(repeats))


def ratio(numerator: Callable[[], Any], denominator: Callable[[], Any], repeats: int,
          warmup: int = 1) -> tuple[Stats, Stats, Stats]:
    """Times both in alternation; returns (ratio, numerator seconds, denominator seconds)."""
    for _ in range(warmup):
        block(numerator())
        block(denominator())
    num, den = [], []
    for _ in range(repeats):
        num.append(time_once(numerator))
        den.append(time_once(denominator))
    return (Stats.of(a / b for a, b in zip(num, den)), Stats.of(num), Stats.of(den))


def machine() -> dict[str, Any]:
    dev = jax.devices()[0]
    return {
        "platform": dev.platform,
        "device": getattr(dev, "device_kind", str(dev)),
        "device_count": jax.device_count(),
        "cpu": platform.processor() or platform.machine(),
        "cores": _cores(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "numpy": np.__version__,
    }


def _cores() -> int:
    import os
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def peak_matmul_flops(n: int = 2048, dtype=np.float32, repeats: int = 5) -> Stats:
    """Measured FLOP/s of a large square ``jnp.dot`` (the machine's practical peak).

    On an accelerator the side is raised to 8192: smaller products do not fill a GPU.
    """
    import jax.numpy as jnp
    if jax.devices()[0].platform != "cpu":
        n = max(n, 8192)
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
    b = jnp.asarray(np.random.default_rng(1).normal(size=(n, n)), dtype)
    f = jax.jit(jnp.dot)
    t = times(lambda: f(a, b), repeats, warmup=2)
    flops = 2.0 * n ** 3
    return Stats(flops / t.max, flops / t.median, flops / t.min)


def compiled_bytes(fn, *args) -> dict[str, int]:
    """XLA's memory analysis of ``jit(fn)(*args)``: argument, output and temp bytes."""
    compiled = jax.jit(fn).lower(*args).compile()
    m = compiled.memory_analysis()
    if m is None:
        return {}
    return {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
            "temp": int(m.temp_size_in_bytes), "alias": int(m.alias_size_in_bytes)}
