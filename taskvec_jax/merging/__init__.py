"""Model merging as pure functions over pytrees.

Every merge is ``name(base, task_vectors, *, alpha, ...) -> model`` with ``alpha`` a
scalar or one coefficient per task; a merge's task-vector form is
``name_task_vector(task_vectors, ...) -> task vector``.

* :mod:`~taskvec_jax.merging.arithmetic`: :func:`task_arithmetic` (the one
  ``base + sum_t alpha_t tau_t``).
* :mod:`~taskvec_jax.merging.sparsify`: :func:`magnitude_mask`, :func:`trim` (scope,
  counting rule and tie-breaking of the kernel in :mod:`~taskvec_jax.merging._select`).
* :mod:`~taskvec_jax.merging.ties_merging`: :func:`ties`, :func:`ties_task_vector`.
* :mod:`~taskvec_jax.merging.drop_and_rescale`: :func:`dare`, :func:`dare_task_arithmetic`.
* :mod:`~taskvec_jax.merging.model_breadcrumbs`: :func:`breadcrumbs`.
* :mod:`~taskvec_jax.merging.iterative`: :func:`atm` (iterative task arithmetic).
* :mod:`~taskvec_jax.merging.soups`: :func:`uniform_soup`, :func:`greedy_soup`,
  :func:`learned_soup`.
* :mod:`~taskvec_jax.merging.search`: :func:`coefficient_search`.

Design notes, conventions and memory use: docs/merging.md.
"""

from taskvec_jax.merging.arithmetic import task_arithmetic
from taskvec_jax.merging.drop_and_rescale import dare, dare_task_arithmetic
from taskvec_jax.merging.iterative import ATMResult, atm
from taskvec_jax.merging.model_breadcrumbs import breadcrumbs
from taskvec_jax.merging.search import CoefficientSearch, coefficient_search
from taskvec_jax.merging.soups import (
    GRANULARITIES,
    GreedySoup,
    LearnedSoup,
    greedy_soup,
    learned_soup,
    uniform_soup,
)
from taskvec_jax.merging.sparsify import SCOPES, magnitude_mask, trim
from taskvec_jax.merging.ties_merging import (
    CONSENSUS,
    TIES_MERGES,
    ties,
    ties_merge,
    ties_task_vector,
)

__all__ = [
    "ATMResult", "CONSENSUS", "CoefficientSearch", "GRANULARITIES", "GreedySoup",
    "LearnedSoup", "SCOPES", "TIES_MERGES", "atm", "breadcrumbs", "coefficient_search",
    "dare", "dare_task_arithmetic", "greedy_soup", "learned_soup", "magnitude_mask",
    "task_arithmetic", "ties", "ties_merge", "ties_task_vector", "trim", "uniform_soup",
]

# Data-aware merges (Fisher, RegMean, AdaMerging) and their statistics collectors.
from taskvec_jax.merging.data_aware import (  # noqa: E402
    ADAMERGING_GRANULARITIES,
    FISHER_MODES,
    AdaMerging,
    adamerging,
    diagonal_fisher,
    fisher,
    prediction_entropy,
    regmean,
    regmean_grams,
    scaled_merge,
    ties_masked_task_vectors,
)

__all__ += [
    "ADAMERGING_GRANULARITIES", "AdaMerging", "FISHER_MODES", "adamerging",
    "diagonal_fisher", "fisher", "prediction_entropy", "regmean", "regmean_grams",
    "scaled_merge", "ties_masked_task_vectors",
]
from taskvec_jax.merging import matrices  # noqa: E402
from taskvec_jax.merging.subspace import (  # noqa: E402
    iso_c,
    iso_c_task_vector,
    iso_cts,
    iso_cts_task_vector,
    task_interference,
    tsv,
    tsv_task_vector,
)

__all__ += [
    "iso_c", "iso_c_task_vector", "iso_cts", "iso_cts_task_vector", "matrices",
    "task_interference", "tsv", "tsv_task_vector",
]
from taskvec_jax.merging.selection import (  # noqa: E402
    consensus,
    consensus_mask,
    della,
    della_keep_probabilities,
    della_linear,
    della_prune,
    magmax,
    magmax_task_vector,
    tall_mask_models,
    tall_masks,
)

__all__ += [
    "consensus", "consensus_mask", "della", "della_keep_probabilities", "della_linear",
    "della_prune", "magmax", "magmax_task_vector", "tall_mask_models", "tall_masks",
]
from taskvec_jax.merging.geometric import model_stock, model_stock_ratio, slerp  # noqa: E402

__all__ += ["model_stock", "model_stock_ratio", "slerp"]
