#!/usr/bin/env bash
# Installs what the tests need (first run only) and runs the whole suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k merging`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,notebooks,parity
set +e
.venv/bin/python -m pytest -n 2 --dist loadfile "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit "$rc"
