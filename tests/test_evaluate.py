"""Evaluate: clinical metrics against hand-computed values, and the evaluate stage end to end on
real tiny workspaces with real Keras models and a real MLflow store."""

from __future__ import annotations

import hashlib
import json
import math
import re
import time

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from conftest import image_params, load, make_workspace, tabular_params
from pipelines import clean, collect, evaluate, preprocess
from pipelines.model import calibration
from pipelines.model import metrics
from pipelines.config import parse_params
from pipelines.errors import MedloopError
from pipelines.values import json_ready
from pipelines.workspace import Layout

# ---------------------------------------------------------------------------------------------
# metrics against hand-computed values
# ---------------------------------------------------------------------------------------------

# Ten patients, four with the finding. At threshold 0.5: flagged 0.9, 0.8, 0.6 (positives) and
# 0.7 (a negative): TP 3, FN 1, FP 1, TN 5.
TEN_Y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
TEN_SCORE = [0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.2, 0.1, 0.05]


@pytest.mark.parametrize(("name", "expected"), [
    ("n", 10),
    ("n_positive", 4),
    ("sensitivity", 3 / 4),
    ("specificity", 5 / 6),
    ("ppv", 3 / 4),
    ("npv", 5 / 6),
    ("f1", 2 * 3 / (2 * 3 + 1 + 1)),
    ("accuracy", 8 / 10),
    # (positive, negative) pairs ordered correctly: 6 + 6 + 5 + 4 of 24
    ("auroc", 21 / 24),
    # precision at each positive, ranked by score: 1/1, 2/2, 3/4, 4/6
    ("auprc", (1 + 1 + 3 / 4 + 4 / 6) / 4),
    ("brier", (0.01 + 0.04 + 0.16 + 0.49 + 0.49 + 0.16 + 0.04 + 0.04 + 0.01 + 0.0025) / 10),
    # one item per bin except 0.2 (two negatives): gaps .1 .2 .7 .4 .4 .7 2x.2 .1 .05
    ("ece", (0.1 + 0.2 + 0.7 + 0.4 + 0.4 + 0.7 + 0.4 + 0.1 + 0.05) / 10),
])
def test_binary_metrics_match_hand_computation(name, expected):
    assert metrics.binary_metrics(TEN_Y, TEN_SCORE, threshold=0.5, bins=10)[name] == pytest.approx(expected)


def test_undefined_metrics_are_none_never_nan():
    only_negatives = metrics.binary_metrics([0, 0, 0], [0.1, 0.6, 0.3], threshold=0.5)
    assert only_negatives["auroc"] is None and only_negatives["auprc"] is None
    assert only_negatives["sensitivity"] is None and only_negatives["npv"] == 1.0
    assert only_negatives["specificity"] == pytest.approx(2 / 3)
    nothing_flagged = metrics.binary_metrics([1, 0], [0.2, 0.1], threshold=0.9)
    assert nothing_flagged["ppv"] is None and nothing_flagged["sensitivity"] == 0.0
    empty = metrics.binary_metrics([], [], threshold=0.5)
    assert empty["n"] == 0 and empty["accuracy"] is None and empty["ece"] is None
    for report in (only_negatives, nothing_flagged, empty):
        json.dumps(report, allow_nan=False)


