"""Evaluate (DVC stage): the trained model on the frozen test set, at a threshold chosen on
validation.

- Every probability is CALIBRATED by the calibrator the train stage fitted on validation
  (``models/train.json`` ``calibration``, `pipelines.model.calibration`), as the served model's are:
  the threshold, every metric, the plots and the explanations use calibrated probabilities.
  The ECE and Brier score before and after calibration, on validation and test, are reported
  (``calibration`` in metrics.json, the model card), with a reliability diagram of both.
- The operating threshold is chosen on the VALIDATION split, never on the test set: the highest
  threshold whose validation sensitivity for ``model.positive_class`` reaches
  ``evaluate.target_sensitivity`` on calibrated scores (see `pipelines.model.metrics.operating_threshold`). It is rounded
  down to 6 decimals, so the value written to metrics.json is exactly the one applied.
- On the frozen test set: AUROC, AUPRC, sensitivity, specificity, PPV, NPV, F1, accuracy, Brier
  score and expected calibration error at that threshold, 95% intervals (AUROC: bootstrap over
  patients; sensitivity and specificity: Wilson score intervals on the patient-clustered
  effective sample size, named in ``intervals``), the per-case results (``test_cases``: label,
  flag and patient index in record-id order, no identifiers) that promote pairs with the
  champion's, and the same metrics per subgroup
  (``evaluate.subgroups``) with their counts. Multi-class models are judged one-vs-rest on the
  positive class, plus a macro AUROC.
- Plots (``reports/plots``): ROC, precision-recall, the reliability diagram (calibrated, and
  the model's own probabilities beside it) and the confusion matrix as DVC plot data and PNGs; Grad-CAM heat maps of test images (image models) or permutation importance
  of the features (tabular models).
- ``reports/model_card.md``: what the model is for, what it was made from, how well it does and
  where it may fail.
- Everything is also logged into the model's MLflow run (named by ``models/train.json``).

metrics.json is deterministic: the same model and data give the same bytes (sorted keys, values
rounded to 6 decimals, a seeded bootstrap). No file name or plot carries a record id.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.model import metrics as clinical
from pipelines.model import card as model_card
from pipelines.model.calibration import Calibrator, calibrator_of
from pipelines.config import Params
from pipelines.errors import MedloopError
from pipelines.model.gradcam import gradcam, overlay
from pipelines.stage import stage_main
from pipelines.data.inputs import processed_summary
from pipelines.registry.tags import (CALIBRATION, FROZEN_TEST_SET_SHA256, OPERATING_THRESHOLD, THRESHOLD_SOURCE,
                                     WEIGHTS_SHA256)
from pipelines.registry.interrupted import answering
from pipelines.registry.tracking import configure, display_uri, dumps, lineage_tags
from pipelines.values import json_ready, number
from pipelines.workspace import Layout, read_json

log = logging.getLogger("medloop.evaluate")

BATCH_SIZE = 64
TABULAR_BATCH_SIZE = 4096
PERMUTATION_REPEATS = 5
THRESHOLD_DIGITS = 6
MLFLOW_ARTIFACT_PATH = "evaluation"


@dataclass(frozen=True)
class EvaluateResult:
    """What evaluate wrote, and the headline figures."""

    metrics_file: str
    operating_threshold: float
    test_n: int
    test_auroc: float | None
    test_sensitivity: float | None
    test_specificity: float | None
    run_id: str
    plots: list[str]


@dataclass(frozen=True)
class Predictions:
    """One split's items, sorted by record id, with the model's per-class probabilities."""

    record_id: np.ndarray
    label_index: np.ndarray
    probabilities: np.ndarray
    features: np.ndarray | None = None  # scaled tabular features (for permutation importance)

    def positive(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(y_true, score) of one class against the rest."""
        return (self.label_index == index).astype(np.int64), self.probabilities[:, index]


