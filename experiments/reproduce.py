"""Reproduce the paper's findings end to end.

    python -m experiments.reproduce                      # embedded offline suite (default)
    python -m experiments.reproduce --quick              # smaller, < 2 minutes
    python -m experiments.reproduce --config=experiments/configs/reproduce.py:quick  # the same
    python -m experiments.reproduce --config=experiments/configs/reproduce.py:vision8 \
        --workdir=results/vision8 --config.data.data_dir=/data/tfds
    python -m experiments.reproduce --config.finetune.minibatch_epochs=8

Writes ``<workdir>/report.md`` (tables, figures, one paragraph per finding),
``results.json``, ``config.json``, ``figures/*.png`` and ``checkpoints/`` (default workdir:
``results/<config name>``). Arguments: experiments/cli.py. Logic: experiments/paper/ (so
notebooks can import it). Configs: experiments/configs/reproduce.py.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from experiments import cli

DEFAULT_CONFIG = cli.config_path("reproduce")


def main(argv: Sequence[str] | None = None) -> int:
    """Parses ``argv`` (``sys.argv[1:]`` when ``None``) and runs; returns the exit status
    (2: the config's data is not on disk, with a message saying how to provide it)."""
    args = cli.parse(argv, default_config=DEFAULT_CONFIG,
                     description="Reproduce arXiv 2508.16082's findings.")
    cli.enable_x64()   # the Theorem 1 table is computed in float64
    from experiments.paper.run import run
    from taskvec_jax.data import DataNotFoundError

    workdir = args.workdir or os.path.join("results", args.config.name)
    try:
        run(args.config, workdir)
    except DataNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
