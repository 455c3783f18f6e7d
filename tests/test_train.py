"""Train: real (tiny) trainings on real processed workspaces, the MLflow run they leave, the
raw-input pyfunc, reproducibility, and the model builders."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from conftest import copy_world, image_params, small_image_params, tabular_params
from pipelines import train
from pipelines.data import inputs
from pipelines.model import architectures as models
from pipelines.model.calibration import Calibrator
from pipelines.model.gradcam import last_conv_path
from pipelines.config import parse_params
from pipelines.errors import MedloopError


@pytest.fixture(scope="module")
def image_workspace(trained_image):
    """The processed workspace of the session's tiny CNN: (layout, params)."""
    return trained_image[:2]


def mlflow_client(layout, params):
    import mlflow
    from mlflow import MlflowClient

    from pipelines.registry.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(params, layout))
    return MlflowClient()


def shard_pixels(layout, split: str) -> tuple[list[str], np.ndarray]:
    """(record ids, uint8 pixels) of a split, read straight from its TFRecord shards."""
    import tensorflow as tf

    spec = {"image": tf.io.FixedLenFeature([], tf.string), "record_id": tf.io.FixedLenFeature([], tf.string)}
    shape = inputs.input_shape(layout)
    ids, pixels = [], []
    for example in tf.data.TFRecordDataset([str(p) for p in inputs.shard_paths(layout, split)]):
        parsed = tf.io.parse_single_example(example, spec)
        ids.append(parsed["record_id"].numpy().decode())
        pixels.append(tf.reshape(tf.io.decode_raw(parsed["image"], tf.uint8), shape).numpy())
    return ids, np.stack(pixels)


@pytest.mark.slow
def test_image_training_writes_the_model_and_a_complete_mlflow_run(trained_image):
    layout, params, result = trained_image
    record = json.loads(layout.train_json.read_text())
    model = models.load_model(layout.model_file)
    assert models.weights_digest(model) == record["weights_sha256"] == result.weights_sha256
    assert record["input"] == {"height": 48, "width": 48, "channels": 3}
    assert record["architecture"] == "cxr_small" and record["classes"] == ["NORMAL", "PNEUMONIA"]
    assert record["parameters"] == model.count_params() and record["epochs_run"] == 2
    assert 1 <= record["best_epoch"] <= 2 and 0.0 <= record["best_val_auroc"] <= 1.0
    assert record["device"]["strategy"] and record["mixed_precision"] is False  # CPU: float32
    # The image profile calibrates with Platt scaling (class weights shift a CNN's output).
    assert record["calibration"]["method"] == params.train.calibration == "platt"
    [[slope, intercept]] = record["calibration"]["platt"]  # one (a, b) pair: a binary model
    assert np.isfinite(slope) and np.isfinite(intercept)
    assert record["calibration"]["fitted_on"]["n"] == len(inputs.split_labels(layout, "validation"))

    client = mlflow_client(layout, params)
    run = client.get_run(record["run_id"])
    assert run.info.run_name.startswith("cxr_small-")
    assert run.data.params["train.architecture"] == "cxr_small"
    assert run.data.params["preprocess.image_size"] == "[48, 48]"
    assert run.data.tags["medloop.params_hash"] == params.digest()
    assert {"medloop.git_commit", "medloop.data.raw", "medloop.data.processed"} <= set(run.data.tags)
    assert run.data.tags["medloop.device.mixed_precision"] == "False"
    for metric in ("loss", "val_loss", "val_auroc"):
        history = client.get_metric_history(record["run_id"], metric)
        assert [m.step for m in history] == [1, 2], metric
    assert run.data.metrics["best_val_auroc"] == pytest.approx(record["best_val_auroc"])
    assert "calibration_temperature" not in run.data.metrics  # logged for temperature scaling only
    assert run.data.tags["medloop.calibration"] == "platt"
    datasets = {d.dataset.name: [t.value for t in d.tags] for d in run.inputs.dataset_inputs}
    assert datasets == {"pneumonia-cxr-train": ["training"], "pneumonia-cxr-validation": ["validation"]}


