"""The nightly schedule: the work pool, the deployment of the retrain flow, the worker, and when
the next run is due. All of it through a Prefect server (``PREFECT_API_URL``).

The deployment itself is declared in ``infra/prefect.yaml`` and applied with ``prefect deploy``,
the same command a user would run by hand; medloop fills in its values from the workspace's
params.yaml (``schedule`` section).
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from pipelines.config import Params
from pipelines.errors import MedloopError
from pipelines.ops.scaffold import project_root
from pipelines.ops.versioning import tool_env
from pipelines.workspace import Layout
from tasks.train_job import train_deployment_name

FLOW_NAME = "retrain"
POLICY_FLOW_NAME = "retrain-policy"
PREFECT_FILE = Path("infra") / "prefect.yaml"


class ScheduleError(MedloopError):
    """The Prefect server is not configured or not reachable, or it refused the deployment."""


def api_url() -> str:
    """``PREFECT_API_URL``, which must name a running Prefect server.

    Raises:
        ScheduleError: it is not set (a schedule in a throwaway in-process server would never fire).
    """
    url = os.environ.get("PREFECT_API_URL", "").strip()
    if not url:
        raise ScheduleError(
            "PREFECT_API_URL is not set: schedules live in a Prefect server. Start one with "
            "`prefect server start --host 127.0.0.1` (or `medloop ui`) and "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api`, then run this again."
        )
    return url


def deployment_values(params: Params, layout: Layout) -> dict[str, str]:
    """The ``{{ $MEDLOOP_* }}`` values of infra/prefect.yaml for one workspace."""
    schedule = params.schedule
    return {
        "MEDLOOP_DEPLOYMENT": schedule.deployment,
        "MEDLOOP_WORK_POOL": schedule.work_pool,
        "MEDLOOP_CRON": schedule.cron,
        "MEDLOOP_TIMEZONE": schedule.timezone,
        "MEDLOOP_PARAMS_FILE": str(layout.params_file),
        "MEDLOOP_PROJECT_ROOT": str(project_root()),
        "MEDLOOP_MODEL": params.model.name,
        "MEDLOOP_POLICY_DEPLOYMENT": params.retrain_policy.deployment,
        "MEDLOOP_POLICY_CRON": params.retrain_policy.check_cron,
        # The train job's deployment (flows/train_job.py). Without a train pool it is declared on
        # the nightly pool and never started: the retrain flow trains in its own process then.
        "MEDLOOP_TRAIN_DEPLOYMENT": train_deployment_name(params),
        "MEDLOOP_TRAIN_WORK_POOL": schedule.train_work_pool or schedule.work_pool,
    }


def apply_schedule(params: Params, layout: Layout) -> dict[str, Any]:
    """Create the work pool (when missing), the retrain deployment with its nightly schedule, and
    the retraining policy's check deployment on ``retrain_policy.check_cron``.

    Returns:
        ``deployment`` (flow/deployment name), ``work_pool``, ``cron``, ``timezone``,
        ``next_run`` (ISO time of the first scheduled run, or None if not yet planned),
        ``policy_deployment`` and ``policy_cron``.

    Raises:
        ScheduleError: no server, or ``prefect deploy`` failed (its own words are included).
    """
    url = api_url()
    ensure_work_pool(params.schedule.work_pool)
    env = {**tool_env(), **deployment_values(params, layout), "PREFECT_API_URL": url}
    command = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all",
               "--prefect-file", str(project_root() / PREFECT_FILE)]
    done = subprocess.run(command, cwd=project_root(), env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise ScheduleError(f"`prefect deploy` failed for {layout.params_file}:\n"
                            f"{(done.stderr or done.stdout).strip()[-3000:]}")
    next_run = next_scheduled_run(params)
    return {
        "deployment": f"{FLOW_NAME}/{params.schedule.deployment}",
        "work_pool": params.schedule.work_pool,
        "cron": params.schedule.cron,
        "timezone": params.schedule.timezone,
        "next_run": next_run.isoformat() if next_run else None,
        "policy_deployment": f"{POLICY_FLOW_NAME}/{params.retrain_policy.deployment}",
        "policy_cron": params.retrain_policy.check_cron,
    }


def ensure_work_pool(name: str) -> bool:
    """Create a ``process`` work pool named ``name`` unless it exists; True when created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        _check_reachable(client)
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        except ObjectAlreadyExists:
            return False
    return True


def next_scheduled_run(params: Params) -> datetime | None:
    """When the deployment's next scheduled run is due; None when nothing is scheduled.

    Raises:
        ScheduleError: no server configured or reachable, or no such deployment.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.exceptions import ObjectNotFound

    api_url()
    with get_client(sync_client=True) as client:
        _check_reachable(client)
        try:
            deployment = client.read_deployment_by_name(f"{FLOW_NAME}/{params.schedule.deployment}")
        except ObjectNotFound:
            raise ScheduleError(f"no deployment {FLOW_NAME}/{params.schedule.deployment} on the Prefect "
                                f"server; create it with `medloop schedule`") from None
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC,
            limit=1,
        )
    return runs[0].expected_start_time if runs else None


def worker_command(params: Params) -> list[str]:
    """The command of a worker for the workspace's pool. It takes every due run it finds; the
    deployment's concurrency limit (infra/prefect.yaml) lets one run per model go and cancels the
    others, so a backlog after downtime does not queue up identical runs."""
    return [sys.executable, "-m", "prefect", "worker", "start", "--pool", params.schedule.work_pool,
            "--type", "process"]


def _check_reachable(client: Any) -> None:
    try:
        error = client.api_healthcheck()  # returns the error rather than raising it
    except Exception as exc:  # noqa: BLE001 - any transport error means unreachable
        error = exc
    if error is not None:
        raise ScheduleError(f"the Prefect server at {os.environ.get('PREFECT_API_URL')} is not reachable ({error}); "
                            f"start it with `prefect server start --host 127.0.0.1` or `medloop ui`")
