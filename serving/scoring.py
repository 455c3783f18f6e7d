"""Scoring one request's inputs, split in the two halves that micro-batching needs.

1. `prepare` (per request, in a worker thread): de-identify each upload exactly as collect does
   it, keep the de-identified image for the feedback export, hash it, and turn it into the Keras
   model's input by the served pyfunc's own `MedloopPyfunc.prepare` (decode, resize, contrast;
   an unusable image fails its own request with a 422 naming it). Feature rows (checked by the
   caller) are kept as rows and hashed.
2. `probabilities` (per batch, one worker thread): the prepared inputs of one or more requests
   for ONE served version, run through the Keras model in one call, calibrated by the calibrator
   the model carries (`pipelines.model.calibration.calibrator_of`, the pyfunc's own), split back per
   request.
   Feature rows are scaled here, a whole batch at once, by `scaled_features` (the pyfunc's
   scaling, bit for bit).

The result equals ``served.model.predict(frame)`` (the pyfunc) for the same inputs: the same
preparation, the same Keras model and the same calibration, called with ``predict_on_batch`` rather than ``predict``,
which for a batch this small sets up a data pipeline and callbacks on every call and costs far
more than the model itself. The Keras model sums a batch's rows in whatever order its kernels
pick for that batch size, so a probability may differ from the same input's probability in
another batch by a float32 rounding step (about 1e-7).

`explain_gradcam` adds a Grad-CAM heat map per image (`pipelines.model.gradcam`), outside any batch,
for the class decided on the calibrated probabilities.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException

from pipelines.config import Params
from serving.model import Served

DECIMALS = 6  # of the probabilities answered (and stored)


@dataclass
class Prepared:
    """One request's inputs, ready for the model.

    Attributes:
        model_input: images: float32 ``(n, H, W, C)``; tables: the feature rows.
        input_sha256: keyed hash of each de-identified input (stored with its prediction).
        metadata: de-identified facts of each input (stored with its prediction).
    """

    model_input: Any
    input_sha256: list[str]
    metadata: list[dict]

    def __len__(self) -> int:
        return len(self.input_sha256)


def pyfunc_of(served: Served) -> Any:
    """The served pyfunc's own `MedloopPyfunc` (its Keras model and its ``prepare``)."""
    python_model = served.model.unwrap_python_model()
    if not (hasattr(python_model, "prepare") and hasattr(python_model, "model")):
        raise HTTPException(500, f"{served.name} v{served.version} is not a medloop model (no prepare step)")
    return python_model


def prepare(served: Served, inputs: list[Any], params: Params, salt: bytes, inputs_dir: Path) -> Prepared:
    """De-identify, hash, keep and prepare one request's inputs (see the module docstring).

    Raises:
        HTTPException: 422 naming the image that cannot be de-identified or used.
    """
    if params.model.modality != "image":
        from pipelines.deid.keys import keyed_hash

        features = list(params.tabular.features)
        rows = [{name: row.get(name) for name in features} for row in inputs]
        return Prepared(rows, [keyed_hash(salt, json.dumps(row, sort_keys=True).encode()) for row in inputs],
                        [{"features": dict(row)} for row in inputs])

    import pandas as pd

    from pipelines.deid.files import EXTENSIONS, deidentify_image
    from pipelines.deid.keys import content_hash, keyed_hash
    from pipelines.errors import DeidentificationError
    from pipelines.data.images import ImageProblem, dicom_header_refusal
    from pipelines.model.pyfunc import IMAGE_COLUMN

    python_model = pyfunc_of(served)
    pixels, metadata, hashes = [], [], []
    for index, data in enumerate(inputs):
        try:
            file_format, stored, meta = deidentify_image(data, salt)
        except DeidentificationError as exc:
            raise HTTPException(422, f"image {index}: {exc}") from None
        try:
            refused = (dicom_header_refusal(stored, params.clean.image.dicom)
                       if file_format == "dicom" and params.clean.image is not None else None)
            if refused:  # a CT or MR is not a chest radiograph: no decision on it
                raise HTTPException(422, f"image {index} is not what the model was built for: {refused}")
            pixels.append(python_model.prepare(pd.DataFrame({IMAGE_COLUMN: [stored]})))
        except ImageProblem as exc:
            raise HTTPException(422, f"image {index} cannot be used: {exc}") from None
        digest = content_hash(stored)
        kept = inputs_dir / f"{digest}.{EXTENSIONS[file_format]}"
        if not kept.exists():
            kept.write_bytes(stored)
        metadata.append({"format": file_format, "content_hash": digest, "file": kept.name,
                         **{k: v for k, v in meta.items() if v is not None}})
        hashes.append(keyed_hash(salt, stored))
    return Prepared(np.concatenate(pixels), hashes, metadata)


class Scored(np.ndarray):
    """One request's probabilities (rows: inputs; columns: ``served.classes``), carrying the
    inputs' drift summaries (``drift``: one dict per input, or None) made in the same pass."""

    drift: list[dict] | None = None


