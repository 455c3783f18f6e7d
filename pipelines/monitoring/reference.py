"""The drift reference a model carries, and the per-input summaries compared with it.

At training (`build_reference`, called by the train stage) a seeded sample of at most
``monitoring.reference_size`` training items is summarised, and the model's predicted
probability of the positive class is taken on the validation split. The result ships inside the
logged pyfunc (`pipelines.model.pyfunc`, artifact ``drift_reference.json``), so every registered
version carries its own reference. At serving (`summarize_inputs`) each input is summarised the
same way; `pipelines.monitoring.drift` compares the two.

What is summarised:

- tables: each feature in raw units (before imputation and scaling), as the service receives it;
- images: the mean and standard deviation of the input as the model sees it (decoded, resized,
  contrast-normalised: 0..255), and the model's penultimate-layer embedding reduced to a few
  principal components (PCA fitted on the reference sample's embeddings; its mean and
  components are stored so a served image is projected the same way).

Prediction drift uses the validation split, not training: the weights were fitted to the training
items, so their predictions there are more confident than on a new patient's input, and a
reference made from them would show drift in any served data.

Kept apart from `pipelines.monitoring.drift` (the report) so that the train stage's code, which DVC tracks,
is only what makes the reference. Keras and scikit-learn are imported inside the functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.data import inputs
from pipelines.config import Params
from pipelines.errors import MedloopError
from pipelines.values import json_ready
from pipelines.workspace import Layout

REFERENCE_FILE = "drift_reference.json"
REFERENCE_FORMAT = 1
EMBEDDING_COMPONENTS = 5  # principal components of the penultimate embedding that are monitored
INTENSITY_STATISTICS = ("intensity_mean", "intensity_std")
FEATURE, INTENSITY, EMBEDDING = "feature", "intensity", "embedding"


def build_reference(params: Params, layout: Layout, model: Any, calibrator: Any = None) -> dict:
    """The drift reference of a trained model, from ``data/processed`` (and, for tables, the
    raw feature values in ``data/clean``).

    Deterministic: the sample is drawn with ``train.seed`` from the splits in a fixed order, and
    the PCA is an exact SVD, so the same data and weights give the same reference.

    Args:
        params: the configuration (``monitoring.reference_size``, ``train.seed``, the model).
        layout: the workspace (preprocess has run).
        model: the trained Keras model.
        calibrator: the model's `pipelines.model.calibration.Calibrator`: the reference's predictions
            are calibrated, as the service's are (None: the model's own probabilities).

    Returns:
        A JSON-able dict: ``statistics`` (name -> ``{"kind", "values"}``, one value per reference
        item), ``prediction`` (the validation split's predicted probabilities of the positive
        class), and for images ``embedding`` (layer, PCA mean and components).
    """
    size = params.monitoring.reference_size
    rng = np.random.default_rng(params.train.seed)
    positive = params.model.classes.index(params.model.positive_class)
    reference: dict[str, Any] = {
        "format": REFERENCE_FORMAT,
        "model": params.model.name,
        "modality": params.model.modality,
        "classes": list(params.model.classes),
        "positive_class": params.model.positive_class,
        "seed": params.train.seed,
        "reference_size": size,
    }
    if params.model.modality == "image":
        train_pixels = _image_sample(layout, "train", size, rng)
        statistics = {name: {"kind": INTENSITY, "values": _floats(values)}
                      for name, values in image_statistics(train_pixels).items()}
        embeddings = embed(embedding_model(model), train_pixels)
        pca = fit_pca(embeddings, EMBEDDING_COMPONENTS)
        if pca is not None:
            reference["embedding"] = {"layer": penultimate_layer(model), **pca}
            for name, values in embedding_components(embeddings, pca).items():
                statistics[name] = {"kind": EMBEDDING, "values": _floats(values)}
        validation_pixels = _image_sample(layout, "validation", size, rng)
        probabilities = _positive_probability(model, validation_pixels.astype(np.float32), positive, calibrator)
        reference["items"] = int(len(train_pixels))
    else:
        features = inputs.processed_summary(layout)["features"]
        train_ids = inputs.split_index(layout, "train")["record_id"]
        records = pd.read_parquet(layout.clean_records).set_index("record_id")
        raw = records.loc[train_ids, features].astype("float64").reset_index(drop=True)
        raw = raw.iloc[_sample_positions(len(raw), size, rng)]
        statistics = {name: {"kind": FEATURE, "values": _floats(raw[name].to_numpy())} for name in features}
        x, _ = inputs.tabular_arrays(layout, "validation", params)
        probabilities = _positive_probability(model, x[_sample_positions(len(x), size, rng)], positive, calibrator)
        reference["items"] = int(len(raw))
    reference["statistics"] = statistics
    reference["prediction"] = {"split": "validation", "values": _floats(probabilities)}
    return reference


def summarize_inputs(model: Any, model_input: Any, *, prepared: np.ndarray | None = None,
                     embeddings: np.ndarray | None = None) -> list[dict[str, float | None]]:
    """Per input, the values drift is computed on, as JSON-able dicts (statistic -> number).

    Args:
        model: the loaded pyfunc (``mlflow.pyfunc.PyFuncModel``) or its `MedloopPyfunc`.
        model_input: what ``predict`` takes (a DataFrame of raw features, or of image bytes in a
            column ``image``; a uint8 pixel array), or for images the prepared float32 array
            ``(n, H, W, C)`` that ``MedloopPyfunc.prepare`` returned.
        prepared, embeddings: images only, when the caller has them already
            (``MedloopPyfunc.predict_with_drift``): the prepared input and its embeddings.

    Returns:
        One dict per input, in order: for tables ``{feature: raw value or None}``; for images
        ``intensity_mean``, ``intensity_std`` and, when the model carries a reference with an
        embedding, ``embedding_pc1`` ... ``embedding_pcK``.
    """
    python_model = model.unwrap_python_model() if hasattr(model, "unwrap_python_model") else model
    summary = python_model.summary
    if summary["modality"] != "image":
        features = list(python_model.scaler["features"])
        frame = model_input[features].astype("float64")
        return [{name: _json_float(value) for name, value in zip(features, row)} for row in frame.to_numpy()]
    if prepared is None:
        if isinstance(model_input, np.ndarray) and model_input.dtype == np.float32 and model_input.ndim == 4:
            prepared = model_input
        else:
            prepared = python_model.prepare(model_input)
    values = image_statistics(prepared)
    reference = getattr(python_model, "drift_reference", None) or {}
    if reference.get("embedding") and len(prepared):
        if embeddings is None:
            embeddings = python_model.embed(prepared)
        values.update(embedding_components(embeddings, reference["embedding"]))
    names = list(values)
    return [{name: _json_float(values[name][i]) for name in names} for i in range(len(prepared))]


def load_reference(path: str | Path) -> dict:
    """A drift reference from its file, or from a pyfunc model's folder (``<model>/artifacts/``),
    such as the service's local copy ``.medloop/serving/<model>/v<N>/model``.

    Raises:
        MedloopError: there is no reference there (models trained before references existed).
    """
    path = Path(path)
    candidates = [path] if path.suffix == ".json" else [path / "artifacts" / REFERENCE_FILE, path / REFERENCE_FILE]
    for candidate in candidates:
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise MedloopError(f"{path}: no drift reference ({REFERENCE_FILE}); the model was logged without one, "
                       f"retrain it to monitor drift")


# ---------------------------------------------------------------------------------------------
# statistics shared by the reference and the served inputs
# ---------------------------------------------------------------------------------------------


def image_statistics(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Mean and standard deviation of each image's pixels (all channels), float64."""
    flat = np.asarray(pixels, dtype=np.float64).reshape(len(pixels), -1)
    if flat.shape[0] == 0:
        return {name: np.zeros(0) for name in INTENSITY_STATISTICS}
    return {"intensity_mean": flat.mean(axis=1), "intensity_std": flat.std(axis=1)}


