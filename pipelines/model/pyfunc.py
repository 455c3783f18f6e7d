"""The MLflow pyfunc model: the trained Keras model plus the preprocessing it needs, so that a
served or registered model takes RAW input and gives per-class probabilities.

Input (``predict``):

- images: a DataFrame with a column ``image`` of file bytes (PNG, JPEG or DICOM), decoded with
  the clean stage's `pipelines.data.images.decode_image` (same channels, same size limits), then
  resized and contrast-normalised with exactly the preprocess stage's steps (Pillow BILINEAR
  resize, `pipelines.preprocess.normalise_intensity`); or an ``np.ndarray`` of uint8
  ``(n, H, W, C)`` pixels already at the model's size, which are contrast-normalised the same
  way (a no-op for pixels taken from ``data/processed``, already normalised).
- tables: a DataFrame with the raw feature columns, imputed with the training medians and
  standardised with the training mean and standard deviation from ``scaler.json``.

Output: a DataFrame with one CALIBRATED probability column per class, named by the class.

Calibration: the model carries the calibrator fitted on the validation split at training
(`pipelines.model.calibration.Calibrator`, artifact ``calibration.json``), loaded as ``calibrator``
(the identity for versions logged before calibration existed). Every probability this class
gives has been through ``calibrator.apply``, and the service's batched scoring applies the same
object to the Keras model's output (`pipelines.model.calibration.calibrator_of`).

Drift: the model carries its own drift reference (artifact ``drift_reference.json``, made at
training by `pipelines.monitoring.reference.build_reference`), loaded as ``drift_reference`` (None
for versions logged before references existed). `MedloopPyfunc.embed` gives the penultimate
layer's embedding of prepared images, which `pipelines.monitoring.reference.summarize_inputs` uses, and
`MedloopPyfunc.predict_with_drift` gives the probabilities and the drift summaries from one pass.

This module is imported by the train stage and by serving only, both of which need MLflow, so
MLflow is imported at its top; TensorFlow is imported only when a model is loaded.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import tempfile
import threading
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from pipelines.config import Params
from pipelines.errors import MedloopError
from pipelines.workspace import Layout

ARTIFACT_PATH = "model"  # the pyfunc's name within the run (contract: runs:/<run_id>/model)
KERAS_ARTIFACT = "keras_model"
PREPROCESS_ARTIFACT = "preprocess_json"
SCALER_ARTIFACT = "scaler_json"
DRIFT_REFERENCE_ARTIFACT = "drift_reference_json"  # stored as artifacts/drift_reference.json
CALIBRATION_ARTIFACT = "calibration_json"  # stored as artifacts/calibration.json
CALIBRATION_FILE = "calibration.json"
IMAGE_COLUMN = "image"
# Distributions the pyfunc imports at prediction time, pinned to the running versions.
REQUIREMENTS = ("keras", "numpy", "pandas", "pillow", "pydicom", "pydantic", "pyyaml")


class MedloopPyfunc(mlflow.pyfunc.PythonModel):
    """Raw input in, per-class probabilities out (see the module docstring).

    Args:
        image_limits: for image models, the clean stage's ``channels``, ``min_side`` and
            ``max_pixels``: a served image is decoded and refused exactly as training data was.
    """

    def __init__(self, image_limits: dict[str, int] | None = None):
        self.image_limits = dict(image_limits or {})

    def load_context(self, context) -> None:
        """Load the Keras model, ``preprocess.json``, (tables) ``scaler.json``, the calibrator
        and the drift reference, when the model carries them."""
        from pipelines.model.calibration import Calibrator
        from pipelines.model.architectures import load_model

        artifacts = context.artifacts
        self.model = load_model(artifacts[KERAS_ARTIFACT])
        self.summary = json.loads(Path(artifacts[PREPROCESS_ARTIFACT]).read_text())
        self.classes = list(self.summary["classes"])
        self.scaler = (
            json.loads(Path(artifacts[SCALER_ARTIFACT]).read_text()) if SCALER_ARTIFACT in artifacts else None
        )
        self.drift_reference = (
            json.loads(Path(artifacts[DRIFT_REFERENCE_ARTIFACT]).read_text())
            if DRIFT_REFERENCE_ARTIFACT in artifacts else None
        )
        self.calibrator = Calibrator.from_dict(
            json.loads(Path(artifacts[CALIBRATION_ARTIFACT]).read_text()) if CALIBRATION_ARTIFACT in artifacts else None
        )
        self._heads = None
        self._heads_lock = threading.Lock()

    def embed(self, prepared: np.ndarray) -> np.ndarray:
        """The penultimate layer's embedding (float64 ``(n, d)``) of prepared input (what
        `prepare` returns)."""
        return self.embed_and_score(prepared)[0]

    def predict_with_drift(self, model_input: Any) -> tuple[pd.DataFrame, list[dict]]:
        """`predict` and `pipelines.monitoring.reference.summarize_inputs` at once: the input is
        prepared once and, for images, the network runs once for both the probabilities and the
        embedding (half the work of calling the two one after the other).

        Returns:
            ``(probabilities, summaries)``: what ``predict`` returns, and one drift summary per input.
        """
        from pipelines.monitoring.reference import summarize_inputs
        from pipelines.model.architectures import class_probabilities

        prepared = self.prepare(model_input)
        if self.summary["modality"] == "image":
            embeddings, probabilities = self.embed_and_score(prepared)
        else:
            embeddings, probabilities = None, self.calibrator.apply(class_probabilities(self.model, prepared))
        index = model_input.index if isinstance(model_input, pd.DataFrame) else None
        frame = pd.DataFrame(probabilities, columns=self.classes, index=index)
        return frame, summarize_inputs(self, model_input, prepared=prepared, embeddings=embeddings)

    def embed_and_score(self, prepared: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The penultimate layer's embedding and the per-class calibrated probabilities of
        prepared input, from one forward pass of a sub-model sharing the weights, with the
        penultimate layer as a second output (built once, on first use).

        Returns:
            ``(embeddings float64 (n, d), probabilities float64 (n, n_classes))``; the
            probabilities are the model's own, calibrated (up to float32 rounding between batch
            sizes).
        """
        from pipelines.monitoring.reference import embedding_model
        from pipelines.model.architectures import PREDICT_BATCH, class_columns

        if self._heads is None:
            with self._heads_lock:  # requests run in threads: build it once
                if self._heads is None:
                    self._heads = embedding_model(self.model, with_output=True)
        x = np.asarray(prepared, dtype=np.float32)
        if len(x) <= PREDICT_BATCH:
            # One batch: `predict` would build a data pipeline and callbacks on every call,
            # which costs more than the model for the few images of a request.
            embedding, raw = self._heads.predict_on_batch(x)
        else:
            embedding, raw = self._heads.predict(x, batch_size=PREDICT_BATCH, verbose=0)
        embedding = np.asarray(embedding, dtype=np.float64).reshape(len(x), -1)
        return embedding, self.calibrator.apply(class_columns(raw))

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would read them as a schema
        """Per-class calibrated probabilities of raw input.

        Raises:
            MedloopError: the input is not of a form this model takes (the message says which
                form it expects); `pipelines.data.images.ImageProblem` for an unusable image.
        """
        from pipelines.model.architectures import class_probabilities

        probabilities = self.calibrator.apply(class_probabilities(self.model, self.prepare(model_input)))
        index = model_input.index if isinstance(model_input, pd.DataFrame) else None
        return pd.DataFrame(probabilities, columns=self.classes, index=index)

    def prepare(self, model_input: Any) -> np.ndarray:
        """Raw input as the Keras model's input (float32)."""
        if self.summary["modality"] == "image":
            return self._prepare_images(model_input)
        return self._prepare_table(model_input)

    def _prepare_images(self, model_input: Any) -> np.ndarray:
        image = self.summary["image"]
        shape = (int(image["height"]), int(image["width"]), int(image["channels"]))
        if isinstance(model_input, np.ndarray):
            if model_input.dtype != np.uint8 or model_input.ndim != 4 or model_input.shape[1:] != shape:
                raise MedloopError(
                    f"image input array must be uint8 of shape (n, {shape[0]}, {shape[1]}, {shape[2]}), "
                    f"got {model_input.dtype} {model_input.shape}"
                )
            from pipelines.preprocess import normalise_intensity

            return np.stack([normalise_intensity(pixels) for pixels in model_input]).astype(np.float32)
        if isinstance(model_input, pd.DataFrame) and IMAGE_COLUMN in model_input.columns:
            return np.stack([
                prepare_image_bytes(_as_bytes(data), shape, **self._decode_limits())
                for data in model_input[IMAGE_COLUMN]
            ]).astype(np.float32)
        raise MedloopError(
            f"image input must be a DataFrame with a column {IMAGE_COLUMN!r} of PNG/JPEG/DICOM bytes "
            f"or a uint8 array (n, {shape[0]}, {shape[1]}, {shape[2]}); got {type(model_input).__name__}"
        )

    def _decode_limits(self) -> dict[str, int]:
        return {
            "min_side": int(self.image_limits.get("min_side", 1)),
            "max_pixels": int(self.image_limits.get("max_pixels", 50_000_000)),
        }

    def _prepare_table(self, model_input: Any) -> np.ndarray:
        features = self.scaler["features"]
        if not isinstance(model_input, pd.DataFrame):
            raise MedloopError(f"tabular input must be a DataFrame with columns {features}")
        missing = [f for f in features if f not in model_input.columns]
        if missing:
            raise MedloopError(f"tabular input lacks feature columns {missing} (needs all of {features})")
        return scale_features(model_input, self.scaler)


