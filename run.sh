#!/usr/bin/env bash
# Set up (idempotent), generate the default offline federation (cached), then run one full federated round
# through the Prefect flow `fedkim` on the embedded defaults (params.yaml): Prefect's ephemeral API, MLflow in
# SQLite under mlruns/, the local store under artifacts/. The flow's Great Expectations gate validates every site
# (per-site reports: <site>/reports/validation.json, GX data docs: <site>/reports/gx/); a site that fails it is
# left out of the round and the quorum decides.
#   ./run.sh [fedkim data generate options]          each run is a new round (id: the UTC time)
#   python -m flows.round --round-id <id>            re-run a round: reuses what it already produced
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
source scripts/env.sh
fedkim data generate "$@"
echo
python -m flows.round   # prints the registered version and aliases, the MLflow UI command and the report path
