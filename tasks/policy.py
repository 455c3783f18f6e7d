"""Tasks of the retraining policy check: the check (the champion's drift and the decision), and
starting the retrain deployment with the reason."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task

from pipelines.monitoring import policy
from pipelines.config import load_params
from pipelines.workspace import Layout
from tasks.retries import retry_policy


@task(name="check-policy")
def check_task(workspace: str, next_nightly: Any) -> policy.PolicyDecision:
    """`pipelines.monitoring.policy.check`: the champion's drift (with ``on_drift``) and the decision."""
    layout = Layout.at(workspace)
    decision = policy.check(load_params(layout.params_file), layout, next_nightly=next_nightly)
    logger = get_run_logger()
    if decision.retrain:
        logger.info("retrain: %s", decision.reason)
    elif decision.held_back_by:
        logger.info("no retrain (%s) although %s", decision.held_back_by, "; ".join(decision.reasons))
    else:
        logger.info("no retrain: %d confirmed labels waiting, no drift", decision.new_labels)
    return decision


@task(name="start-retrain", **retry_policy(2, 10))
def start_retrain_task(workspace: str, reason: str) -> str:
    """Start a run of the workspace's retrain deployment now, with the reason as its parameter;
    returns the flow run id (the run itself is the worker's)."""
    from prefect.deployments import run_deployment

    layout = Layout.at(workspace)
    params = load_params(layout.params_file)
    run = run_deployment(
        name=f"retrain/{params.schedule.deployment}",
        parameters={"params_file": str(layout.params_file), "reason": reason},
        timeout=0,  # start it; do not wait for it
        tags=["medloop", params.model.name, "trigger:policy"],
    )
    return str(run.id)
