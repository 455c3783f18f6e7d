"""Train (DVC stage): fit the diagnosis model on the training split, tracked in MLflow.

- Reproducible: with ``train.deterministic`` the seeds are fixed and TensorFlow's ops are made
  deterministic, so the same data and params give the same weights on a CPU (compare
  ``weights_sha256``). The input pipeline's augmentation is seeded per batch (`pipelines.data.inputs`).
- Fast where it can be: float16 compute (``mixed_float16``) when a GPU is visible and
  ``train.mixed_precision`` allows it, and a ``MirroredStrategy`` over every visible GPU.
- Across processes or hosts (``train.distribution: multi_worker``): a
  ``MultiWorkerMirroredStrategy`` over the workers of ``TF_CONFIG`` or ``train.workers``, every
  worker running this stage with the same params and data; the chief (worker 0) alone opens the
  MLflow run and saves the model. Keras 3's ``model.fit`` fails under that strategy (tensorflow
  issue 72388), so the workers train with a custom loop over ``strategy.run``
  (`fit_across_workers`) that drives the same callbacks; one process keeps ``model.fit``.
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
from typing import Any, Sequence

import numpy as np
import pandas as pd

from pipelines.model import calibration
from pipelines.data import inputs, packs
from pipelines.registry import tracking
from pipelines.registry.interrupted import (answering, clear_training_run, close_abandoned_training_run,
                                       mark_training_run)
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
    """Fit the model of ``params.train`` on ``data/processed`` and track it in MLflow.

    An MLflow run that an earlier training left open (it was killed, or its tracking server went
    away mid-upload) is ended first (`pipelines.registry.interrupted.close_abandoned_training_run`).

    Raises:
        TrackingUnavailable: the tracking server did not answer; no model was registered and the
            run this training opened is ended by the next one.
    """
    with answering(params, layout, "training",
                   "No model was registered from it and the champion is unchanged; the next night trains again "
                   "and ends the MLflow run this one left open."):
        return _train(params, layout)


def _train(params: Params, layout: Layout) -> TrainResult:
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
        train_data, validation_data = _datasets(params, layout, device)
        weights = inputs.class_weights(train_labels, len(classes))
        log.info("train: %s, %d parameters, class weights %s, device %s", params.train.architecture,
                 parameter_count(model), weights, device.facts)
        if not device.chief:  # a worker trains in step with the chief, which alone logs and saves
            fitted = _fit(model, params, device, train_data, validation_data, weights, log_epochs=False)
            log.info("train: worker %d of %d done (best validation AUROC %.4f at epoch %d); the chief "
                     "saves the model and logs the run", device.worker_index, device.workers,
                     fitted.best_val_auroc, fitted.best_epoch)
            return TrainResult("", params.train.architecture, weights_digest(model), fitted.best_epoch,
                               fitted.epochs_run, fitted.best_val_auroc, parameter_count(model), "")

        close_abandoned_training_run(params, layout)
        experiment_id = tracking.configure(params, layout)
        run_name = f"{params.train.architecture}-{params.digest()[:8]}"
        with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as active:
            mark_training_run(layout, active.info.run_id)
            environment = {ENV_PREFIX + key: value for key, value in tracking.environment_facts().items()}
            mlflow.set_tags({**tracking.lineage_tags(params, layout), **_device_tags(device.facts), **environment,
                             STAGE: "train", ARCHITECTURE: params.train.architecture})
            mlflow.log_params(flatten_params(params))
            _log_dataset_inputs(params, layout)
            fitted = _fit(model, params, device, train_data, validation_data, weights, log_epochs=True)
            epochs_run, best_epoch, best_val_auroc = fitted.epochs_run, fitted.best_epoch, fitted.best_val_auroc
            if device.workers > 1:
                # Everything after training runs on the chief alone: a copy outside the
                # multi-worker strategy, so no step waits for workers that have finished.
                model = _local_copy(params, summary, model)

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
        clear_training_run(layout)  # MLflow ended the run: nothing is left open

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
    workers: int = 1
    worker_index: int = 0

    @property
    def chief(self) -> bool:
        """Worker 0 (or the only process): the one that logs to MLflow and saves the model."""
        return self.worker_index == 0


def configure_device(params: Params) -> Device:
    """Seeds and op determinism, the mixed-precision policy and the distribution strategy.

    The precision and the strategy are `plan_device`'s decision for the visible GPUs: float16
    compute only with a GPU; ``train.distribution`` ``mirrored`` uses every visible GPU through a
    ``MirroredStrategy``, ``none`` the default device, and ``multi_worker`` a
    ``MultiWorkerMirroredStrategy`` over the processes of `worker_cluster`.
    """
    import keras
    import tensorflow as tf

    spec = params.train
    # TensorFlow requires a multi-worker strategy to exist before any other op runs.
    strategy, workers, index = (multi_worker_strategy(spec) if spec.distribution == "multi_worker"
                                else (None, 1, 0))
    keras.backend.clear_session()
    if spec.deterministic:
        keras.utils.set_random_seed(spec.seed)
        tf.config.experimental.enable_op_determinism()
    gpus = tf.config.list_physical_devices("GPU")
    plan = plan_device(spec, gpus)
    if plan.warning:
        log.warning(plan.warning)
    keras.mixed_precision.set_global_policy(plan.policy)
    mixed = plan.policy == MIXED_POLICY
    if strategy is None:
        strategy = tf.distribute.MirroredStrategy() if plan.strategy == MIRRORED else tf.distribute.get_strategy()
    facts = {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "gpus": [_gpu_name(gpu) for gpu in gpus],
        "gpu_count": len(gpus),
        "cpu_count": os.cpu_count() or 1,
        # (TensorFlow's class behind MultiWorkerMirroredStrategy is CollectiveAllReduceStrategy)
        "strategy": MULTI_WORKER if plan.strategy == MULTI_WORKER else type(strategy).__name__,
        "replicas": int(strategy.num_replicas_in_sync),
        "workers": workers,
        "mixed_precision": mixed,
        "deterministic": spec.deterministic,
    }
    return Device(strategy, mixed, facts, workers, index)


MIXED_POLICY, FLOAT32_POLICY = "mixed_float16", "float32"
MIRRORED, MULTI_WORKER, DEFAULT_DEVICE = "MirroredStrategy", "MultiWorkerMirroredStrategy", "default"


@dataclass(frozen=True)
class DevicePlan:
    """What `configure_device` sets up for given settings and GPUs.

    Attributes:
        policy: the Keras dtype policy, ``mixed_float16`` (float16 compute, float32 weights and
            output layer) or ``float32``.
        strategy: ``MirroredStrategy`` (one replica per GPU of this host),
            ``MultiWorkerMirroredStrategy`` (the workers of `worker_cluster`) or ``default`` (the
            default device alone).
        warning: what to tell the person when a setting cannot be honoured here, else None.
    """

    policy: str
    strategy: str
    warning: str | None = None


def plan_device(spec: Any, gpus: Sequence[Any]) -> DevicePlan:
    """The precision and strategy for ``train`` settings on a host with these GPUs.

    A pure decision, apart from TensorFlow so it can be checked for any host: float16 compute
    only with a GPU (``mixed_precision`` ``auto`` or ``on``; on a CPU float16 is slower and gains
    nothing, so ``on`` falls back to float32 with a warning), and a ``MirroredStrategy`` when
    ``distribution`` is ``mirrored`` and there is at least one GPU (one GPU included, so one code
    path serves one or many).

    Args:
        spec: ``params.train``.
        gpus: the visible GPUs (``tf.config.list_physical_devices("GPU")``); only their number
            matters.
    """
    mixed = bool(gpus) and spec.mixed_precision in ("auto", "on")
    warning = None
    if spec.mixed_precision == "on" and not gpus:
        warning = ("train.mixed_precision is on, but no GPU is visible: training in float32 "
                   "(float16 on a CPU is slower and gains nothing)")
    if spec.distribution == "multi_worker":
        strategy = MULTI_WORKER
    elif gpus and spec.distribution == "mirrored":
        strategy = MIRRORED
    else:
        strategy = DEFAULT_DEVICE
    return DevicePlan(MIXED_POLICY if mixed else FLOAT32_POLICY, strategy, warning)


WORKER_INDEX_VARIABLE = "MEDLOOP_WORKER_INDEX"


def worker_cluster(spec: Any) -> tuple[list[str], int]:
    """The workers of a ``multi_worker`` training and this process's place among them.

    ``TF_CONFIG`` (what Kubernetes operators and TensorFlow's own tools set) wins; otherwise
    ``train.workers`` with the index from ``MEDLOOP_WORKER_INDEX`` (0, the chief, if unset).

    Raises:
        MedloopError: no cluster is given, or this process's index is not in it.
    """
    config = os.environ.get("TF_CONFIG")
    if config:
        try:
            parsed = json.loads(config)
            workers = list(parsed["cluster"]["worker"])
            index = int(parsed["task"]["index"])
        except (ValueError, KeyError, TypeError) as exc:
            raise MedloopError(
                f"TF_CONFIG is not a worker cluster ({exc}): it needs "
                '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": N}}'
            ) from None
        task_type = parsed["task"].get("type", "worker")
        if task_type != "worker" or set(parsed["cluster"]) - {"worker"}:
            # worker 0 is the chief here; a separate "chief" task would make two processes log and save
            raise MedloopError(
                f"TF_CONFIG names a {task_type!r} task or cluster roles {sorted(parsed['cluster'])}: medloop "
                'trains on "worker" tasks only, worker 0 being the chief; list the chief first under "worker"'
            )
    else:
        workers = list(spec.workers)
        raw_index = os.environ.get(WORKER_INDEX_VARIABLE, "0")
        if not raw_index.isdigit():
            raise MedloopError(f"{WORKER_INDEX_VARIABLE}={raw_index!r} is not a worker index (0 is the chief)")
        index = int(raw_index)
    if not workers:
        raise MedloopError("train.distribution is multi_worker, but neither TF_CONFIG nor train.workers "
                           "names the workers: list their host:port in train.workers, the chief first")
    if not 0 <= index < len(workers):
        raise MedloopError(f"worker index {index} is not among the {len(workers)} workers of train.workers "
                           f"(or TF_CONFIG); set {WORKER_INDEX_VARIABLE} to 0..{len(workers) - 1}")
    return workers, index


def multi_worker_strategy(spec: Any) -> tuple[Any, int, int]:
    """A ``MultiWorkerMirroredStrategy`` over `worker_cluster`, with ring all-reduce (which works
    on CPUs and GPUs alike; NCCL would need GPUs on every worker). Returns the strategy, the
    number of workers and this process's index."""
    import tensorflow as tf

    workers, index = worker_cluster(spec)
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({"worker": workers}), task_type="worker", task_id=index)
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver,
                                                         communication_options=options)
    return strategy, len(workers), index


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