def run(params: Params, layout: Layout) -> EvaluateResult:
    """Evaluate models/model.keras on validation and the frozen test set; write reports/."""
    trained = read_json(layout.train_json, "run the train stage first")
    summary = processed_summary(layout)
    classes = list(params.model.classes)
    _check_consistent(params, trained, summary)
    positive = classes.index(params.model.positive_class)
    model = _load_model(layout)
    calibrator = Calibrator.from_dict(trained.get("calibration"))

    uncalibrated = {split: predict_split(model, layout, summary, split, len(classes)) for split in ("validation", "test")}
    validation, test = (calibrated(uncalibrated[split], calibrator) for split in ("validation", "test"))
    if len(test.record_id) == 0:
        raise MedloopError(f"{layout.processed}: the frozen test set is empty; nothing to evaluate on")
    y_val, score_val = validation.positive(positive)
    if y_val.sum() == 0:
        raise MedloopError(
            f"the validation split has no {params.model.positive_class!r} cases "
            f"(observed 0 of {len(y_val)}; at least 1 required), so no operating threshold can be "
            f"chosen for sensitivity >= {params.evaluate.target_sensitivity}; collect more data"
        )
    threshold = _round_down(clinical.operating_threshold(y_val, score_val, params.evaluate.target_sensitivity))

    index = pd.read_parquet(layout.processed / "index.parquet")
    calibration = calibration_report(calibrator, uncalibrated, {"validation": validation, "test": test}, positive,
                                     params.evaluate.calibration_bins)
    report = build_report(params, trained, test, validation, index, threshold, calibration)
    report["test_set"] = summary.get("test_set")  # growing or frozen (promote judges only on frozen)
    layout.reports.mkdir(parents=True, exist_ok=True)
    layout.metrics_json.write_text(dumps(report))

    if layout.plots.exists():
        shutil.rmtree(layout.plots)  # stale Grad-CAMs of an earlier model must not survive
    layout.plots.mkdir(parents=True)
    y_test, score_test = test.positive(positive)
    written = write_curve_plots(layout.plots, y_test, score_test, report, params.evaluate.calibration_bins,
                                uncalibrated_score=uncalibrated["test"].probabilities[:, positive])
    written += write_confusion_matrix(layout.plots, test, classes, positive, threshold)
    explanations: dict = {}
    if params.model.modality == "image" and params.evaluate.gradcam_per_class > 0:
        gradcams = write_gradcams(model, layout, summary, test, classes, positive, params.evaluate.gradcam_per_class)
        written += gradcams
        explanations["gradcam"] = gradcams
    if params.model.modality == "tabular":
        importance = permutation_importance(model, test, positive, summary["features"], params.train.seed,
                                            calibrator=calibrator)
        written += write_permutation_importance(layout.plots, importance)
        explanations["permutation_importance"] = importance

    card = model_card.render(
        params=params, report=report, lineage=lineage_tags(params, layout), data=summary,
        explanations=explanations, trained=trained,
    )
    layout.model_card.write_text(card)
    with answering(params, layout, f"logging the evaluation to run {trained['run_id']}",
                   "The reports are written, but the stage did not finish: dvc.lock does not record it, so the "
                   "next night evaluates again."):
        log_to_mlflow(params, layout, trained["run_id"], report)
    log.info("evaluate: test AUROC %s at operating threshold %s", report["test"]["auroc"], threshold)
    return EvaluateResult(
        metrics_file=str(layout.metrics_json),
        operating_threshold=report["operating_threshold"],
        test_n=report["test"]["n"],
        test_auroc=report["test"]["auroc"],
        test_sensitivity=report["test"]["sensitivity"],
        test_specificity=report["test"]["specificity"],
        run_id=trained["run_id"],
        plots=sorted(str(p.relative_to(layout.root)) for p in written),
    )


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------


