# Sourced by run.sh, test.sh and .ci/run: offline, no telemetry, state kept inside the repo.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 HF_DATASETS_OFFLINE=1
export DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 GX_ANALYTICS_ENABLED=false
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_HOME=${PREFECT_HOME:-$root/.prefect}
export MPLBACKEND=Agg PYTHONDONTWRITEBYTECODE=1
export PATH="$root/.venv/bin:$PATH"
