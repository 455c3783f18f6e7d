"""The service's JSON bodies as pydantic models: what a clinician or reviewer posts, and the one
shape of every refusal. A field a body does not declare is refused (422): it may identify.

``POST /predict`` takes either a raw image or JSON whose schema comes from params (each feature's
declared type and range, at most ``serving.max_batch`` inputs); `serving.predict` checks it and
documents it in the OpenAPI document.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MAX_ROW_ID = 2**63 - 1  # the largest id a database integer column holds


class FeedbackIn(BaseModel):
    """A clinician's label for a prediction (a field it does not declare is refused: it may identify)."""

    model_config = ConfigDict(extra="forbid")

    prediction_id: str = Field(min_length=1, max_length=36)
    label: str = Field(min_length=1, max_length=100)
    idempotency_key: str = Field(min_length=1, max_length=200)
    comment: str | None = Field(default=None, max_length=5000)


class ResolveIn(BaseModel):
    """A reviewer's decision on an adjudication case (undeclared fields are refused)."""

    model_config = ConfigDict(extra="forbid")

    label: str = Field(min_length=1, max_length=100)
    reason: str | None = Field(default=None, max_length=5000)


class Problem(BaseModel):
    """Every refusal: one paragraph saying what is wrong, where, and what to do."""

    detail: str


PROBLEMS = {status: {"model": Problem, "description": description} for status, description in {
    401: "no token or an unknown token", 403: "the role may not do this", 404: "no such prediction or case",
    409: "conflicts with what is stored", 413: "request body or batch too large", 415: "content type not accepted",
    422: "input refused: what is wrong and where",
    503: "the feedback store is not answering (a restart): send the request again after Retry-After seconds"}.items()}