@pytest.mark.parametrize(("y", "score", "expected"), [
    pytest.param([0, 0, 0, 1, 0, 1, 1, 1], [0.25] * 4 + [0.75] * 4, 0.0, id="perfectly-calibrated"),
    pytest.param([0] * 5, [0.95] * 5, 0.95, id="confident-and-wrong"),
    pytest.param([1] * 5 + [0] * 5, [0.9] * 10, 0.4, id="overconfident"),
    # bins: 0.1 (gap .1, one item), 0.9 (gap .1, one item), 0.5 x2 (gap 0) -> 0.2 / 4
    pytest.param([0, 1, 1, 0], [0.1, 0.9, 0.5, 0.5], 0.05, id="mixed"),
])
def test_expected_calibration_error(y, score, expected):
    assert metrics.expected_calibration_error(y, score, bins=10) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("y", "score", "target", "expected"), [
    # ten positives scoring .1 .. 1.0: 9 of 10 are caught at 0.2, only 8 at 0.3
    pytest.param([1] * 10 + [0] * 3, [i / 10 for i in range(1, 11)] + [0.95, 0.5, 0.0], 0.9, 0.2, id="exact-target"),
    pytest.param([1] * 10, [i / 10 for i in range(1, 11)], 1.0, 0.1, id="all-positives"),
    pytest.param([1] * 10, [i / 10 for i in range(1, 11)], 0.05, 1.0, id="one-positive-is-enough"),
    # tied positives are caught together: 0.8 reaches 3/4 >= 0.5
    pytest.param([1, 1, 1, 1, 0], [0.8, 0.8, 0.8, 0.2, 0.9], 0.5, 0.8, id="ties"),
    pytest.param([0, 0, 0], [0.3, 0.1, 0.7], 0.9, 0.1, id="no-positives-lowest-score"),
])
def test_operating_threshold(y, score, target, expected):
    assert metrics.operating_threshold(y, score, target) == pytest.approx(expected)


def test_operating_threshold_is_the_highest_reaching_the_target():
    rng = np.random.default_rng(3)
    for target in (0.8, 0.85, 0.9, 0.95):
        y = (rng.random(300) < 0.3).astype(int)
        score = np.round(np.clip(0.3 * y + rng.random(300) * 0.7, 0, 1), 2)  # many ties
        threshold = metrics.operating_threshold(y, score, target)
        assert metrics.binary_metrics(y, score, threshold)["sensitivity"] >= target
        higher = np.unique(score[score > threshold])
        if len(higher):
            assert metrics.binary_metrics(y, score, higher[0])["sensitivity"] < target


def test_bootstrap_is_seeded_brackets_the_estimate_and_is_fast():
    rng = np.random.default_rng(0)
    y = (rng.random(1000) < 0.4).astype(int)
    score = np.clip(0.3 * y + rng.random(1000) * 0.7, 0, 1)
    point = metrics.binary_metrics(y, score, 0.5)
    started = time.perf_counter()
    first = metrics.bootstrap_auroc_interval(y, score, samples=500, seed=7)
    elapsed = time.perf_counter() - started
    assert elapsed < 2.0
    assert first == metrics.bootstrap_auroc_interval(y, score, samples=500, seed=7)
    assert first != metrics.bootstrap_auroc_interval(y, score, samples=500, seed=8)
    low, high = first
    assert low < point["auroc"] < high
    assert high - low < 0.15
    assert metrics.bootstrap_auroc_interval(y, score, samples=0, seed=7) is None


def test_bootstrap_resamples_whole_patients():
    patients = np.repeat(np.arange(50), 3)  # three images per patient
    weights = metrics._bootstrap_weights(len(patients), samples=20, seed=1, groups=patients.astype(str))
    per_patient = weights.reshape(20, 50, 3)
    assert (per_patient == per_patient[:, :, :1]).all()  # a patient's images come and go together
    assert (weights.sum(axis=1) == len(patients)).all()  # every replicate has as many patients as the data


def test_weighted_auroc_equals_sklearn_with_sample_weights():
    rng = np.random.default_rng(2)
    y = (rng.random(200) < 0.35).astype(int)
    score = np.round(rng.random(200) * 0.6 + 0.4 * y, 1)  # ties
    weights = metrics._bootstrap_weights(200, samples=5, seed=4, groups=None)
    expected = [roc_auc_score(y, score, sample_weight=row) for row in weights]
    np.testing.assert_allclose(metrics.weighted_auroc(weights, y, score), expected, rtol=1e-12)


def test_probabilities_from_output_and_macro_auroc():
    sigmoid = metrics.probabilities_from_output(np.array([[0.2], [0.9]], dtype=np.float32), 2)
    np.testing.assert_allclose(sigmoid, [[0.8, 0.2], [0.1, 0.9]], rtol=1e-6)
    softmax = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.3, 0.2]])
    np.testing.assert_array_equal(metrics.probabilities_from_output(softmax, 3), softmax)
    with pytest.raises(MedloopError, match="3 classes"):
        metrics.probabilities_from_output(np.zeros((2, 2)), 3)
    labels = np.array([0, 1, 2, 1])
    assert metrics.macro_auroc(labels, softmax) == pytest.approx(
        roc_auc_score(labels, softmax, multi_class="ovr", average="macro"))