def build_report(
    params: Params,
    trained: dict,
    test: Predictions,
    validation: Predictions,
    index: pd.DataFrame,
    threshold: float,
    calibration: dict | None = None,
) -> dict:
    """metrics.json's content (JSON-ready: rounded, None for undefined metrics).

    Args:
        test, validation: the calibrated predictions (`calibrated`).
        calibration: `calibration_report`'s summary (None when not measured).
    """
    classes = list(params.model.classes)
    positive = classes.index(params.model.positive_class)
    bins = params.evaluate.calibration_bins
    y_test, score_test = test.positive(positive)
    y_val, score_val = validation.positive(positive)

    frame = pd.DataFrame({"record_id": test.record_id, "y_true": y_test, "score": score_test})
    present = [c for c in params.evaluate.subgroups if c in index.columns]
    absent = sorted(set(params.evaluate.subgroups) - set(present))
    if absent:
        log.warning("subgroup columns %s are not in the data; not reported", absent)
    extra = index[["record_id", *(["patient_id"] if "patient_id" in index.columns else []), *present]]
    frame = frame.merge(extra.drop_duplicates("record_id"), on="record_id", how="left")
    groups = frame["patient_id"].astype(str).to_numpy() if "patient_id" in frame.columns else None

    test_metrics = clinical.binary_metrics(y_test, score_test, threshold, bins)
    test_metrics.update(clinical.intervals(
        y_test, score_test, threshold, params.evaluate.bootstrap_samples, params.train.seed, groups=groups,
    ))
    if len(classes) > 2:
        test_metrics["macro_auroc"] = clinical.macro_auroc(test.label_index, test.probabilities)
    report = {
        "positive_class": params.model.positive_class,
        "classes": classes,
        "operating_threshold": threshold,
        "threshold_source": "validation",
        "test": test_metrics,
        "validation": clinical.binary_metrics(y_val, score_val, threshold, bins),
        "subgroups": clinical.subgroup_metrics(frame, threshold, present),
        "intervals": clinical.interval_methods(params.evaluate.bootstrap_samples, params.train.seed),
        # Promote pairs the champion's results with these case by case (same fingerprint, same order).
        "test_cases": clinical.case_outcomes(y_test, score_test, threshold, groups),
        "calibration": calibration,
        "frozen_test_set_sha256": frozen_test_set_sha256(test.record_id),
        "weights_sha256": trained.get("weights_sha256"),
        "run_id": trained["run_id"],
    }
    return json_ready(report, THRESHOLD_DIGITS)


def calibrated(predictions: Predictions, calibrator: Calibrator) -> Predictions:
    """The same items with the calibrator applied to their probabilities."""
    return replace(predictions, probabilities=calibrator.apply(predictions.probabilities))


def calibration_report(calibrator: Calibrator, before: dict[str, Predictions], after: dict[str, Predictions],
                       positive: int, bins: int) -> dict:
    """What calibration did: the method, and per split (``validation``, ``test``) the ECE and
    Brier score of the positive class with the model's own probabilities (``*_before``) and the
    calibrated ones (``*_after``). The calibrator was fitted on validation, so the test figures
    are the honest ones."""
    summary: dict = {"method": calibrator.method, "description": calibrator.describe(), "fitted_on": "validation"}
    if calibrator.method == "temperature":
        summary["temperature"] = calibrator.temperature
    for split in before:
        row = {}
        for stage, predictions in (("before", before[split]), ("after", after[split])):
            y, score = predictions.positive(positive)
            measured = clinical.binary_metrics(y, score, 0.5, bins)
            row[f"ece_{stage}"], row[f"brier_{stage}"] = measured["ece"], measured["brier"]
        summary[split] = row
    return summary


def rescore_registered(params: Params, layout: Layout, model_uri: str) -> dict:
    """metrics.json of a registered version (``models:/<name>/<version>``) on TODAY's frozen test
    set, at the operating threshold stored with that version.

    Promote uses it when the champion's recorded metrics were measured on a different test set
    (items quarantined since, say), so that champion and candidate meet on the same yardstick.
    """
    from mlflow import MlflowClient

    from pipelines.registry.tracking import configure

    configure(params, layout)
    name, version = model_uri.removeprefix("models:/").rsplit("/", 1)
    registered = MlflowClient().get_model_version(name, version)
    from pipelines.model import pyfunc

    python_model = pyfunc.load(model_uri).unwrap_python_model()
    model, calibrator = python_model.model, calibrator_of(python_model)
    summary = processed_summary(layout)
    n_classes = len(params.model.classes)
    positive = params.model.classes.index(params.model.positive_class)
    uncalibrated = {split: predict_split(model, layout, summary, split, n_classes) for split in ("validation", "test")}
    validation, test = (calibrated(uncalibrated[split], calibrator) for split in ("validation", "test"))
    stored = registered.tags.get(OPERATING_THRESHOLD)
    if stored in (None, "", "None"):
        raise MedloopError(f"{model_uri} has no stored operating threshold (tag {OPERATING_THRESHOLD})")
    trained = {"run_id": registered.run_id, "weights_sha256": registered.tags.get(WEIGHTS_SHA256)}
    index = pd.read_parquet(layout.processed / "index.parquet")
    calibration = calibration_report(calibrator, uncalibrated, {"validation": validation, "test": test}, positive,
                                     params.evaluate.calibration_bins)
    return build_report(params, trained, test, validation, index, float(stored), calibration)