@pytest.mark.slow
def test_pyfunc_on_raw_images_equals_keras_on_preprocessed_pixels(trained_image):
    import mlflow

    layout, params, _ = trained_image
    record = json.loads(layout.train_json.read_text())
    mlflow_client(layout, params)
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{record['run_id']}/model")
    keras_model = models.load_model(layout.model_file)
    ids, pixels = shard_pixels(layout, "test")
    # calibrated by the calibrator fitted at training, which the pyfunc carries
    calibrator = Calibrator.from_dict(record["calibration"])
    assert pyfunc.unwrap_python_model().calibrator == calibrator
    expected = calibrator.apply(models.class_probabilities(keras_model, pixels.astype(np.float32)))
    # the files as collected (de-identified DICOM and JPEG), before clean touched them
    raw = pd.DataFrame({"image": [(layout.raw / record_id).read_bytes() for record_id in ids]})
    predicted = pyfunc.predict(raw)
    assert list(predicted.columns) == ["NORMAL", "PNEUMONIA"]
    np.testing.assert_array_equal(predicted.to_numpy(), expected)
    np.testing.assert_allclose(predicted.sum(axis=1), 1.0, rtol=1e-6)
    # pixels already at the model's size (e.g. from data/processed) are taken as they are
    np.testing.assert_array_equal(pyfunc.predict(pixels).to_numpy(), expected)
    with pytest.raises(MedloopError, match="uint8 of shape"):
        pyfunc.predict(pixels[:, :40])


@pytest.mark.slow
def test_same_data_and_params_give_the_same_weights(trained_image, tmp_path):
    from pipelines.workspace import Layout

    layout, params, first = trained_image
    again_layout = Layout.at(copy_world(layout.root.parent, tmp_path / "world") / layout.root.name)
    again = train.run(params, again_layout)
    assert again.weights_sha256 == first.weights_sha256
    assert again.run_id != first.run_id


@pytest.mark.slow
def test_tabular_training_and_pyfunc_on_raw_features(trained_tabular):
    import mlflow

    layout, params, result = trained_tabular
    record = json.loads(layout.train_json.read_text())
    assert record["architecture"] == "mlp" and record["input"]["features"][0] == "mean_radius"
    assert result.epochs_run <= 5 and result.parameters == 30 * 128 + 128 + 129
    client = mlflow_client(layout, params)
    assert len(client.get_metric_history(record["run_id"], "val_auroc")) == result.epochs_run
    test = pd.read_parquet(layout.processed / "tabular" / "test.parquet")
    features = record["input"]["features"]
    raw = pd.read_parquet(layout.clean_records).set_index("record_id").loc[test["record_id"], features]
    raw.iloc[0, 0] = np.nan  # imputed with the training median, as in preprocess
    scaler = json.loads((layout.processed / "scaler.json").read_text())
    expected_x = test[features].to_numpy(np.float32, copy=True)
    expected_x[0, 0] = np.float32((scaler["impute_median"][features[0]] - scaler["mean"][features[0]])
                                  / scaler["std"][features[0]])
    own = models.class_probabilities(models.load_model(layout.model_file), expected_x)
    expected = Calibrator.from_dict(record["calibration"]).apply(own)
    assert np.abs(expected - own).max() > 1e-3  # the calibration did something
    predicted = mlflow.pyfunc.load_model(record["model_uri"]).predict(raw.reset_index(drop=True))
    assert list(predicted.columns) == ["benign", "malignant"]
    np.testing.assert_allclose(predicted.to_numpy(), expected, rtol=1e-5, atol=1e-6)


def test_training_input_pipeline_is_seeded_augmented_and_flip_free(image_workspace):
    import tensorflow as tf

    layout, params = image_workspace
    tf.config.experimental.enable_op_determinism()  # as train does: the pipeline must stay parallel and equal

    def two_epochs(p):
        dataset = inputs.image_dataset(layout, "train", p, training=True)
        return [np.concatenate([x.numpy() for x, _ in dataset]) for _ in range(2)]

    first, second = two_epochs(params), two_epochs(params)
    assert first[0].dtype == np.float32 and first[0].shape[1:] == (48, 48, 3)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[0], first[1])  # reshuffled and re-augmented every epoch
    _, stored = shard_pixels(layout, "train")
    stored_sums = {int(s) for s in stored.reshape(len(stored), -1).sum(axis=1)}
    seen_sums = {int(s) for s in first[0].reshape(len(first[0]), -1).sum(axis=1)}
    assert len(seen_sums & stored_sums) < len(stored_sums) // 2  # augmented, not the stored pixels
    plain = inputs.image_dataset(layout, "validation", params, training=False)
    x, y = next(iter(plain))
    assert y.shape[1] == 1 and x.numpy().max() <= 255.0

    kinds = [type(layer).__name__ for layer in inputs.augmentation_layers(params.train.augmentation, 1)]
    assert kinds == ["RandomRotation", "RandomZoom", "RandomContrast"]  # no flip by default
    raw = small_image_params()
    raw["train"]["augmentation"]["horizontal_flip"] = True
    flipping = parse_params(raw).train.augmentation
    assert "RandomFlip" in [type(layer).__name__ for layer in inputs.augmentation_layers(flipping, 1)]


