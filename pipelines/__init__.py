"""DVC stage entry points (`python -m pipelines.<stage>`): thin wiring over fedkim/, one script per stage."""
