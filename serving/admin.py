"""``POST /admin/reload``: check for a new champion now (admin role)."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Depends

from serving.auth import Caller
from serving.service import Service, caller, service_of

log = logging.getLogger("medloop.serving")

router = APIRouter()


@router.post("/admin/reload")
async def reload(who: Caller = Depends(caller("admin")), service: Service = Depends(service_of)) -> dict:
    manager = service.manager
    changed = await asyncio.to_thread(manager.refresh)
    served = manager.current
    log.info("reload asked by %s: %s", who.name, "new version" if changed else "unchanged")
    return {"reloaded": changed, "version": served.version if served else None, "error": manager.last_error}
