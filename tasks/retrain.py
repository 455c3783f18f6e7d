"""Tasks of the model half of the loop: promote, deploy, version (commit, tag, push), report.

Retries with backoff are only on steps that talk to a database or the network: the feedback export
(the feedback store), promote and deploy (the MLflow registry, a database or a tracking server),
the DVC push (a remote that may be S3) and the lineage stamp. The DVC stages and git commits are local: trying them again would fail the same
way, so they are not retried.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.logging import get_run_logger

from pipelines import deploy, promote
from pipelines.registry import lineage
from pipelines.ops import report, runs
from pipelines.config import load_params
from pipelines.registry.tracking import tracking_uri
from pipelines.ops.versioning import commit, head_commit, push, tag
from pipelines.workspace import Layout
from tasks import progress
from tasks.retries import retry_policy

MODEL_STAGES = ("train", "evaluate")
REGISTRY_RETRIES = retry_policy(3, 5, 30, 120)


@task(name="feedback-export", **REGISTRY_RETRIES)
def feedback_export_task(workspace: str) -> dict[str, Any]:
    """Export clinicians' confirmed labels since the last export into data/feedback (dvc add)."""
    from pipelines import feedback_export

    layout = Layout.at(workspace)
    progress.emit("feedback", "running")
    started = time.perf_counter()
    result = feedback_export.run(load_params(layout.params_file), layout).as_dict()
    progress.emit("feedback", "done" if result["export_id"] else "skipped", stored=result["exported"])
    get_run_logger().info("feedback export: %s", result)
    return {**result, "seconds": round(time.perf_counter() - started, 3)}


@task(name="close-abandoned-training")
def close_abandoned_task(workspace: str) -> str | None:
    """End the MLflow run of a training that died with it open (killed, or its tracking server gone
    mid-upload): `pipelines.registry.interrupted.close_abandoned_training_run`. A tracking server
    that does not answer is logged, not raised: the night goes on, and the next one tries again."""
    from pipelines.registry.interrupted import TrackingUnavailable, close_abandoned_training_run

    layout = Layout.at(workspace)
    try:
        closed = close_abandoned_training_run(load_params(layout.params_file), layout)
    except TrackingUnavailable as exc:
        get_run_logger().warning("%s", exc)
        return None
    if closed:
        get_run_logger().warning("the MLflow run %s of a training that died is marked FAILED", closed)
    return closed


@task(name="plan")
def nothing_changed_task(workspace: str) -> bool:
    """`pipelines.ops.runs.nothing_changed`: every stage up to date and the last model judged."""
    layout = Layout.at(workspace)
    return runs.nothing_changed(load_params(layout.params_file), layout)


@task(name="promote", **REGISTRY_RETRIES)
def promote_task(workspace: str) -> dict[str, Any]:
    """Judge the evaluated model against the clinical gates and the champion; promote it if it
    passes, unless an earlier run judged it (`pipelines.promote.judge_once`). A refusal is a result,
    not an error: the registry is untouched and the report says why."""
    started = time.perf_counter()
    layout = Layout.at(workspace)
    params = load_params(layout.params_file)
    progress.emit("promote", "running")
    result = promote.judge_once(params, layout, actor="medloop-nightly")
    progress.emit("promote", "done", action=result["action"])
    get_run_logger().info("promote: %s - %s", result["action"], result["reason"].splitlines()[0])
    return {**result, "seconds": round(time.perf_counter() - started, 3)}


@task(name="deploy", **REGISTRY_RETRIES)
def deploy_task(workspace: str, version: str, flow_run_id: str | None = None) -> dict[str, Any]:
    """Put the promoted version in service (idempotent) and record the deployment (with the flow run)."""
    started = time.perf_counter()
    layout = Layout.at(workspace)
    progress.emit("deploy", "running")
    result = deploy.run(load_params(layout.params_file), layout, version, actor="medloop-nightly",
                         flow_run_id=flow_run_id)
    progress.emit("deploy", "done")
    get_run_logger().info("deploy: %s", result.describe())
    return {**result.as_dict(), "seconds": round(time.perf_counter() - started, 3)}


@task(name="commit")
def commit_task(workspace: str, message: str, git_tag: str | None) -> dict[str, Any]:
    """Commit ``dvc.lock`` and the ``.dvc`` files (and tag the commit for a new model version)."""
    started = time.perf_counter()
    layout = Layout.at(workspace)
    progress.emit("publish", "running")
    made = commit(layout, message)
    head = made or head_commit(layout)
    tagged = None
    if git_tag and head:
        tag(layout, git_tag, message)
        tagged = git_tag
    return {"commit": head, "new_commit": made is not None, "git_tag": tagged,
            "commit_seconds": round(time.perf_counter() - started, 3)}


@task(name="dvc-push", **retry_policy(3, 10, 60, 300))
def push_task(workspace: str) -> float:
    """Upload the data versions to the DVC remote; the wall time of the push."""
    started = time.perf_counter()
    push(Layout.at(workspace))
    return round(time.perf_counter() - started, 3)


@task(name="record-lineage", **REGISTRY_RETRIES)
def record_commit_task(workspace: str, run_id: str, version: str | None, commit_sha: str,
                       git_tag: str | None, trigger: str | None = None) -> float:
    """Write the commit (and tag) that holds the run's dvc.lock, and what started the run, onto the
    MLflow run and version; the wall time it took."""
    started = time.perf_counter()
    layout = Layout.at(workspace)
    lineage.record_commit(load_params(layout.params_file), layout, run_id, version, commit_sha, git_tag, trigger)
    progress.emit("publish", "done")
    return round(time.perf_counter() - started, 3)


@task(name="report")
def report_task(workspace: str, summary: dict[str, Any]) -> str:
    """Publish the run as a Prefect artifact and record it (`pipelines.ops.runs.record`: an MLflow
    run of its own, and the run log cache)."""
    from prefect.artifacts import create_markdown_artifact

    layout = Layout.at(workspace)
    markdown = report.render_markdown(summary)
    key = "retrain-" + "".join(c if c.isalnum() else "-" for c in summary["model"].lower())
    create_markdown_artifact(markdown=markdown, key=key, description=report.headline(summary))
    runs.record(load_params(layout.params_file), layout, summary)
    get_run_logger().info(report.headline(summary))
    return markdown


def links(workspace: str, run_id: str | None) -> dict[str, str]:
    """Where to look: the MLflow run (a URL on a tracking server, else how to open the UI) and the
    Data Docs."""
    layout = Layout.at(workspace)
    params = load_params(layout.params_file)
    found = {"data_docs": (layout.data_docs / "index.html").as_uri()}
    if run_id:
        from mlflow import MlflowClient

        uri = tracking_uri(params, layout)
        try:
            experiment = MlflowClient(uri).get_run(run_id).info.experiment_id
        except Exception:  # noqa: BLE001 - a link is not worth failing a finished run over
            return {**found, "mlflow_run": f"run {run_id}", "lineage": f"medloop lineage -w {layout.root}"}
        page = f"#/experiments/{experiment}/runs/{run_id}"
        if uri.startswith(("http://", "https://")):
            found["mlflow_run"] = f"{uri.rstrip('/')}/{page}"
        else:
            found["mlflow_run"] = f"http://127.0.0.1:5000/{page} (after `medloop ui -w {layout.root}`)"
    found["lineage"] = f"medloop lineage -w {layout.root}"
    return found


def workspace_of(params_file: str) -> str:
    """The workspace a params file belongs to (its folder), resolved."""
    path = Path(params_file).expanduser().resolve()
    return str(path.parent)
