"""Test configuration: 8 fake CPU devices and float64, set before JAX initializes."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
# Tolerances in the tests are derived from IEEE float32/float64 arithmetic; on GPUs JAX's
# default float32 matmul precision is TF32 (about 1e-3 relative), so pin full precision.
# A no-op on CPUs, where it is always full precision.
jax.config.update("jax_default_matmul_precision", "highest")
