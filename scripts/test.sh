#!/usr/bin/env bash
# Installs what the tests need (first run only) and runs the whole suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k merging`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,notebooks,parity
# Imports write their bytecode once (setup.sh does not precompile), even where the caller's
# environment says not to.
unset PYTHONDONTWRITEBYTECODE
# One JAX compilation cache for every process of this run (xdist workers, the sharded
# process, experiment subprocesses, notebook kernels), fresh each run: see
# tests/experiment_env.py.
TVJ_TEST_CACHE_DIR="$(mktemp -d "${TMPDIR:-/tmp}/tvj_jax_cache.XXXXXX")"
export TVJ_TEST_CACHE_DIR
trap 'rm -rf "$TVJ_TEST_CACHE_DIR"' EXIT
set +e
# Files stay whole on one worker, the slowest first (conftest.py orders them), so the two
# workers finish together.
.venv/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit "$rc"
