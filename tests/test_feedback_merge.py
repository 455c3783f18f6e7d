"""Clinicians' confirmed labels back into the data: feedback export -> collect -> clean ->
preprocess, on real workspaces (git + DVC) and a real feedback store."""

from __future__ import annotations

import pandas as pd

from conftest import image_params, load, make_workspace, tabular_params
from pipelines import clean, collect, feedback_export, preprocess, validate
from pipelines.data import manifest
from pipelines.store.feedback import FeedbackStore
from pipelines.workspace import database_url


def _store(layout):
    return FeedbackStore(database_url(layout, load(layout).serving.store_url))


def _confirm(store, *, features=None, file=None, label, reviewer="dr-a", key=None, modality="tabular"):
    metadata = {"features": features} if features is not None else {"format": "png", "file": file}
    prediction_id = store.record_prediction(
        model_name="m", model_version="1", input_sha256=(key or label)[:64], modality=modality,
        probabilities={}, decision=label, operating_threshold=0.5, requested_by="dr-a", input_metadata=metadata)
    store.add_feedback(prediction_id, label, reviewer, f"{prediction_id}-{reviewer}-{label}")
    return prediction_id


def _other(label: str, classes: list[str]) -> str:
    return next(name for name in classes if name != label)


def test_a_clinician_label_overrides_the_dataset_label_of_the_same_row(tmp_path):
    params = tabular_params()
    params["source"]["nights"] = 1  # the source brings nothing after the first collect
    layout = make_workspace(tmp_path, params)
    collect.run(load(layout), layout)
    clean.run(load(layout), layout)
    records = pd.read_parquet(layout.clean_records)
    stored = collect_rows(layout)
    classes = load(layout).model.classes
    features = list(load(layout).tabular.features)
    target = records.iloc[3]
    relabel = _other(target["label"], classes)
    row = stored.loc[target["record_id"], features]
    store = _store(layout)
    corrected = _confirm(store, features={name: float(row[name]) for name in features}, label=target["label"])
    new_case = {name: float(row[name]) * 1.01 for name in features}  # no such row in the dataset
    _confirm(store, features=new_case, label=classes[0])
    assert feedback_export.run(load(layout), layout).exported == 2
    store.add_feedback(corrected, relabel, "dr-a", "correction")  # a correction after the export
    assert feedback_export.run(load(layout), layout).exported == 1
    store.close()

    first = collect.run(load(layout), layout)
    assert first.stored == 3 and first.batch_id is not None
    assert collect.run(load(layout), layout).batch_id is None  # each export is collected once
    raw = manifest.read(layout)
    from_feedback = raw[raw["source"] == "feedback"]
    assert set(from_feedback["label_provenance"]) == {"clinician"}
    assert from_feedback["source_ref"].str.contains(corrected).sum() == 2

    clean.run(load(layout), layout)
    after = pd.read_parquet(layout.clean_records).set_index("record_id")
    assert len(after) == len(records) + 1  # the new case; the relabels are not new items
    # The latest clinician label wins, on the record that was there before (same patient).
    assert after.loc[target["record_id"], "label"] == relabel
    assert after.loc[target["record_id"], "label_provenance"] == "clinician"
    assert after.loc[target["record_id"], "label_batch_id"] == first.batch_id
    assert after.loc[target["record_id"], "patient_id"] == target["patient_id"]
    assert (after["label_provenance"] == "clinician").sum() == 2
    intake = pd.read_parquet(layout.clean_intake)
    merged = intake[intake["reason"].str.startswith("merged: ")]
    assert len(merged) == 2 and merged["accepted"].all()
    quarantine = pd.read_csv(layout.quarantine_csv)
    assert not quarantine["reason"].fillna("").str.startswith("merged").any()
    # A batch of labels only passes the newest-batch gate: relabelled records count for it.
    validate.run(load(layout), layout)


def test_a_clinician_label_enters_training_but_never_the_frozen_test_set(tmp_path):
    params = tabular_params()
    params["source"]["nights"] = 1  # the source brings nothing after the first collect
    layout = make_workspace(tmp_path, params)
    collect.run(load(layout), layout)
    clean.run(load(layout), layout)
    preprocess.run(load(layout), layout)
    frozen = pd.read_parquet(layout.root / "data" / "splits" / preprocess.FROZEN_TEST_FILE)
    records = pd.read_parquet(layout.clean_records).set_index("record_id")
    stored = collect_rows(layout)
    features = list(load(layout).tabular.features)
    classes = load(layout).model.classes
    test_record = frozen["record_id"].iloc[0]
    train_record = next(r for r in records.index if r not in set(frozen["record_id"])
                        and not records.loc[r, "patient_id"] in set(frozen["patient_id"]))
    store = _store(layout)
    for record in (test_record, train_record):
        row = stored.loc[record, features]
        _confirm(store, features={n: float(row[n]) for n in features}, label=_other(records.loc[record, "label"], classes))
    store.close()
    feedback_export.run(load(layout), layout)
    collect.run(load(layout), layout)
    clean.run(load(layout), layout)
    preprocess.run(load(layout), layout)
    split = _splits(layout)
    assert split.loc[test_record, "label"] == records.loc[test_record, "label"]  # frozen: unchanged
    assert split.loc[train_record, "label"] == _other(records.loc[train_record, "label"], classes)
    assert split.loc[test_record, "split"] == "test" and split.loc[train_record, "split"] != "test"


def test_an_image_label_relabels_the_same_pixels_and_a_lost_input_is_quarantined(tmp_path):
    params = image_params()
    params["source"]["nights"] = 1
    layout = make_workspace(tmp_path, params)
    collect.run(load(layout), layout)
    clean.run(load(layout), layout)
    records = pd.read_parquet(layout.clean_records)
    target = records.iloc[0]
    raw = manifest.read(layout).set_index("record_id")
    # What the service keeps of an upload: the de-identified file, named by its content hash.
    stored_file = layout.raw / target["record_id"]
    inputs = layout.state / "serving" / "inputs"
    inputs.mkdir(parents=True)
    (inputs / stored_file.name).write_bytes(stored_file.read_bytes())
    relabel = _other(target["label"], load(layout).model.classes)
    store = _store(layout)
    _confirm(store, file=stored_file.name, label=relabel, modality="image")
    _confirm(store, file="gone.png", label=relabel, modality="image", key="z")
    store.close()
    export = feedback_export.run(load(layout), layout)
    assert (export.exported, export.missing_inputs) == (2, 1)

    result = collect.run(load(layout), layout)
    assert (result.stored, result.rejected) == (1, 1)
    clean.run(load(layout), layout)
    after = pd.read_parquet(layout.clean_records).set_index("record_id")
    assert len(after) == len(records)
    assert after.loc[target["record_id"], "label"] == relabel
    assert after.loc[target["record_id"], "label_provenance"] == "clinician"
    assert after.loc[target["record_id"], "patient_id"] == raw.loc[target["record_id"], "patient_id"]
    quarantine = pd.read_csv(layout.quarantine_csv)
    lost = quarantine[quarantine["source"] == "feedback"]
    assert len(lost) == 1 and "without its input" in lost["reason"].iloc[0]
    assert "gone.png" in lost["reason"].iloc[0]


def collect_rows(layout) -> pd.DataFrame:
    """Every stored table row of data/raw, indexed by record id."""
    return manifest.stored_rows(layout)


def _splits(layout) -> pd.DataFrame:
    """Every item's split and the label it trains or is tested with (preprocess's index)."""
    return pd.read_parquet(layout.processed / "index.parquet").set_index("record_id")
