#!/usr/bin/env bash
# Creates .venv and installs taskvec_jax with the given extras; idempotent.
# Usage: bash scripts/setup.sh [extras]    (default extras: test)
# Re-installs only when pyproject.toml or the extras change.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
venv=".venv"
stamp="$venv/.taskvec_jax-installed"
want="$(sha256sum pyproject.toml | cut -c1-16)-$extras"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python3 -m venv "$venv" 2>/dev/null || python3 -m venv --without-pip "$venv"
if [ ! -x "$venv/bin/uv" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip uv >&2 || true
fi
# A local folder of wheels (the CPU build of torch here) is used when the machine has one.
links=()
for dir in ${PIP_FIND_LINKS:-} /opt/wheels; do
  [ -d "$dir" ] && links+=(--find-links "$dir")
done
if [ -x "$venv/bin/uv" ]; then
  # No --compile-bytecode: precompiling every module (all of torch's) takes longer than
  # the first import compiling the few it uses (scripts/test.sh: 26 s against about 5).
  VIRTUAL_ENV="$venv" "$venv/bin/uv" pip install -q "${links[@]}" -e ".[$extras]" >&2
else
  "$venv/bin/python" -m pip install -q -e ".[$extras]" >&2
fi
# The parity tests' reference implementations, installed without their dependency trees:
# fusion-bench's hydra/lightning/datasets stack, mergekit's peft/accelerate and
# neural-tangents' tensorflow/tf2jax are
# never imported by the tests (they load only the merge functions and empirical kernels).
nodeps=("fusion-bench==0.2.33" "mergekit==0.1.5" "neural-tangents==0.6.5")
if [[ ",$extras," == *",parity,"* ]]; then
  if [ -x "$venv/bin/uv" ]; then
    VIRTUAL_ENV="$venv" "$venv/bin/uv" pip install -q --no-deps "${links[@]}" "${nodeps[@]}" >&2
  else
    "$venv/bin/python" -m pip install -q --no-deps "${nodeps[@]}" >&2
  fi
fi
echo "$want" > "$stamp"
