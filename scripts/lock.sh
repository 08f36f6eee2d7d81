#!/usr/bin/env bash
# Regenerate requirements.lock.txt from requirements.in (needs uv: `pip install uv`).
# The torch line loses its local label so that pip takes the machine's CPU wheel through find-links.
set -euo pipefail
cd "$(dirname "$0")/.."
uv pip compile requirements.in ${PIP_FIND_LINKS:+--find-links "$PIP_FIND_LINKS"} --python-version 3.11 \
  -o requirements.lock.txt
sed -i 's/^torch==\([0-9.]*\)+cpu$/torch==\1/' requirements.lock.txt
