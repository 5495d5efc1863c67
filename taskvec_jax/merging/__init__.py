"""Model merging as pure functions over pytrees.

* :mod:`~taskvec_jax.merging.arithmetic`: :func:`task_arithmetic`.
* :mod:`~taskvec_jax.merging.sparsify`: :func:`magnitude_mask`, :func:`trim`,
  :func:`ties_merge`, :func:`ties`, :func:`dare`, :func:`breadcrumbs` (every choice of
  scope, counting rule and tie-breaking is an explicit, documented argument).
* :mod:`~taskvec_jax.merging.iterative`: :func:`atm` (iterative task arithmetic).
* :mod:`~taskvec_jax.merging.soups`: :func:`uniform_soup`, :func:`greedy_soup`,
  :func:`learned_soup`.
* :mod:`~taskvec_jax.merging.search`: :func:`coefficient_search`.

Design notes, conventions and memory use: docs/merging.md.
"""

from taskvec_jax.merging.arithmetic import task_arithmetic
from taskvec_jax.merging.iterative import ATMResult, atm
from taskvec_jax.merging.search import CoefficientSearch, coefficient_search
from taskvec_jax.merging.soups import (
    GRANULARITIES,
    GreedySoup,
    LearnedSoup,
    greedy_soup,
    learned_soup,
    uniform_soup,
)
from taskvec_jax.merging.sparsify import (
    SCOPES,
    TIES_MERGES,
    breadcrumbs,
    dare,
    magnitude_mask,
    ties,
    ties_merge,
    trim,
)

__all__ = [
    "ATMResult", "CoefficientSearch", "GRANULARITIES", "GreedySoup", "LearnedSoup",
    "SCOPES", "TIES_MERGES", "atm", "breadcrumbs", "coefficient_search", "dare",
    "greedy_soup", "learned_soup", "magnitude_mask", "task_arithmetic", "ties",
    "ties_merge", "trim", "uniform_soup",
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
