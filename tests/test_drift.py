"""Drift: PSI and KS on known distributions, the report's verdicts, the reference a trained model
carries inside its logged pyfunc, and the per-input summaries the service stores, for a tabular
MLP and a tiny CNN trained for real."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from conftest import tabular_params
from pipelines.monitoring import drift
from pipelines.monitoring import reference as drift_reference
from pipelines.config import parse_params
from test_train import shard_pixels

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc)


def monitoring_params(**changes):
    raw = tabular_params()
    raw["monitoring"].update(changes)
    return parse_params(raw)


def rows(summaries, probabilities=None, *, at=NOW, version="1", positive="malignant", negative="benign"):
    """Prediction rows as the store holds them."""
    probabilities = probabilities if probabilities is not None else [0.5] * len(summaries)
    return [{"created_at": at - timedelta(minutes=i), "model_name": "breast-cancer-mlp", "model_version": version,
             "input_metadata": {"drift": summary}, "probabilities": {negative: 1 - p, positive: p}}
            for i, (summary, p) in enumerate(zip(summaries, probabilities))]


def tabular_reference(values: dict[str, np.ndarray], predictions: np.ndarray) -> dict:
    return {"modality": "tabular", "positive_class": "malignant",
            "statistics": {name: {"kind": "feature", "values": v.tolist()} for name, v in values.items()},
            "prediction": {"split": "validation", "values": predictions.tolist()}}


# ---------------------------------------------------------------------------------------------
# the statistics
# ---------------------------------------------------------------------------------------------


def test_psi_and_ks_flag_a_shift_and_leave_the_same_distribution_alone():
    params = monitoring_params(min_inputs=30, bins=10, psi_threshold=0.2, ks_pvalue=0.01)
    rng = np.random.default_rng(0)
    reference = rng.normal(10.0, 2.0, size=2000)

    assert drift.population_stability_index(reference, reference, 10) == 0.0
    same = drift.compare("x", "feature", reference, rng.normal(10.0, 2.0, size=400), params)
    assert same.judged and not same.drifted
    assert same.psi < 0.1 and same.ks_pvalue > 0.05

    shifted = drift.compare("x", "feature", reference, rng.normal(11.0, 2.0, size=400), params)  # half an SD
    assert shifted.drifted and shifted.psi > 0.2 and shifted.ks_pvalue < 1e-6
    assert shifted.ks_statistic == pytest.approx(0.2, abs=0.06)

    # Only the spread changed: same mean, twice the SD; PSI sees the outer bins fill up.
    wider = drift.compare("x", "feature", reference, rng.normal(10.0, 4.0, size=400), params)
    assert wider.drifted and wider.psi > 0.2


def test_psi_counts_values_beyond_the_reference_and_stays_finite_on_empty_bins():
    reference = np.linspace(0.0, 1.0, 1000)
    beyond = np.full(100, 5.0)  # all in the open-ended top bin, nine bins empty
    psi = drift.population_stability_index(reference, beyond, 10)
    assert np.isfinite(psi) and psi > 5
    # An empty bin counts as the epsilon share: one bin emptied into its neighbour.
    half = np.concatenate([np.full(100, 0.05), np.linspace(0.2, 1.0, 800)])
    expected = (1e-4 - 0.1) * np.log(1e-4 / 0.1)
    assert drift.population_stability_index(reference, half, 10) > expected
    # Ties in the reference merge quantile edges rather than making empty bins of zero width.
    tied = np.array([0.0] * 900 + list(np.linspace(1, 2, 100)))
    assert drift.population_stability_index(tied, tied, 10) == 0.0


def test_too_few_inputs_are_not_judged_however_far_they_moved():
    params = monitoring_params(min_inputs=30)
    rng = np.random.default_rng(1)
    reference = tabular_reference({"mean_radius": rng.normal(14, 3, 500)}, rng.uniform(0, 1, 200))
    few = rows([{"mean_radius": 40.0}] * 29, [0.99] * 29)
    report = drift.drift_report(params, reference, few, now=NOW)
    assert report.inputs == 29 and not report.judged and not report.drifted
    assert report.reasons == [] and not report.statistics[0].judged
    assert report.note == "not judged: 29 inputs in the last 7 days, fewer than monitoring.min_inputs (30)"
    # One more, and the same far-moved inputs are judged drifted.
    report = drift.drift_report(params, reference, rows([{"mean_radius": 40.0}] * 30, [0.99] * 30), now=NOW)
    assert report.judged and report.drifted and report.input_drift and report.prediction_drift


def test_the_report_names_each_drifted_statistic_and_reads_only_the_window():
    params = monitoring_params(min_inputs=30, window_days=7, ks_pvalue=0.01)
    rng = np.random.default_rng(2)
    reference = tabular_reference({"mean radius": rng.normal(14, 3, 1000), "texture": rng.normal(20, 4, 1000)},
                                  rng.beta(2, 5, 500))
    served = [{"mean radius": r, "texture": t} for r, t in zip(rng.normal(18, 3, 200), rng.normal(20, 4, 200))]
    report = drift.drift_report(params, reference, rows(served, rng.beta(2, 5, 200)), now=NOW)
    assert report.judged and report.drifted and report.input_drift and not report.prediction_drift
    assert len(report.reasons) == 1
    assert re.fullmatch(r"feature 'mean radius': PSI \d+\.\d\d > 0\.2, KS p=[0-9.e+-]+ < 0\.01", report.reasons[0])
    by_name = {s.name: s for s in report.statistics}
    assert by_name["mean radius"].drifted and not by_name["texture"].drifted
    assert report.model_name == "breast-cancer-mlp" and report.model_version == "1"
    assert report.note == "drift in 1 of 3 statistics over 200 inputs in the last 7 days"

    body = report.as_dict()
    assert json.loads(json.dumps(body)) == body  # JSON-able as it is, for /monitoring
    assert body["prediction"]["label"] == "predicted P(malignant)" and body["thresholds"]["psi_threshold"] == 0.2

    # The same drifted inputs, but eight days old: outside the window, so nothing to judge.
    old = rows(served, rng.beta(2, 5, 200), at=NOW - timedelta(days=8))
    report = drift.drift_report(params, reference, old, now=NOW)
    assert report.inputs == 0 and not report.judged and not report.drifted


def test_prediction_drift_alone_and_missing_values_left_out():
    params = monitoring_params(min_inputs=30)
    rng = np.random.default_rng(3)
    reference = tabular_reference({"age": rng.normal(50, 10, 800)}, rng.beta(2, 5, 800))
    served = [{"age": float(a)} for a in rng.normal(50, 10, 150)] + [{"age": None}] * 20
    report = drift.drift_report(params, reference, rows(served, rng.beta(5, 2, 170)), now=NOW)
    assert report.prediction_drift and not report.input_drift and report.drifted
    assert report.statistics[0].served_count == 150
    assert report.reasons[0].startswith("predicted P(malignant): PSI ")


def test_predictions_are_read_from_the_store_by_version_and_window(tmp_path):
    from pipelines.store.db import engine_for, sessions, upgrade
    from pipelines.store.models import Prediction

    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    engine = engine_for(url)
    upgrade(engine)
    rng = np.random.default_rng(4)
    with sessions(engine).begin() as session:
        for i, (value, version, age_days) in enumerate(
            [(float(v), "2", 1) for v in rng.normal(30, 3, 40)]     # in the window, drifted
            + [(float(v), "1", 1) for v in rng.normal(14, 3, 40)]   # another version
            + [(float(v), "2", 10) for v in rng.normal(14, 3, 40)]  # too old
        ):
            session.add(Prediction(
                id=f"p{i}", created_at=NOW - timedelta(days=age_days, minutes=i), model_name="breast-cancer-mlp",
                model_version=version, input_sha256=f"{i:064d}", modality="tabular",
                input_metadata={"features": {"mean_radius": value}, "drift": {"mean_radius": value}},
                probabilities={"benign": 0.5, "malignant": 0.5}, decision="benign", operating_threshold=0.4,
                requested_by="dr-test"))
    engine.dispose()

    found = drift.recent_predictions(url, "breast-cancer-mlp", "2", window_days=7, now=NOW)
    assert len(found) == 40 and {row["model_version"] for row in found} == {"2"}
    assert found[0]["created_at"] < found[-1]["created_at"]
    params = monitoring_params(min_inputs=30)
    reference = tabular_reference({"mean_radius": rng.normal(14, 3, 500)}, np.full(100, 0.5))
    report = drift.report_from_store(params, reference, url, "2", now=NOW)
    assert report.inputs == 40 and report.input_drift and report.model_version == "2"
    assert drift.report_from_store(params, reference, url, "1", now=NOW).drifted is False


# ---------------------------------------------------------------------------------------------
# a trained tabular model: the reference inside the pyfunc, served summaries
# ---------------------------------------------------------------------------------------------


def logged_pyfunc(layout, params):
    import mlflow

    from pipelines.registry.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(params, layout))
    record = json.loads(layout.train_json.read_text())
    return record, mlflow.pyfunc.load_model(record["model_uri"])


@pytest.mark.slow
def test_the_logged_tabular_model_carries_its_reference(trained_tabular, tmp_path):
    import mlflow

    layout, params, _ = trained_tabular
    record, pyfunc = logged_pyfunc(layout, params)
    reference = pyfunc.unwrap_python_model().drift_reference
    features = list(params.tabular.features)
    train_ids = pd.read_parquet(layout.processed / "index.parquet").query("split == 'train'")["record_id"]
    records = pd.read_parquet(layout.clean_records).set_index("record_id")
    assert reference["modality"] == "tabular" and reference["positive_class"] == "malignant"
    assert list(reference["statistics"]) == features
    assert reference["items"] == len(train_ids) <= params.monitoring.reference_size
    # Raw units, not the scaled features the MLP sees: exactly the training rows' values.
    assert sorted(reference["statistics"]["mean_radius"]["values"]) == sorted(records.loc[train_ids, "mean_radius"])
    n_validation = int((pd.read_parquet(layout.processed / "index.parquet")["split"] == "validation").sum())
    assert reference["prediction"]["split"] == "validation" and len(reference["prediction"]["values"]) == n_validation
    assert record["drift_reference"]["items"] == reference["items"]

    # The file the service's copy holds: <model>/artifacts/drift_reference.json
    copy = mlflow.artifacts.download_artifacts(record["model_uri"], dst_path=str(tmp_path / "copy"))
    assert drift.load_reference(copy) == reference

    # Seeded and capped: the same reference again, and at most reference_size items. Its
    # predictions are calibrated by the model's own calibrator, as the served ones are.
    keras_model, calibrator = pyfunc.unwrap_python_model().model, pyfunc.unwrap_python_model().calibrator
    assert drift_reference.build_reference(params, layout, keras_model, calibrator) == reference
    assert drift_reference.build_reference(params, layout, keras_model)["prediction"] != reference["prediction"]
    capped = params.model_copy(update={"monitoring": params.monitoring.model_copy(update={"reference_size": 50})})
    small = drift_reference.build_reference(params=capped, layout=layout, model=keras_model)
    assert small["items"] == 50 and len(small["statistics"]["mean_radius"]["values"]) == 50
    assert len(small["prediction"]["values"]) == min(50, n_validation)
    assert small == drift_reference.build_reference(capped, layout, keras_model)
    assert set(small["statistics"]["mean_radius"]["values"]) <= set(reference["statistics"]["mean_radius"]["values"])


@pytest.mark.slow
def test_training_rows_do_not_drift_and_shifted_rows_do(trained_tabular):
    layout, params, _ = trained_tabular
    _, pyfunc = logged_pyfunc(layout, params)
    reference = pyfunc.unwrap_python_model().drift_reference
    features = list(params.tabular.features)
    train_ids = pd.read_parquet(layout.processed / "index.parquet").query("split == 'train'")["record_id"]
    training_rows = (pd.read_parquet(layout.clean_records).set_index("record_id").loc[train_ids, features]
                     .sample(n=200, random_state=5).reset_index(drop=True))

    def served(frame):
        summaries = drift.summarize_inputs(pyfunc, frame)
        probabilities = pyfunc.predict(frame)["malignant"].tolist()
        return rows(summaries, probabilities)

    summaries = drift.summarize_inputs(pyfunc, training_rows)
    assert len(summaries) == 200 and list(summaries[0]) == features
    assert summaries[0]["mean_radius"] == training_rows.loc[0, "mean_radius"]  # raw units
    assert json.loads(json.dumps(summaries)) == summaries

    probabilities, same = pyfunc.unwrap_python_model().predict_with_drift(training_rows)
    assert same == summaries
    np.testing.assert_array_equal(probabilities.to_numpy(), pyfunc.predict(training_rows).to_numpy())

    calm = drift.drift_report(params, reference, served(training_rows), now=NOW)
    assert calm.judged and not calm.drifted, calm.reasons
    assert all(s.judged for s in calm.statistics) and calm.prediction.judged

    # A new scanner's calibration: every size measurement reads 40% larger.
    shifted = training_rows.copy()
    moved = [name for name in features if any(word in name for word in ("radius", "perimeter", "area"))]
    shifted[moved] = shifted[moved] * 1.4
    shifted.loc[0, "mean_texture"] = np.nan  # a missing value is stored as null and left out
    report = drift.drift_report(params, reference, served(shifted), now=NOW)
    assert report.judged and report.drifted and report.input_drift
    flagged = {s.name for s in report.statistics if s.drifted}
    assert {"mean_radius", "mean_area", "worst_perimeter"} <= flagged <= set(moved)
    assert any(reason.startswith("feature 'mean_radius': PSI ") for reason in report.reasons)
    assert {s.name: s for s in report.statistics}["mean_texture"].served_count == 199
    assert report.prediction_drift  # larger tumours: the model calls more of them malignant


# ---------------------------------------------------------------------------------------------
# a tiny CNN: intensity statistics and embedding components
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_image_reference_and_served_summaries_agree_on_the_same_images(trained_image):
    layout, params, _ = trained_image
    _, pyfunc = logged_pyfunc(layout, params)
    python_model = pyfunc.unwrap_python_model()
    reference = python_model.drift_reference
    ids, pixels = shard_pixels(layout, "train")
    names = ["intensity_mean", "intensity_std"] + [f"embedding_pc{k}" for k in range(1, 6)]
    assert reference["modality"] == "image" and list(reference["statistics"]) == names
    assert reference["items"] == len(ids)
    embedding = reference["embedding"]
    assert embedding["layer"] == "dropout" and len(embedding["mean"]) == 128  # cxr_small's pooled features
    assert np.asarray(embedding["components"]).shape == (5, 128)
    assert 0 < sum(embedding["explained_variance_ratio"]) <= 1.0 + 1e-9
    # The reference's values are the statistics of the training pixels, in shard order.
    np.testing.assert_allclose(reference["statistics"]["intensity_mean"]["values"],
                               pixels.reshape(len(pixels), -1).mean(axis=1))
    pcs = np.asarray([reference["statistics"][f"embedding_pc{k}"]["values"] for k in range(1, 6)])
    assert np.all(pcs.std(axis=1) > 0) and np.allclose(pcs.mean(axis=1), 0.0, atol=1e-6 * (1 + np.abs(pcs).max()))
    # Deterministic: the saved weights give the very same reference again.
    assert drift_reference.build_reference(params, layout, python_model.model, python_model.calibrator) == reference

    # The service's view of the same images, from the collected files: the same numbers.
    files = pd.DataFrame({"image": [(layout.raw / record_id).read_bytes() for record_id in ids[:6]]})
    served = drift.summarize_inputs(pyfunc, files)
    assert [list(s) for s in served] == [names] * 6
    for name in names:
        np.testing.assert_allclose([s[name] for s in served], reference["statistics"][name]["values"][:6],
                                   rtol=1e-4, atol=1e-4, err_msg=name)
    # Prepared pixels and uint8 arrays give the same summaries as the files.
    prepared = python_model.prepare(files)
    assert drift.summarize_inputs(python_model, prepared) == served
    assert drift.summarize_inputs(pyfunc, pixels[:6]) == served
    assert json.loads(json.dumps(served)) == served
    embedded = python_model.embed(prepared)
    assert embedded.shape == (6, 128) and python_model.embed(prepared[:1]).shape == (1, 128)
    # One pass for both: the same probabilities as predict, the same summaries.
    probabilities, summaries = python_model.predict_with_drift(files)
    np.testing.assert_allclose(probabilities.to_numpy(), pyfunc.predict(files).to_numpy(), rtol=1e-6, atol=1e-7)
    assert list(probabilities.columns) == ["NORMAL", "PNEUMONIA"]
    for name in names:
        np.testing.assert_allclose([s[name] for s in summaries], [s[name] for s in served], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_darker_exposures_drift_and_the_training_images_do_not(trained_image):
    layout, params, _ = trained_image
    _, pyfunc = logged_pyfunc(layout, params)
    reference = pyfunc.unwrap_python_model().drift_reference
    _, pixels = shard_pixels(layout, "train")
    few = params.model_copy(update={"monitoring": params.monitoring.model_copy(update={"min_inputs": 20})})

    def report(images):
        summaries = drift.summarize_inputs(pyfunc, images)
        probabilities = pyfunc.predict(images)["PNEUMONIA"].tolist()
        return drift.drift_report(few, reference, rows(summaries, probabilities, positive="PNEUMONIA",
                                                       negative="NORMAL"), now=NOW)

    calm = report(pixels)
    assert calm.judged and not calm.input_drift, calm.reasons
    # Gamma 2.5 darkens mid-tones that contrast stretching cannot undo.
    darker = np.clip(np.rint(255.0 * (pixels / 255.0) ** 2.5), 0, 255).astype(np.uint8)
    drifted = report(darker)
    flagged = {s.name for s in drifted.statistics if s.drifted}
    assert drifted.input_drift and "intensity_mean" in flagged, drifted.reasons
    assert any(reason.startswith("image intensity mean: PSI ") for reason in drifted.reasons)
