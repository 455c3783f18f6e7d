"""MLflow set-up and lineage, shared by train, evaluate and promote.

Relative locations in ``tracking`` are resolved against the workspace root, so the default
(SQLite store and artifact folder under ``.medloop/``) needs no server. MLflow is imported inside
the functions that use it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import yaml

from pipelines.config import Params
from pipelines.registry.tags import (CLINICIAN_LABEL_BATCH_COUNT, CLINICIAN_LABEL_BATCHES, CLINICIAN_LABELS,
                                     DATA_FEEDBACK, DATA_FROZEN_TEST_SET, DATA_PROCESSED, DATA_RAW, FLOW_RUN_ID,
                                     GIT_COMMIT, PARAMS_HASH)
from pipelines.workspace import Layout, database_url

# How a stage process (``dvc repro`` -> ``python -m pipelines.train``) learns the Prefect flow run
# that started it: a variable of that subprocess's environment only (`flow_run_env`); pipelines
# never import Prefect.
FLOW_RUN_ENV = "MEDLOOP_FLOW_RUN_ID"


def tracking_uri(params: Params, layout: Layout) -> str:
    """The MLflow tracking URI with a relative SQLite path made absolute."""
    return database_url(layout, params.tracking.uri)


def display_uri(params: Params, layout: Layout) -> str:
    """The tracking URI for messages and files: any password masked."""
    from pipelines.errors import mask_credentials

    return mask_credentials(tracking_uri(params, layout))


def artifact_location(params: Params, layout: Layout) -> str:
    """Where new experiments store artifacts (a file URI for a relative folder)."""
    root = params.tracking.artifact_root
    if "://" in root:
        return root
    path = Path(root) if Path(root).is_absolute() else layout.root / root
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve().as_uri()


def configure(params: Params, layout: Layout) -> str:
    """Point MLflow at the workspace's store; create the experiment when missing; its id.

    A tracking server's credentials come from ``MLFLOW_TRACKING_USERNAME`` and
    ``MLFLOW_TRACKING_PASSWORD`` (or their ``_FILE`` forms, `pipelines.secrets`); artifacts that
    MLflow uploads to S3 itself ask for ``storage.s3_server_side_encryption``.
    """
    import mlflow

    from pipelines.secrets import export_file_secrets

    export_file_secrets()
    s3_upload_arguments(params)
    mlflow.set_tracking_uri(tracking_uri(params, layout))
    name = params.tracking.experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        return mlflow.create_experiment(name, artifact_location=new_experiment_location(params, layout))
    return experiment.experiment_id


def new_experiment_location(params: Params, layout: Layout) -> str | None:
    """Where a new experiment keeps its artifacts: the workspace's artifact root, except with a
    tracking server, which keeps them where it is configured (proxied: --artifacts-destination)
    unless params name a remote root; a local folder named there would put them on this
    machine, out of everyone else's reach."""
    if tracking_uri(params, layout).startswith(("http://", "https://")):
        return params.tracking.artifact_root if "://" in params.tracking.artifact_root else None
    return artifact_location(params, layout)


def flow_run_env(flow_run_id: str | None) -> dict[str, str]:
    """The environment variables that give a stage subprocess the flow run id (none without one)."""
    return {FLOW_RUN_ENV: flow_run_id} if flow_run_id else {}


S3_UPLOAD_ARGUMENTS_ENV = "MLFLOW_S3_UPLOAD_EXTRA_ARGS"


def s3_upload_arguments(params: Params) -> dict[str, str]:
    """The extra arguments of MLflow's own S3 uploads that ask for server-side encryption
    (``storage.s3_server_side_encryption``), put in ``MLFLOW_S3_UPLOAD_EXTRA_ARGS`` unless that
    is set already; empty when params ask for none. (With a tracking server that proxies
    artifacts, the server uploads: set the same variable in its environment, as infra/ does.)"""
    storage = params.storage
    if storage.s3_server_side_encryption is None:
        return {}
    arguments = {"ServerSideEncryption": storage.s3_server_side_encryption}
    if storage.s3_kms_key_id:
        arguments["SSEKMSKeyId"] = storage.s3_kms_key_id
    os.environ.setdefault(S3_UPLOAD_ARGUMENTS_ENV, json.dumps(arguments))
    return arguments


def lineage_tags(params: Params, layout: Layout) -> dict[str, str]:
    """What a run or model version was made from: git commit, DVC data hashes, params hash,
    flow run id. Every value is a string (MLflow tags)."""
    tags = {
        GIT_COMMIT: _git_commit(layout),
        PARAMS_HASH: params.digest(),
        **data_hashes(layout),
        **clinician_labels(layout),
    }
    flow_run = os.environ.get(FLOW_RUN_ENV)  # in a stage process: given by `flow_run_env`
    if flow_run:
        tags[FLOW_RUN_ID] = flow_run
    return tags


