# syntax=docker/dockerfile:1
# Multi-stage image of fedkim, installed from the same lock as ./run.sh. (Not built on the development machines,
# which have no Docker engine; linted with hadolint in the tests.)
FROM python:3.11-slim AS build
WORKDIR /src
COPY requirements.lock.txt requirements-nodeps.txt pyproject.toml README.md ./
COPY fedkim ./fedkim
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir torch==2.13.0 \
    && /opt/venv/bin/pip install --no-cache-dir -r requirements.lock.txt \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps --require-hashes -r requirements-nodeps.txt \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 fedkim
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# The flows and stage scripts travel with the image: a hospital's site worker (`prefect worker start --pool
# site-<id>`) and the central worker run them from /app, the deployments' working directory.
COPY --chown=fedkim:fedkim params.yaml dvc.yaml ./
COPY --chown=fedkim:fedkim flows ./flows
COPY --chown=fedkim:fedkim pipelines ./pipelines
ENV PATH=/opt/venv/bin:$PATH HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=true \
    MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 GX_ANALYTICS_ENABLED=false \
    PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_HOME=/app/.prefect FEDKIM_PARAMS=/app/params.yaml
USER 10001
ENTRYPOINT ["fedkim"]
CMD ["--help"]
