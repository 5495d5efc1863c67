"""Experiments: the paper reproduction, Theorem 1/2, tangent space, CLIP benchmarks."""

import os

# One OpenBLAS thread (unless the user set it): the LAPACK calls behind jnp.linalg.svd on
# CPU (Iso-C/CTS, TSV-M) are on small matrices and gain nothing from threads, while
# OpenBLAS' spinning threads on a busy machine made one Iso-CTS merge at the main job's MLP
# shapes (784x128, T = 8) take 37.6 s instead of 0.41 s (load average 11, 2 cores).
# XLA's own thread pool is not affected. Set before numpy loads (python -m experiments.X
# imports this package first).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