def frozen_test_set_sha256(record_ids) -> str:
    """sha256 of the sorted test record ids joined by newlines: the yardstick's fingerprint."""
    return hashlib.sha256("\n".join(sorted(str(r) for r in record_ids)).encode()).hexdigest()


def _round_down(value: float) -> float:
    """Round a threshold down to 6 decimals: a lower threshold never loses sensitivity."""
    scale = 10**THRESHOLD_DIGITS
    return math.floor(value * scale) / scale


# ---------------------------------------------------------------------------------------------
# model and data
# ---------------------------------------------------------------------------------------------


def _check_consistent(params: Params, trained: dict, summary: dict) -> None:
    classes = list(params.model.classes)
    for name, found in (("models/train.json", trained.get("classes")), ("preprocess.json", summary.get("classes"))):
        if found != classes:
            raise MedloopError(f"{name} has classes {found}, but params model.classes is {classes}; retrain")
    if summary.get("modality") != params.model.modality:
        raise MedloopError(
            f"data/processed holds {summary.get('modality')} data, but model.modality is {params.model.modality}"
        )
    if "run_id" not in trained:
        raise MedloopError("models/train.json has no run_id; retrain")
    wanted = (trained.get("input") or {}).get("features")
    if params.model.modality == "tabular" and wanted is not None and wanted != summary.get("features"):
        raise MedloopError(
            f"the model was trained on features {wanted}, but data/processed has {summary.get('features')}; retrain"
        )


def _load_model(layout: Layout):
    import keras

    if not layout.model_file.is_file():
        raise MedloopError(f"{layout.model_file} is missing; run the train stage first")
    return keras.models.load_model(layout.model_file, compile=False)


def predict_split(model, layout: Layout, summary: dict, split: str, n_classes: int) -> Predictions:
    """The model's own (uncalibrated) per-class probabilities for every item of a split, sorted by
    record id."""
    if summary["modality"] == "image":
        record_ids, labels, outputs = [], [], []
        _check_input(model, tuple(summary["image"][k] for k in ("height", "width", "channels")))
        for images, label, record_id in image_batches(layout, summary, split):
            outputs.append(np.asarray(model(images, training=False), dtype=np.float64))
            labels.append(label.numpy())
            record_ids.extend(r.decode() for r in record_id.numpy())
        features = None
        label_index = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    else:
        frame = pd.read_parquet(layout.processed / summary["tables"][split])
        features = frame[summary["features"]].to_numpy(np.float32)
        _check_input(model, (features.shape[1],))
        outputs = [_predict_array(model, features)]
        record_ids, label_index = frame["record_id"].astype(str).tolist(), frame["label_index"].to_numpy()
    output = np.concatenate(outputs) if outputs else np.zeros((0, 1))
    probabilities = clinical.probabilities_from_output(output, n_classes) if len(output) else np.zeros((0, n_classes))
    order = np.argsort(np.asarray(record_ids, dtype=object).astype(str), kind="stable")
    label_index = np.asarray(label_index, dtype=np.int64)
    if len(label_index) and (label_index.min() < 0 or label_index.max() >= n_classes):
        raise MedloopError(f"{split}: label indices outside 0..{n_classes - 1}; rerun preprocess")
    return Predictions(
        record_id=np.asarray(record_ids, dtype=object)[order].astype(str),
        label_index=label_index[order],
        probabilities=probabilities[order],
        features=None if features is None else features[order],
    )