def _datasets(params: Params, layout: Layout, device: Device) -> tuple[Any, Any]:
    make = inputs.image_dataset if params.model.modality == "image" else inputs.tabular_dataset
    datasets = (make(layout, "train", params, training=True), make(layout, "validation", params, training=False))
    if device.workers == 1:
        return datasets
    import tensorflow as tf

    # Every worker reads the same (seeded) stream and keeps its share of each batch: sharding
    # by file would fail with fewer shards than workers, and would change the batches.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return tuple(dataset.with_options(options) for dataset in datasets)


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
        with packs.PackReader(layout.clean) as reader:
            return pd.DataFrame({"image": [reader.read(path) for path in validation["image_path"]]})
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
# the training loop
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fitted:
    epochs_run: int
    best_epoch: int  # counted from 1
    best_val_auroc: float


def _fit(model: Any, params: Params, device: Device, train_data: Any, validation_data: Any,
         weights: dict[int, float], *, log_epochs: bool) -> Fitted:
    """Fit with early stopping on the validation AUROC, keeping the best epoch's weights.

    One process: Keras' ``model.fit``. Several workers: `fit_across_workers`, the same
    callbacks driven by a custom loop, because Keras 3's ``fit`` under a
    ``MultiWorkerMirroredStrategy`` fails ("Invalid reduction dimension 0": tensorflow issue
    72388, keras issue 20585).
    """
    import keras

    classes = params.model.classes
    positive = classes.index(params.model.positive_class)
    early_stopping = keras.callbacks.EarlyStopping(
        monitor="val_auroc", mode="max", patience=params.train.early_stopping_patience,
        restore_best_weights=True,
    )
    callbacks = [validation_auroc_callback(validation_data, classes, positive), early_stopping]
    if log_epochs:
        callbacks.append(epoch_metrics_callback(params.train.epochs))
    if device.workers > 1:
        epochs_run = fit_across_workers(model, device.strategy, train_data, params.train.epochs, weights, callbacks)
    else:
        history = model.fit(train_data, epochs=params.train.epochs, class_weight=weights, callbacks=callbacks,
                            shuffle=False,  # the training dataset shuffles itself (seeded)
                            verbose=0)
        epochs_run = len(history.epoch)
    return Fitted(epochs_run, int(early_stopping.best_epoch) + 1, float(early_stopping.best))


