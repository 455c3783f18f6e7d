"""The diagnosis models medloop trains, and the helpers every later stage uses on them.

Three architectures, chosen by ``train.architecture``:

- ``seed_cnn``: the reference pneumonia CNN (three conv/pool blocks, a Dense-512 head).
- ``cxr_small``: medloop's default chest X-ray CNN (batch norm, global average pooling).
- ``mlp``: the reference tabular MLP (one hidden Dense layer).

Every model takes what ``data/processed`` holds: images as float32 ``(None, H, W, C)`` with
values 0..255 (the model rescales inside, so serving passes pixels as they are), tables as the
scaled features. The output is one sigmoid unit, P(``classes[1]``), for two classes and a softmax
over the classes otherwise, always in float32 (safe under mixed precision).
`class_probabilities` turns either form into one column per class.

Augmentation is not part of any model: it lives in the training input pipeline
(`pipelines.data.inputs`), so a served model sees exactly what preprocessing makes. TensorFlow and
Keras are imported inside the functions.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipelines.config import Params
from pipelines.errors import MedloopError

IMAGE_ARCHITECTURES = ("seed_cnn", "cxr_small")
TABULAR_ARCHITECTURES = ("mlp",)
# The layer whose activations Grad-CAM should use, per architecture (named in build_model).
GRADCAM_LAYERS = {"seed_cnn": "conv3", "cxr_small": "block4_relu2"}
PREDICT_BATCH = 64


def build_model(params: Params, input_shape_or_features: Sequence[int] | Sequence[str] | int) -> Any:
    """Build and compile the model named by ``params.train.architecture``.

    Args:
        params: the configuration (architecture, classes, learning rate, MLP width).
        input_shape_or_features: for images ``(height, width, channels)``; for tables the
            feature names or their count.

    Returns:
        A compiled ``keras.Model`` (Adam, the matching cross-entropy, AUROC as metric).

    Raises:
        MedloopError: the architecture does not fit ``model.modality``.
    """
    import keras

    architecture = params.train.architecture
    modality = params.model.modality
    if modality == "image" and architecture not in IMAGE_ARCHITECTURES:
        raise MedloopError(
            f"train.architecture {architecture!r} is for tables, but model.modality is image "
            f"(use one of {list(IMAGE_ARCHITECTURES)})"
        )
    if modality == "tabular" and architecture not in TABULAR_ARCHITECTURES:
        raise MedloopError(
            f"train.architecture {architecture!r} is for images, but model.modality is tabular "
            f"(use one of {list(TABULAR_ARCHITECTURES)})"
        )
    n_classes = len(params.model.classes)
    if architecture == "mlp":
        n_features = (
            input_shape_or_features if isinstance(input_shape_or_features, int) else len(input_shape_or_features)
        )
        inputs = keras.Input(shape=(n_features,), name="features")
        features = _mlp(inputs, params.train.mlp_hidden_units)
    else:
        shape = tuple(int(d) for d in input_shape_or_features)
        if len(shape) != 3:
            raise MedloopError(f"an image model needs (height, width, channels), got {shape}")
        inputs = keras.Input(shape=shape, name="image")
        features = _seed_cnn(inputs) if architecture == "seed_cnn" else _cxr_small(inputs)
    outputs = _output_layer(n_classes)(features)
    model = keras.Model(inputs, outputs, name=architecture)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=params.train.learning_rate),
        loss=loss_for(n_classes),
        metrics=[keras.metrics.AUC(name="auroc")],
    )
    return model


def loss_for(n_classes: int) -> Any:
    """Binary cross-entropy for one sigmoid output, categorical for a softmax."""
    import keras

    if n_classes == 2:
        return keras.losses.BinaryCrossentropy()
    return keras.losses.CategoricalCrossentropy()


def class_probabilities(model: Any, x: Any, batch_size: int = PREDICT_BATCH) -> np.ndarray:
    """Per-class probabilities from either output form.

    Args:
        model: a model built here (or loaded with `load_model`).
        x: what the model takes: an array, or a ``tf.data.Dataset`` of batches (its labels,
            if any, are ignored).
        batch_size: the prediction batch size for arrays.

    Returns:
        float64 array ``(n, n_classes)``; for a binary model ``[1 - p, p]``.
    """
    if isinstance(x, np.ndarray):
        raw = model.predict(x, batch_size=batch_size, verbose=0)
    else:
        raw = model.predict(x, verbose=0)
    return class_columns(raw)


def class_columns(raw: Any) -> np.ndarray:
    """A model's raw output as one probability column per class.

    Args:
        raw: what the model returned for ``n`` inputs: ``(n, 1)`` sigmoid or ``(n, k)`` softmax.

    Returns:
        float64 array ``(n, n_classes)``; for a binary model ``[1 - p, p]``.
    """
    raw = np.asarray(raw, dtype=np.float64)
    if raw.ndim == 1:
        raw = raw[:, None]
    if raw.shape[1] == 1:
        positive = raw[:, 0]
        return np.stack([1.0 - positive, positive], axis=1)
    return raw


def load_model(path: str | Path) -> Any:
    """Load a model saved by the train stage (``models/model.keras``).

    Raises:
        MedloopError: the file is missing.
    """
    import keras

    path = Path(path)
    if not path.is_file():
        raise MedloopError(f"{path}: model file not found; run the train stage first")
    return keras.models.load_model(path)


def weights_digest(model: Any) -> str:
    """SHA-256 over all weights (trainable and not, in order, as raw bytes): the model's
    reproducibility fingerprint. Two trainings on the same data and params give the same
    digest on a CPU."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(np.asarray(weight.numpy())).tobytes())
    return digest.hexdigest()


