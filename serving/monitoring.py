"""``GET /monitoring`` (reviewer role): live sensitivity, specificity and agreement per served
version from confirmed labels, and beside each version the shadow candidate's figures on the
same cases; ``drift``: the served version's input and prediction drift against its training
reference (`pipelines.monitoring.drift`)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends

from pipelines.config import Params
from serving.auth import Caller
from serving.model import Served
from serving.service import Service, caller, service_of

router = APIRouter()


@router.get("/monitoring")
async def monitoring(_who: Caller = Depends(caller("review")), service: Service = Depends(service_of)) -> dict:
    """Live performance per served version, from clinicians' confirmed labels, and beside each
    version every shadow candidate's figures on the same cases (``shadow``)."""
    params, store = service.params, service.store
    name, positive = params.model.name, params.model.positive_class
    report = await asyncio.to_thread(store.live_performance, name, positive)
    shadows = await asyncio.to_thread(store.shadow_performance, name, positive)
    for version in report:
        version["shadow"] = [entry for entry in shadows if entry["served_version"] == version["version"]]
    drift = await asyncio.to_thread(served_drift, service.manager.current, params, service.store_url)
    return {"model": name, "positive_class": positive, "versions": report, "shadow": service.shadow_status(),
            "drift": drift.as_dict() if drift else None}


def served_drift(served: Served | None, params: Params, store_url: str) -> Any:
    """The served version's input and prediction drift against the reference it carries
    (a `pipelines.monitoring.drift` report; the API and the monitoring page show the same one);
    None when nothing is served or the version carries no reference."""
    from pipelines.monitoring import drift

    reference = getattr(served.model.unwrap_python_model(), "drift_reference", None) if served else None
    if not reference:
        return None
    return drift.report_from_store(params, reference, store_url, served.version)
