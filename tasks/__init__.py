"""Prefect tasks: one per stage or side effect. They hold no stage logic, only retries,
logging and reporting around the functions in ``pipelines``."""
