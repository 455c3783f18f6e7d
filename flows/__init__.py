"""Prefect flows: compositions of tasks, no logic of their own."""