def image_batches(layout: Layout, summary: dict, split: str, batch_size: int = BATCH_SIZE):
    """(float32 images 0..255 of shape (n, H, W, C), int64 labels, record id bytes) batches of a
    split's TFRecord shards, in file order."""
    import tensorflow as tf

    height, width, channels = (int(summary["image"][k]) for k in ("height", "width", "channels"))
    files = [str(layout.processed / name) for name in summary["shards"].get(split, [])]
    spec = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "record_id": tf.io.FixedLenFeature([], tf.string),
    }

    def parse(serialized):
        example = tf.io.parse_single_example(serialized, spec)
        pixels = tf.reshape(tf.io.decode_raw(example["image"], tf.uint8), (height, width, channels))
        return tf.cast(pixels, tf.float32), example["label"], example["record_id"]

    dataset = tf.data.TFRecordDataset(files).map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _predict_array(model, features: np.ndarray) -> np.ndarray:
    if len(features) == 0:
        return np.zeros((0, 1))
    return np.concatenate([
        np.asarray(model(features[start : start + TABULAR_BATCH_SIZE], training=False), dtype=np.float64)
        for start in range(0, len(features), TABULAR_BATCH_SIZE)
    ])


def _check_input(model, shape: tuple) -> None:
    expected = tuple(model.input_shape[1:]) if not isinstance(model.input_shape, list) else None
    if expected is not None and all(d is not None for d in expected) and expected != shape:
        raise MedloopError(f"the model takes inputs of shape {expected}, but data/processed holds {shape}; retrain")


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------


def write_curve_plots(folder: Path, y_true, score, report: dict, bins: int, uncalibrated_score=None) -> list[Path]:
    """ROC, precision-recall and the reliability diagram: DVC plot data (JSON) and PNGs.

    ``calibration.json`` is the reliability curve of the (calibrated) scores;
    ``calibration_uncalibrated.json`` that of the model's own scores (``uncalibrated_score``),
    drawn together in ``calibration.png``."""
    data = clinical.curves(y_true, score, bins)
    if uncalibrated_score is not None:
        data["calibration_uncalibrated"] = clinical.curves(y_true, uncalibrated_score, bins)["calibration"]
    written = []
    for name, points in data.items():
        path = folder / f"{name}.json"
        path.write_text(dumps({name: json_ready(points)}))
        written.append(path)
    plt = _pyplot()
    test, positive = report["test"], report["positive_class"]

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([p["x"] for p in data["roc"]], [p["y"] for p in data["roc"]], label=f"AUROC {_fmt_ci(test, 'auroc')}")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    if test["sensitivity"] is not None and test["specificity"] is not None:
        ax.plot([1 - test["specificity"]], [test["sensitivity"]], "o", color="red",
                label=f"operating threshold {report['operating_threshold']:.3f}")
    ax.set(xlabel="1 - specificity", ylabel=f"sensitivity ({positive})", title="ROC, frozen test set")
    ax.legend(loc="lower right")
    written.append(_save(fig, folder / "roc.png"))

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([p["x"] for p in data["pr"]], [p["y"] for p in data["pr"]], label=f"AUPRC {number(test['auprc'])}")
    if test["n"]:
        ax.axhline(test["n_positive"] / test["n"], linestyle="--", color="grey", linewidth=1, label="prevalence")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall, frozen test set",
           xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower left")
    written.append(_save(fig, folder / "pr.png"))

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    calibration = report.get("calibration") or {}
    if "calibration_uncalibrated" in data:
        before = (calibration.get("test") or {}).get("ece_before")
        ax.plot([p["x"] for p in data["calibration_uncalibrated"]], [p["y"] for p in data["calibration_uncalibrated"]],
                "s:", color="grey", label=f"before calibration (ECE {number(before)})")
    shown = "calibrated" if calibration.get("method", "none") != "none" else "model"
    ax.plot([p["x"] for p in data["calibration"]], [p["y"] for p in data["calibration"]], "o-",
            label=f"{shown} (ECE {number(test['ece'])})")
    ax.set(xlabel=f"mean predicted P({positive})", ylabel="observed frequency",
           title="Reliability diagram, frozen test set", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left")
    written.append(_save(fig, folder / "calibration.png"))
    return written


def write_confusion_matrix(folder: Path, test: Predictions, classes: list[str], positive: int, threshold: float) -> list[Path]:
    """Actual against predicted class at the operating threshold: per-item rows (DVC's confusion
    template) and a PNG. An item is predicted positive when its positive-class probability
    reaches the threshold, otherwise as its most probable other class."""
    others = test.probabilities.copy()
    others[:, positive] = -np.inf
    predicted = np.where(test.probabilities[:, positive] >= threshold, positive, others.argmax(axis=1))
    rows = [{"actual": classes[a], "predicted": classes[p]} for a, p in zip(test.label_index, predicted)]
    json_path = folder / "confusion_matrix.json"
    json_path.write_text(dumps({"confusion_matrix": rows}))

    from sklearn.metrics import confusion_matrix

    matrix = confusion_matrix(test.label_index, predicted, labels=list(range(len(classes))))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4 + 0.5 * len(classes), 4 + 0.5 * len(classes)))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center",
                color="white" if count > matrix.max() / 2 else "black")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="actual", title=f"Frozen test set at threshold {threshold:.3f}")
    return [json_path, _save(fig, folder / "confusion_matrix.png")]


