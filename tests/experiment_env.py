"""The environment of the experiment and notebook processes the tests start.

One device, the Agg backend, and one persistent JAX compilation cache shared by every such
process of a test run (``results/.jax_test_cache``, git-ignored): the quick reproduction,
the theorem experiment and the notebooks compile the same programs (pretraining, the
Theorem 1 sweep, ...), so only the first process pays for them.
"""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_DIR = os.path.join(ROOT, "results", ".jax_test_cache")


def subprocess_env(**extra) -> dict:
    """``os.environ`` plus the settings above (and ``extra``)."""
    return {**os.environ, "XLA_FLAGS": "", "MPLBACKEND": "Agg", "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": CACHE_DIR,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **extra}
