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

float64: most tests compare against float64 references at 1e-12..1e-14 tolerances
(identities of the engine, Theorem 1 slopes, dense-Hessian parity), so x64 is enabled for
the whole session rather than per module (``jax_enable_x64`` is process-global, and
flipping it between modules would retrace every cached program).
"""

import os

DEVICES = os.environ.get("TVJ_TEST_DEVICES")
if DEVICES:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={int(DEVICES)}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
# Tolerances in the tests are derived from IEEE float32/float64 arithmetic; on GPUs JAX's
# default float32 matmul precision is TF32 (about 1e-3 relative), so pin full precision.
# A no-op on CPUs, where it is always full precision.
jax.config.update("jax_default_matmul_precision", "highest")

# test_sharded.py only where its devices exist; its launcher only where they do not.
collect_ignore = ["test_sharded_subprocess.py"] if DEVICES else ["test_sharded.py"]
