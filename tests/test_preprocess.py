"""Preprocess: patient-level split, the frozen test set, scaling fitted on train only, shards."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import image_params, load, make_workspace, tabular_params
from pipelines import clean, collect, preprocess
from pipelines.config import parse_params


def records(patients: int, per_patient: int, seed: int = 0, batch: str = "b1") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        label = "malignant" if rng.random() < 0.35 else "benign"
        for k in range(per_patient):
            rows.append({"record_id": f"{batch}/p{p}-{k}", "patient_id": f"pt-{seed}-{p}", "label": label,
                         "batch_id": batch})
    return pd.DataFrame(rows)


def spec(**changes):
    params = tabular_params()
    params["preprocess"].update(changes)
    return parse_params(params).preprocess


def test_no_patient_is_in_two_splits_and_strata_are_balanced():
    items = records(200, 3)
    patients = preprocess.assign_patients(items, None, spec(), ["benign", "malignant"])
    assert patients["patient_id"].is_unique
    merged = items.merge(patients, on="patient_id")
    assert (merged.groupby("patient_id")["split"].nunique() == 1).all()
    for label, group in patients.groupby("stratum"):
        share = group["split"].value_counts(normalize=True)
        assert share["test"] == pytest.approx(0.2, abs=0.02), label
        assert share["validation"] == pytest.approx(0.15, abs=0.02), label


def test_frozen_test_set_never_changes_and_new_patients_avoid_it():
    first = records(100, 2, seed=1, batch="b1")
    patients = preprocess.assign_patients(first, None, spec(), ["benign", "malignant"])
    frozen = preprocess.freeze_test_set(first, patients)
    later = pd.concat([first, records(120, 2, seed=2, batch="b2")], ignore_index=True)
    # a test patient comes back with a new study, and a train patient too
    test_patient = frozen["patient_id"].iloc[0]
    train_patient = patients.loc[patients["split"] == "train", "patient_id"].iloc[0]
    later = pd.concat([later, pd.DataFrame([
        {"record_id": "b2/again-test", "patient_id": test_patient, "label": "benign", "batch_id": "b2"},
        {"record_id": "b2/again-train", "patient_id": train_patient, "label": "benign", "batch_id": "b2"},
    ])], ignore_index=True)
    patients2 = preprocess.assign_patients(later, patients, spec(), ["benign", "malignant"])
    items = preprocess.split_items(later, patients2, frozen)
    assert set(items.loc[items["split"] == "test", "record_id"]) == set(frozen["record_id"])
    assert items.set_index("record_id").at["b2/again-test", "split"] == "held_out"
    assert items.set_index("record_id").at["b2/again-train", "split"] == "train"
    kept = patients.merge(patients2, on="patient_id", suffixes=("_before", "_after"))
    assert (kept["split_before"] == kept["split_after"]).all()
    newcomers = patients2[~patients2["patient_id"].isin(patients["patient_id"])]
    assert "test" not in set(newcomers["split"])
    assert (newcomers["split"] == "validation").mean() == pytest.approx(0.15 / 0.8, abs=0.05)


def test_test_labels_stay_as_frozen():
    first = records(40, 1, seed=3)
    patients = preprocess.assign_patients(first, None, spec(), ["benign", "malignant"])
    frozen = preprocess.freeze_test_set(first, patients)
    relabelled = first.copy()
    relabelled["label"] = "malignant"
    items = preprocess.split_items(relabelled, patients, frozen)
    test = items[items["split"] == "test"].set_index("record_id")["label"]
    assert test.to_dict() == frozen.set_index("record_id")["label"].to_dict()


@pytest.mark.parametrize("proportion, half_width, cases", [(0.85, 0.15, 22), (0.85, 0.10, 49), (0.5, 0.15, 39),
                                                          (1.0, 0.15, 9), (0.95, 0.05, 83)])
def test_the_minimum_test_set_comes_from_the_precision_a_floor_needs(proportion, half_width, cases):
    from scipy.stats import binomtest

    assert preprocess.cases_for_precision(proportion, half_width) == cases
    interval = binomtest(round(proportion * cases), cases).proportion_ci(method="wilson")
    observed = round(proportion * cases) / cases
    assert interval.high - interval.low <= 2 * half_width + 0.02  # whole cases round the proportion
    assert interval.low <= observed <= interval.high
    fewer = binomtest(round(proportion * (cases - 1)), cases - 1).proportion_ci(method="wilson")
    assert fewer.high - fewer.low > interval.high - interval.low - 0.01


def test_a_small_test_set_grows_with_new_patients_then_freezes_and_versions(tmp_path):
    """Below the minimum the test set takes new patients (never its old items' labels back, never
    a patient from training); once big enough it is frozen v1; a raised minimum grows it into v2."""
    classes = ["benign", "malignant"]
    minimum = {"items": 40, "cases_per_class": 12}
    grow = spec()
    nights = [records(60, 1, seed=s, batch=f"b{s}") for s in (11, 12, 13, 14)]
    seen, patients, frozen, state, history = None, None, None, None, []
    for night in nights:
        seen = night if seen is None else pd.concat([seen, night], ignore_index=True)
        growing = frozen is None or not preprocess.big_enough(preprocess.present_cases(frozen, seen, classes), minimum)
        before = None if patients is None else set(patients.loc[patients["split"] != "test", "patient_id"])
        patients = preprocess.assign_patients(seen, patients, grow, classes, grow_test=growing)
        if before is not None:  # nobody moves from train or validation into test
            assert before.isdisjoint(set(patients.loc[patients["split"] == "test", "patient_id"]))
        earlier = frozen
        frozen = preprocess.freeze_test_set(seen, patients, frozen) if growing else frozen
        if earlier is not None:  # earlier members and their labels stay
            assert earlier.merge(frozen, on=["record_id", "label"]).shape[0] == len(earlier)
        state = preprocess.test_set_state(frozen, preprocess.present_cases(frozen, seen, classes), minimum, state)
        history.append((state["status"], state["version"], state["items"]))
    assert history[0][:2] == ("growing", 0) and history[-1][:2] == ("frozen", 1)
    frozen_at = [i for i, h in enumerate(history) if h[0] == "frozen"][0]
    assert len({h[2] for h in history[frozen_at:]}) == 1  # frozen: no more growth
    assert preprocess.describe_test_set(state).startswith(f"frozen v1: {state['items']} items")

    raised = {"items": 40, "cases_per_class": max(state["cases"].values()) + 5}
    assert not preprocess.big_enough(state["cases"], raised)
    again = preprocess.test_set_state(frozen, state["cases"], raised, state)
    assert (again["status"], again["version"]) == ("growing", 1)
    assert preprocess.describe_test_set(again).startswith("growing: ")
    assert f"of {raised['cases_per_class']} " in preprocess.describe_test_set(again)
    # The extension reverted before any patient joined: the same members are still version 1.
    back = preprocess.test_set_state(frozen, state["cases"], minimum, again)
    assert (back["status"], back["version"]) == ("frozen", 1)


def test_tabular_scaler_is_fitted_on_train_only(tmp_path):
    layout = make_workspace(tmp_path, tabular_params())
    params = load(layout)
    collect.run(params, layout)
    clean.run(params, layout)
    result = preprocess.run(params, layout)
    assert result.test_set_created
    scaler = json.loads((layout.processed / "scaler.json").read_text())
    index = pd.read_parquet(layout.processed / "index.parquet")
    records_ = pd.read_parquet(layout.clean_records).set_index("record_id")
    train_ids = index.loc[index["split"] == "train", "record_id"]
    expected = records_.loc[train_ids, "mean_radius"].mean()
    assert scaler["mean"]["mean_radius"] == pytest.approx(expected)
    assert scaler["fitted_rows"] == len(train_ids)
    train = pd.read_parquet(layout.processed / "tabular" / "train.parquet")
    assert train["mean_radius"].mean() == pytest.approx(0.0, abs=1e-5)
    assert train["mean_radius"].dtype == np.float32
    # second night: the frozen test set is read back, not drawn again
    frozen_before = pd.read_parquet(layout.splits / "frozen_test_set.parquet")
    collect.run(params, layout)
    clean.run(params, layout)
    again = preprocess.run(params, layout)
    assert not again.test_set_created
    pd.testing.assert_frame_equal(pd.read_parquet(layout.splits / "frozen_test_set.parquet"), frozen_before)
    test = pd.read_parquet(layout.processed / "tabular" / "test.parquet")
    assert set(test["record_id"]) == set(frozen_before["record_id"])


def test_image_shards_read_back_with_tf_data(tmp_path):
    import tensorflow as tf

    layout = make_workspace(tmp_path, image_params())
    params = load(layout)
    for _ in range(2):
        collect.run(params, layout)
    clean.run(params, layout)
    preprocess.run(params, layout)
    summary = json.loads((layout.processed / "preprocess.json").read_text())
    index = pd.read_parquet(layout.processed / "index.parquet")
    # no patient in two splits, in the real output
    used = index[index["split"].isin(["train", "validation", "test"])]
    assert (used.groupby("patient_id")["split"].nunique() == 1).all()
    features = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "record_id": tf.io.FixedLenFeature([], tf.string),
    }
    seen = {}
    for split, files in summary["shards"].items():
        dataset = tf.data.TFRecordDataset([str(layout.processed / f) for f in files])
        for example in dataset.map(lambda x: tf.io.parse_single_example(x, features)):
            pixels = tf.reshape(tf.io.decode_raw(example["image"], tf.uint8), (64, 64, 3))
            assert pixels.dtype == tf.uint8 and int(tf.reduce_max(pixels)) > 200
            seen[example["record_id"].numpy().decode()] = (split, int(example["label"]))
    expected = {r.record_id: (r.split, r.label_index) for r in used.itertuples()}
    assert seen == expected
    assert summary["image"] == {**summary["image"], "height": 64, "width": 64, "channels": 3}


def test_a_test_patient_absent_for_a_night_stays_in_test():
    first = records(60, 1, seed=4, batch="b1")
    patients = preprocess.assign_patients(first, None, spec(), ["benign", "malignant"])
    frozen = preprocess.freeze_test_set(first, patients)
    gone = frozen["patient_id"].iloc[0]
    # night 2: every item of that patient was quarantined, so they are absent from the records
    second = first[first["patient_id"] != gone]
    patients2 = preprocess.assign_patients(second, patients, spec(), ["benign", "malignant"])
    assert patients2.set_index("patient_id").at[gone, "split"] == "test"
    # night 3: they return with a new study, which must not reach train or validation
    third = pd.concat([first, pd.DataFrame([{"record_id": "b3/back", "patient_id": gone, "label": "benign",
                                             "batch_id": "b3"}])], ignore_index=True)
    patients3 = preprocess.assign_patients(third, patients2, spec(), ["benign", "malignant"])
    items = preprocess.split_items(third, patients3, frozen)
    assert items.set_index("record_id").at["b3/back", "split"] == "held_out"