def embedding_model(model: Any, *, with_output: bool = False) -> Any:
    """A Keras model from the same weights giving the penultimate layer's output: the tensor the
    output layer reads (global pooling for ``cxr_small``, Dense-512 for ``seed_cnn``), and with
    ``with_output`` the model's own output as a second output (one pass for both)."""
    import keras

    penultimate = model.layers[-1].input
    outputs = [penultimate, model.outputs[0]] if with_output else penultimate
    return keras.Model(model.inputs, outputs, name=f"{model.name}_embedding")


def penultimate_layer(model: Any) -> str:
    """The name of the layer whose output the output layer reads."""
    history = getattr(model.layers[-1].input, "_keras_history", None)
    return history.operation.name if history is not None else model.layers[-2].name


def embed(embedder: Any, prepared: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Penultimate-layer embeddings (float64 ``(n, d)``) of prepared images."""
    if len(prepared) == 0:
        return np.zeros((0, int(embedder.outputs[0].shape[-1])))
    raw = embedder.predict(np.asarray(prepared, dtype=np.float32), batch_size=batch_size, verbose=0)
    return np.asarray(raw, dtype=np.float64).reshape(len(prepared), -1)


def fit_pca(embeddings: np.ndarray, components: int) -> dict | None:
    """scikit-learn's PCA (exact SVD) of the reference embeddings, as JSON-able mean and
    components; None when there are fewer than two embeddings."""
    from sklearn.decomposition import PCA

    count = min(components, len(embeddings) - 1, embeddings.shape[1] if embeddings.ndim == 2 else 0)
    if count < 1:
        return None
    pca = PCA(n_components=count, svd_solver="full").fit(embeddings)
    return {
        "mean": _floats(pca.mean_),
        "components": [_floats(row) for row in pca.components_],
        "explained_variance_ratio": _floats(pca.explained_variance_ratio_),
    }


def embedding_components(embeddings: np.ndarray, pca: dict) -> dict[str, np.ndarray]:
    """Embeddings projected on the reference's principal components: ``embedding_pc1`` ... ."""
    mean = np.asarray(pca["mean"], dtype=np.float64)
    components = np.asarray(pca["components"], dtype=np.float64)
    projected = (np.asarray(embeddings, dtype=np.float64) - mean) @ components.T
    return {f"embedding_pc{k + 1}": projected[:, k] for k in range(components.shape[0])}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _sample_positions(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """All positions when there are at most ``size``; otherwise a seeded sample, in order."""
    if count <= size:
        return np.arange(count)
    return np.sort(rng.choice(count, size=size, replace=False))


def _image_sample(layout: Layout, split: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A seeded sample of a split's processed pixels (uint8 ``(n, H, W, C)``), read from its
    TFRecord shards in their listed order (one reader: the order never varies)."""
    import tensorflow as tf

    count = int(inputs.processed_summary(layout).get("counts", {}).get(split, 0))
    chosen = set(_sample_positions(count, size, rng).tolist())
    shape = inputs.input_shape(layout)
    spec = {"image": tf.io.FixedLenFeature([], tf.string)}
    files = [str(path) for path in inputs.shard_paths(layout, split)]
    kept = []
    for position, serialized in enumerate(tf.data.TFRecordDataset(files) if files else []):
        if position in chosen:
            parsed = tf.io.parse_single_example(serialized, spec)
            kept.append(np.frombuffer(parsed["image"].numpy(), dtype=np.uint8).reshape(shape))
    if not kept:
        return np.zeros((0, *shape), dtype=np.uint8)
    return np.stack(kept)


def _positive_probability(model: Any, x: np.ndarray, positive: int, calibrator: Any = None) -> np.ndarray:
    from pipelines.model.architectures import class_probabilities

    if len(x) == 0:
        return np.zeros(0)
    probabilities = class_probabilities(model, x)
    return (probabilities if calibrator is None else calibrator.apply(probabilities))[:, positive]


def _json_float(value: Any) -> float | None:
    """A float for JSON: NaN and missing values become None (JSON has no NaN)."""
    return None if value is None else json_ready(float(value), None)


def _floats(values: Any) -> list[float | None]:
    return [_json_float(value) for value in np.asarray(values, dtype=np.float64).ravel()]
