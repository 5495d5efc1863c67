"""Reproduce the paper's findings end to end.

    python -m experiments.reproduce                      # embedded offline suite (default)
    python -m experiments.reproduce --quick              # smaller, < 2 minutes
    python -m experiments.reproduce --config vision8 --workdir results/vision8

Writes ``<workdir>/report.md`` (tables, figures, one paragraph per finding),
``results.json``, ``config.json``, ``figures/*.png`` and ``checkpoints/``. The logic lives
in ``experiments/paper`` so notebooks can import it; configs in
``experiments/configs/reproduce.py``.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Reproduce arXiv 2508.16082's findings.")
    parser.add_argument("--config", default=None, help="default, quick or vision8")
    parser.add_argument("--quick", action="store_true", help="same as --config quick")
    parser.add_argument("--workdir", default=None, help="default: results/<config>")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config entry, e.g. --set finetune.minibatch_epochs=8")
    args = parser.parse_args(argv)
    name = args.config or ("quick" if args.quick else "default")

    import jax
    jax.config.update("jax_enable_x64", True)  # the Theorem 1 table is computed in float64
    from experiments.configs.reproduce import get_config
    from experiments.paper.run import run
    from taskvec_jax.data import DataNotFoundError

    config = get_config(name)
    for item in args.set:
        key, _, value = item.partition("=")
        import ast
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        node, *path = key.split(".")
        target = config
        for part in [node, *path][:-1]:
            target = target[part]
        target[[node, *path][-1]] = parsed
    workdir = args.workdir or os.path.join("results", name)
    try:
        run(config, workdir)
    except DataNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
