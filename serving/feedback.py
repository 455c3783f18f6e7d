"""Clinicians' labels: ``POST /feedback`` and the adjudication queue, ``GET /review`` and
``POST /review/{id}`` (reviewer role).

``POST /feedback`` takes ``{prediction_id, label, idempotency_key, comment?}``; the reviewer is
the caller, and the idempotency key is the caller's own: a post that repeats the caller's earlier
one with the same key exactly (every field) is a replay (200, nothing stored); the same key with
any field changed is 409, naming the caller's own feedback.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, HTTPException
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse

from pipelines.config import Params
from serving.auth import Caller
from serving.guards import excerpt
from serving.schemas import MAX_ROW_ID, FeedbackIn, ResolveIn
from serving.service import Service, caller, service_of

router = APIRouter()


@router.post("/feedback", status_code=201, responses={200: {"description": "seen before: nothing stored"}})
async def feedback(item: FeedbackIn, who: Caller = Depends(caller("feedback")),
                   service: Service = Depends(service_of)):
    from pipelines.store.feedback import Conflict, NotFound

    _check_label(item.label, service.params)
    posts = service.figures.feedback_posts
    try:
        result = await asyncio.to_thread(service.store.add_feedback, item.prediction_id, item.label, who.name,
                                         item.idempotency_key, item.comment)
    except NotFound as exc:
        posts.labels("not_found").inc()
        raise HTTPException(404, str(exc)) from None
    except Conflict as exc:
        posts.labels("conflict").inc()
        raise HTTPException(409, str(exc)) from None
    posts.labels("stored" if result.created else "replayed").inc()
    body = {"feedback_id": result.feedback_id, "created": result.created, "reviewer": who.name,
            "adjudication_id": result.adjudication_id}
    return JSONResponse(body, status_code=201 if result.created else 200)


@router.get("/review")
async def review(_who: Caller = Depends(caller("review")), service: Service = Depends(service_of)) -> dict:
    return {"open": await asyncio.to_thread(service.store.open_reviews)}


@router.post("/review/{adjudication_id}")
async def resolve(item: ResolveIn, adjudication_id: int = PathParam(ge=1, le=MAX_ROW_ID),
                  who: Caller = Depends(caller("review")), service: Service = Depends(service_of)) -> dict:
    from pipelines.store.feedback import Conflict, NotFound

    _check_label(item.label, service.params)
    try:
        return await asyncio.to_thread(service.store.resolve, adjudication_id, item.label, who.name, item.reason)
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except Conflict as exc:
        raise HTTPException(409, str(exc)) from None


def _check_label(label: str, params: Params) -> None:
    if label not in params.model.classes:
        raise HTTPException(422, f"label {excerpt(label)} is not one of {params.model.classes}")
