"""Lineage of registered model versions: what a version was made from, and the commit that holds it.

Train tags its MLflow run with the git commit it started from, the DVC hashes of its inputs, the
params hash and the Prefect flow run (`pipelines.registry.tracking.lineage_tags`); promote copies those tags onto
the registered version with the gate results and who promoted it and why. After the run the flow
commits ``dvc.lock`` and the ``.dvc`` files and tags that commit; `record_commit` then writes the
commit and tag onto the run and the version, so a version names the exact commit to reproduce it
from. `version_lineage` reads it all back for ``medloop lineage``.
"""

from __future__ import annotations

import json
from typing import Any

from pipelines.config import Params
from pipelines.errors import MedloopError
from pipelines.registry.client import champion as champion_of, connect, is_registered
from pipelines.registry.interrupted import answering
from pipelines.registry.tags import (CHAMPION, CLINICIAN_LABEL_BATCH_COUNT, CLINICIAN_LABEL_BATCHES, CLINICIAN_LABELS,
                                     COMMIT, DATA_FEEDBACK, DATA_FROZEN_TEST_SET, DATA_PROCESSED, DATA_RAW, DECISION,
                                     DEVICE_PREFIX, ENV_PREFIX, FLOW_RUN_ID, GIT_COMMIT, GIT_TAG, METRICS,
                                     OPERATING_THRESHOLD, PARAMS_HASH, PROMOTION_ACTOR, PROMOTION_AT,
                                     PROMOTION_REASON, TRIGGER, VERDICTS, WEIGHTS_SHA256)
from pipelines.workspace import Layout


class LineageError(MedloopError):
    """The model or version asked about is not in the registry."""


def git_tag_name(model_name: str, version: str) -> str:
    """The git tag of a version's commit, e.g. ``pneumonia-cxr-v3``."""
    return f"{model_name}-v{version}"


def record_commit(params: Params, layout: Layout, run_id: str, version: str | None, commit: str,
                  git_tag: str | None, trigger: str | None = None) -> None:
    """Write the commit (and its tag) that holds a run's ``dvc.lock``, and what started the flow
    run (``trigger``), onto the run and the version.

    Raises:
        TrackingUnavailable: the tracking server did not answer; the commit stands, unnamed in MLflow.
    """
    made = f"The commit {commit[:12]}{f' (tag {git_tag})' if git_tag else ''} is made and holds the night's data"
    with answering(params, layout, f"naming commit {commit[:12]} on run {run_id}",
                   f"{made}, but the MLflow run{' and version ' + version if version else ''} do not name it yet."):
        client = connect(params, layout)
        tags = {COMMIT: commit, GIT_TAG: git_tag, TRIGGER: trigger}
        for key, value in tags.items():
            if value:
                client.set_tag(run_id, key, value)
                if version is not None:
                    client.set_model_version_tag(params.model.name, version, key, value)


def version_lineage(params: Params, layout: Layout, version: str | None = None) -> dict[str, Any]:
    """Everything recorded about a registered version (default: the champion).

    Returns:
        ``model``, ``version``, ``aliases``, ``commit`` and ``git_tag`` (where the dvc.lock is),
        ``trigger`` (what started the flow run that made it),
        ``trained_from_commit`` (HEAD when training started), ``data`` (DVC hashes of raw,
        feedback, processed and the frozen test set), ``params_hash`` and ``params`` (as logged
        with the run), ``gates`` (every gate's verdict), ``operating_threshold``, ``metrics``
        (frozen test set), ``mlflow_run_id``, ``experiment_id``, ``flow_run_id``, ``promotion``
        (decision, actor, reason, at), ``device`` (TensorFlow, GPUs, strategy, mixed precision)
        and ``environment`` (Python, platform, package versions) of the training run.

    Raises:
        LineageError: no such model or version, or no champion when no version is given.
    """
    from mlflow.exceptions import MlflowException

    client = connect(params, layout)
    name = params.model.name
    if not is_registered(client, name):
        raise LineageError(f"model {name} is not registered in {params.tracking.uri}")
    if version is None:
        champion = champion_of(client, name)
        if champion is None:
            raise LineageError(f"model {name} has no {CHAMPION}; name a version")
        version = str(champion.version)
    try:
        model_version = client.get_model_version(name, str(version))
    except MlflowException:
        raise LineageError(f"model {name} has no version {version}") from None
    tags = model_version.tags
    run = client.get_run(model_version.run_id) if model_version.run_id else None
    run_tags = run.data.tags if run else {}
    metrics = json.loads(tags.get(METRICS, "{}"))
    return {
        "model": name,
        "version": str(model_version.version),
        "aliases": sorted(model_version.aliases),
        "commit": tags.get(COMMIT) or run_tags.get(COMMIT),
        "git_tag": tags.get(GIT_TAG) or run_tags.get(GIT_TAG),
        "trigger": tags.get(TRIGGER) or run_tags.get(TRIGGER),
        "trained_from_commit": tags.get(GIT_COMMIT),
        "data": {
            "raw": tags.get(DATA_RAW),
            "feedback": tags.get(DATA_FEEDBACK),
            "processed": tags.get(DATA_PROCESSED),
            "frozen_test_set": tags.get(DATA_FROZEN_TEST_SET),
        },
        "learned_from": {
            "clinician_labels": int(tags[CLINICIAN_LABELS])
            if tags.get(CLINICIAN_LABELS) else None,
            "clinician_label_batches": [b for b in tags.get(CLINICIAN_LABEL_BATCHES, "").split(",") if b],
            "clinician_label_batch_count": int(tags[CLINICIAN_LABEL_BATCH_COUNT])
            if tags.get(CLINICIAN_LABEL_BATCH_COUNT) else None,
        },
        "params_hash": tags.get(PARAMS_HASH),
        "params": dict(sorted(run.data.params.items())) if run else {},
        "gates": json.loads(tags.get(VERDICTS, "[]")),
        "operating_threshold": tags.get(OPERATING_THRESHOLD),
        "weights_sha256": tags.get(WEIGHTS_SHA256),
        "metrics": metrics.get("test", {}),
        "mlflow_run_id": model_version.run_id,
        "experiment_id": run.info.experiment_id if run else None,
        "flow_run_id": tags.get(FLOW_RUN_ID),
        "promotion": {
            "decision": tags.get(DECISION),
            "actor": tags.get(PROMOTION_ACTOR),
            "reason": tags.get(PROMOTION_REASON),
            "at": tags.get(PROMOTION_AT),
        },
        "device": _tags_under(run_tags, DEVICE_PREFIX),
        "environment": _tags_under(run_tags, ENV_PREFIX),
    }


def _tags_under(tags: dict[str, str], prefix: str) -> dict[str, str]:
    return {key[len(prefix):]: value for key, value in sorted(tags.items()) if key.startswith(prefix)}