def test_subgroup_metrics_count_every_item_once():
    frame = pd.DataFrame({
        "y_true": TEN_Y, "score": TEN_SCORE,
        "sex": ["F", "F", "M", "M", "F", "M", None, "F", "M", "F"],
        "site": ["a"] * 10,
    })
    report = metrics.subgroup_metrics(frame, 0.5, ["sex", "site", "not_a_column"])
    assert set(report) == {"sex", "site"}
    assert sum(row["n"] for row in report["sex"].values()) == 10
    assert report["sex"]["unknown"] == {"n": 1, "n_positive": 0, "auroc": None, "sensitivity": None,
                                        "specificity": 1.0}
    assert report["site"]["a"]["sensitivity"] == pytest.approx(0.75)


def test_json_ready_rounds_and_drops_nan():
    assert json_ready({"a": np.float32(0.1234567), "b": [float("nan"), np.int64(3)], "c": -0.0000001}) == {
        "a": 0.123457, "b": [None, 3], "c": 0.0}


def test_evaluate_without_a_trained_model_names_what_is_missing(tmp_path):
    params = parse_params(tabular_params())
    with pytest.raises(MedloopError, match="train.json is missing"):
        evaluate.run(params, Layout.at(tmp_path))


# ---------------------------------------------------------------------------------------------
# the stage end to end: real data, real Keras models, a real MLflow store
# ---------------------------------------------------------------------------------------------


def weights_sha256(model) -> str:
    digest = hashlib.sha256()
    for array in model.get_weights():
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def processed_workspace(tmp_path_factory, params_dict: dict, name: str) -> Layout:
    with pytest.MonkeyPatch.context() as patch:
        from conftest import SALT

        patch.setenv("MEDLOOP_DEID_SALT", SALT)
        layout = make_workspace(tmp_path_factory.mktemp(name), params_dict)
        params = load(layout)
        for _ in range(params.source.nights):
            collect.run(params, layout)
        clean.run(params, layout)
        preprocess.run(params, layout)
    return layout


def save_trained(layout: Layout, params, model, summary: dict, model_input: dict, calibrator=None) -> str:
    """What train leaves behind (per the contract): model.keras, train.json (with the calibrator,
    when given) and an MLflow run."""
    import mlflow

    from pipelines.registry.tracking import configure, tracking_uri

    layout.models.mkdir(parents=True, exist_ok=True)
    model.save(layout.model_file)
    experiment_id = configure(params, layout)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_param("architecture", "test")
    layout.train_json.write_text(json.dumps({
        "run_id": run.info.run_id, "experiment_id": experiment_id,
        "tracking_uri": tracking_uri(params, layout), "architecture": "test",
        "classes": summary["classes"], "positive_class": params.model.positive_class,
        "modality": summary["modality"], "input": model_input, "weights_sha256": weights_sha256(model),
        "best_epoch": 1, "epochs_run": 1, "best_val_auroc": None, "device": {"kind": "cpu"},
        "mixed_precision": False, "parameters": int(model.count_params()),
        **({"calibration": calibrator.to_dict()} if calibrator is not None else {}),
    }, indent=2))
    return run.info.run_id


