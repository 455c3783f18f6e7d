"""The train stage as a separate job: start the ``train-stage`` deployment on the GPU work pool
and wait for it (``schedule.train_work_pool``, ``schedule.train_gpus``)."""

from __future__ import annotations

import time

from prefect import task
from prefect.logging import get_run_logger

from pipelines.config import Params, load_params
from pipelines.errors import MedloopError
from pipelines.workspace import Layout
from tasks import progress

TRAIN_FLOW = "train-stage"
GPU_VARIABLE = "gpu_count"  # the work pool's job variable that becomes nvidia.com/gpu (infra/k8s/)


def train_deployment_name(params: Params) -> str:
    """The train job's deployment: the nightly deployment's name with ``-train``."""
    return f"{params.schedule.deployment}-train"


def train_job_variables(params: Params) -> dict:
    """What this night's train job asks of the pool's base job template."""
    return {GPU_VARIABLE: params.schedule.train_gpus}


@task(name="train-job", task_run_name="train on {workspace}")
def train_job_task(workspace: str, flow_run_id: str | None = None) -> dict:
    """Run the train stage as its own flow run on ``schedule.train_work_pool`` and wait for it;
    ``flow_run_id`` (the nightly retrain's) goes into the training run's lineage.

    Returns:
        ``ran`` (True: the job ran ``dvc repro train``, which may have found nothing to do) and
        ``seconds`` (the job's wall time, queueing for a GPU node included).

    Raises:
        MedloopError: the job ended in any state but completed (its logs are in Prefect's UI).
    """
    from prefect.deployments import run_deployment

    layout = Layout.at(workspace)
    params = load_params(layout.params_file)
    name = f"{TRAIN_FLOW}/{train_deployment_name(params)}"
    progress.emit("train", "running")
    started = time.perf_counter()
    flow_run = run_deployment(name=name, parameters={"params_file": str(layout.params_file), "flow_run_id": flow_run_id or ""},
                              job_variables=train_job_variables(params), timeout=None)
    seconds = time.perf_counter() - started
    state = flow_run.state
    if state is None or not state.is_completed():
        progress.emit("train", "failed")
        raise MedloopError(
            f"the train job {name} (flow run {flow_run.id}) ended {state.name if state else 'without a state'} "
            f"on work pool {params.schedule.train_work_pool}: see that flow run's logs in Prefect; "
            "check the pool's worker and that a GPU node can take the job"
        )
    progress.emit("train", "done", seconds=seconds)
    get_run_logger().info("train job %s: completed (%.1f s)", name, seconds)
    return {"ran": True, "seconds": round(seconds, 3)}
