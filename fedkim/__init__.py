"""fedkim: federated knowledge injection into medical foundation models."""
__version__ = "0.1.0"
