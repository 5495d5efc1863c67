"""The JAX environment of every process of a test run: pytest (and its xdist workers), the
8-device sharded process, the experiment subprocesses and the notebook kernels.

tests/conftest.py applies :func:`jax_env` to ``os.environ`` before JAX is imported, so every
process the tests start inherits it; :func:`subprocess_env` is that environment for the
experiment and notebook processes, which run on one device. What it sets, and why:

- **Fast compilation.** The suite's cost is XLA compilation, not compute (tiny models, many
  programs), so XLA compiles with ``--xla_backend_optimization_level=0`` and
  ``--xla_llvm_disable_expensive_passes=true`` (about a third less CPU time per program,
  measured on the Theorem 1 programs), and with XLA:CPU's older loop emitters instead of
  its MLIR fusion emitters (``--xla_cpu_use_fusion_emitters=false``): about half the
  compilation again (tests/test_finetune.py: 29.5 CPU-s instead of 53.5; the 8-device
  process 101 CPU-s instead of 150). Results stay IEEE float64/float32 arithmetic; only
  the rounding of fused expressions may differ from the optimized build, which no test
  can observe except by comparing a jitted program with its eager twin bit for bit (XLA
  makes no such promise: tests compare bit for bit within one evaluation mode).
  Bit-for-bit tests compare two runs of one program. ``TVJ_TEST_FAST_COMPILE=0`` keeps
  XLA's default compilation.

  The 8-device process also caps the instruction set at AVX (``--xla_cpu_max_isa=AVX``,
  no FMA instructions; x86 only, the flag names x86 extensions): there a sharded merge's
  program runs on blocks whose sizes are not multiples of the vector width, and the loop
  emitters contracted ``acc + alpha * x`` into a fused multiply-add in some lanes and not
  in others (an entry of ``dare_task_arithmetic`` came out -3.97e-09 instead of 0), so the
  sharded merge was no longer bit for bit the unsharded one, which tests/test_sharded.py
  asserts (and which holds under XLA's default compilation too). Without FMA nothing is
  contracted.

  History: under the loop emitters the 256-model sweep of tests/test_theory_bound.py
  once deadlocked: two batched LAPACK SVDs (one per layer) ran at once on the two
  threads of XLA's intra-op pool, each waiting for the pool;
  :func:`taskvec_jax.theory.mlp_weight_norms` now runs one SVD per kernel shape, one
  after another. Earlier whole-suite runs with them also crashed once in the
  compilation-cache write of a selection program (tests/test_merging_select.py), not
  seen since.
- **One persistent compilation cache per test run**, shared by all these processes:
  ``TVJ_TEST_CACHE_DIR`` when set (scripts/test.sh makes a fresh one per run, so a run's
  time is a cold run's), else ``results/.jax_test_cache`` (git-ignored). Every program is
  cached (no minimum compile time or size): the quick reproduction, the theorem experiment
  and the notebooks compile the same programs (pretraining, the Theorem 1 sweep, ...), and
  so do the two xdist workers, so only the first process pays for them.
- One CPU device unless ``devices`` asks for fake ones (tests/test_sharded.py), the Agg
  matplotlib backend.

This module must not import JAX: conftest imports it before JAX reads its configuration.
"""

import os
import platform

__all__ = ["ROOT", "CACHE_DIR", "FAST_COMPILE_FLAGS", "NO_FMA_FLAGS", "xla_flags", "jax_env",
           "subprocess_env"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_DIR = (os.environ.get("TVJ_TEST_CACHE_DIR")
             or os.path.join(ROOT, "results", ".jax_test_cache"))
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0",
                      "--xla_llvm_disable_expensive_passes=true",
                      "--xla_cpu_use_fusion_emitters=false")
# The 8-device process only (see above).
NO_FMA_FLAGS = ("--xla_cpu_max_isa=AVX",)
_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def xla_flags(devices: int | None = None, base: str | None = None) -> str:
    """``base`` (default: the current ``XLA_FLAGS``) without this module's flags, plus the
    fast-compilation flags (with the FMA cap when ``devices`` is given) and, when
    ``devices`` is given, that many fake CPU devices.

    Idempotent: a child process re-deriving its flags from its parent's gets the same ones
    (with its own device count)."""
    base = os.environ.get("XLA_FLAGS", "") if base is None else base
    ours = {flag.split("=")[0] for flag in FAST_COMPILE_FLAGS + NO_FMA_FLAGS}
    flags = [f for f in base.split() if f.split("=")[0] not in ours | {_DEVICE_FLAG}]
    if os.environ.get("TVJ_TEST_FAST_COMPILE", "1") != "0":
        flags += FAST_COMPILE_FLAGS
        if devices and platform.machine().lower() in ("x86_64", "amd64"):
            flags += NO_FMA_FLAGS
    if devices:
        flags.append(f"{_DEVICE_FLAG}={int(devices)}")
    return " ".join(flags)


def jax_env(devices: int | None = None) -> dict:
    """The variables above (set before JAX is imported; JAX reads them when it loads)."""
    return {"XLA_FLAGS": xla_flags(devices),
            "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS") or "cpu",
            "MPLBACKEND": "Agg",
            "JAX_COMPILATION_CACHE_DIR": CACHE_DIR,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


def subprocess_env(**extra) -> dict:
    """``os.environ`` with :func:`jax_env` on one device (and ``extra``): the environment of
    the experiment and notebook processes the tests start."""
    env = {**os.environ, **jax_env(), **extra}
    env.pop("TVJ_TEST_DEVICES", None)
    return env
