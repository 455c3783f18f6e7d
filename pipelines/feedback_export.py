"""Feedback export (a task, before collect): clinicians' confirmed labels out of the feedback
store and into ``data/feedback/``, versioned by DVC.

Each export is a folder ``data/feedback/exports/<export id>/`` holding ``labels.parquet``, one
row per prediction whose label is confirmed (agreed by its reviewers, or adjudicated) and that
has feedback newer than the previous export: prediction id, model version, the label with
provenance ``clinician`` and how it was confirmed, the reviewers, and the input it refers to
(the de-identified image, copied into ``images/``, or the feature values). A case still waiting
for adjudication is not exported until it is resolved. The highest feedback id exported is kept
in ``data/feedback/export_state.json``, so every confirmed label is exported exactly once, and
the folder is published by one rename and recorded with ``dvc add data/feedback``.

Nothing is dropped silently: a confirmed label whose image the service no longer has is exported
with ``status = missing_input`` and the reason.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass

import pandas as pd

from pipelines.config import Params
from pipelines.manifest import new_batch_id
from pipelines.store.feedback import FeedbackStore
from pipelines.versioning import track
from pipelines.workspace import Layout, database_url

log = logging.getLogger("medloop.feedback")

STATE_FILE = "export_state.json"
LABELS_FILE = "labels.parquet"


@dataclass(frozen=True)
class ExportResult:
    """What one export did: ``export_id`` is None when there was nothing new to export."""

    export_id: str | None
    exported: int
    missing_inputs: int
    last_feedback_id: int
    dvc_file: str | None

    def as_dict(self) -> dict:
        return asdict(self)


def run(params: Params, layout: Layout) -> ExportResult:
    """Export the labels confirmed since the last export (see module docstring)."""
    state_path = layout.feedback / STATE_FILE
    mark = json.loads(state_path.read_text())["last_feedback_id"] if state_path.is_file() else 0
    store = FeedbackStore(database_url(layout, params.serving.store_url))
    try:
        confirmed = store.confirmed_labels(after_feedback_id=mark)
        if not confirmed:
            return ExportResult(None, 0, 0, mark, None)
        export_id = new_batch_id()
        staging = layout.tmp / f"feedback-{export_id}"
        (staging / "images").mkdir(parents=True)
        try:
            rows = [_row(store.prediction(case["prediction_id"]), case, layout, staging) for case in confirmed]
            pd.DataFrame(rows).to_parquet(staging / LABELS_FILE, index=False)
            (layout.feedback / "exports").mkdir(parents=True, exist_ok=True)
            staging.rename(layout.feedback / "exports" / export_id)  # publish: one rename
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        store.close()
    last = max(case["last_feedback_id"] for case in confirmed)
    state_path.write_text(json.dumps({"last_feedback_id": last, "last_export": export_id}, indent=2) + "\n")
    dvc_file = track(layout, layout.feedback)
    missing = sum(row["status"] == "missing_input" for row in rows)
    log.info("feedback export %s: %d confirmed labels (%d without their input)", export_id, len(rows), missing)
    return ExportResult(export_id, len(rows), missing, last, dvc_file.relative_to(layout.root).as_posix())


def _row(prediction: dict, case: dict, layout: Layout, staging) -> dict:
    metadata = dict(prediction["input_metadata"] or {})
    row = {
        "prediction_id": case["prediction_id"], "model_version": case["model_version"],
        "input_sha256": case["input_sha256"], "label": case["label"], "label_provenance": "clinician",
        "confirmed_by": case["how"], "reviewers": json.dumps(case["reviewers"]),
        "last_feedback_id": case["last_feedback_id"], "status": "exported", "reason": "",
        "record": "", "features": "",
    }
    if prediction["modality"] == "image":
        kept = layout.state / "serving" / "inputs" / str(metadata.get("file", ""))
        if metadata.get("file") and kept.is_file():
            shutil.copyfile(kept, staging / "images" / kept.name)
            row["record"] = f"images/{kept.name}"
        else:
            row.update(status="missing_input", reason=f"the service no longer has the de-identified image {kept.name}")
        for key in ("patient_id", "sex", "age_band", "view", "site", "study_year"):
            row[key] = str(metadata[key]) if metadata.get(key) is not None else ""
    else:
        row["features"] = json.dumps(metadata.get("features", {}), sort_keys=True)
    return row
