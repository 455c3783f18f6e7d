"""The decisions of a retrain run, made here so that the flow, ``medloop run`` and a person
reading the code see the same rules: is there anything to do, which version goes into service,
how did the run end, and what does its commit say.

MLflow (and git) is the record of every run's decision: `record` writes each retrain run as an
MLflow run of its own (outcome, reason, trigger, data hashes, the run judged, the workspace
commit; the full summary as an artifact) in the experiment ``<tracking.experiment>-retrain-runs``,
and the flow's commit names the outcome. The "nothing changed" shortcut reads the judged
training run's promotion tags, and the policy cooldown reads `last_started` from these records,
so a re-cloned workspace pointing at the same tracking store keeps both.
``.medloop/runs.jsonl`` is only a cache of the summaries for ``medloop status``; `recent`
rebuilds it from MLflow when it is missing.

The flow (`flows.retrain`) only wires these to its tasks.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from pipelines import promote
from pipelines.config import Params
from pipelines.ops import report
from pipelines.ops.versioning import changed
from pipelines.registry.tags import (COMMIT, FLOW_RUN_ID, PARAMS_HASH, RETRAIN_FINISHED_AT, RETRAIN_JUDGED_RUN,
                                     RETRAIN_OUTCOME, RETRAIN_PROMOTION, RETRAIN_REASON, RETRAIN_STARTED_AT,
                                     RETRAIN_VERSION, TRIGGER)
from pipelines.workspace import Layout, read_json

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger("medloop.runs")

PROMOTED = ("promoted", "override")
SUMMARY_ARTIFACT = "retrain/summary.json"
ENDED_BADLY = ("failed", "crashed")
TAG_LIMIT = 5000  # a reason longer than this is cut in the tag; the summary artifact keeps it whole


def nothing_changed(params: Params, layout: Layout) -> bool:
    """True when there is nothing to do: ``dvc status`` finds every stage up to date and the model
    of the last training was already judged by promote."""
    out_of_date = changed(layout)
    if out_of_date:
        log.info("out of date: %s", ", ".join(out_of_date))
        return False
    if not layout.train_json.is_file():
        return False
    run_id = read_json(layout.train_json, "run the train stage").get("run_id")
    return promote.earlier_decision(params, layout, run_id) is not None


def new_version(promotion: dict[str, Any]) -> str | None:
    """The version this run registered as champion (promoted, or by override), else None: the
    version the workspace commit is tagged with."""
    return promotion["version"] if promotion["action"] in PROMOTED else None


def version_to_deploy(promotion: dict[str, Any]) -> str | None:
    """The version to put in service after promote: the new champion, or a run registered earlier
    that is champion (deploy is idempotent, so a deploy that failed on an earlier night is
    completed now); None when nothing is to be deployed."""
    return new_version(promotion) or (promotion["version"] if promotion.get("passed") else None)


def outcome(promotion: dict[str, Any]) -> str:
    """How a run that trained (or found its model trained) ended: promoted, refused or data-only."""
    if promotion["action"] in PROMOTED:
        return "promoted"
    if promotion["action"] == "refused":
        return "refused"
    return "data-only"


def commit_message(model: str, outcome: str, promotion: dict[str, Any], collected: dict[str, Any]) -> str:
    """The workspace commit's message: the outcome, the run judged and the data batch."""
    batch = f"batch {collected['batch_id']}" if collected.get("batch_id") else "no new data"
    run = (promotion.get("run_id") or "")[:12]
    if outcome == "promoted":
        return f"{model} v{promotion['version']}: promoted (run {run}; {batch})"
    if outcome == "refused":
        return f"{model}: run {run} refused, champion unchanged ({batch})"
    return f"{model}: data updated ({batch})"


def feedback_commit_message(export: dict[str, Any]) -> str:
    """The commit of a night with nothing to retrain but clinicians' labels to version."""
    return f"feedback: export {export['export_id']} ({export['exported']} confirmed labels)"


# --------------------------------------------------------------------------------------------
# the record: MLflow runs, with runs.jsonl as a cache
# --------------------------------------------------------------------------------------------


def records_experiment(params: Params) -> str:
    """The MLflow experiment that holds the workspace's retrain run records."""
    return f"{params.tracking.experiment}-retrain-runs"


