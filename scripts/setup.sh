#!/usr/bin/env bash
# Idempotent setup shared by run.sh and test.sh: create .venv and install from the lock, skipping the install
# when the lock files and pyproject.toml are unchanged since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv

pip_install() {  # quiet pip; on failure show its output without the machine's harmless find-links warnings
  local log; log=$(mktemp)
  if ! .venv/bin/python -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
    grep -v '^WARNING: Location' "$log" >&2; rm -f "$log"; echo "setup: pip install $* failed" >&2; exit 1
  fi
  rm -f "$log"
}

stamp=$(cat requirements.lock.txt requirements-nodeps.txt pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat .venv/.stamp 2>/dev/null)" != "$stamp" ]; then
  echo "setup: installing from requirements.lock.txt into .venv (first time: about 2 minutes)"
  pip_install -U 'pip>=25'                 # pip 23's resolver backtracks for minutes on this stack
  pip_install torch==2.13.0                # first, pinned: the CPU wheel (a CUDA build otherwise)
  pip_install -r requirements.lock.txt
  pip_install --no-deps --require-hashes -r requirements-nodeps.txt
  pip_install --no-deps -e .
  .venv/bin/python -c "import torch, prefect, mlflow, great_expectations, fedkim"
  echo "$stamp" > .venv/.stamp
fi
