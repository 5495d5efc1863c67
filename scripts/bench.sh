#!/usr/bin/env bash
# Installs the benchmark extras (first run only) and runs the benchmarks -> BENCHMARKS.md.
# Extra arguments go to benchmarks/run.py, e.g. `bash scripts/bench.sh --quick`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,notebooks,parity
exec .venv/bin/python -m benchmarks.run "$@"
