"""The data quality gate (pipelines/validate.py).

Every test writes a tiny cleaned workspace (records.parquet and intake.parquet) into tmp_path
and runs the gate on it. Each failing case checks that the GateError names the expectation, the
column and what was observed, and that plain pandas (`check_with_pandas`) reaches the same
verdict as Great Expectations on every expectation.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np
import pandas as pd
import pytest

from benchmarks.validate_pandas import check_with_pandas
from pipelines import validate
from pipelines.config import Params, parse_params
from pipelines.errors import GateError
from pipelines.workspace import Layout

FEATURES = ("mean radius", "mean texture", "mean area", "mean smoothness")
OLD_BATCH, NEW_BATCH = "20260101T000000000000Z", "20260102T000000000000Z"


# --------------------------------------------------------------------------------------------
# fixtures: params and cleaned data
# --------------------------------------------------------------------------------------------


def _common(validate_section: dict[str, Any]) -> dict[str, Any]:
    from conftest import profile

    shipped = profile("breast_cancer.yaml")  # the sections validate does not read
    return {
        "deid": {"salt_env": "MEDLOOP_DEID_SALT"},
        "validate": validate_section,
        "storage": {"dvc_remote": "../remote"},
        **{section: shipped[section] for section in ("train", "tracking", "evaluate", "promote", "schedule", "serving", "monitoring", "retrain_policy",
                                                  "compute")},
    }


def tabular_params_dict() -> dict[str, Any]:
    """A valid params mapping for the breast cancer (tabular) model."""
    params = {
        "model": {
            "name": "breast_cancer",
            "modality": "tabular",
            "classes": ["benign", "malignant"],
            "positive_class": "malignant",
        },
        "source": {"kind": "builtin_breast_cancer", "seed": 1, "nights": 3},
        "tabular": {
            "label": "diagnosis",
            "features": {
                "mean radius": {"dtype": "float", "min": 0, "max": 50},
                "mean texture": {"dtype": "float", "min": 0, "max": 40},
                "mean area": {"dtype": "float", "min": 0},
                "mean smoothness": {"dtype": "float", "min": 0, "max": 1},
            },
            "subgroups": ["age_band"],
        },
        "clean": {},
        "preprocess": {
            "seed": 1,
            "test_fraction": 0.2,
            "test_set": {"min_items": 1, "min_cases_per_class": 1, "precision": 0.15},
            "validation_fraction": 0.1,
            "shard_size": 100,
        },
        **_common(
            {
                "min_new_items": 5,
                "min_total_items": 20,
                "max_null_fraction": 0.1,
                "max_quarantined_fraction": 0.2,
                "class_fraction": {"min": 0.2, "max": 0.8},
            }
        ),
    }
    params["deid"]["columns"] = {"age": "age_band"}  # the source of the age_band subgroup
    params["evaluate"] = {**params["evaluate"], "subgroups": ["age_band"]}
    return params


def image_params_dict() -> dict[str, Any]:
    """A valid params mapping for the chest radiograph (image) model."""
    return {
        "model": {
            "name": "cxr",
            "modality": "image",
            "classes": ["NORMAL", "PNEUMONIA"],
            "positive_class": "PNEUMONIA",
        },
        "source": {
            "kind": "synthetic_cxr",
            "seed": 1,
            "nights": 2,
            "images_per_night": 10,
            "patients": 5,
            "image_size": 64,
            "pneumonia_fraction": 0.5,
            "jpeg_fraction": 0.2,
        },
        "clean": {"image": {"channels": 1, "min_side": 32, "max_pixels": 4096 * 4096,
                            "dicom": {"tags": {"Modality": {"allowed": ["CR", "DX"]}}}}},
        "preprocess": {
            "seed": 1,
            "test_fraction": 0.2,
            "test_set": {"min_items": 1, "min_cases_per_class": 1, "precision": 0.15},
            "validation_fraction": 0.1,
            "image_size": [64, 64],
            "shard_size": 100,
        },
        **_common(
            {
                "min_new_items": 5,
                "min_total_items": 10,
                "max_null_fraction": 0.0,
                "max_quarantined_fraction": 0.2,
                "class_fraction": {"min": 0.2, "max": 0.8},
                "image": {
                    "width": {"min": 32, "max": 4096},
                    "height": {"min": 32, "max": 4096},
                    "mean_intensity": {"min": 10, "max": 245},
                    "std_intensity": {"min": 1},
                },
            }
        ),
    }


def _identity_columns(n: int, batches: list[str], labels: list[str]) -> dict[str, Any]:
    return {
        "record_id": pd.array([f"rec-{i:04d}" for i in range(n)], dtype="string"),
        "content_hash": pd.array([f"{i:064x}" for i in range(n)], dtype="string"),
        "batch_id": pd.array(batches, dtype="string"),
        "arrival_time": pd.Timestamp("2026-01-02", tz="UTC"),
        "source": pd.array(["test"] * n, dtype="string"),
        "source_ref": pd.array([str(i) for i in range(n)], dtype="string"),
        # pandas' default "str" dtype on purpose: both string dtypes must pass the type check.
        "patient_id": [f"patient-{i % 7}" for i in range(n)],
        "study_year": pd.array([2026] * n, dtype="Int64"),
        "label": pd.array(labels, dtype="string"),
        "label_provenance": pd.array(["dataset"] * n, dtype="string"),
        "label_batch_id": pd.array(batches, dtype="string"),
    }


def tabular_records(n: int = 40, new: int = 10) -> pd.DataFrame:
    """Clean records that pass the tabular gate: two batches, balanced labels, sane values."""
    rng = np.random.default_rng(7)
    batches = [OLD_BATCH] * (n - new) + [NEW_BATCH] * new
    labels = ["benign" if i % 2 else "malignant" for i in range(n)]
    frame = pd.DataFrame(_identity_columns(n, batches, labels))
    frame["age_band"] = pd.array(["40-49"] * n, dtype="string")
    frame["mean radius"] = rng.uniform(6, 28, n)
    frame["mean texture"] = rng.uniform(9, 39, n)
    frame["mean area"] = rng.uniform(140, 2500, n)
    frame["mean smoothness"] = rng.uniform(0.05, 0.16, n)
    return frame


def image_records(n: int = 20, new: int = 10) -> pd.DataFrame:
    """Clean records that pass the image gate (metadata of synthetic radiographs)."""
    batches = [OLD_BATCH] * (n - new) + [NEW_BATCH] * new
    labels = ["NORMAL" if i % 2 else "PNEUMONIA" for i in range(n)]
    frame = pd.DataFrame(_identity_columns(n, batches, labels))
    frame["image_path"] = pd.array([f"data/raw/batches/b/{i}.png" for i in range(n)], "string")
    frame["width"] = np.full(n, 64, dtype="int64")
    frame["height"] = np.full(n, 64, dtype="int64")
    frame["channels"] = np.full(n, 1, dtype="int64")
    frame["mean_intensity"] = np.linspace(90.0, 140.0, n)
    frame["std_intensity"] = np.linspace(30.0, 50.0, n)
    frame["min_intensity"] = np.zeros(n)
    frame["max_intensity"] = np.full(n, 255.0)
    frame["conversion"] = pd.array(["png:L"] * n, dtype="string")
    for column in ("sex", "age_band", "view", "site"):
        frame[column] = pd.array([None] * n, dtype="string")
    frame["view"] = pd.array(["PA"] * n, dtype="string")
    return frame


def intake_for(records: pd.DataFrame, quarantined: dict[str, int] | None = None) -> pd.DataFrame:
    """The intake table of the given records, plus ``quarantined[batch]`` refused items."""
    frame = pd.DataFrame(
        {
            "record_id": records["record_id"].astype("string"),
            "batch_id": records["batch_id"].astype("string"),
            "accepted": True,
            "reason": pd.array([""] * len(records), dtype="string"),
        }
    )
    extra = [
        {"record_id": f"refused-{batch}-{i}", "batch_id": batch, "accepted": False,
         "reason": "unreadable image"}
        for batch, count in (quarantined or {}).items()
        for i in range(count)
    ]  # fmt: skip
    if extra:
        frame = pd.concat([frame, pd.DataFrame(extra).astype(frame.dtypes.to_dict())])
    return frame.reset_index(drop=True)


def write_clean(layout: Layout, records: pd.DataFrame, intake: pd.DataFrame) -> None:
    layout.clean.mkdir(parents=True, exist_ok=True)
    records.to_parquet(layout.clean_records, index=False)
    intake.to_parquet(layout.clean_intake, index=False)


@pytest.fixture(scope="module")
def tabular_params() -> Params:
    return parse_params(tabular_params_dict())


@pytest.fixture(scope="module")
def image_params() -> Params:
    return parse_params(image_params_dict())


def _run_failing(params: Params, layout: Layout) -> str:
    with pytest.raises(GateError) as caught:
        validate.run(params, layout)
    return str(caught.value)


def _assert_pandas_agrees(params: Params, layout: Layout) -> None:
    """check_with_pandas reaches GX's verdict on every expectation, with the same counts."""
    report = json.loads(layout.validation_json.read_text())
    baseline = check_with_pandas(
        params, pd.read_parquet(layout.clean_records), pd.read_parquet(layout.clean_intake)
    )
    assert len(baseline) == len(report["expectations"])
    for gx_entry, pandas_entry in zip(report["expectations"], baseline):
        where = (gx_entry["suite"], gx_entry["expectation"], gx_entry["column"])
        assert gx_entry["success"] == pandas_entry["success"], where
        assert gx_entry["kwargs"] == pandas_entry["kwargs"], where
        # Error texts differ between engines; measured results must not.
        if "error" not in gx_entry["observed"]:
            assert gx_entry["observed"] == pandas_entry["observed"], where