@pytest.fixture(scope="module")
def tabular_evaluated(tmp_path_factory):
    import keras

    layout = processed_workspace(tmp_path_factory, tabular_params(), "tabular")
    params = load(layout)
    summary = json.loads((layout.processed / "preprocess.json").read_text())
    train = pd.read_parquet(layout.processed / summary["tables"]["train"])
    x, y = train[summary["features"]].to_numpy(np.float32), train["label_index"].to_numpy()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((x.shape[1],)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    model.fit(x, y, epochs=20, batch_size=32, verbose=0)
    # as train does: temperature scaling fitted on the validation split's predictions
    validation = evaluate.predict_split(model, layout, summary, "validation", 2)
    calibrator = calibration.fit("temperature", validation.probabilities, validation.label_index)
    run_id = save_trained(layout, params, model, summary, {"features": summary["features"]}, calibrator)

    first = evaluate.run(params, layout)
    snapshot = {p.relative_to(layout.root): p.read_bytes()
                for p in [layout.metrics_json, layout.model_card, *layout.plots.glob("*.json")]}
    second = evaluate.run(params, layout)
    return layout, params, run_id, first, second, snapshot


@pytest.mark.slow
def test_tabular_metrics_json_follows_the_contract(tabular_evaluated):
    layout, params, run_id, result, _, _ = tabular_evaluated
    report = json.loads(layout.metrics_json.read_text())
    assert set(report) == {"positive_class", "classes", "operating_threshold", "threshold_source", "test",
                           "validation", "subgroups", "intervals", "test_cases", "calibration",
                           "frozen_test_set_sha256", "weights_sha256", "run_id", "test_set"}
    assert report["intervals"]["sensitivity_ci"] == "wilson-patient-clustered"
    assert report["intervals"]["non_inferiority"] == "newcombe-paired-patient-clustered"
    # per-case results in record-id order, no identifiers: they agree with the counts
    y_true, flagged, _ = metrics.read_case_outcomes(report["test_cases"])
    assert len(y_true) == report["test"]["n"] and int(y_true.sum()) == report["test"]["n_positive"]
    caught = int((flagged & (y_true == 1)).sum())
    assert caught / report["test"]["n_positive"] == pytest.approx(report["test"]["sensitivity"], abs=1e-6)
    point = set(metrics.METRIC_NAMES)
    assert set(report["test"]) == point | {"auroc_ci", "sensitivity_ci", "specificity_ci"}
    assert set(report["validation"]) == point
    assert report["positive_class"] == "malignant" and report["classes"] == ["benign", "malignant"]
    assert report["threshold_source"] == "validation" and report["run_id"] == run_id
    assert report["weights_sha256"] == json.loads(layout.train_json.read_text())["weights_sha256"]
    test = report["test"]
    assert test["auroc"] > 0.9, test
    # the threshold was chosen on validation to reach the target
    assert report["validation"]["sensitivity"] >= params.evaluate.target_sensitivity
    for name in ("auroc", "sensitivity", "specificity"):
        low, high = test[f"{name}_ci"]
        assert low <= test[name] <= high, name
    # the frozen test set's fingerprint is that of the evaluated record ids
    test_ids = pd.read_parquet(layout.processed / "tabular" / "test.parquet")["record_id"]
    assert test["n"] == len(test_ids)
    assert report["frozen_test_set_sha256"] == hashlib.sha256("\n".join(sorted(test_ids)).encode()).hexdigest()
    # every subgroup column accounts for every test item once
    assert set(report["subgroups"]) == set(params.evaluate.subgroups)
    for column, values in report["subgroups"].items():
        assert sum(v["n"] for v in values.values()) == test["n"], column
        assert sum(v["n_positive"] for v in values.values()) == test["n_positive"], column
    assert "NaN" not in layout.metrics_json.read_text()
    assert result.test_auroc == test["auroc"] and result.operating_threshold == report["operating_threshold"]


@pytest.mark.slow
def test_tabular_metrics_and_threshold_are_on_calibrated_probabilities(tabular_evaluated):
    import keras

    layout, params, _, _, _, _ = tabular_evaluated
    report = json.loads(layout.metrics_json.read_text())
    trained = json.loads(layout.train_json.read_text())
    calibrator = calibration.Calibrator.from_dict(trained["calibration"])
    summary = json.loads((layout.processed / "preprocess.json").read_text())
    model = keras.models.load_model(layout.model_file, compile=False)
    own = {split: evaluate.predict_split(model, layout, summary, split, 2) for split in ("validation", "test")}
    calibrated = {split: calibrator.apply(p.probabilities)[:, 1] for split, p in own.items()}
    # the threshold is chosen on the CALIBRATED validation scores, and the test metrics use them
    chosen = metrics.operating_threshold(own["validation"].label_index, calibrated["validation"], 0.9)
    assert report["operating_threshold"] == math.floor(chosen * 1e6) / 1e6
    y_test = own["test"].label_index
    assert report["test"]["ece"] == pytest.approx(metrics.expected_calibration_error(y_test, calibrated["test"]), abs=1e-6)
    section = report["calibration"]
    assert section["method"] == "temperature" and section["fitted_on"] == "validation"
    assert section["temperature"] == pytest.approx(calibrator.temperature, abs=1e-6)
    assert section["description"].startswith("temperature scaling (T = ")
    for split, key in (("validation", "validation"), ("test", "test")):
        y = own[split].label_index
        row = section[key]
        assert row["ece_before"] == pytest.approx(metrics.expected_calibration_error(y, own[split].probabilities[:, 1]),
                                                  abs=1e-6)
        assert row["ece_after"] == pytest.approx(report[split]["ece"], abs=1e-6)
        assert row["brier_after"] == pytest.approx(report[split]["brier"], abs=1e-6)
    # fitted by minimising the validation log loss, so it cannot make that worse
    from sklearn.metrics import log_loss

    y_val = own["validation"].label_index
    assert log_loss(y_val, calibrated["validation"]) <= log_loss(y_val, own["validation"].probabilities[:, 1])


@pytest.mark.slow
def test_tabular_plots_model_card_and_mlflow(tabular_evaluated):
    import mlflow

    layout, params, run_id, _, _, _ = tabular_evaluated
    for name in ("roc", "pr", "calibration", "confusion_matrix", "permutation_importance"):
        assert (layout.plots / f"{name}.json").is_file() and (layout.plots / f"{name}.png").is_file(), name
    # the reliability diagram before calibration, beside the calibrated one (one DVC plot)
    before = json.loads((layout.plots / "calibration_uncalibrated.json").read_text())["calibration_uncalibrated"]
    after = json.loads((layout.plots / "calibration.json").read_text())["calibration"]
    assert sum(p["count"] for p in before) == sum(p["count"] for p in after) > 0
    assert before != after
    roc = json.loads((layout.plots / "roc.json").read_text())["roc"]
    assert roc[0] == {"x": 0.0, "y": 0.0} and roc[-1] == {"x": 1.0, "y": 1.0}
    importance = json.loads((layout.plots / "permutation_importance.json").read_text())["permutation_importance"]
    assert {row["feature"] for row in importance} == set(params.tabular.features)
    card = layout.model_card.read_text()
    report = json.loads(layout.metrics_json.read_text())
    assert "screening aid" in card and "not a diagnosis" in card
    assert str(report["operating_threshold"]) in card and "validation" in card
    assert "params_hash" in card and "## Limitations" in card and "site-" in card
    assert "SYNTHETIC" not in card
    calibrated = report["calibration"]["test"]
    assert "## Calibration" in card and report["calibration"]["description"] in card
    assert (f"| test | {calibrated['ece_before']:.3f} | {calibrated['ece_after']:.3f} | "
            f"{calibrated['brier_before']:.3f} | {calibrated['brier_after']:.3f} |") in card
    assert "calibrated probability" in card

    from pipelines.registry.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri(params, layout))
    run = client.get_run(run_id)
    assert run.data.metrics["test_auroc"] == pytest.approx(report["test"]["auroc"], abs=1e-6)
    assert run.data.metrics["val_sensitivity"] == pytest.approx(report["validation"]["sensitivity"], abs=1e-6)
    assert float(run.data.tags["medloop.operating_threshold"]) == report["operating_threshold"]
    assert run.data.metrics["test_ece_uncalibrated"] == pytest.approx(report["calibration"]["test"]["ece_before"],
                                                                       abs=1e-6)
    assert run.data.metrics["val_brier_uncalibrated"] == pytest.approx(
        report["calibration"]["validation"]["brier_before"], abs=1e-6)
    assert run.data.tags["medloop.calibration"] == "temperature"
    plots = {a.path for a in client.list_artifacts(run_id, "evaluation/plots")}
    assert {"evaluation/plots/calibration.png", "evaluation/plots/calibration_uncalibrated.json"} <= plots
    logged = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert {"evaluation/metrics.json", "evaluation/model_card.md", "evaluation/plots"} <= logged


