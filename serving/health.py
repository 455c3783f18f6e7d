"""``GET /healthz`` (the process answers), ``GET /readyz`` (a model is loaded; also the shadow
candidate, loaded or its load error) and ``GET /metrics`` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse

from pipelines.errors import mask_credentials
from serving.service import Service, service_of

router = APIRouter()


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "no model loaded (yet): why"}})
def readyz(service: Service = Depends(service_of)):
    manager = service.manager
    served = manager.current
    error = mask_credentials(manager.last_error) if manager.last_error else None
    if served is None:
        return JSONResponse({"ready": False, "error": error, "shadow": service.shadow_status()}, status_code=503)
    return {"ready": True, "model": served.name, "version": served.version, "loaded_at": served.loaded_at,
            "last_reload_error": error, "shadow": service.shadow_status()}


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(service: Service = Depends(service_of)) -> PlainTextResponse:
    from prometheus_client import generate_latest

    served = service.manager.current
    if served is not None:
        service.figures.served_version.labels(served.name).set(float(served.version))
    return PlainTextResponse(generate_latest(service.figures.registry).decode(),
                             media_type="text/plain; version=0.0.4")
