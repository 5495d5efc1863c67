#!/usr/bin/env bash
# Installs the project (first run only) and runs the main job on the embedded default.
# Extra arguments go to the experiment, e.g. `bash scripts/reproduce.sh --quick`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# Imports write their bytecode once (setup.sh does not precompile), even where the caller's
# environment says not to.
unset PYTHONDONTWRITEBYTECODE
exec .venv/bin/python -m experiments.reproduce "$@"