@pytest.mark.slow
def test_tabular_evaluation_is_deterministic(tabular_evaluated):
    layout, _, _, first, second, snapshot = tabular_evaluated
    assert first == second
    for path, content in snapshot.items():
        assert (layout.root / path).read_bytes() == content, path


@pytest.mark.slow
def test_image_evaluation_writes_gradcams_named_by_class_only(tmp_path_factory):
    import keras

    raw = image_params()
    raw["preprocess"]["image_size"] = [48, 48]
    raw["evaluate"]["gradcam_per_class"] = 2
    layout = processed_workspace(tmp_path_factory, raw, "image")
    params = load(layout)
    summary = json.loads((layout.processed / "preprocess.json").read_text())
    images, labels = [], []
    for batch, label, _ in evaluate.image_batches(layout, summary, "train"):
        images.append(batch.numpy())
        labels.append(label.numpy())
    keras.utils.set_random_seed(0)
    inputs = keras.Input((48, 48, 3))
    hidden = keras.layers.Rescaling(1 / 255)(inputs)
    hidden = keras.layers.Conv2D(4, 3, activation="relu")(hidden)
    hidden = keras.layers.MaxPooling2D()(hidden)
    hidden = keras.layers.Conv2D(8, 3, activation="relu", name="last_conv")(hidden)
    hidden = keras.layers.GlobalAveragePooling2D()(hidden)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(hidden))
    model.compile(optimizer="adam", loss="binary_crossentropy")
    model.fit(np.concatenate(images), np.concatenate(labels), epochs=2, batch_size=16, verbose=0)
    save_trained(layout, params, model, summary, dict(summary["image"]))

    result = evaluate.run(params, layout)

    report = json.loads(layout.metrics_json.read_text())
    index = pd.read_parquet(layout.processed / "index.parquet")
    test_items = index[index["split"] == "test"]
    assert report["test"]["n"] == len(test_items) == result.test_n
    for column, values in report["subgroups"].items():
        assert sum(v["n"] for v in values.values()) == len(test_items), column
    gradcams = sorted(p.name for p in (layout.plots / "gradcam").glob("*.png"))
    expected = [f"{c}_{i:02d}.png" for c in params.model.classes
                for i in range(min(2, int((test_items["label"] == c).sum())))]
    assert gradcams == expected
    forbidden = set(test_items["record_id"]) | set(test_items["patient_id"]) | set(test_items["content_hash"])
    for name in gradcams:
        assert re.fullmatch(r"[A-Za-z]+_\d\d\.png", name)
        assert not any(part in name for ident in forbidden for part in re.split(r"[/.#]", ident) if len(part) > 6)
    assert "SYNTHETIC" in layout.model_card.read_text()
    assert not math.isnan(report["operating_threshold"])


