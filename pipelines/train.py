"""Train (DVC stage): fit the diagnosis model on the training split, tracked in MLflow.

- Reproducible: with ``train.deterministic`` the seeds are fixed and TensorFlow's ops are made
  deterministic, so the same data and params give the same weights on a CPU (compare
  ``weights_sha256``). The input pipeline's augmentation is seeded per batch (`pipelines.data.inputs`).
- Fast where it can be: float16 compute (``mixed_float16``) when a GPU is visible and
  ``train.mixed_precision`` allows it, and a ``MirroredStrategy`` over every visible GPU.
- Clinically judged: early stopping on the validation AUROC of the positive class (computed
  with scikit-learn, one-vs-rest), keeping the best epoch's weights; balanced class weights
  from the training split, so the rarer finding is not ignored.
- Tracked: one MLflow run per training with the flattened params, per-epoch metrics, lineage
  tags, device facts, the training and validation sets as dataset inputs, and a pyfunc model
  that takes raw input (`pipelines.model.pyfunc`) and carries its own drift reference
  (`pipelines.monitoring.reference`: a seeded sample of the training inputs, and the validation
  split's predicted probabilities), made after the weights are saved so it never changes them.
- Calibrated: after training, a post-hoc calibrator (``train.calibration``, temperature scaling
  by default; `pipelines.model.calibration`) is fitted on the validation split's predictions. It is
  part of the model: stored in ``train.json`` (``calibration``) for evaluate and in the pyfunc
  (artifact ``calibration.json``) for serving, and the drift reference's predictions are
  calibrated. It never touches the weights.

Outputs: ``models/model.keras`` and ``models/train.json``. Runs in its own process (the DVC stage
command), so the GPU's memory is freed when it ends.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipelines.model import calibration
from pipelines.data import inputs
from pipelines.registry import tracking
from pipelines.registry.tags import (ARCHITECTURE, CALIBRATION, DATA_PROCESSED, DEVICE_PREFIX, ENV_PREFIX, STAGE,
                                     WEIGHTS_SHA256)
from pipelines.config import Params
from pipelines.errors import MedloopError, mask_credentials
from pipelines.model.architectures import build_model, class_probabilities, parameter_count, weights_digest
from pipelines.stage import stage_main
from pipelines.workspace import Layout

log = logging.getLogger("medloop.train")

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
EXAMPLE_ROWS = 2


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    architecture: str
    weights_sha256: str
    best_epoch: int
    epochs_run: int
    best_val_auroc: float
    parameters: int
    model_file: str


def run(params: Params, layout: Layout) -> TrainResult:
    """Fit the model of ``params.train`` on ``data/processed`` and track it in MLflow."""
    import keras
    import mlflow

    summary = inputs.processed_summary(layout)
    _check_processed(summary, params)
    classes = params.model.classes
    positive = classes.index(params.model.positive_class)
    train_labels = inputs.split_labels(layout, "train")
    validation_labels = inputs.split_labels(layout, "validation")
    _check_validation(validation_labels, classes, positive)

    previous_policy = keras.mixed_precision.global_policy().name
    device = configure_device(params)
    try:
        with device.strategy.scope():
            model = build_model(params, _model_input(summary))
        train_data, validation_data = _datasets(params, layout)
        weights = inputs.class_weights(train_labels, len(classes))
        log.info("train: %s, %d parameters, class weights %s, device %s", params.train.architecture,
                 parameter_count(model), weights, device.facts)

        experiment_id = tracking.configure(params, layout)
        run_name = f"{params.train.architecture}-{params.digest()[:8]}"
        with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as active:
            environment = {ENV_PREFIX + key: value for key, value in tracking.environment_facts().items()}
            mlflow.set_tags({**tracking.lineage_tags(params, layout), **_device_tags(device.facts), **environment,
                             STAGE: "train", ARCHITECTURE: params.train.architecture})
            mlflow.log_params(flatten_params(params))
            _log_dataset_inputs(params, layout)
            validation_auroc = validation_auroc_callback(validation_data, classes, positive)
            early_stopping = keras.callbacks.EarlyStopping(
                monitor="val_auroc", mode="max", patience=params.train.early_stopping_patience,
                restore_best_weights=True,
            )
            history = model.fit(
                train_data,
                epochs=params.train.epochs,
                class_weight=weights,
                callbacks=[validation_auroc, early_stopping, epoch_metrics_callback(params.train.epochs)],
                shuffle=False,  # the training dataset shuffles itself (seeded)
                verbose=0,
            )
            epochs_run = len(history.epoch)
            best_epoch = int(early_stopping.best_epoch) + 1
            best_val_auroc = float(early_stopping.best)

            layout.models.mkdir(parents=True, exist_ok=True)
            model.save(layout.model_file)
            digest = weights_digest(model)
            count = parameter_count(model)
            mlflow.log_metrics({"best_val_auroc": best_val_auroc, "best_epoch": best_epoch,
                                "epochs_run": epochs_run, "parameters": count})
            mlflow.set_tag(WEIGHTS_SHA256, digest)
            calibrator = calibration.fit(params.train.calibration, class_probabilities(model, validation_data),
                                         dataset_labels(validation_data))
            mlflow.set_tag(CALIBRATION, calibrator.method)
            if calibrator.method == "temperature":
                mlflow.log_metric("calibration_temperature", calibrator.temperature)
            log.info("train: calibration %s, fitted on %d validation items", calibrator.describe(),
                     calibrator.fitted_on["n"])
            from pipelines.monitoring.reference import build_reference
            from pipelines.model.pyfunc import log_pyfunc

            reference = build_reference(params, layout, model, calibrator)
            model_info = log_pyfunc(params, layout, _input_example(params, layout, summary), reference,
                                    calibrator)
            run_id = active.info.run_id

        record = {
            "run_id": run_id,
            "experiment_id": experiment_id,
            "tracking_uri": tracking.display_uri(params, layout),
            "model_uri": model_info.model_uri,
            "architecture": params.train.architecture,
            "classes": classes,
            "positive_class": params.model.positive_class,
            "modality": params.model.modality,
            "input": _model_input_record(summary),
            "weights_sha256": digest,
            "best_epoch": best_epoch,
            "epochs_run": epochs_run,
            "best_val_auroc": best_val_auroc,
            "device": device.facts,
            "mixed_precision": device.mixed_precision,
            "parameters": count,
            "calibration": calibrator.to_dict(),
            "drift_reference": {"items": reference["items"], "statistics": list(reference["statistics"]),
                                "prediction_items": len(reference["prediction"]["values"])},
        }
        layout.train_json.write_text(tracking.dumps(record))
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    log.info("train: best validation AUROC %.4f at epoch %d of %d; weights %s; run %s",
             best_val_auroc, best_epoch, epochs_run, digest[:12], run_id)
    return TrainResult(run_id, params.train.architecture, digest, best_epoch, epochs_run, best_val_auroc,
                       count, str(layout.model_file))


# ---------------------------------------------------------------------------------------------
# device: determinism, mixed precision, distribution
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    strategy: Any
    mixed_precision: bool
    facts: dict


def configure_device(params: Params) -> Device:
    """Seeds and op determinism, the mixed-precision policy and the distribution strategy.

    Float16 compute is used only with a GPU: on a CPU it is slower and gains nothing, so
    ``mixed_precision: on`` falls back to float32 there (and says so). Every visible GPU is used
    through a ``MirroredStrategy`` (one GPU included, so one code path serves one or many).
    """
    import keras
    import tensorflow as tf

    spec = params.train
    keras.backend.clear_session()
    if spec.deterministic:
        keras.utils.set_random_seed(spec.seed)
        tf.config.experimental.enable_op_determinism()
    gpus = tf.config.list_physical_devices("GPU")
    mixed = bool(gpus) and spec.mixed_precision in ("auto", "on")
    if spec.mixed_precision == "on" and not gpus:
        log.warning("train.mixed_precision is on, but no GPU is visible: training in float32 "
                    "(float16 on a CPU is slower and gains nothing)")
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    strategy = tf.distribute.MirroredStrategy() if gpus else tf.distribute.get_strategy()
    facts = {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "gpus": [_gpu_name(gpu) for gpu in gpus],
        "gpu_count": len(gpus),
        "cpu_count": os.cpu_count() or 1,
        "strategy": type(strategy).__name__,
        "replicas": int(strategy.num_replicas_in_sync),
        "mixed_precision": mixed,
        "deterministic": spec.deterministic,
    }
    return Device(strategy, mixed, facts)


def _gpu_name(gpu: Any) -> str:
    import tensorflow as tf

    try:
        return str(tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name))
    except (RuntimeError, ValueError):
        return gpu.name


def _device_tags(facts: dict) -> dict[str, str]:
    return {DEVICE_PREFIX + key: json.dumps(value) if isinstance(value, list) else str(value)
            for key, value in facts.items()}


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def _check_processed(summary: dict, params: Params) -> None:
    if summary.get("modality") != params.model.modality or summary.get("classes") != params.model.classes:
        raise MedloopError(
            f"data/processed was made for modality {summary.get('modality')!r} and classes "
            f"{summary.get('classes')}, but params say {params.model.modality!r} and "
            f"{params.model.classes}; run preprocess again"
        )


def _check_validation(labels: np.ndarray, classes: list[str], positive: int) -> None:
    """Early stopping needs a validation AUROC, hence both positive and negative cases."""
    n_positive = int((labels == positive).sum())
    if n_positive == 0 or n_positive == len(labels):
        raise MedloopError(
            f"the validation split has {len(labels)} items, {n_positive} of them "
            f"{classes[positive]}: the validation AUROC that early stopping uses needs at least one "
            f"{classes[positive]} and one other case; collect more data"
        )


def _datasets(params: Params, layout: Layout) -> tuple[Any, Any]:
    if params.model.modality == "image":
        return (inputs.image_dataset(layout, "train", params, training=True),
                inputs.image_dataset(layout, "validation", params, training=False))
    return (inputs.tabular_dataset(layout, "train", params, training=True),
            inputs.tabular_dataset(layout, "validation", params, training=False))


def _model_input(summary: dict) -> Any:
    if summary["modality"] == "image":
        image = summary["image"]
        return (image["height"], image["width"], image["channels"])
    return summary["features"]


def _model_input_record(summary: dict) -> dict:
    if summary["modality"] == "image":
        return {key: summary["image"][key] for key in ("height", "width", "channels")}
    return {"features": list(summary["features"])}


def _input_example(params: Params, layout: Layout, summary: dict) -> Any:
    """A couple of validation items as RAW input, what the pyfunc takes: image files as
    cleaned (PNG, original size), or unscaled features."""
    validation = inputs.split_index(layout, "validation").head(EXAMPLE_ROWS)
    if params.model.modality == "image":
        return pd.DataFrame({"image": [(layout.clean / path).read_bytes() for path in validation["image_path"]]})
    records = pd.read_parquet(layout.clean_records).set_index("record_id")
    return records.loc[validation["record_id"], summary["features"]].reset_index(drop=True).astype("float64")


def _log_dataset_inputs(params: Params, layout: Layout) -> None:
    """The training and validation sets as MLflow dataset inputs, keyed by the data version."""
    import mlflow

    digest = tracking.lineage_tags(params, layout)[DATA_PROCESSED]
    if digest == "none":  # not produced by `dvc repro` (no dvc.lock): hash the index itself
        digest = tracking.file_sha256(layout.processed / "index.parquet")[:32]
    for split, context in (("train", "training"), ("validation", "validation")):
        with warnings.catch_warnings():
            # MLflow's hints on schema inference and on how it reads a local path as a source
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(
                inputs.split_index(layout, split), source=str(layout.processed), targets="label",
                name=f"{params.model.name}-{split}", digest=digest[:36],
            )
            mlflow.log_input(dataset, context=context)


# ---------------------------------------------------------------------------------------------
# params and callbacks
# ---------------------------------------------------------------------------------------------


def flatten_params(params: Params) -> dict[str, str]:
    """The resolved params as MLflow params: dotted keys (``train.learning_rate``), lists as
    JSON, passwords in URLs masked, values cut to MLflow's 6000 characters."""
    flat: dict[str, str] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                # MLflow keys allow letters, digits, _ - . / and spaces: user-chosen names
                # (feature columns, label aliases) may hold anything else.
                safe = re.sub(r"[^0-9A-Za-z_\-. /]", "_", str(key))
                visit(f"{prefix}.{safe}" if prefix else safe, inner)
            return
        text = json.dumps(value) if isinstance(value, (list, dict, type(None))) else str(value)
        flat[prefix] = mask_credentials(text)[:MAX_PARAM_LENGTH]

    visit("", params.model_dump(mode="json", by_alias=True))
    return flat


