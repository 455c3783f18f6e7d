"""The train stage as a flow of its own, so that it can run as a separate job on a GPU node.

The nightly retrain (`flows.retrain`) starts this flow's deployment when
``schedule.train_work_pool`` names a work pool (a Kubernetes pool whose base job template
requests ``gpu_count`` NVIDIA GPUs, infra/k8s/), and waits for it; the other stages stay on the
CPU worker. The job sees the same workspace (a shared volume) and runs ``dvc repro --single-item
train`` there (the retrain flow has brought the stages before it up to date), so its process ends
with the stage and the GPU is freed.
"""

from __future__ import annotations

from prefect import flow

from tasks.data import stage_task
from tasks.retrain import workspace_of

FLOW_NAME = "train-stage"


@flow(name=FLOW_NAME)
def train_stage(params_file: str = "params.yaml", flow_run_id: str = "") -> dict:
    """``dvc repro --single-item train`` in the workspace of ``params_file``: ``ran`` and ``seconds``.

    ``flow_run_id`` is the nightly retrain's flow run, which the training run's lineage names
    (not this job's own flow run)."""
    return stage_task(workspace_of(params_file), "train", flow_run_id or None)
