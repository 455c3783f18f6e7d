"""Watching a model in service: drift, the reference a model carries, the retraining policy."""
