"""Theorems 1 and 2 of "On Task Vectors and Gradients" (arXiv 2508.16082), measured.

Across depths, activations and task counts on the embedded digits tasks: Theorem 1's gap
(slope 2 in ``lr``) and residual after ``lr^2 C_k`` (slope 3), Theorem 2's bound against
the measured ``||C_k||``, and the one-epoch gap under minibatch SGD. Writes
``results.json``, four PNG figures and ``report.md`` into ``--workdir``::

    python -m experiments.theorem                                   # results/theorem
    python -m experiments.theorem --config=experiments/configs/theorem.py:quick
    python -m experiments.theorem --quick --workdir=/tmp/theorem    # the same, elsewhere
    python -m experiments.theorem --config.alpha=0.5 --config.num_epochs=3

Arguments: experiments/cli.py. Logic: experiments/paper/numerics/. Config:
experiments/configs/theorem.py.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from experiments import cli

DEFAULT_CONFIG = cli.config_path("theorem")
DEFAULT_WORKDIR = "results/theorem"


def main(argv: Sequence[str] | None = None) -> dict:
    """Parses ``argv`` (``sys.argv[1:]`` when ``None``), runs, returns the results."""
    args = cli.parse(argv, default_config=DEFAULT_CONFIG, default_workdir=DEFAULT_WORKDIR,
                     description=__doc__.splitlines()[0])
    cli.enable_x64()
    from experiments.paper import numerics

    workdir = os.path.abspath(args.workdir)
    results = numerics.run(args.config, workdir)
    print(f"[theorem] wrote {workdir}/results.json, report.md and "
          f"{len(results['figures'])} figures in {results['wall_time_s']:.1f} s")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
