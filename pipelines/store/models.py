"""Tables of the feedback store: predictions, feedback, adjudications and their resolutions,
deployments, shadow answers and the access log (who viewed which case). Rows are only ever added: a correction is a new feedback row, a
resolution is a new row beside its adjudication, and nothing is updated or deleted. The database
holds to that itself: migration 0003 puts triggers on every one of these tables that refuse
UPDATE and DELETE (and TRUNCATE on PostgreSQL), and migration 0004 on the access log."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from pipelines.values import utc_now


class Base(DeclarativeBase):
    pass


class Prediction(Base):
    """One answer of the service: which model version said what about which input."""

    __tablename__ = "predictions"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now, index=True)
    model_name: Mapped[str] = mapped_column(String(200), index=True)
    model_version: Mapped[str] = mapped_column(String(50))
    input_sha256: Mapped[str] = mapped_column(String(64), index=True)  # keyed hash of the de-identified input
    modality: Mapped[str] = mapped_column(String(20))
    input_metadata: Mapped[dict] = mapped_column(JSON, default=dict)  # de-identified only
    probabilities: Mapped[dict] = mapped_column(JSON)
    decision: Mapped[str] = mapped_column(String(100))
    operating_threshold: Mapped[float] = mapped_column(Float)
    requested_by: Mapped[str] = mapped_column(String(200))


class Feedback(Base):
    """A clinician's confirmed label for a prediction. Append-only: a correction is a new row.

    An idempotency key belongs to its author (``reviewer_id``, the token's holder): two reviewers
    may use the same key for different feedback.
    """

    __tablename__ = "feedback"
    __table_args__ = (UniqueConstraint("reviewer_id", "idempotency_key", name="uq_feedback_reviewer_idempotency_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now, index=True)
    prediction_id: Mapped[str] = mapped_column(ForeignKey("predictions.id"), index=True)
    label: Mapped[str] = mapped_column(String(100))
    reviewer_id: Mapped[str] = mapped_column(String(200), index=True)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    idempotency_key: Mapped[str] = mapped_column(String(200))


class Adjudication(Base):
    """Reviewers disagree on a prediction's label: the case waits in the queue until a reviewer
    with the reviewer role resolves it (an `AdjudicationResolution` row), and only then enters
    training. The row itself never changes: ``labels_in_conflict`` are the labels when the case
    was opened (the queue shows the reviewers' current labels)."""

    __tablename__ = "adjudications"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    prediction_id: Mapped[str] = mapped_column(ForeignKey("predictions.id"), unique=True)
    labels_in_conflict: Mapped[list] = mapped_column(JSON)


class AdjudicationResolution(Base):
    """How a case was settled: at most one per adjudication (a second resolution is refused)."""

    __tablename__ = "adjudication_resolutions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    adjudication_id: Mapped[int] = mapped_column(ForeignKey("adjudications.id"), unique=True)
    resolved_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    resolved_label: Mapped[str] = mapped_column(String(100))
    resolved_by: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)


class Deployment(Base):
    """What was served when: one row per version put in service."""

    __tablename__ = "deployments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now, index=True)
    model_name: Mapped[str] = mapped_column(String(200), index=True)
    model_version: Mapped[str] = mapped_column(String(50))
    actor: Mapped[str] = mapped_column(String(200))
    flow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)


class ShadowPrediction(Base):
    """A shadow candidate's answer for a prediction the champion served: logged, never returned,
    so that the candidate can be judged on live, clinician-confirmed cases before it is promoted.

    ``candidate`` is the reference as configured (``serving.shadow``: ``"7"`` or
    ``"run:<id>"``); ``model_version`` is set for a registered version, ``run_id`` for both when
    known.
    """

    __tablename__ = "shadow_predictions"
    __table_args__ = (UniqueConstraint("prediction_id", "candidate", name="uq_shadow_prediction_candidate"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now, index=True)
    prediction_id: Mapped[str] = mapped_column(ForeignKey("predictions.id"), index=True)
    candidate: Mapped[str] = mapped_column(String(100), index=True)
    model_name: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[str | None] = mapped_column(String(50), nullable=True)
    run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    probabilities: Mapped[dict] = mapped_column(JSON)
    decision: Mapped[str] = mapped_column(String(100))
    operating_threshold: Mapped[float] = mapped_column(Float)


class CaseView(Base):
    """One view of a case on the clinicians' pages (who, which prediction, when, which page): the
    audit control a system holding health data needs. Append-only (migration 0004)."""

    __tablename__ = "access_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    viewed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now, index=True)
    prediction_id: Mapped[str] = mapped_column(ForeignKey("predictions.id"), index=True)
    viewer: Mapped[str] = mapped_column(String(200), index=True)
    role: Mapped[str] = mapped_column(String(20))
    page: Mapped[str] = mapped_column(String(50))
