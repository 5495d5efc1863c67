"""Task arithmetic in the tangent space (arXiv 2305.12827) on the embedded suite.

    python -m experiments.tangent --quick                   # < 30 s
    python -m experiments.tangent --workdir results/tangent # default config, < 5 min

Writes report.md, results.json and figures/ into --workdir. The logic is
experiments/paper/tangent.py; the configuration experiments/configs/tangent.py.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

DEFAULT_WORKDIR = "results/tangent"


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR,
                        help=f"where to write results (default {DEFAULT_WORKDIR})")
    parser.add_argument("--quick", action="store_true", help="the small config (< 30 s)")
    args = parser.parse_args(argv)
    from experiments.configs.tangent import get_config
    from experiments.paper import tangent

    return tangent.run(get_config("quick" if args.quick else "default"), args.workdir)


if __name__ == "__main__":
    main(sys.argv[1:])
