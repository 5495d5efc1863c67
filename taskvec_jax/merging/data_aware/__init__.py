"""Data-aware merges: they need statistics of each task's data, which the library collects.

* :mod:`~taskvec_jax.merging.data_aware.fisher`: :func:`fisher` (Matena & Raffel, 2022)
  and :func:`diagonal_fisher` (per-example squared gradients, vmapped and chunked).
* :mod:`~taskvec_jax.merging.data_aware.regmean`: :func:`regmean` (Jin et al., 2023) and
  :func:`regmean_grams` (input Grams of every flax linen ``nn.Dense`` / ``nnx.Linear``).
* :mod:`~taskvec_jax.merging.data_aware.adamerging`: :func:`adamerging` (Yang et al.,
  2024), task-wise or layer-wise, over any merge differentiable in its coefficients.

What each method needs, formulas and the FusionBench conventions: docs/merging.md.
"""

from taskvec_jax.merging.data_aware.adamerging import (
    ADAMERGING_GRANULARITIES,
    AdaMerging,
    adamerging,
    prediction_entropy,
    scaled_merge,
    ties_masked_task_vectors,
)
from taskvec_jax.merging.data_aware.fisher import FISHER_MODES, diagonal_fisher, fisher
from taskvec_jax.merging.data_aware.regmean import regmean, regmean_grams

__all__ = [
    "ADAMERGING_GRANULARITIES", "AdaMerging", "FISHER_MODES", "adamerging",
    "diagonal_fisher", "fisher", "prediction_entropy", "regmean", "regmean_grams",
    "scaled_merge", "ties_masked_task_vectors",
]