def test_augmentation_is_the_keras_layers_in_one_resampling_and_one_channel():
    import tensorflow as tf

    from pipelines.data.sources.synthetic_cxr import render_radiograph

    augment = inputs.Augmenter(parse_params(image_params()).train.augmentation, seed=5)
    gray = np.stack([render_radiograph(np.random.default_rng(i), 64, i % 2 == 0) for i in range(6)])
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    seed = tf.constant(11, tf.int64)
    fast = augment(tf.constant(rgb), seed).numpy()
    assert fast.shape == rgb.shape and not np.allclose(fast, rgb)
    colour = rgb.copy()
    colour[0, 0, 0, 1] ^= 1  # one pixel off: the batch is no longer gray, all channels are augmented
    np.testing.assert_allclose(augment(tf.constant(colour), seed).numpy()[1:], fast[1:], atol=1e-3)
    # the same draws applied by the Keras layers themselves, one resampling after the other
    x = tf.constant(rgb, tf.float32)
    for index, layer in enumerate(augment.layers):
        drawn = layer.get_random_transformation(x, training=True, seed=inputs._batch_seed_class()(seed, index))
        x = layer.transform_images(x, drawn, training=True)
    assert np.abs(fast - x.numpy())[:, 8:-8, 8:-8].mean() < 1.0  # one interpolation instead of two


def test_seed_cnn_and_cxr_small_at_150_pixels():
    params = parse_params(image_params())
    seed_cnn = models.build_model(params.model_copy(update={"train": params.train.model_copy(
        update={"architecture": "seed_cnn"})}), (150, 150, 3))
    cxr_small = models.build_model(params, (150, 150, 3))
    assert seed_cnn.input_shape == cxr_small.input_shape == (None, 150, 150, 3)
    assert seed_cnn.output_shape == cxr_small.output_shape == (None, 1)
    assert seed_cnn.count_params() == 19_034_177
    assert cxr_small.count_params() < seed_cnn.count_params() / 40
    [target] = last_conv_path(cxr_small)  # the feature map Grad-CAM explains
    assert target.name == "block4_relu2" and target.output.shape[-1] == 128
    with pytest.raises(MedloopError, match="for tables"):
        models.build_model(params.model_copy(update={"train": params.train.model_copy(
            update={"architecture": "mlp"})}), (150, 150, 3))


@pytest.mark.slow
def test_three_classes_train_and_give_a_probability_per_class():
    raw = tabular_params()
    raw["model"]["classes"] = ["benign", "malignant", "other"]
    params = parse_params(raw)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 30)).astype(np.float32)
    labels = rng.integers(0, 3, size=64)
    y = inputs.encode_labels(labels, 3)
    assert y.shape == (64, 3) and (y.sum(axis=1) == 1).all()
    for p, features in ((params, 30), (params.model_copy(update={"model": params.model.model_copy(
            update={"modality": "image"}), "train": params.train.model_copy(update={"architecture": "cxr_small"})}),
            (32, 32, 1))):
        model = models.build_model(p, features)
        assert model.output_shape == (None, 3)
        data = x if features == 30 else rng.integers(0, 256, size=(64, 32, 32, 1)).astype(np.float32)
        model.fit(data, y, batch_size=32, epochs=1, class_weight=inputs.class_weights(labels, 3), verbose=0)
        probabilities = models.class_probabilities(model, data)
        assert probabilities.shape == (64, 3)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_class_weights_balance_the_training_split():
    weights = inputs.class_weights(np.array([0, 0, 0, 1]), 2)
    assert weights == {0: pytest.approx(4 / 6), 1: pytest.approx(2.0)}
    assert inputs.class_weights(np.array([0, 1, 1]), 3)[2] == 1.0  # absent class: neutral


def test_mixed_precision_stays_off_without_a_gpu(caplog):
    import keras

    raw = tabular_params()
    raw["train"]["mixed_precision"] = "on"
    with caplog.at_level(logging.WARNING, logger="medloop.train"):
        device = train.configure_device(parse_params(raw))
    assert device.mixed_precision is False and keras.mixed_precision.global_policy().name == "float32"
    assert "no GPU is visible" in caplog.text
    assert device.facts["gpu_count"] == 0 and device.facts["replicas"] == 1


def test_params_are_flattened_for_mlflow_without_passwords():
    raw = tabular_params(kind="sql", url="postgresql://clinic:s3cret@db.example/ehr", table="cases")
    flat = train.flatten_params(parse_params(raw))
    assert flat["train.learning_rate"] == "0.001"
    assert flat["tabular.features.mean_radius.max"] == "60.0"
    assert flat["source.url"] == "postgresql://clinic:***@db.example/ehr"
    assert "s3cret" not in json.dumps(flat)


def test_a_one_class_validation_split_is_refused():
    with pytest.raises(MedloopError, match="validation split has 3 items, 0 of them PNEUMONIA"):
        train._check_validation(np.array([0, 0, 0]), ["NORMAL", "PNEUMONIA"], 1)