def fit_across_workers(model: Any, strategy: Any, dataset: Any, epochs: int, class_weight: dict[int, float],
                       callbacks: list) -> int:
    """Keras' ``fit`` as a loop over ``strategy.run``: what ``fit`` does for one process, for a
    ``MultiWorkerMirroredStrategy``.

    Each global batch is split among the replicas; each replica's loss is the class-weighted
    cross-entropy averaged over the global batch (``tf.nn.compute_average_loss``), so the
    all-reduced gradient is the one-process gradient. The callbacks run on every worker with
    identical weights and validation data, so every worker makes the same early-stopping
    decision and no worker waits for a step the others skipped.

    Args:
        model: a compiled model built under ``strategy.scope()``.
        strategy: the distribution strategy.
        dataset: the training ``tf.data.Dataset`` of global batches ``(x, encoded labels)``.
        epochs: the most epochs to run.
        class_weight: weight per class index.
        callbacks: Keras callbacks (early stopping, validation AUROC, metric logging).

    Returns:
        The number of epochs run.
    """
    import keras
    import tensorflow as tf

    binary = int(model.outputs[0].shape[-1]) == 1
    per_item_loss = keras.losses.binary_crossentropy if binary else keras.losses.categorical_crossentropy
    weight_of_class = tf.constant([class_weight[index] for index in sorted(class_weight)], tf.float32)
    batches = strategy.experimental_distribute_dataset(dataset)

    def replica_step(x, y):
        label_index = tf.cast(y[:, 0], tf.int32) if binary else tf.argmax(y, axis=1, output_type=tf.int32)
        with tf.GradientTape() as tape:
            loss = tf.nn.compute_average_loss(per_item_loss(y, model(x, training=True)),
                                              sample_weight=tf.gather(weight_of_class, label_index))
            scaled = model.optimizer.scale_loss(loss)  # the loss scale under mixed precision
        gradients = tape.gradient(scaled, model.trainable_variables)
        model.optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    @tf.function
    def train_step(x, y):
        return strategy.reduce("SUM", strategy.run(replica_step, args=(x, y)), axis=None)

    callback_list = keras.callbacks.CallbackList(callbacks, model=model)
    model.stop_training = False
    callback_list.on_train_begin()
    epochs_run = 0
    for epoch in range(epochs):
        callback_list.on_epoch_begin(epoch)
        total, steps = 0.0, 0
        for x, y in batches:
            total += float(train_step(x, y))
            steps += 1
        epochs_run = epoch + 1
        callback_list.on_epoch_end(epoch, {"loss": total / max(steps, 1)})
        if model.stop_training:
            break
    callback_list.on_train_end()
    return epochs_run


def _local_copy(params: Params, summary: dict, model: Any) -> Any:
    """The same model, built outside any distribution strategy, with ``model``'s weights."""
    copy = build_model(params, _model_input(summary))
    copy.set_weights(model.get_weights())
    return copy


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