def data_hashes(layout: Layout) -> dict[str, str]:
    """The DVC hashes of the workspace's data now: raw (its index's ``.dvc`` file, which pins
    every batch; ``data/raw.dvc`` in a workspace not yet recorded batch by batch) and feedback
    (its ``.dvc`` file), the processed data and the frozen test set (``dvc.lock``); ``none`` for
    what is not there."""
    raw = layout.raw_record
    return {
        DATA_RAW: _dvc_file_hash(raw if raw.is_file() else layout.raw_folder_record),
        DATA_FEEDBACK: _dvc_file_hash(layout.root / "data" / "feedback.dvc"),
        DATA_PROCESSED: _lock_out_hash(layout, "preprocess", "data/processed"),
        DATA_FROZEN_TEST_SET: _lock_out_hash(layout, "preprocess", "data/splits"),
    }


MAX_NAMED_BATCHES = 50  # feedback exports named in a run tag (about 24 characters each)


def clinician_labels(layout: Layout) -> dict[str, str]:
    """What a model learns from clinicians: how many training and validation items carry a
    clinician's confirmed label (``medloop.data.clinician_labels``) and from which feedback
    exports (``medloop.data.clinician_label_batches``: the newest `MAX_NAMED_BATCHES` batch ids,
    comma-separated; ``medloop.data.clinician_label_batch_count``: how many)."""
    import pandas as pd

    index_file = layout.processed / "index.parquet"
    if not index_file.exists():
        return {}
    columns = pd.read_parquet(index_file).columns
    wanted = [c for c in ("split", "label_provenance", "label_batch_id") if c in columns]
    if "label_provenance" not in wanted:
        return {CLINICIAN_LABELS: "0", CLINICIAN_LABEL_BATCHES: "",
                CLINICIAN_LABEL_BATCH_COUNT: "0"}
    index = pd.read_parquet(index_file, columns=wanted)
    learned = index[(index["label_provenance"] == "clinician") & index["split"].isin(["train", "validation"])]
    batches = sorted({str(b) for b in learned.get("label_batch_id", pd.Series(dtype=str)).dropna()})
    # A tag holds at most 8,000 characters: the newest exports by name, all of them by count (the
    # data/feedback version in medloop.data.feedback names every one).
    return {CLINICIAN_LABELS: str(len(learned)),
            CLINICIAN_LABEL_BATCHES: ",".join(batches[-MAX_NAMED_BATCHES:]),
            CLINICIAN_LABEL_BATCH_COUNT: str(len(batches))}


ENVIRONMENT_PACKAGES = ("tensorflow", "tensorflow-cpu", "keras", "numpy", "pandas", "scikit-learn", "pillow",
                        "pydicom", "pyarrow", "mlflow", "dvc", "great-expectations", "prefect")


def environment_facts() -> dict[str, str]:
    """Facts of the software environment that can change a model: Python, the platform, and the
    installed versions of the packages training and evaluation use (absent ones are left out).
    Tagged on every training run as ``medloop.env.<name>``; reproduce reports differences."""
    import platform
    from importlib import metadata

    facts = {"python": platform.python_version(), "platform": f"{platform.system()}-{platform.machine()}"}
    for package in ENVIRONMENT_PACKAGES:
        try:
            facts[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return facts


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _git_commit(layout: Layout) -> str:
    from pipelines.ops.versioning import git, head_commit

    head = head_commit(layout)
    if head is None:
        return "none"
    dirty = git(layout, "status", "--porcelain", "--untracked-files=no", check=False).stdout.strip()
    return head + ("-dirty" if dirty else "")


def _dvc_file_hash(path: Path) -> str:
    if not path.is_file():
        return "none"
    outs = yaml.safe_load(path.read_text()).get("outs", [])
    return str(outs[0].get("md5", "none")) if outs else "none"


def _lock_out_hash(layout: Layout, stage: str, out: str) -> str:
    lock = layout.root / "dvc.lock"
    if not lock.is_file():
        return "none"
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for entry in stages.get(stage, {}).get("outs", []):
        if entry.get("path") == out:
            return str(entry.get("md5", "none"))
    return "none"


def dumps(payload: dict) -> str:
    """Deterministic JSON for reports that DVC tracks."""
    return json.dumps(payload, indent=2, sort_keys=True) + "\n"
