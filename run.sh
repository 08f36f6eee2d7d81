#!/usr/bin/env bash
# Set up (idempotent), then run the main job on the embedded defaults (params.yaml):
# generate the default offline federation and validate every site with the Great Expectations gate.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
source scripts/env.sh
fedkim data generate "$@"
root=$(python -c "from fedkim.config import load_params; print(load_params().data.root)")
status=0
for site in "$root"/*/; do
  fedkim data validate "$site" || status=1
done
echo
echo "federation: $root   (per-site reports: <site>/reports/validation.json, GX data docs: <site>/reports/gx/)"
exit $status