def validation_auroc_callback(data: Any, classes: list[str], positive: int) -> Any:
    """A Keras callback that, after every epoch, predicts the validation set once and adds to
    the epoch's logs ``val_loss`` (log loss) and ``val_auroc`` (scikit-learn's ROC AUC of the
    positive class, one-vs-rest), for EarlyStopping and the MLflow metrics.

    Args:
        data: the validation ``tf.data.Dataset`` (fixed order) of ``(x, encoded labels)``.
        classes: ``model.classes``.
        positive: the index of ``model.positive_class``.
    """
    import keras
    from sklearn.metrics import log_loss, roc_auc_score

    truth = dataset_labels(data)

    class ValidationAuroc(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            probabilities = class_probabilities(self.model, data)
            logs = logs if logs is not None else {}
            logs["val_loss"] = float(log_loss(truth, probabilities, labels=list(range(len(classes)))))
            logs["val_auroc"] = float(roc_auc_score(truth == positive, probabilities[:, positive]))

    return ValidationAuroc()


def dataset_labels(data: Any) -> np.ndarray:
    """The class index of every item of a ``(x, encoded labels)`` dataset, in the dataset's own
    order (shards are interleaved), which is the order ``model.predict`` gives."""
    encoded = np.concatenate([np.asarray(y) for _, y in data])
    return encoded[:, 0].astype(np.int64) if encoded.shape[1] == 1 else encoded.argmax(axis=1)


def epoch_metrics_callback(epochs: int) -> Any:
    """A Keras callback logging every epoch's metrics to the active MLflow run (step = epoch,
    counted from 1), and a line ``epoch k/n: ...`` to the stage log (progress displays read it)."""
    import keras
    import mlflow

    class EpochMetrics(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            metrics = {key: float(value) for key, value in (logs or {}).items()
                       if isinstance(value, (int, float, np.floating)) and np.isfinite(value)}
            learning_rate = getattr(self.model.optimizer, "learning_rate", None)
            if learning_rate is not None:
                metrics["learning_rate"] = float(np.asarray(learning_rate))
            mlflow.log_metrics(metrics, step=epoch + 1)
            shown = ", ".join(f"{key} {metrics[key]:.4f}" for key in ("loss", "val_auroc") if key in metrics)
            log.info("epoch %d/%d: %s", epoch + 1, epochs, shown)

    return EpochMetrics()


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        "train", run,
        lambda r: (f"train: {r.architecture}, best validation AUROC {r.best_val_auroc:.4f} at epoch "
                   f"{r.best_epoch}/{r.epochs_run}; weights {r.weights_sha256[:12]}; MLflow run {r.run_id}"),
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
