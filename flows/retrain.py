"""The nightly retrain: feedback export -> collect -> clean -> validate -> preprocess -> train -> evaluate -> DVC
push -> promote -> deploy -> commit and tag -> report.

The DVC stages run as ``dvc repro <stage>`` so that DVC's own caching, lock file and lineage are in
force: a stage whose deps and params did not change is skipped by DVC (changing only training
params reruns train and evaluate, not the data stages). When nothing changed at all (no new data,
same params and code, and the current model already judged) the flow says so and stops before
any stage runs. One run at a time per workspace (a lock), and one at a time per deployment (the
Prefect concurrency limit in infra/prefect.yaml).
"""

from __future__ import annotations

import time

from prefect import flow

from pipelines.ops import runs
from pipelines.config import load_params
from pipelines.registry.lineage import git_tag_name
from pipelines.values import now_iso
from pipelines.workspace import Layout, exclusive, read_json
from tasks import progress
from tasks.data import DATA_STAGES, collect_task, stage_task
from tasks.notify import notify, on_retrain_failure
from tasks.train_job import train_job_task
from tasks.retrain import (
    MODEL_STAGES,
    close_abandoned_task,
    commit_task,
    deploy_task,
    feedback_export_task,
    links,
    nothing_changed_task,
    promote_task,
    push_task,
    record_commit_task,
    report_task,
    workspace_of,
)


@flow(name="retrain", on_failure=[on_retrain_failure], on_crashed=[on_retrain_failure])
def retrain(params_file: str = "params.yaml", reason: str = "nightly schedule") -> dict:
    """One night of the loop for the workspace that holds ``params_file``. It starts by exporting
    the clinicians' labels confirmed since the last night into ``data/feedback`` (DVC-tracked).
    ``reason`` says what started it (the schedule, a person, or the retraining policy's finding);
    it is kept in the report and on the MLflow run (``medloop.trigger``).

    ``seconds`` holds each step's own wall time, measured inside its task (collect, each DVC
    command, promote, deploy, publish) and ``total``, the flow body's.

    Returns:
        The run summary (also published as a Prefect artifact and recorded as an MLflow run,
        `pipelines.ops.runs.record`): ``outcome`` (promoted | refused | data-only |
        nothing-changed), what was collected, which stages ran, the gates, metrics against the
        champion, the promotion decision, the commit and tag, links, and ``seconds`` per step.
    """
    from prefect.runtime import flow_run

    started = time.perf_counter()
    workspace = workspace_of(params_file)
    layout = Layout.at(workspace).require()
    params = load_params(layout.params_file)
    summary: dict = {"model": params.model.name, "workspace": workspace, "flow_run_id": str(flow_run.id or ""),
                     "trigger": reason, "started_at": now_iso(), "seconds": {}}
    with exclusive(layout):
        close_abandoned_task(workspace)  # a training killed on an earlier night left its MLflow run open
        exported = feedback_export_task(workspace)
        summary["feedback_export"] = exported
        summary["seconds"]["feedback"] = exported["seconds"]
        collected = collect_task(workspace)
        summary["collect"] = collected
        summary["seconds"]["collect"] = collected["seconds"]
        if not collected["batch_id"] and nothing_changed_task(workspace):
            for step in (*DATA_STAGES, *MODEL_STAGES, "promote", "deploy"):
                progress.emit(step, "skipped")
            if exported["export_id"]:
                # The feedback is versioned at once, even on a night with nothing to retrain: on
                # the DVC remote first, so no commit names data the remote lacks.
                push_seconds = push_task(workspace)
                published = commit_task(workspace, runs.feedback_commit_message(exported), None)
                published["push_seconds"] = push_seconds
                summary["publish"] = published
            progress.emit("publish", "done" if exported["export_id"] else "skipped")
            return _finish(summary, "nothing-changed", started)

        summary["stages"] = {}
        for stage in (*DATA_STAGES, *MODEL_STAGES):
            if stage == "train" and params.schedule.train_work_pool:  # training as its own job (a GPU node)
                outcome = train_job_task(workspace, summary["flow_run_id"])
            else:
                outcome = stage_task(workspace, stage, summary["flow_run_id"])
            summary["stages"][stage] = outcome["ran"]
            summary["seconds"][stage] = outcome["seconds"]
        summary["validation"] = read_json(layout.validation_json, "run validate")
        metrics = read_json(layout.metrics_json, "run evaluate")
        summary["metrics"] = metrics.get("test", {})

        # The night's data and model go to the DVC remote before anything is promoted: a
        # champion's data is always on the remote, and a push that fails (retried first) fails
        # the night with the registry and the champion untouched. The workspace's versions are
        # what the commit below records, so every commit's data is on the remote, and a failed
        # push leaves nothing committed for a later night to make up.
        push_seconds = push_task(workspace)
        promotion = promote_task(workspace)
        summary["promotion"] = promotion
        summary["champion_metrics"] = promotion.get("champion_metrics")
        summary["seconds"]["promote"] = promotion["seconds"]
        version = runs.new_version(promotion)
        serving_version = runs.version_to_deploy(promotion)
        if serving_version:
            summary["deploy"] = deploy_task(workspace, serving_version, summary["flow_run_id"])
            summary["seconds"]["deploy"] = summary["deploy"]["seconds"]
        else:
            progress.emit("deploy", "skipped")

        outcome = runs.outcome(promotion)
        message = runs.commit_message(params.model.name, outcome, promotion, collected)
        published = commit_task(workspace, message, git_tag_name(params.model.name, version) if version else None)
        published["push_seconds"] = push_seconds
        publish_seconds = published["commit_seconds"] + push_seconds
        if published["commit"] and promotion.get("run_id") and (published["new_commit"] or version):
            publish_seconds += record_commit_task(workspace, promotion["run_id"], version, published["commit"],
                                                  published["git_tag"], reason)
        else:
            progress.emit("publish", "done")
        summary["publish"] = published
        summary["seconds"]["publish"] = round(publish_seconds, 3)
        summary["links"] = links(workspace, promotion.get("run_id"))
        result = _finish(summary, outcome, started)
    if outcome == "refused":
        notify(params_file, f"medloop: {params.model.name} model refused", promotion["reason"], failure=False)
    return result


def _finish(summary: dict, outcome: str, started: float) -> dict:
    summary["outcome"] = outcome
    summary["finished_at"] = now_iso()
    summary["seconds"]["total"] = round(time.perf_counter() - started, 3)
    report_task(summary["workspace"], summary)
    return summary