def probabilities(served: Served, model_inputs: list[Any]) -> list[Scored]:
    """Per-class calibrated probabilities (columns in ``served.classes`` order) for each
    request's prepared inputs, from ONE call of the Keras model.

    For an image model that carries a drift reference, the same call also gives the penultimate
    embedding (`MedloopPyfunc.embed_and_score`), and each input's drift summary (intensity
    statistics and embedding components, `pipelines.monitoring.drift.summarize_inputs`) rides along as
    ``drift``. Table inputs need none: drift is computed on the stored feature values.
    """
    from pipelines.monitoring.drift import summarize_inputs
    from pipelines.model.architectures import class_columns
    from pipelines.model.calibration import calibrator_of

    python_model = pyfunc_of(served)
    sizes = np.cumsum([len(part) for part in model_inputs])[:-1]
    summaries = None
    if isinstance(model_inputs[0], np.ndarray):
        x = model_inputs[0] if len(model_inputs) == 1 else np.concatenate(model_inputs)
        if getattr(python_model, "drift_reference", None):
            embeddings, scored = python_model.embed_and_score(x)  # calibrated by the pyfunc itself
            summaries = summarize_inputs(python_model, x, prepared=x, embeddings=embeddings)
        else:
            scored = calibrator_of(python_model).apply(class_columns(python_model.model.predict_on_batch(x)))
    else:
        x = scaled_features(python_model.scaler, [row for rows in model_inputs for row in rows])
        scored = calibrator_of(python_model).apply(class_columns(python_model.model.predict_on_batch(x)))
    order = [list(python_model.classes).index(label) for label in served.classes]
    parts = [part.view(Scored) for part in np.split(scored[:, order], sizes)]
    if summaries is not None:
        for part, start, end in zip(parts, [0, *sizes], [*sizes, len(scored)]):
            part.drift = summaries[start:end]
    return parts


def scaled_features(scaler: dict, rows: list[dict]) -> np.ndarray:
    """Feature rows as the pyfunc's `MedloopPyfunc.prepare` makes them
    (`pipelines.model.pyfunc.scale_features`: missing values imputed with the training median,
    then standardised with the training mean and standard deviation, in float64, then float32),
    done in NumPy with the same arithmetic in the same order, so the result is the same to the
    bit (tested). pandas spends about 20 ms on it per call, column by column, whatever the
    number of rows: more than the model itself for a batch of a few rows.
    """
    features = scaler["features"]
    median, mean, std = (np.array([scaler[key][name] for name in features], dtype=np.float64)
                         for key in ("impute_median", "mean", "std"))
    raw = np.array([[np.nan if row.get(name) is None else row[name] for name in features] for row in rows],
                   dtype=np.float64).reshape(len(rows), len(features))
    return ((np.where(np.isnan(raw), median, raw) - mean) / std).astype(np.float32)


class NotAProbability(Exception):
    """The model gave something that is not a finite probability for an input: no decision is
    made from it (the service answers 422 and counts it in ``medloop_unusable_outputs_total``)."""


def answers(served: Served, scored: np.ndarray, prepared: Prepared) -> list[dict]:
    """One answer per input: probabilities, the decision at the operating threshold, and what is
    stored with it (``input_sha256``, ``metadata``; popped before answering).

    Raises:
        NotAProbability: an output is not finite or not within 0..1 (nothing is decided).
    """
    usable = np.isfinite(scored) & (scored >= 0) & (scored <= 1)
    if not usable.all():
        position = int(np.flatnonzero(~usable.all(axis=1))[0])
        raise NotAProbability(
            f"model output not a finite probability for input {position} ({served.name} v{served.version} gave "
            f"{[float(p) for p in scored[position]]}); no decision was made: check the input, and report it "
            "if it is within the declared ranges")
    result = []
    for position, (row, digest, meta) in enumerate(zip(scored, prepared.input_sha256, prepared.metadata)):
        if getattr(scored, "drift", None):
            meta["drift"] = scored.drift[position]
        probabilities_of = {label: round(float(p), DECIMALS) for label, p in zip(served.classes, row)}
        result.append({"probabilities": probabilities_of, "decision": served.decide(probabilities_of),
                       "input_sha256": digest, "metadata": meta})
    return result


def explain_gradcam(served: Served, prepared: Prepared) -> tuple[np.ndarray, list[dict]]:
    """Probabilities and a Grad-CAM heat map per image, for the class each image is decided as
    (on its calibrated probabilities, as answered).

    Returns:
        (probabilities as `probabilities` gives them, one explanation per image:
        ``{"method": "gradcam", "class": <decided class>, "image_png": <base64 PNG>}``, the heat
        map over the image as the model saw it, at the model's input size).

    Raises:
        HTTPException: 422 when the model has no convolutional layer to explain with.
    """
    from pipelines.model.gradcam import gradcam, overlay_png

    [scored] = probabilities(served, [prepared.model_input])
    decided = [served.decide({label: round(float(p), DECIMALS) for label, p in zip(served.classes, row)})
               for row in scored]
    python_model = pyfunc_of(served)
    classes = list(python_model.classes)
    heat = gradcam(python_model.model, prepared.model_input, np.array([classes.index(d) for d in decided]),
                   len(classes))
    if heat is None:
        raise HTTPException(422, f"{served.name} v{served.version} has no convolutional layer to explain with")
    return scored, [{"method": "gradcam", "class": label,
                     "image_png": base64.b64encode(overlay_png(image, cam)).decode()}
                    for label, image, cam in zip(decided, prepared.model_input, heat)]