# Models registered before the package was grouped by concern pickled their classes under the flat
# module names; `load` maps those names to where the classes live now.
FLAT_MODULE_NAMES = {
    "pipelines.pyfunc_model": "pipelines.model.pyfunc",
    "pipelines.calibration": "pipelines.model.calibration",
    "pipelines.models": "pipelines.model.architectures",
    "pipelines.drift_reference": "pipelines.monitoring.reference",
    "pipelines.inputs": "pipelines.data.inputs",
    "pipelines.images": "pipelines.data.images",
    "pipelines.metrics": "pipelines.model.metrics",
}


def register_flat_module_names() -> None:
    """Make the flat module names of releases before the regrouping resolve to today's modules,
    so that unpickling a version registered then finds its classes."""
    import importlib
    import sys

    for flat, current in FLAT_MODULE_NAMES.items():
        sys.modules.setdefault(flat, importlib.import_module(current))


def load(model_uri: str) -> Any:
    """``mlflow.pyfunc.load_model``, for versions pickled under today's module names or the flat
    names of releases before the regrouping (a registered champion keeps loading after an upgrade).
    """
    register_flat_module_names()
    return mlflow.pyfunc.load_model(model_uri)


def prepare_image_bytes(data: bytes, shape: tuple[int, int, int], *, min_side: int, max_pixels: int) -> np.ndarray:
    """One image file as the model's input pixels, by the clean and preprocess stages' own steps.

    Args:
        data: PNG, JPEG or DICOM bytes.
        shape: the model's ``(height, width, channels)``.
        min_side, max_pixels: the clean stage's limits.

    Returns:
        uint8 ``(height, width, channels)``.

    Raises:
        pipelines.data.images.ImageProblem: the image is unusable (the same reasons clean quarantines).
    """
    from PIL import Image

    from pipelines.data.images import decode_image
    from pipelines.preprocess import normalise_intensity

    height, width, channels = shape
    pixels = decode_image(data, channels=channels, min_side=min_side, max_pixels=max_pixels).pixels
    # As clean writes it (a PNG in mode L or RGB) and preprocess reads it back and resizes it.
    image = Image.fromarray(np.ascontiguousarray(pixels[:, :, 0] if channels == 1 else pixels),
                            mode="L" if channels == 1 else "RGB")
    resized = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))
    if resized.ndim == 2:
        resized = resized[:, :, None]
    return normalise_intensity(resized)


