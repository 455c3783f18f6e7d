"""``POST /predict``: one image as the request body (``Content-Type`` ``image/png``,
``image/jpeg`` or ``application/dicom``), or JSON: ``{"images": [base64, ...]}`` or
``{"instances": [{feature: value, ...}, ...]}``.

Images are de-identified on arrival exactly as collect does it and prepared as in training. Each
answer: probability per class, the decision at the version's operating threshold, model name and
version, and a prediction id. Requests that arrive together are scored by one model call
(`serving.batching`, up to ``serving.batch_max_size`` inputs, waiting at most
``batch_max_wait_ms``; 1 turns it off). ``?explain=gradcam`` (image models) adds to each answer a
Grad-CAM heat map over the image as the model saw it, for the class decided (``explanation``:
``method``, ``class``, ``image_png`` in base64); such requests are scored on their own, outside
any batch.

The input contract comes from params: each feature's declared type and range
(``tabular.features``, checked by `pipelines.config.FeatureSpec.problem`) and at most
``serving.max_missing_share`` of the features missing per instance, else 422 naming the field,
the value and the range; images pass collect's de-identification and clean's size and channel
checks. The JSON body is parsed with limits by `serving.guards` and checked here, because its
schema is params' (`document_body` puts it into the OpenAPI document). A model output that is not
a finite probability is never decided: 422 "model output not a finite probability", counted in
``medloop_unusable_outputs_total``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request

from pipelines.config import Params
from serving import scoring
from serving.auth import Caller
from serving.guards import excerpt, parsed_json
from serving.model import Served
from serving.schemas import Problem
from serving.service import Service, caller, service_of

log = logging.getLogger("medloop.serving")

IMAGE_TYPES = {"image/png": "png", "image/jpeg": "jpeg", "application/dicom": "dicom"}

router = APIRouter()


@router.post("/predict", responses={503: {"model": Problem, "description": "no model loaded yet"}})
async def predict(request: Request, who: Caller = Depends(caller("predict")),
                  explain: str | None = Query(None, description="gradcam: add a Grad-CAM heat map per image "
                                                                  "(image models)"),
                  service: Service = Depends(service_of)) -> dict:
    params, manager, figures = service.params, service.manager, service.figures
    served = manager.current  # one version for the whole request, whatever reloads meanwhile
    if served is None:
        raise HTTPException(503, f"no model loaded yet ({manager.last_error or 'starting'})")
    if explain is not None:
        _check_explain(explain, params)
    body = await request.body()  # at most serving.max_request_bytes (RequestGuard)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    inputs = _parse_inputs(content_type, body, parsed_json(request.scope), params)
    salt, inputs_dir, batcher = service.salt, service.inputs_dir, service.batcher
    try:
        if explain is not None:  # gradients: scored on its own, outside any batch
            answers = await asyncio.to_thread(_explain, served, inputs, params, salt, inputs_dir)
        elif batcher is None:
            answers = await asyncio.to_thread(_score, served, inputs, params, salt, inputs_dir)
        else:
            with batcher.preparing():  # a batch forming now waits for this request
                prepared = await asyncio.to_thread(scoring.prepare, served, inputs, params, salt, inputs_dir)
            scored = await batcher.score(served, prepared.model_input, len(prepared))
            answers = scoring.answers(served, scored, prepared)
    except scoring.NotAProbability as exc:
        figures.unusable_outputs.labels(served.name, served.version).inc()
        log.error("%s v%s: a model output was not a finite probability; the request was refused",
                  served.name, served.version)
        raise HTTPException(422, str(exc)) from None
    await asyncio.get_running_loop().run_in_executor(
        service.prediction_writer, _record, service.store, served, answers, who.name, params.model.modality)
    figures.predictions_made.labels(served.name, served.version).inc(len(answers))
    service.shadow.submit([answer["prediction_id"] for answer in answers])  # never blocks; answers unchanged
    return {"model": served.name, "version": served.version, "operating_threshold": served.operating_threshold,
            "predictions": answers}


def document_body(openapi: dict, params: Params) -> dict:
    """Put the request body of ``POST /predict``, which params declare, into an app's OpenAPI
    document (the route reads the body itself, so FastAPI cannot infer it); returns ``openapi``."""
    openapi["paths"]["/predict"]["post"]["requestBody"] = _predict_body(params)
    return openapi


def _parse_inputs(content_type: str, body: bytes, payload: Any, params: Params) -> list[Any]:
    """Raw image bytes (one or a batch) or feature rows, checked against the model's modality and
    the input contract from params (``payload``: the body as `serving.guards` parsed it)."""
    image_model = params.model.modality == "image"
    if content_type in IMAGE_TYPES:
        if not image_model:
            raise HTTPException(415, f"{params.model.name} takes JSON features, not {content_type}")
        if not body:
            raise HTTPException(422, "empty image body")
        return [body]
    if content_type != "application/json":
        expected = "image/png, image/jpeg, application/dicom or application/json" if image_model else "application/json"
        raise HTTPException(415, f"Content-Type {excerpt(content_type or '(none)')} is not accepted; send {expected}")
    key = "images" if image_model else "instances"
    if not isinstance(payload, dict) or not isinstance(payload.get(key), list) or not payload[key]:
        raise HTTPException(422, f"expected a JSON object with a non-empty list {key!r}")
    unknown = sorted(excerpt(name) for name in set(payload) - {key})
    if unknown:
        raise HTTPException(422, f"the request has fields other than {key!r}: {', '.join(unknown[:5])}; "
                                 f"send only {key!r}")
    items = payload[key]
    if len(items) > params.serving.max_batch:
        raise HTTPException(422, f"{len(items)} inputs in one request; at most {params.serving.max_batch}")
    if image_model:
        decoded = []
        for index, item in enumerate(items):
            try:
                decoded.append(base64.b64decode(item, validate=True))
            except (binascii.Error, TypeError, ValueError):
                raise HTTPException(422, f"images[{index}] is not base64") from None
        return decoded
    return [_checked_row(index, item, params) for index, item in enumerate(items)]


def _checked_row(index: int, item: Any, params: Params) -> dict:
    """One instance, held to the features' declarations and the share that may be missing."""
    features = params.tabular.features if params.tabular else {}
    if not isinstance(item, dict):
        raise HTTPException(422, f"instances[{index}] is not an object of feature values")
    unknown = sorted(set(item) - set(features))
    if unknown:
        # Never accept (and so never store) fields that are not model features: they may identify.
        raise HTTPException(422, f"instances[{index}] has fields that are not features: "
                                 f"[{', '.join(excerpt(name) for name in unknown[:5])}]")
    for name, value in item.items():
        problem = features[name].problem(value)
        if problem:
            raise HTTPException(422, f"instances[{index}].{name} {problem}")
    missing = sum(item.get(name) is None for name in features)
    allowed = params.serving.max_missing_share
    if missing > allowed * len(features):
        raise HTTPException(422, f"instances[{index}] misses {missing} of its {len(features)} features (absent or "
                                 f"null); at most {allowed:.0%} may be missing (serving.max_missing_share): a "
                                 "decision on imputed values would not be about this case")
    return item


