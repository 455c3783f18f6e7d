"""The data half of the nightly loop: collect -> clean -> validate -> preprocess -> push -> commit."""

from __future__ import annotations

from prefect import flow

from tasks.data import DATA_STAGES, collect_task, commit_task, stage_task
from tasks.retrain import push_task


@flow(name="data-refresh")
def data_refresh(workspace: str, night: int | None = None) -> dict:
    """Collect what is new and bring the DVC data stages up to date, then push the data versions
    to the DVC remote before committing them (as the retrain flow does): every commit's data is on
    the remote, and a push that fails (retried first) fails the run with nothing committed.

    Returns:
        ``collect`` (what arrived), ``stages`` (which ran), ``commit`` (the workspace commit
        recording the new data version, or None when nothing changed).
    """
    from prefect.runtime import flow_run

    collected = collect_task(workspace, night)
    ran = {stage: stage_task(workspace, stage, str(flow_run.id or ""))["ran"] for stage in DATA_STAGES}
    push_task(workspace)
    message = f"data: batch {collected['batch_id']}" if collected["batch_id"] else "data: stages refreshed"
    commit = commit_task(workspace, message)
    return {"collect": collected, "stages": ran, "commit": commit}
