"""Test configuration, set before JAX initializes.

Devices: the suite runs on the default device count (one CPU device), except
tests/test_sharded.py, which needs 8 fake CPU devices. XLA reads
``--xla_force_host_platform_device_count`` once, when the backend starts, and pytest-xdist
(``--dist loadfile``) reuses worker processes across files, so the flag cannot be switched
per file. Instead tests/test_sharded_subprocess.py runs ``pytest tests/test_sharded.py`` in a
fresh interpreter with ``TVJ_TEST_DEVICES=8``; this conftest turns that variable into
XLA_FLAGS before importing jax, and collects test_sharded.py only in such a process (and
the launcher only outside it). Any invocation (plain ``pytest``, ``-n 2``, scripts/test.sh)
therefore runs every test, with the flag set exactly where it is needed.

Compilation: the rest of the environment (fast XLA compilation, one persistent compilation
cache shared by every process of the run) comes from tests/experiment_env.py, applied here
before JAX loads.

float64: most tests compare against float64 references at 1e-12..1e-14 tolerances
(identities of the engine, Theorem 1 slopes, dense-Hessian parity), so x64 is enabled for
the whole session rather than per module (``jax_enable_x64`` is process-global, and
flipping it between modules would retrace every cached program).
"""

import os

from tests.experiment_env import jax_env

DEVICES = os.environ.get("TVJ_TEST_DEVICES")
# Fast XLA compilation, one persistent compilation cache for the whole run, the device count
# (tests/experiment_env.py says why); inherited by every process the tests start.
os.environ.update(jax_env(devices=int(DEVICES) if DEVICES else None))
if DEVICES:
    # No persistent compilation cache in the 8-device process: no other process compiles
    # its programs, and with the fast-compilation flags a cached shard_map ranking of
    # tests/test_sharded.py (Breadcrumbs, global scope) crashed when read back (a
    # segfault; with XLA's default optimization, or with a fresh cache, it runs).
    for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                 "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"):
        os.environ.pop(name, None)

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
# Tolerances in the tests are derived from IEEE float32/float64 arithmetic; on GPUs JAX's
# default float32 matmul precision is TF32 (about 1e-3 relative), so pin full precision.
# A no-op on CPUs, where it is always full precision.
jax.config.update("jax_default_matmul_precision", "highest")

# test_sharded.py only where its devices exist; its launcher only where they do not.
collect_ignore = ["test_sharded_subprocess.py"] if DEVICES else ["test_sharded.py"]


# Scheduling. scripts/test.sh runs `-n 2 --dist loadfile --no-loadscope-reorder`: every file
# stays on one worker (its module-scoped fixtures and compiled programs are made once), and
# files are handed out in collection order, which puts the longest files first, so that the
# two workers finish together (the longest file last would bound the wall time). Not
# `--dist loadgroup` with a group per file: pytest-xdist 3.8 then tears module-scoped
# fixtures down between the tests of a group, so the quick reproduction and the tangent
# experiment each ran twice. The sharded process starts first: it is the longest. The
# notebooks start second: tests/test_theorem_experiment.py and test_tangent_experiment.py
# check notebooks 01 and 04's runs (tests/notebook_runs.py), and as they sort late they
# find them done instead of waiting on them.
# The rest follow by CPU time (tests/cpu_profile.py, 2026-12-02), so that only small files
# are left for the end: a 20 CPU-s file last kept one core idle for its whole run.
SLOWEST_FIRST = ("test_sharded_subprocess.py", "test_notebooks.py", "test_reproduce.py",
                 "test_theory_bound.py", "test_merging_radix.py", "test_merging_select.py",
                 "test_finetune.py", "test_tangent.py", "test_theory.py",
                 "test_merging_ties.py", "test_models.py", "test_merging_breadcrumbs.py",
                 "test_clip_model.py", "test_hessian.py", "test_clip_convert.py",
                 "test_merging_parity_refs.py")


def _file_rank(item):
    name = item.path.name
    return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_file_rank)  # stable: the order inside a file is kept
