"""Feedback export (a task, before collect): clinicians' confirmed labels out of the feedback
store and into ``data/feedback/``, versioned by DVC.

Each export is a folder ``data/feedback/exports/<export id>/`` holding ``labels.parquet``, one
row per prediction whose confirmed label (agreed by its reviewers, or adjudicated) is new since
the exports before it: prediction id, model version, the label with provenance ``clinician`` and
how it was confirmed, the reviewers, and the input it refers to (the de-identified image, copied
into ``images/``, or the feature values). A case still waiting for adjudication is not exported
until it is resolved, however late that is; a later correction or adjudication that changes an
exported label is exported again, naming the label it supersedes. What was exported is read
back from the exports themselves, and a new export is published by one rename and recorded with
``dvc add data/feedback``, so a failure never loses or repeats a label.

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
from pipelines.data.manifest import new_batch_id
from pipelines.store.feedback import FeedbackStore
from pipelines.ops.versioning import track
from pipelines.workspace import Layout, database_url

log = logging.getLogger("medloop.feedback")

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
    exported_before, mark = _read_exports(layout)
    store = FeedbackStore(database_url(layout, params.serving.store_url))
    try:
        confirmed = pending(store, layout, exported_before)
        if not confirmed:
            if layout.feedback.is_dir() and not (layout.root / "data" / "feedback.dvc").is_file():
                track(layout, layout.feedback)  # an export published before a failed `dvc add`
            return ExportResult(None, 0, 0, mark, None)
        export_id = new_batch_id()
        staging = layout.tmp / f"feedback-{export_id}"
        (staging / "images").mkdir(parents=True)
        try:
            rows = [_row(store.prediction(case["prediction_id"]), case, layout, staging,
                         exported_before.get(case["prediction_id"])) for case in confirmed]
            pd.DataFrame(rows).to_parquet(staging / LABELS_FILE, index=False)
            (layout.feedback / "exports").mkdir(parents=True, exist_ok=True)
            # Publishing is one rename, and what was exported is read back from the exports
            # themselves: a failure before or after it never loses or repeats a label.
            staging.rename(layout.feedback / "exports" / export_id)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        store.close()
    last = max(case["last_feedback_id"] for case in confirmed)
    dvc_file = track(layout, layout.feedback)
    missing = sum(row["status"] == "missing_input" for row in rows)
    log.info("feedback export %s: %d confirmed labels (%d without their input)", export_id, len(rows), missing)
    return ExportResult(export_id, len(rows), missing, last, dvc_file.relative_to(layout.root).as_posix())


def pending(store: FeedbackStore, layout: Layout, exported: dict[str, str] | None = None) -> list[dict]:
    """The confirmed labels an export would take now: new, or changed since their export."""
    exported = exported_labels(layout) if exported is None else exported
    return [case for case in store.confirmed_labels() if exported.get(case["prediction_id"]) != case["label"]]


def exported_labels(layout: Layout) -> dict[str, str]:
    """The label last exported for each prediction, read from every export (oldest first)."""
    return _read_exports(layout)[0]


def _read_exports(layout: Layout) -> tuple[dict[str, str], int]:
    """Every export read once: the label last exported per prediction, and the highest
    feedback id exported (0 before the first export)."""
    labels: dict[str, str] = {}
    mark = 0
    for labels_file in sorted((layout.feedback / "exports").glob(f"*/{LABELS_FILE}")):
        frame = pd.read_parquet(labels_file, columns=["prediction_id", "label", "last_feedback_id"])
        labels.update(zip(frame["prediction_id"], frame["label"]))
        mark = max(mark, int(frame["last_feedback_id"].max()))
    return labels, mark


def _row(prediction: dict, case: dict, layout: Layout, staging, superseded: str | None) -> dict:
    metadata = dict(prediction["input_metadata"] or {})
    row = {
        "supersedes_label": superseded or "",
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
