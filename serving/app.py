"""The HTTP service (FastAPI), started by ``medloop serve``.

- ``POST /predict``: one image as the request body (``Content-Type`` ``image/png``,
  ``image/jpeg`` or ``application/dicom``), or JSON: ``{"images": [base64, ...]}`` or
  ``{"instances": [{feature: value, ...}, ...]}``. Images are de-identified on arrival exactly as
  collect does it and prepared as in training. Each answer: probability per class, the decision
  at the version's operating threshold, model name and version, and a prediction id. Requests
  that arrive together are scored by one model call (`serving.batching`, up to
  ``serving.batch_max_size`` inputs, waiting at most ``batch_max_wait_ms``; 1 turns it off).
  ``?explain=gradcam`` (image models) adds to each answer a Grad-CAM heat map over the image as
  the model saw it, for the class decided (``explanation``: ``method``, ``class``, ``image_png``
  in base64); such requests are scored on their own, outside any batch.
- ``POST /feedback``: ``{prediction_id, label, idempotency_key, comment?}``; the reviewer is the
  caller, and the idempotency key is the caller's own: a post that repeats the caller's earlier
  one with the same key exactly (every field) is a replay (200, nothing stored); the same key
  with any field changed is 409, naming the caller's own feedback. ``GET /review`` and ``POST /review/{id}``: the adjudication queue (reviewer role).
- ``POST /admin/reload``: check for a new champion now (admin role).
- ``GET /monitoring`` (reviewer role): live sensitivity, specificity and agreement per served
  version from confirmed labels, and beside each version the shadow candidate's figures on the
  same cases; ``drift``: the served version's input and prediction drift against its training
  reference (`pipelines.monitoring.drift`). The shadow candidate (``serving.shadow``) scores every input off the response
  path; its answers are stored, never returned (`serving.shadow`).
- ``GET /healthz``, ``GET /readyz`` (a model is loaded; also the shadow candidate, loaded or
  its load error), ``GET /metrics`` (Prometheus).

Every write records the caller. Requests larger than ``serving.max_request_bytes`` get 413,
counted as the bytes arrive (chunked bodies too), before the body is parsed or the token checked;
JSON is parsed with limits on depth, number size and strings (`serving.guards`); a wrong content
type 415; malformed input 422 naming the field, with at most a short escaped excerpt of what was
sent; a field a body does not declare 422; a missing or unknown token 401; a role without the
permission 403.

The input contract of ``/predict`` comes from params: each feature's declared type and range
(``tabular.features``, checked by `pipelines.config.FeatureSpec.problem`) and at most
``serving.max_missing_share`` of the features missing per instance, else 422 naming the field,
the value and the range; images pass collect's de-identification and clean's size and channel
checks. A model output that is not a finite probability is never decided: 422 "model output not
a finite probability", counted in ``medloop_unusable_outputs_total``. ``/docs`` and ``/redoc``
are served only with ``serving.docs: true`` (their scripts come from a public CDN);
``/openapi.json`` always.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from pipelines.config import Params, load_params
from pipelines.errors import mask_credentials
from pipelines.workspace import Layout, database_url
from serving import scoring
from serving.auth import Caller, TokenTable
from serving.batching import MicroBatcher
from serving.guards import RequestGuard, excerpt, parsed_json, validation_problem
from serving.model import ModelManager, Served
from serving.shadow import ShadowScorer

log = logging.getLogger("medloop.serving")

IMAGE_TYPES = {"image/png": "png", "image/jpeg": "jpeg", "application/dicom": "dicom"}


MAX_ROW_ID = 2**63 - 1  # the largest id a database integer column holds


class FeedbackIn(BaseModel):
    """A clinician's label for a prediction (a field it does not declare is refused: it may identify)."""

    model_config = ConfigDict(extra="forbid")

    prediction_id: str = Field(min_length=1, max_length=36)
    label: str = Field(min_length=1, max_length=100)
    idempotency_key: str = Field(min_length=1, max_length=200)
    comment: str | None = Field(default=None, max_length=5000)