def parameter_count(model: Any) -> int:
    """Number of weights (trainable and not) of a model."""
    return int(model.count_params())


# ---------------------------------------------------------------------------------------------
# architectures
# ---------------------------------------------------------------------------------------------


def _seed_cnn(inputs: Any) -> Any:
    """The reference pneumonia CNN.

    Rescaling(1/255); three blocks of Conv2D 3x3 (32, 64, 128 filters, ReLU) and 2x2 max
    pooling; Flatten; Dense 512 ReLU; Dropout 0.5. At 150x150x3 the flattened feature map is
    17x17x128, so the Dense-512 head alone holds about 18.9 million of its weights.
    """
    from keras import layers

    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    for index, filters in enumerate((32, 64, 128), start=1):
        x = layers.Conv2D(filters, 3, activation="relu", name=f"conv{index}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{index}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(512, activation="relu", name="dense")(x)
    return layers.Dropout(0.5, name="dropout")(x)


def _cxr_small(inputs: Any) -> Any:
    """medloop's default chest X-ray CNN.

    Rescaling(1/255); four blocks of [Conv 3x3 without bias -> BatchNorm(momentum 0.9) -> ReLU] with 32, 64,
    96 and 128 filters (the last two blocks have a second conv), each closed by 2x2 max
    pooling; GlobalAveragePooling2D; Dropout 0.3.

    Why it is the default rather than the reference CNN:

    - Size: global average pooling replaces the Flatten + Dense-512 head, where the reference
      keeps ~95% of its ~19M weights. cxr_small has ~0.4M weights, which suits the few thousand
      radiographs a clinic retrains on nightly: less to overfit, faster epochs, a small model
      file to version and serve.
    - Stability: batch norm makes training far less sensitive to the learning rate and the
      initial weights, so nightly retrains on slightly different data behave alike.
    - Resolution: no layer depends on the input size, so a change of
      ``preprocess.image_size`` needs no architecture change; the deeper, padded stack sees
      larger structures (a consolidation spanning a lobe) than three valid-padded convs do.
    - Explainability: the last block's ReLU output is a clean class-evidence map for Grad-CAM
      (``GRADCAM_LAYERS``).

    Batch norm uses momentum 0.9 rather than Keras' 0.99: a night's retrain on a few hundred
    images is only ~100 optimizer steps, too few for 0.99's moving statistics (used at inference)
    to leave their initial values, and such a model scores at chance on validation whatever it
    learned. With 0.9 they settle within a few dozen steps.
    """
    from keras import layers

    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    for block, (filters, convs) in enumerate(((32, 1), (64, 1), (96, 2), (128, 2)), start=1):
        for conv in range(1, convs + 1):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"block{block}_conv{conv}")(x)
            x = layers.BatchNormalization(momentum=0.9, name=f"block{block}_bn{conv}")(x)
            x = layers.ReLU(name=f"block{block}_relu{conv}")(x)
        x = layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    x = layers.GlobalAveragePooling2D(name="global_pool")(x)
    return layers.Dropout(0.3, name="dropout")(x)


def _mlp(inputs: Any, hidden_units: int) -> Any:
    """The reference tabular MLP: one Dense ReLU layer."""
    from keras import layers

    return layers.Dense(hidden_units, activation="relu", name="hidden")(inputs)


def _output_layer(n_classes: int) -> Any:
    """One sigmoid unit for two classes, a softmax otherwise; float32 under mixed precision."""
    from keras import layers

    if n_classes == 2:
        return layers.Dense(1, activation="sigmoid", dtype="float32", name="probability")
    return layers.Dense(n_classes, activation="softmax", dtype="float32", name="probabilities")
