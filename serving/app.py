"""The HTTP service (FastAPI), started by ``medloop serve``: `create_app` builds the app for a
workspace from the routers of its parts, each in a module of its own:

- `serving.predict`: ``POST /predict`` (images or feature rows; answers, optionally with Grad-CAM).
- `serving.feedback`: ``POST /feedback`` (a clinician's label), ``GET /review`` and
  ``POST /review/{id}``: the adjudication queue (reviewer role).
- `serving.monitoring`: ``GET /monitoring`` (reviewer role): live performance per served version,
  the shadow candidate's beside it, and drift against the training reference.
- `serving.admin`: ``POST /admin/reload``: check for a new champion now (admin role).
- `serving.health`: ``GET /healthz``, ``GET /readyz`` (a model is loaded; also the shadow
  candidate, loaded or its load error), ``GET /metrics`` (Prometheus).

What they share (settings, store, champion, batcher, figures) is the `serving.service.Service`
on ``app.state.service``; a route takes it, and its caller, through the dependencies there. The
JSON bodies are the pydantic models of `serving.schemas`.

Every write records the caller. Requests larger than ``serving.max_request_bytes`` get 413,
counted as the bytes arrive (chunked bodies too), before the body is parsed or the token checked;
JSON is parsed with limits on depth, number size and strings (`serving.guards`); a wrong content
type 415; malformed input 422 naming the field, with at most a short escaped excerpt of what was
sent; a field a body does not declare 422; a missing or unknown token 401; a role without the
permission 403. ``/docs`` and ``/redoc`` are served only with ``serving.docs: true`` (their
scripts come from a public CDN); ``/openapi.json`` always.

While the feedback store does not answer (a PostgreSQL restart), storing a prediction or feedback
is tried again for ``serving.store_retry_seconds``; after that, or when any other use of the
store finds the database unreachable, the answer is 503 with Retry-After and a paragraph that
says what to do, never a 500: the client sends the same request again (feedback with the same
idempotency key, which stores it exactly once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Callable, Union

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from serving import admin, feedback, health, monitoring, pages, predict
from serving.guards import RequestGuard, store_errors, store_outage, validation_problem
from serving.model import ModelManager
from serving.schemas import PROBLEMS
from serving.service import Service

log = logging.getLogger("medloop.serving")


def clinicians_pages(service: Service) -> APIRouter:
    """The clinicians' pages under /pages, on the service's own store, model and tokens."""
    return pages.router(service.params, service.layout, service.store, service.manager, service.tokens)


# A part of the service: its router, or a function that builds its router for the app's Service.
Part = Union[APIRouter, Callable[[Service], APIRouter]]

# The parts of the service, in the order the OpenAPI document lists them. A new part (the
# clinicians' pages, say) is a module of its own, added here: a module-level router whose routes
# reach the service through the dependencies of `serving.service` (`service_of`, `caller`), or a
# function of the Service that builds one.
ROUTERS: tuple[Part, ...] = (health.router, predict.router, feedback.router, monitoring.router, admin.router,
                             clinicians_pages)


def create_app(params_file: str | Path, *, reload_seconds: float | None = None) -> FastAPI:
    """The service for the workspace holding ``params_file``."""
    service = Service.create(params_file, reload_seconds)
    params = service.params

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        await asyncio.to_thread(service.manager.start)
        service.shadow.start()
        task = asyncio.create_task(_watch(service.manager, service.reload_seconds))
        try:
            yield
        finally:
            task.cancel()
            if service.batcher is not None:
                await service.batcher.close()
            await asyncio.to_thread(service.shadow.stop)
            service.prediction_writer.shutdown(wait=True)
            service.store.close()

    docs = {} if params.serving.docs else {"docs_url": None, "redoc_url": None}
    app = FastAPI(title="medloop prediction service", version="1", lifespan=lifespan, responses=PROBLEMS,
                  description=f"Serves {params.model.name}@champion and takes clinicians' feedback.", **docs)
    app.state.service = service
    for part in ROUTERS:
        app.include_router(part if isinstance(part, APIRouter) else part(service))

    def openapi() -> dict:
        # The routers are shared by every app in the process; what params declare goes into
        # this app's document only.
        if app.openapi_schema is None:
            app.openapi_schema = predict.document_body(FastAPI.openapi(app), params)
        return app.openapi_schema

    app.openapi = openapi
    # Innermost of the two: measure (below) counts what the guard refuses too.
    app.add_middleware(RequestGuard, max_request_bytes=params.serving.max_request_bytes)

    async def store_not_answering(request: Request, exc: Exception) -> JSONResponse:
        return store_unavailable(request, exc, params.serving.store_retry_seconds)

    for error in store_errors():  # the same list the pages answer with a page of their own
        app.add_exception_handler(error, store_not_answering)

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
        service.figures.requests.labels(endpoint, str(response.status_code)).inc()
        service.figures.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    return app


def store_unavailable(request: Request, exc: Exception, retry_seconds: float) -> JSONResponse:
    """503 with Retry-After for a request the feedback store could not take (`serving.guards.store_outage`)."""
    retry_after = store_outage(request.method, request.url.path, exc, retry_seconds)
    again = (f"send it again after {retry_after} s with the same idempotency key: the feedback is stored exactly once"
             if request.url.path == "/feedback" else f"send it again after {retry_after} s")
    return JSONResponse({"detail": f"the feedback store is not answering (it may be restarting), so this request "
                                   f"was not completed; {again}"},
                        status_code=503, headers={"Retry-After": str(retry_after)})


async def _watch(manager: ModelManager, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        await asyncio.to_thread(manager.refresh)


def app_from_environment() -> FastAPI:
    """The app for ``uvicorn --factory serving.app:app_from_environment`` (``MEDLOOP_PARAMS``)."""
    return create_app(os.environ.get("MEDLOOP_PARAMS", "params.yaml"))