class Problem(BaseModel):
    """Every refusal: one paragraph saying what is wrong, where, and what to do."""

    detail: str


PROBLEMS = {status: {"model": Problem, "description": description} for status, description in {
    401: "no token or an unknown token", 403: "the role may not do this", 404: "no such prediction or case",
    409: "conflicts with what is stored", 413: "request body or batch too large", 415: "content type not accepted",
    422: "input refused: what is wrong and where"}.items()}


class ResolveIn(BaseModel):
    """A reviewer's decision on an adjudication case (undeclared fields are refused)."""

    model_config = ConfigDict(extra="forbid")

    label: str = Field(min_length=1, max_length=100)
    reason: str | None = Field(default=None, max_length=5000)


def create_app(params_file: str | Path, *, reload_seconds: float | None = None) -> FastAPI:
    """The service for the workspace holding ``params_file``."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from pipelines.deid.keys import load_salt
    from pipelines.store.feedback import FeedbackStore

    params_path = Path(params_file).resolve()
    layout = Layout.at(params_path.parent)
    params = load_params(params_path)
    spec = params.serving
    salt = load_salt(params.deid.salt_env)
    store_url = database_url(layout, spec.store_url)
    store = FeedbackStore(store_url)
    tokens = TokenTable(_path(spec.tokens_file, layout))
    manager = ModelManager(params, layout)
    inputs_dir = layout.state / "serving" / "inputs"  # de-identified uploads, for the feedback export
    inputs_dir.mkdir(parents=True, exist_ok=True)
    interval = reload_seconds if reload_seconds is not None else spec.reload_seconds

    registry = CollectorRegistry()
    requests = Counter("medloop_requests_total", "HTTP requests", ["endpoint", "status"], registry=registry)
    latency = Histogram("medloop_request_seconds", "request latency", ["endpoint"], registry=registry,
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
    served_version = Gauge("medloop_model_version", "version in service", ["model"], registry=registry)
    feedback_posts = Counter("medloop_feedback_total", "feedback posts", ["outcome"], registry=registry)
    predictions_made = Counter("medloop_predictions_total", "inputs scored", ["model", "version"], registry=registry)
    batch_inputs = Histogram("medloop_batch_inputs", "inputs scored per model call (micro-batching)", registry=registry,
                             buckets=(1, 2, 4, 8, 16, 32, 64, 128))
    # serving.batch_max_size 1 turns micro-batching off: each request is then scored on its own.
    batcher = (MicroBatcher(scoring.probabilities, spec.batch_max_size, spec.batch_max_wait_ms / 1000,
                            batch_inputs.observe) if spec.batch_max_size > 1 else None)
    # Predictions are stored by threads of their own, so that waiting on the database never holds
    # up preparing and scoring; one for SQLite, which takes one writer at a time anyway (more would
    # only wait on its lock), several for a server database.
    prediction_writer = ThreadPoolExecutor(1 if store.url.startswith("sqlite") else 4,
                                           thread_name_prefix="medloop-store")
    shadow = ShadowScorer(manager, store, params, inputs_dir, registry)  # serving.shadow: logged, never returned

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        await asyncio.to_thread(manager.start)
        shadow.start()
        task = asyncio.create_task(_watch(manager, interval))
        try:
            yield
        finally:
            task.cancel()
            if batcher is not None:
                await batcher.close()
            await asyncio.to_thread(shadow.stop)
            prediction_writer.shutdown(wait=True)
            store.close()

    unusable_outputs = Counter("medloop_unusable_outputs_total", "model outputs that were not a finite "
                               "probability (refused, never decided)", ["model", "version"], registry=registry)
    docs = {} if spec.docs else {"docs_url": None, "redoc_url": None}
    app = FastAPI(title="medloop prediction service", version="1", lifespan=lifespan, responses=PROBLEMS,
                  description=f"Serves {params.model.name}@champion and takes clinicians' feedback.", **docs)
    app.state.manager, app.state.store, app.state.params = manager, store, params
    # Innermost of the two: measure (below) counts what the guard refuses too.
    app.add_middleware(RequestGuard, max_request_bytes=spec.max_request_bytes)

    @app.exception_handler(RequestValidationError)
    async def refuse_invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer repeats the whole input (a 60 MB comment came back in full).
        return JSONResponse({"detail": validation_problem(list(exc.errors()))}, status_code=422)

    @app.middleware("http")
    async def measure(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        requests.labels(endpoint, str(response.status_code)).inc()
        latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    def caller(permission: str):
        def check(request: Request) -> Caller:
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise HTTPException(401, "missing bearer token (Authorization: Bearer <token>)",
                                    headers={"WWW-Authenticate": "Bearer"})
            who = tokens.caller(token.strip())
            if who is None:
                raise HTTPException(401, "unknown token", headers={"WWW-Authenticate": "Bearer"})
            if not who.may(permission):
                raise HTTPException(403, f"role {who.role} may not {permission}")
            return who
        return check

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "no model loaded (yet): why"}})
    def readyz():
        served = manager.current
        error = mask_credentials(manager.last_error) if manager.last_error else None
        if served is None:
            return JSONResponse({"ready": False, "error": error, "shadow": _shadow_status(manager)}, status_code=503)
        return {"ready": True, "model": served.name, "version": served.version, "loaded_at": served.loaded_at,
                "last_reload_error": error, "shadow": _shadow_status(manager)}

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        from prometheus_client import generate_latest

        if manager.current is not None:
            served_version.labels(manager.current.name).set(float(manager.current.version))
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    @app.post("/predict", openapi_extra={"requestBody": _predict_body(params)},
              responses={503: {"model": Problem, "description": "no model loaded yet"}})
    async def predict(request: Request, who: Caller = Depends(caller("predict")),
                      explain: str | None = Query(None, description="gradcam: add a Grad-CAM heat map per image "
                                                                      "(image models)")) -> dict:
        served = manager.current  # one version for the whole request, whatever reloads meanwhile
        if served is None:
            raise HTTPException(503, f"no model loaded yet ({manager.last_error or 'starting'})")
        if explain is not None:
            _check_explain(explain, params)
        body = await request.body()  # at most serving.max_request_bytes (RequestGuard)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        inputs = _parse_inputs(content_type, body, parsed_json(request.scope), params)
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
            unusable_outputs.labels(served.name, served.version).inc()
            log.error("%s v%s: a model output was not a finite probability; the request was refused",
                      served.name, served.version)
            raise HTTPException(422, str(exc)) from None
        await asyncio.get_running_loop().run_in_executor(
            prediction_writer, _record, store, served, answers, who.name, params.model.modality)
        predictions_made.labels(served.name, served.version).inc(len(answers))
        shadow.submit([answer["prediction_id"] for answer in answers])  # never blocks; answers unchanged
        return {"model": served.name, "version": served.version, "operating_threshold": served.operating_threshold,
                "predictions": answers}

    @app.post("/feedback", status_code=201, responses={200: {"description": "seen before: nothing stored"}})
    async def feedback(item: FeedbackIn, who: Caller = Depends(caller("feedback"))):
        from pipelines.store.feedback import Conflict, NotFound

        if item.label not in params.model.classes:
            raise HTTPException(422, f"label {excerpt(item.label)} is not one of {params.model.classes}")
        try:
            result = await asyncio.to_thread(store.add_feedback, item.prediction_id, item.label, who.name,
                                             item.idempotency_key, item.comment)
        except NotFound as exc:
            feedback_posts.labels("not_found").inc()
            raise HTTPException(404, str(exc)) from None
        except Conflict as exc:
            feedback_posts.labels("conflict").inc()
            raise HTTPException(409, str(exc)) from None
        feedback_posts.labels("stored" if result.created else "replayed").inc()
        body = {"feedback_id": result.feedback_id, "created": result.created, "reviewer": who.name,
                "adjudication_id": result.adjudication_id}
        return JSONResponse(body, status_code=201 if result.created else 200)

    @app.get("/review")
    async def review(_who: Caller = Depends(caller("review"))) -> dict:
        return {"open": await asyncio.to_thread(store.open_reviews)}

    @app.post("/review/{adjudication_id}")
    async def resolve(item: ResolveIn, adjudication_id: int = PathParam(ge=1, le=MAX_ROW_ID),
                      who: Caller = Depends(caller("review"))) -> dict:
        from pipelines.store.feedback import Conflict, NotFound

        if item.label not in params.model.classes:
            raise HTTPException(422, f"label {excerpt(item.label)} is not one of {params.model.classes}")
        try:
            return await asyncio.to_thread(store.resolve, adjudication_id, item.label, who.name, item.reason)
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None
        except Conflict as exc:
            raise HTTPException(409, str(exc)) from None

    @app.get("/monitoring")
    async def monitoring(_who: Caller = Depends(caller("review"))) -> dict:
        """Live performance per served version, from clinicians' confirmed labels, and beside each
        version every shadow candidate's figures on the same cases (``shadow``)."""
        name, positive = params.model.name, params.model.positive_class
        report = await asyncio.to_thread(store.live_performance, name, positive)
        shadows = await asyncio.to_thread(store.shadow_performance, name, positive)
        for version in report:
            version["shadow"] = [entry for entry in shadows if entry["served_version"] == version["version"]]
        drift = await asyncio.to_thread(_drift, manager.current, params, store_url)
        return {"model": name, "positive_class": positive, "versions": report, "shadow": _shadow_status(manager),
                "drift": drift}

    @app.post("/admin/reload")
    async def reload(who: Caller = Depends(caller("admin"))) -> dict:
        changed = await asyncio.to_thread(manager.refresh)
        served = manager.current
        log.info("reload asked by %s: %s", who.name, "new version" if changed else "unchanged")
        return {"reloaded": changed, "version": served.version if served else None, "error": manager.last_error}

    from serving import pages  # the clinicians' pages under /pages (same store, model and tokens)
    app.include_router(pages.router(params, layout, store, manager, tokens))
    return app


