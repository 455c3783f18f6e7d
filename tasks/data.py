"""Tasks of the data half of the loop: collect, the DVC data stages, and the workspace commit."""

from __future__ import annotations

import time

from prefect import task
from prefect.logging import get_run_logger

from pipelines import collect
from pipelines.config import load_params
from pipelines.registry.tracking import flow_run_env
from pipelines.ops.versioning import commit, repro
from pipelines.workspace import Layout
from tasks import progress
from tasks.retries import retry_policy

DATA_STAGES = ("clean", "validate", "preprocess")
NETWORK_SOURCES = {"sql", "s3"}


@task(name="collect")
def collect_task(workspace: str, night: int | None = None) -> dict:
    """Collect new items into data/raw and ``dvc add`` them; returns the CollectResult as a dict.

    Network and database sources are retried with backoff (see `collect_with_retries`); a
    local folder or built-in source is not, since trying again would fail the same way.
    """
    layout = Layout.at(workspace)
    params = load_params(layout.params_file)
    runner = collect_with_retries if params.source.kind in NETWORK_SOURCES else collect_once
    progress.emit("collect", "running")
    started = time.perf_counter()
    try:
        result = runner(workspace, night)
    except Exception:
        progress.emit("collect", "failed")
        raise
    seconds = time.perf_counter() - started
    progress.emit("collect", "done", seconds=seconds, stored=result["stored"])
    return {**result, "seconds": round(seconds, 3)}


@task(name="collect-from-network", **retry_policy(3, 10, 60, 300))
def collect_with_retries(workspace: str, night: int | None) -> dict:
    return collect_once.fn(workspace, night)


@task(name="collect-local")
def collect_once(workspace: str, night: int | None) -> dict:
    layout = Layout.at(workspace)
    result = collect.run(load_params(layout.params_file), layout, night=night)
    get_run_logger().info("collect: %s", result.as_dict())
    return result.as_dict()


@task(name="dvc-stage", task_run_name="dvc repro {stage}")
def stage_task(workspace: str, stage: str, flow_run_id: str | None = None) -> dict:
    """``dvc repro --single-item <stage>``: ``ran`` (False when DVC found its inputs unchanged
    and skipped it) and ``seconds`` (wall time of the DVC command). The stage processes get
    ``flow_run_id`` in their environment and tag their MLflow runs with it.

    Only this stage is checked and run: the flows run the stages in order after collect's
    ``dvc add`` of its batch, so the ones upstream are already up to date, and checking them again
    would walk every file of the archive once more per stage (`pipelines.ops.versioning.repro`).
    """
    progress.emit(stage, "running")
    started = time.perf_counter()
    try:
        ran = repro(Layout.at(workspace), stage, on_line=progress.stage_line(stage), alone=True,
                    extra_env=flow_run_env(flow_run_id))
    except Exception:
        progress.emit(stage, "failed")
        raise
    seconds = time.perf_counter() - started
    progress.emit(stage, "done" if ran else "skipped", seconds=seconds)
    get_run_logger().info("stage %s: %s (%.1f s)", stage, "ran" if ran else "unchanged, skipped by DVC", seconds)
    return {"ran": ran, "seconds": round(seconds, 3)}


@task(name="commit-workspace")
def commit_task(workspace: str, message: str) -> str | None:
    """Commit dvc.lock and the .dvc files in the workspace's git repository."""
    return commit(Layout.at(workspace), message)