def record(params: Params, layout: Layout, summary: dict[str, Any]) -> str:
    """Record a retrain run's summary as an MLflow run (tags for every decision, the summary as
    the artifact ``retrain/summary.json``) and in the ``runs.jsonl`` cache; the record's run id."""
    from pipelines.registry.client import connect
    from pipelines.registry.tracking import data_hashes, new_experiment_location
    from pipelines.values import now_iso

    client = connect(params, layout)
    name = records_experiment(params)
    experiment = client.get_experiment_by_name(name)
    experiment_id = (experiment.experiment_id if experiment is not None
                     else client.create_experiment(name, artifact_location=new_experiment_location(params, layout)))
    promotion = summary.get("promotion") or {}
    finished = summary.get("finished_at") or now_iso()
    started = summary.get("started_at") or finished
    tags = {
        RETRAIN_OUTCOME: summary.get("outcome"), RETRAIN_STARTED_AT: started, RETRAIN_FINISHED_AT: finished,
        RETRAIN_REASON: (summary.get("reason") or promotion.get("reason") or "")[:TAG_LIMIT],
        RETRAIN_JUDGED_RUN: promotion.get("run_id"), RETRAIN_PROMOTION: promotion.get("action"),
        RETRAIN_VERSION: promotion.get("version"), TRIGGER: summary.get("trigger"),
        FLOW_RUN_ID: summary.get("flow_run_id"), COMMIT: (summary.get("publish") or {}).get("commit"),
        PARAMS_HASH: params.digest(), **data_hashes(layout),
    }
    run = client.create_run(experiment_id, start_time=_millis(started), run_name=f"retrain {summary.get('outcome')}",
                            tags={key: str(value) for key, value in tags.items() if value})
    run_id = run.info.run_id
    client.log_text(run_id, json.dumps(summary, indent=1, sort_keys=True, default=str), SUMMARY_ARTIFACT)
    client.set_terminated(run_id, "FAILED" if summary.get("outcome") in ENDED_BADLY else "FINISHED",
                          end_time=_millis(finished))
    report.append_run(layout, summary)
    return run_id


def last_started(params: Params, layout: Layout) -> datetime | None:
    """When the last retrain run of the workspace started, from its MLflow records; None when
    there was none."""
    newest = _records(params, layout, limit=1)
    if not newest:
        return None
    started = newest[0].data.tags.get(RETRAIN_STARTED_AT)
    if not started:
        return datetime.fromtimestamp(newest[0].info.start_time / 1000, timezone.utc)
    moment = datetime.fromisoformat(started)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def recent(params: Params, layout: Layout, limit: int = 5) -> list[dict[str, Any]]:
    """The last ``limit`` run summaries, newest first, from the ``runs.jsonl`` cache (rebuilt from
    the MLflow records first when it is missing)."""
    if not (layout.state / report.RUNS_FILE).is_file():
        rebuild_cache(params, layout)
    return report.recent_runs(layout, limit)


def rebuild_cache(params: Params, layout: Layout) -> int:
    """Write ``runs.jsonl`` anew from the MLflow records, oldest first; how many runs it holds."""
    import mlflow

    summaries = []
    for found in reversed(_records(params, layout)):
        try:
            summaries.append(json.loads(mlflow.artifacts.load_text(f"runs:/{found.info.run_id}/{SUMMARY_ARTIFACT}")))
        except Exception:  # noqa: BLE001 - a record without its artifact still has its tags
            tags = found.data.tags
            summaries.append({"outcome": tags.get(RETRAIN_OUTCOME), "started_at": tags.get(RETRAIN_STARTED_AT),
                              "finished_at": tags.get(RETRAIN_FINISHED_AT), "reason": tags.get(RETRAIN_REASON)})
    if summaries:  # no empty cache: the next look asks MLflow again
        report.write_runs(layout, summaries)
    return len(summaries)


def _records(params: Params, layout: Layout, limit: int | None = None) -> list:
    """The retrain run records, newest first (none when the tracking store holds none yet)."""
    client = _reader(params, layout)
    if client is None:
        return []
    experiment = client.get_experiment_by_name(records_experiment(params))
    if experiment is None:
        return []
    order = ["attributes.start_time DESC"]
    if limit is not None:
        return list(client.search_runs([experiment.experiment_id], order_by=order, max_results=limit))
    found, token = [], None
    while True:
        page = client.search_runs([experiment.experiment_id], order_by=order, max_results=1000, page_token=token)
        found += list(page)
        token = page.token
        if not token:
            return found


def _reader(params: Params, layout: Layout) -> "MlflowClient | None":
    """A client on the tracking store (MLflow pointed at it), or None when it is a local SQLite
    file not made yet (so reading creates nothing)."""
    from pathlib import Path

    from pipelines.registry.tracking import tracking_uri

    uri = tracking_uri(params, layout)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None  # and MLflow is not even imported
    import mlflow

    from pipelines.secrets import export_file_secrets

    export_file_secrets()  # MLFLOW_TRACKING_PASSWORD_FILE, as configure does
    mlflow.set_tracking_uri(uri)  # for the runs:/ artifact URIs too
    return mlflow.MlflowClient(uri)


def _millis(moment: str) -> int:
    parsed = datetime.fromisoformat(moment)
    parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
    return int(parsed.timestamp() * 1000)