def write_gradcams(model, layout: Layout, summary: dict, test: Predictions, classes: list[str], positive: int,
                   per_class: int) -> list[Path]:
    """Grad-CAM heat maps over the first ``per_class`` test images (by record id) of each class,
    for the image's actual class. Files are named by class and position, never by record id."""
    chosen: dict[str, tuple[int, int]] = {}  # record id -> (class index, position in class)
    for k in range(len(classes)):
        for position, i in enumerate(np.flatnonzero(test.label_index == k)[:per_class]):
            chosen[test.record_id[i]] = (k, position)
    if not chosen:
        return []
    images: dict[str, np.ndarray] = {}
    for batch, _, record_ids in image_batches(layout, summary, "test"):
        for image, record_id in zip(batch.numpy(), record_ids.numpy()):
            if record_id.decode() in chosen:
                images[record_id.decode()] = image
    order = sorted(chosen, key=chosen.get)
    pixels = np.stack([images[r] for r in order])
    targets = np.array([chosen[r][0] for r in order])
    heat = gradcam(model, pixels, targets, len(classes))
    if heat is None:
        log.warning("the model has no Conv2D layer reachable for Grad-CAM; no heat maps written")
        return []
    folder = layout.plots / "gradcam"
    folder.mkdir(parents=True, exist_ok=True)
    score = {r: test.probabilities[np.flatnonzero(test.record_id == r)[0], positive] for r in order}
    plt = _pyplot()
    written = []
    for image, cam, record_id in zip(pixels, heat, order):
        k, position = chosen[record_id]
        rgb, blended = overlay(image, cam)
        fig, axes = plt.subplots(1, 2, figsize=(6, 3.3))
        axes[0].imshow(rgb)
        axes[1].imshow(blended)
        for ax in axes:
            ax.axis("off")
        fig.suptitle(f"actual {classes[k]} #{position}: P({classes[positive]}) = {score[record_id]:.2f}")
        path = folder / f"{_safe_name(classes[k])}_{position:02d}.png"
        written.append(_save(fig, path))
    return written