# --------------------------------------------------------------------------------------------
# the gate passes on good data
# --------------------------------------------------------------------------------------------


def test_good_tabular_data_passes_with_docs_and_a_deterministic_report(
    tmp_path, tabular_params, capfd
):
    layout = Layout.at(tmp_path)
    records = tabular_records()
    write_clean(layout, records, intake_for(records))

    result = validate.run(tabular_params, layout)
    first = layout.validation_json.read_bytes()
    validate.run(tabular_params, layout)
    second = layout.validation_json.read_bytes()

    assert result.success and result.failed == 0
    report = json.loads(first)
    assert report["success"] is True
    assert report["failed"] == 0
    assert report["evaluated"] == len(report["expectations"]) == result.evaluated
    assert report["data_docs"] == "reports/data_docs/index.html"
    assert (tmp_path / "reports" / "data_docs" / "index.html").is_file()
    assert first == second, "validation.json must not change when the data does not"

    kinds = {(e["expectation"], e["column"]) for e in report["expectations"]}
    for feature in FEATURES:
        assert ("expect_column_to_exist", feature) in kinds
        assert ("expect_column_values_to_be_in_type_list", feature) in kinds
    assert ("expect_column_values_to_be_in_set", "accepted") in kinds
    assert ("expect_table_row_count_to_be_between", None) in kinds
    json.dumps(report, allow_nan=False)  # strict JSON, no NaN

    # Great Expectations keeps its internals out of the workspace: data/ holds clean's files.
    assert sorted(p.name for p in (tmp_path / "data").rglob("*") if p.is_file()) == [
        "intake.parquet",
        "records.parquet",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "reports"]

    out, err = capfd.readouterr()
    for noise in ("Calculating Metrics", "%|"):
        assert noise not in out and noise not in err


