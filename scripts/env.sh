# Sourced by run.sh, test.sh and .ci/run: offline, no telemetry, state kept inside the repo.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 HF_DATASETS_OFFLINE=1
export DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 GX_ANALYTICS_ENABLED=false
export PREFECT_SERVER_ANALYTICS_ENABLED=false
# fedkim's progress lines go to the flow and task runs' logs in Prefect as well (the console shows them anyway);
# outside a run (a test, a benchmark) they are not sent, without a warning.
export PREFECT_LOGGING_EXTRA_LOGGERS=fedkim PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW=ignore
export PREFECT_HOME=${PREFECT_HOME:-$root/.prefect}
export MPLBACKEND=Agg PYTHONDONTWRITEBYTECODE=1
export PATH="$root/.venv/bin:$PATH"