def _predict_body(params: Params) -> dict:
    """The OpenAPI request body of /predict, from params: the features with their declared types
    and ranges, or base64 images (or one image as the raw body)."""
    if params.model.modality == "image":
        images = {"type": "object", "additionalProperties": False, "required": ["images"], "properties": {
            "images": {"type": "array", "minItems": 1, "maxItems": params.serving.max_batch,
                       "items": {"type": "string", "format": "byte"}}}}
        raw = {"schema": {"type": "string", "format": "binary"}}
        return {"required": True, "content": {"application/json": {"schema": images},
                                              **{media: raw for media in IMAGE_TYPES}}}
    properties = {}
    for name, feature in params.tabular.features.items():
        number = {"type": "integer" if feature.dtype == "int" else "number"}
        if feature.min is not None:
            number["minimum"] = feature.min
        if feature.max is not None:
            number["maximum"] = feature.max
        properties[name] = {"anyOf": [number, {"type": "null"}]}
    # What JSON Schema can say of serving.max_missing_share: how many features must be present
    # (a null present is missing as well: the service refuses an instance that misses too many).
    present = len(properties) - math.floor(params.serving.max_missing_share * len(properties))
    instance = {"type": "object", "additionalProperties": False, "properties": properties, "minProperties": present,
                "description": f"at most {params.serving.max_missing_share:.0%} of the features absent or null"}
    instances = {"type": "object", "additionalProperties": False, "required": ["instances"], "properties": {
        "instances": {"type": "array", "minItems": 1, "maxItems": params.serving.max_batch, "items": instance}}}
    return {"required": True, "content": {"application/json": {"schema": instances}}}


def _score(served: Served, inputs: list[Any], params: Params, salt: bytes, inputs_dir: Path) -> list[dict]:
    """De-identify, hash, keep the de-identified image (for the feedback export), predict and
    decide, for one request on its own (in a worker thread; `serving.scoring`)."""
    prepared = scoring.prepare(served, inputs, params, salt, inputs_dir)
    [scored] = scoring.probabilities(served, [prepared.model_input])
    return scoring.answers(served, scored, prepared)


def _explain(served: Served, inputs: list[Any], params: Params, salt: bytes, inputs_dir: Path) -> list[dict]:
    """`_score` with a Grad-CAM heat map per image (``explanation``)."""
    prepared = scoring.prepare(served, inputs, params, salt, inputs_dir)
    scored, explanations = scoring.explain_gradcam(served, prepared)
    answers = scoring.answers(served, scored, prepared)
    for answer, explanation in zip(answers, explanations):
        answer["explanation"] = explanation
    return answers


def _check_explain(explain: str, params: Params) -> None:
    if explain != "gradcam":
        raise HTTPException(422, f"explain={explain!r} is not offered; the one explanation is explain=gradcam "
                                 "(image models)")
    if params.model.modality != "image":
        raise HTTPException(422, f"explain=gradcam needs an image model; {params.model.name} is a "
                                 f"{params.model.modality} model")


def _record(store: Any, served: Served, answers: list[dict], requested_by: str, modality: str) -> None:
    """Store each answer's prediction (in a worker thread); its id goes into the answer."""
    for answer in answers:
        answer["prediction_id"] = store.record_prediction(
            model_name=served.name, model_version=served.version, input_sha256=answer.pop("input_sha256"),
            modality=modality, probabilities=answer["probabilities"], decision=answer["decision"],
            operating_threshold=served.operating_threshold, requested_by=requested_by,
            input_metadata=answer.pop("metadata"))
