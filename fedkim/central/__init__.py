"""Central side: foundation model, M3OE, injection, evaluation, baselines (runs at the server)."""