def scale_features(frame: pd.DataFrame, scaler: dict) -> np.ndarray:
    """Raw features imputed and standardised as preprocess did (``scaler.json``); float32."""
    features = scaler["features"]
    median, mean, std = (pd.Series(scaler[key])[features] for key in ("impute_median", "mean", "std"))
    raw = frame[features].astype("float64")
    return ((raw.fillna(median) - mean) / std).astype("float32").to_numpy()


# ---------------------------------------------------------------------------------------------
# logging the pyfunc to the active MLflow run
# ---------------------------------------------------------------------------------------------


def log_pyfunc(params: Params, layout: Layout, input_example: Any, drift_reference: dict | None = None,
               calibrator: Any = None) -> Any:
    """Log `MedloopPyfunc` (with ``models/model.keras``, ``preprocess.json``, for tables
    ``scaler.json``, the calibrator and the drift reference) to the active run under the name
    ``model``.

    Args:
        params: the configuration.
        layout: the workspace (the model file must be written already).
        input_example: one or two rows of raw input, stored with the model as its example.
        drift_reference: `pipelines.monitoring.reference.build_reference`'s result, stored as the
            artifact ``drift_reference.json`` (``<model>/artifacts/drift_reference.json``).
        calibrator: the `pipelines.model.calibration.Calibrator` fitted at training, stored as the
            artifact ``calibration.json`` (None: the model's own probabilities).

    Returns:
        MLflow's ``ModelInfo`` (``model_uri``, ``model_id``, ...).
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    summary = json.loads((layout.processed / "preprocess.json").read_text())
    artifacts = {
        KERAS_ARTIFACT: str(layout.model_file),
        PREPROCESS_ARTIFACT: str(layout.processed / "preprocess.json"),
    }
    outputs = Schema([ColSpec("double", name) for name in summary["classes"]])
    if params.model.modality == "image":
        spec = params.clean.image
        python_model = MedloopPyfunc({"channels": spec.channels, "min_side": spec.min_side,
                                      "max_pixels": spec.max_pixels})
        # No input schema: predict takes a DataFrame of bytes OR a uint8 array, and a schema can
        # describe only one of them (MLflow would refuse the other before predict sees it).
        signature = ModelSignature(inputs=None, outputs=outputs)
    else:
        artifacts[SCALER_ARTIFACT] = str(layout.processed / summary["scaler"])
        python_model = MedloopPyfunc()
        signature = ModelSignature(
            inputs=Schema([ColSpec("double", name) for name in summary["features"]]), outputs=outputs
        )
    with tempfile.TemporaryDirectory(prefix="medloop-drift-") as scratch:
        if drift_reference is not None:
            # Not a workspace file: the reference lives only inside the logged model.
            from pipelines.monitoring.reference import REFERENCE_FILE

            reference_file = Path(scratch) / REFERENCE_FILE
            reference_file.write_text(json.dumps(drift_reference, separators=(",", ":")))
            artifacts[DRIFT_REFERENCE_ARTIFACT] = str(reference_file)
        if calibrator is not None:
            calibration_file = Path(scratch) / CALIBRATION_FILE
            calibration_file.write_text(json.dumps(calibrator.to_dict(), indent=2, sort_keys=True))
            artifacts[CALIBRATION_ARTIFACT] = str(calibration_file)
        return mlflow.pyfunc.log_model(
            name=ARTIFACT_PATH,
            python_model=python_model,
            artifacts=artifacts,
            signature=signature,
            input_example=input_example,
            pip_requirements=pinned_requirements(),
            # Bundle the code it was trained with, so the logged model does not depend on whichever
            # medloop happens to be installed where it is loaded.
            code_paths=[str(Path(__file__).resolve().parents[1])],
        )


def pinned_requirements() -> list[str]:
    """The pyfunc's pip requirements pinned to the running versions (no slow inference)."""
    pins = []
    for name in ("tensorflow", "tensorflow-cpu", *REQUIREMENTS):
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return pins


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):  # base64 text, as JSON requests to a serving endpoint carry it
        import base64

        return base64.b64decode(value)
    if isinstance(value, io.IOBase):
        return value.read()
    raise MedloopError(f"column {IMAGE_COLUMN!r} must hold image file bytes, got {type(value).__name__}")
