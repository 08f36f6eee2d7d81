"""Prefect flows (`fedkim/round` and per-site deployments): thin wiring over fedkim/, added by the pipeline
issue. The library under fedkim/ never imports Prefect."""