def test_multi_class_report_is_one_vs_rest_with_macro_auroc(tmp_path):
    raw = tabular_params()
    raw["model"]["classes"] = ["benign", "malignant", "atypical"]
    params = parse_params(raw)
    rng = np.random.default_rng(5)

    def predictions(n: int, prefix: str) -> evaluate.Predictions:
        labels = rng.integers(0, 3, n)
        logits = rng.normal(size=(n, 3)) + 2.0 * np.eye(3)[labels]
        probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        return evaluate.Predictions(np.array([f"{prefix}{i:03d}" for i in range(n)]), labels, probabilities)

    test, validation = predictions(90, "t"), predictions(60, "v")
    index = pd.DataFrame({"record_id": test.record_id, "patient_id": test.record_id,
                          "site": np.where(np.arange(90) % 2, "a", "b")})
    report = evaluate.build_report(params, {"run_id": "r", "weights_sha256": "w"}, test, validation, index, 0.3)
    y = (test.label_index == 1).astype(int)
    assert report["test"]["auroc"] == pytest.approx(roc_auc_score(y, test.probabilities[:, 1]), abs=1e-6)
    assert report["test"]["macro_auroc"] == pytest.approx(
        roc_auc_score(test.label_index, test.probabilities, multi_class="ovr"), abs=1e-6)
    assert report["test"]["n_positive"] == int(y.sum())
    assert set(report["subgroups"]) == {"site"}  # age_band is not in this index
    written = evaluate.write_confusion_matrix(tmp_path, test, params.model.classes, 1, 0.3)
    rows = json.loads(written[0].read_text())["confusion_matrix"]
    flagged = test.probabilities[:, 1] >= 0.3
    assert sum(row["predicted"] == "malignant" for row in rows) == int(flagged.sum())
