"""The retraining policy check (Prefect deployment on ``retrain_policy.check_cron``): starts the
retrain deployment outside the nightly schedule when enough confirmed labels wait or the
champion's inputs drift, outside the cooldown; the reason is the retrain run's ``reason``
parameter. See ``pipelines.monitoring.policy`` for the rules."""

from __future__ import annotations

from prefect import flow

from pipelines.monitoring import policy
from pipelines.config import load_params
from pipelines.workspace import Layout
from tasks.policy import check_task, start_retrain_task
from tasks.retrain import workspace_of


@flow(name="retrain-policy")
def retrain_policy(params_file: str = "params.yaml") -> dict:
    """Check the policy once; start a retrain when it says so.

    Returns:
        The decision (``retrain``, ``reasons``, ``held_back_by``, ``new_labels``, ``drift``,
        ``flow_run_id`` of the retrain it started), also kept in ``.medloop/policy.jsonl`` and
        published as the Prefect artifact ``retrain-policy-<model>``.
    """
    from prefect.artifacts import create_markdown_artifact

    from flows.deployments import ScheduleError, next_scheduled_run

    workspace = workspace_of(params_file)
    layout = Layout.at(workspace).require()
    params = load_params(layout.params_file)
    try:
        next_nightly = next_scheduled_run(params)
    except ScheduleError:
        next_nightly = None  # no nightly deployment (yet): the policy alone decides
    decision = check_task(workspace, next_nightly)
    if decision.retrain:
        decision.flow_run_id = start_retrain_task(workspace, decision.reason)
    policy.record(layout, decision)
    key = "retrain-policy-" + "".join(c if c.isalnum() else "-" for c in params.model.name.lower())
    create_markdown_artifact(markdown=policy.render_markdown(decision), key=key,
                             description=policy.headline(decision))
    return decision.as_dict()