def test_good_image_metadata_passes(tmp_path, image_params):
    layout = Layout.at(tmp_path)
    records = image_records()
    write_clean(layout, records, intake_for(records))

    result = validate.run(image_params, layout)

    assert result.success
    columns = {e["column"] for e in result.expectations}
    assert {"width", "height", "channels", "mean_intensity", "std_intensity"} <= columns
    assert "pixels" not in json.dumps(result.expectations)


# --------------------------------------------------------------------------------------------
# the gate fails on bad data, and says why
# --------------------------------------------------------------------------------------------


def _out_of_range(records: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    records.loc[[0, 1], "mean radius"] = [-4.0, 120.0]
    return records, intake_for(records)


def _unknown_label(records: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    records.loc[3, "label"] = "flu"
    return records, intake_for(records)


def _too_many_missing(records: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    records.loc[:9, "mean texture"] = np.nan
    return records, intake_for(records)


def _imbalanced(records: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    records["label"] = pd.array(["benign"] * 36 + ["malignant"] * 4, dtype="string")
    return records, intake_for(records)


def _few_new(records: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    records = records.iloc[:32].copy()  # 30 old records, 2 new ones
    return records, intake_for(records)


def _quarantined(records: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    return records, intake_for(records, quarantined={NEW_BATCH: 5})


def _missing_feature(records: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    records = records.drop(columns=["mean area"])
    return records, intake_for(records)


def _strings_in_float_feature(records: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    records["mean smoothness"] = records["mean smoothness"].map(lambda v: f"{v:.3f}")
    return records, intake_for(records)


FAILURES: dict[str, tuple[Callable, list[str]]] = {
    "out of range": (
        _out_of_range,
        ["- records: values of 'mean radius' between 0 and 50: "
         "2 of 40 rows (5.0%) outside, e.g. [-4.0, 120.0]"],
    ),
    "unknown label": (
        _unknown_label,
        ["- records: values of 'label' in {benign, malignant}: 1 of 40 rows (2.5%) outside, "
         "e.g. ['flu']"],
    ),
    "null rate": (
        _too_many_missing,
        ["- records: missing values of 'mean texture' at most 10% of rows: "
         "10 of 40 rows (25.0%) missing"],
    ),
    "class imbalance": (
        _imbalanced,
        ["- records: share of label 'benign' at most 80% of rows: found 90.0% (36 of 40)",
         "- records: share of label 'malignant' at least 20% of rows: found 10.0% (4 of 40)"],
    ),
    "too few new records": (
        _few_new,
        [f"- newest_batch: records of batch '{NEW_BATCH}' (new or newly labelled) at least 5: found 2"],
    ),
    "too many quarantined": (
        _quarantined,
        [f"- newest_batch_intake: accepted items of batch '{NEW_BATCH}' at least 80% of items: "
         "found 66.7% (10 of 15)"],
    ),
    "missing feature": (
        _missing_feature,
        ["- records: column 'mean area' present: missing"],
    ),
    "wrong type": (
        _strings_in_float_feature,
        ["- records: type of 'mean smoothness' float: found str"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(FAILURES))
def test_bad_tabular_data_fails_the_gate_naming_what_and_where(tmp_path, tabular_params, case):
    breaks, expected_lines = FAILURES[case]
    layout = Layout.at(tmp_path)
    write_clean(layout, *breaks(tabular_records()))

    message = _run_failing(tabular_params, layout)

    for expected in expected_lines:
        assert any(line.startswith(expected) for line in message.splitlines()), (
            f"{expected!r} not in:\n{message}"
        )
    assert message.splitlines()[-1] == f"Data Docs: {layout.data_docs / 'index.html'}"
    assert (layout.data_docs / "index.html").is_file()
    report = json.loads(layout.validation_json.read_text())
    assert report["success"] is False
    # One line per failed expectation, unless it only failed because its column is unusable.
    shown = [line for line in message.splitlines() if line.startswith("- ")]
    assert len(expected_lines) <= len(shown) <= report["failed"]
    assert message.splitlines()[0].startswith(f"Data quality gate failed: {report['failed']} of ")
    _assert_pandas_agrees(tabular_params, layout)


def test_knock_on_failures_of_a_missing_column_are_folded_into_its_line(tmp_path, tabular_params):
    layout = Layout.at(tmp_path)
    write_clean(layout, *_missing_feature(tabular_records()))

    message = _run_failing(tabular_params, layout)

    lines = [line for line in message.splitlines() if "'mean area'" in line]
    assert lines == [
        "- records: column 'mean area' present: missing (3 more checks on it could not run)"
    ]
    report = json.loads(layout.validation_json.read_text())
    failed = [e for e in report["expectations"] if not e["success"]]
    assert {e["column"] for e in failed} == {"mean area"}
    assert len(failed) == 4


def test_all_black_images_fail_on_their_metadata(tmp_path, image_params):
    layout = Layout.at(tmp_path)
    records = image_records()
    records["mean_intensity"] = 0.0
    records["std_intensity"] = 0.0
    records["max_intensity"] = 0.0
    write_clean(layout, records, intake_for(records))

    message = _run_failing(image_params, layout)

    assert (
        "- records: values of 'mean_intensity' between 10 and 245: 20 of 20 rows (100.0%) "
        "outside, e.g. [0.0, 0.0, 0.0, 0.0, 0.0]" in message.splitlines()
    )
    assert "- records: values of 'std_intensity' at least 1: 20 of 20 rows (100.0%) outside" in (
        message
    )
    _assert_pandas_agrees(image_params, layout)


# --------------------------------------------------------------------------------------------
# command line, and the rules without GX
# --------------------------------------------------------------------------------------------


def test_main_prints_the_failures_without_a_traceback(tmp_path, monkeypatch, capsys):
    import yaml

    layout = Layout.at(tmp_path)
    write_clean(layout, *_quarantined(tabular_records()))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tabular_params_dict()))
    monkeypatch.chdir(tmp_path)

    assert validate.main([]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("validate failed: Data quality gate failed: 1 of ")
    assert "accepted items of batch" in err
    assert "Traceback" not in err
    assert err.rstrip().endswith("reports/data_docs/index.html")


def test_a_newest_batch_quarantined_entirely_is_still_the_one_judged(tabular_params):
    records = tabular_records(n=30, new=0)
    intake = intake_for(records, quarantined={NEW_BATCH: 10})

    entries = check_with_pandas(tabular_params, records, intake)

    newest = [e for e in entries if e["suite"] != "records"]
    assert [e["success"] for e in newest] == [False, False]
    assert newest[0]["observed"] == {"observed_value": 0}
    assert newest[1]["kwargs"]["row_condition"] == f"batch_id == '{NEW_BATCH}'"


def test_missing_clean_outputs_are_a_clear_error(tmp_path, tabular_params):
    from pipelines.errors import WorkspaceError

    with pytest.raises(WorkspaceError, match="run the clean stage first"):
        validate.run(tabular_params, Layout.at(tmp_path))