# ------------------------------------------------------------------------------------------------


async def _watch(manager: ModelManager, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        await asyncio.to_thread(manager.refresh)


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


def _drift(served: Served | None, params: Params, store_url: str) -> dict | None:
    """The served version's input and prediction drift against the reference it carries
    (`pipelines.monitoring.drift`); None when nothing is served or the version carries no reference."""
    from pipelines.monitoring import drift

    reference = getattr(served.model.unwrap_python_model(), "drift_reference", None) if served else None
    if not reference:
        return None
    return drift.report_from_store(params, reference, store_url, served.version).as_dict()


def _shadow_status(manager: ModelManager) -> dict | None:
    """The shadow candidate as /readyz and /monitoring show it: None when none is configured."""
    if not manager.shadow_reference:
        return None
    if manager.shadow is not None:
        return manager.shadow.describe()
    error = mask_credentials(manager.shadow_error) if manager.shadow_error else "not loaded yet"
    return {"candidate": manager.shadow_reference, "loaded": False, "error": error}


def _path(value: str, layout: Layout) -> Path:
    path = Path(value)
    return path if path.is_absolute() else layout.root / path


def app_from_environment() -> FastAPI:
    """The app for ``uvicorn --factory serving.app:app_from_environment`` (``MEDLOOP_PARAMS``)."""
    return create_app(os.environ.get("MEDLOOP_PARAMS", "params.yaml"))