def permutation_importance(model, test: Predictions, positive: int, features: list[str], seed: int,
                           repeats: int = PERMUTATION_REPEATS, calibrator: Calibrator | None = None) -> list[dict]:
    """Drop in test AUROC when one feature's values are shuffled across patients (seeded), on
    calibrated probabilities (``calibrator`` applied to the model's output), by scikit-learn's
    `sklearn.inspection.permutation_importance`.

    Returns:
        ``[{"feature", "importance" (mean AUROC drop), "std"}]``, most important first; empty
        when the test AUROC is undefined.
    """
    from sklearn.inspection import permutation_importance as shuffled_feature_drops
    from sklearn.metrics import roc_auc_score

    y = (test.label_index == positive).astype(int)
    if test.features is None or not 0 < y.sum() < len(y):
        return []
    n_classes = test.probabilities.shape[1]

    def test_auroc(estimator, x: np.ndarray, y_true: np.ndarray) -> float:
        scores = clinical.probabilities_from_output(_predict_array(estimator, x), n_classes)
        return roc_auc_score(y_true, (scores if calibrator is None else calibrator.apply(scores))[:, positive])

    drops = shuffled_feature_drops(model, test.features, y, scoring=test_auroc, n_repeats=repeats,
                                   random_state=seed)
    rows = [{"feature": name, "importance": float(mean), "std": float(std)}
            for name, mean, std in zip(features, drops.importances_mean, drops.importances_std)]
    rows = json_ready(rows)
    return sorted(rows, key=lambda row: (-row["importance"], row["feature"]))


def write_permutation_importance(folder: Path, importance: list[dict]) -> list[Path]:
    path = folder / "permutation_importance.json"
    path.write_text(dumps({"permutation_importance": importance}))
    if not importance:
        return [path]
    shown = importance[:20][::-1]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 1.2 + 0.3 * len(shown)))
    ax.barh([row["feature"] for row in shown], [row["importance"] for row in shown],
            xerr=[row["std"] for row in shown], color="steelblue")
    ax.set(xlabel="drop in test AUROC when shuffled", title="Permutation importance")
    return [path, _save(fig, folder / "permutation_importance.png")]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "class"


def _fmt_ci(metrics: dict, name: str) -> str:
    interval = metrics.get(f"{name}_ci")
    text = number(metrics.get(name))
    return f"{text} [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else text


# ---------------------------------------------------------------------------------------------
# MLflow
# ---------------------------------------------------------------------------------------------


def log_to_mlflow(params: Params, layout: Layout, run_id: str, report: dict) -> None:
    """Metrics (``test_*``, ``val_*``, calibrated; ``test_ece_uncalibrated`` and the like before
    calibration), the threshold and calibration tags, metrics.json, plots (the reliability
    diagram among them) and the model card into the training run."""
    import mlflow
    from mlflow.exceptions import MlflowException

    configure(params, layout)
    try:
        mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        raise MedloopError(
            f"MLflow run {run_id} (from {layout.train_json}) is not in the tracking store "
            f"{display_uri(params, layout)}; retrain"
        ) from None
    values = {}
    for prefix, section in (("test", report["test"]), ("val", report["validation"])):
        for name, value in section.items():
            if isinstance(value, list):  # a 95% interval
                values[f"{prefix}_{name}_low"], values[f"{prefix}_{name}_high"] = value
            elif value is not None:
                values[f"{prefix}_{name}"] = float(value)
    calibration = report.get("calibration") or {}
    for prefix, split in (("test", "test"), ("val", "validation")):
        for name in ("ece", "brier"):
            value = (calibration.get(split) or {}).get(f"{name}_before")
            if value is not None:
                values[f"{prefix}_{name}_uncalibrated"] = float(value)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(values)
        mlflow.set_tags({
            CALIBRATION: str(calibration.get("method", "none")),
            OPERATING_THRESHOLD: str(report["operating_threshold"]),
            THRESHOLD_SOURCE: report["threshold_source"],
            FROZEN_TEST_SET_SHA256: report["frozen_test_set_sha256"],
        })
        mlflow.log_artifact(str(layout.metrics_json), MLFLOW_ARTIFACT_PATH)
        mlflow.log_artifact(str(layout.model_card), MLFLOW_ARTIFACT_PATH)
        mlflow.log_artifacts(str(layout.plots), f"{MLFLOW_ARTIFACT_PATH}/plots")


def _describe(result: EvaluateResult) -> str:
    return (
        f"evaluate: frozen test set n={result.test_n}: AUROC {number(result.test_auroc)}, sensitivity "
        f"{number(result.test_sensitivity)}, specificity {number(result.test_specificity)} at operating threshold "
        f"{result.operating_threshold} (chosen on validation) -> {result.metrics_file}"
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main("evaluate", run, _describe, argv)


if __name__ == "__main__":
    sys.exit(main())
