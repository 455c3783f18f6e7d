"""The feedback store's operations: record predictions (and a shadow candidate's answers for
them), take clinicians' feedback (idempotent, append-only), queue conflicting labels for
adjudication, resolve them, list the labels that may enter training, and report live
performance from those labels. Nothing here updates or deletes a row (the database refuses it):
the state of a case is read from the rows added so far.

A prediction's confirmed label is:

- the adjudicated label, once its adjudication is resolved;
- otherwise the label every reviewer's latest feedback agrees on, when there is no open
  adjudication;
- nothing while reviewers disagree: the case waits in the adjudication queue.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Callable

from sqlalchemy import exists, select
from sqlalchemy.exc import IntegrityError

from pipelines.errors import MedloopError
from pipelines.store.db import engine_for, retried, sessions, upgrade
from pipelines.store.models import (Adjudication, AdjudicationResolution, CaseView, Deployment, Feedback,
                                    Prediction, ShadowPrediction)


class NotFound(MedloopError):
    """The prediction or adjudication named does not exist."""


class Conflict(MedloopError):
    """The request contradicts what is stored (a reviewer's idempotency key reused for different
    feedback, an adjudication resolved twice)."""


@dataclass(frozen=True)
class FeedbackResult:
    """What a feedback post did.

    Attributes:
        feedback_id: the stored row (the earlier one when the post replays an earlier one).
        created: False when the post replayed an earlier one and nothing was stored.
        adjudication_id: the open adjudication of the prediction, when reviewers now disagree.
    """

    feedback_id: int
    created: bool
    adjudication_id: int | None


RETRY_SECONDS = 5.0  # the default of serving.store_retry_seconds


class FeedbackStore:
    """The store at ``url`` (SQLite file or PostgreSQL), migrated to the newest schema on open.

    Storing a prediction and taking feedback outlive a database restart: while the database does
    not answer they are tried again for up to ``retry_seconds`` (`pipelines.store.db.retried`),
    then `pipelines.store.db.StoreUnavailable` is raised. Both are safe to repeat: feedback by
    its idempotency key, a prediction by its id, chosen before the first try.
    """

    def __init__(self, url: str, *, retry_seconds: float = RETRY_SECONDS, on_retry: Callable[[], None] | None = None,
                 **engine_options: Any):
        self.url = url
        self.retry_seconds = retry_seconds
        self.on_retry = on_retry
        self.engine = engine_for(url, **engine_options)
        self.revision = upgrade(self.engine)
        self.session = sessions(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # ---------------------------------------------------------------------------------------
    # predictions and deployments
    # ---------------------------------------------------------------------------------------

    def record_prediction(self, *, model_name: str, model_version: str, input_sha256: str, modality: str,
                          probabilities: dict[str, float], decision: str, operating_threshold: float,
                          requested_by: str, input_metadata: dict | None = None,
                          prediction_id: str | None = None) -> str:
        """Store one prediction; its id (a new UUID unless given).

        Raises:
            StoreUnavailable: the database did not answer for ``retry_seconds``.
        """
        prediction_id = prediction_id or str(uuid.uuid4())

        def store(attempt: int) -> str:
            with self.session.begin() as session:
                if attempt and session.get(Prediction, prediction_id) is not None:
                    return prediction_id  # the earlier try committed before its connection dropped
                session.add(Prediction(
                    id=prediction_id, model_name=model_name, model_version=str(model_version),
                    input_sha256=input_sha256, modality=modality, input_metadata=input_metadata or {},
                    probabilities=probabilities, decision=decision, operating_threshold=operating_threshold,
                    requested_by=requested_by,
                ))
            return prediction_id

        return self._retried(store, "storing a prediction")

    def record_shadow_predictions(self, *, candidate: str, model_name: str, model_version: str | None,
                                  run_id: str | None, operating_threshold: float,
                                  answers: list[dict[str, Any]]) -> int:
        """Store a shadow candidate's answers for predictions the champion served.

        Args:
            candidate: the candidate as configured (``serving.shadow``: ``"7"`` or ``"run:<id>"``).
            model_name: the registered model's name.
            model_version: the candidate's registered version (None for a run).
            run_id: the MLflow run that trained the candidate, when known.
            operating_threshold: the candidate's own decision threshold.
            answers: ``{"prediction_id", "probabilities", "decision"}`` each.

        Returns:
            How many answers were stored; one already stored for the same prediction and
            candidate is skipped, so storing twice changes nothing.
        """
        ids = [answer["prediction_id"] for answer in answers]
        with self.session.begin() as session:
            seen = set(session.scalars(select(ShadowPrediction.prediction_id).where(
                ShadowPrediction.candidate == candidate, ShadowPrediction.prediction_id.in_(ids))).all())
            fresh = [answer for answer in answers if answer["prediction_id"] not in seen]
            session.add_all(ShadowPrediction(
                prediction_id=answer["prediction_id"], candidate=candidate, model_name=model_name,
                model_version=None if model_version is None else str(model_version), run_id=run_id,
                probabilities=answer["probabilities"], decision=answer["decision"],
                operating_threshold=operating_threshold,
            ) for answer in fresh)
        return len(fresh)

    def shadow_predictions(self, prediction_id: str) -> list[dict[str, Any]]:
        """The shadow answers stored for a prediction, oldest first."""
        with self.session() as session:
            rows = session.scalars(select(ShadowPrediction).where(ShadowPrediction.prediction_id == prediction_id)
                                   .order_by(ShadowPrediction.id)).all()
            return [{"id": row.id, "created_at": row.created_at.isoformat(), "prediction_id": row.prediction_id,
                     "candidate": row.candidate, "model_name": row.model_name, "model_version": row.model_version,
                     "run_id": row.run_id, "probabilities": row.probabilities, "decision": row.decision,
                     "operating_threshold": row.operating_threshold} for row in rows]

    def record_deployment(self, model_name: str, model_version: str, actor: str, flow_run_id: str | None = None) -> int:
        with self.session.begin() as session:
            row = Deployment(model_name=model_name, model_version=str(model_version), actor=actor,
                             flow_run_id=flow_run_id)
            session.add(row)
            session.flush()
            return row.id

    def prediction(self, prediction_id: str) -> dict[str, Any]:
        """One stored prediction as plain data.

        Raises:
            NotFound: no such prediction.
        """
        with self.session() as session:
            row = session.get(Prediction, prediction_id)
            if row is None:
                raise NotFound(f"no prediction {prediction_id!r}")
            return {"id": row.id, "created_at": row.created_at.isoformat(), "model_name": row.model_name,
                    "model_version": row.model_version, "input_sha256": row.input_sha256, "modality": row.modality,
                    "input_metadata": row.input_metadata, "probabilities": row.probabilities,
                    "decision": row.decision, "operating_threshold": row.operating_threshold,
                    "requested_by": row.requested_by}

    def deployments(self, model_name: str) -> list[dict[str, Any]]:
        """What was served when, oldest first."""
        with self.session() as session:
            rows = session.scalars(select(Deployment).where(Deployment.model_name == model_name)
                                   .order_by(Deployment.id)).all()
            return [{"version": row.model_version, "at": row.at.isoformat(), "actor": row.actor,
                     "flow_run_id": row.flow_run_id} for row in rows]

    # ---------------------------------------------------------------------------------------
    # feedback and adjudication
    # ---------------------------------------------------------------------------------------

    def add_feedback(self, prediction_id: str, label: str, reviewer_id: str, idempotency_key: str,
                     comment: str | None = None) -> FeedbackResult:
        """Append a reviewer's label for a prediction (a correction is simply a later row).

        An idempotency key is the reviewer's own: another reviewer's identical key is a different
        key. A post that repeats an earlier one of the same reviewer with the same key, exactly
        (prediction, label and comment), is a replay: nothing is stored and the earlier row is
        returned. The same key with any field changed is refused, naming only the reviewer's own
        earlier row.

        A post whose connection dropped is tried again with the same key while the database
        does not answer (for up to ``retry_seconds``): if the first try had committed, the next
        one finds its row and answers as a replay, so the feedback is stored once.

        Raises:
            NotFound: no such prediction.
            Conflict: the reviewer used the idempotency key for different feedback.
            StoreUnavailable: the database did not answer for ``retry_seconds``.
        """

        def add(_attempt: int) -> FeedbackResult:
            for _race in range(2):
                try:
                    return self._add_feedback(prediction_id, label, reviewer_id, idempotency_key, comment)
                except IntegrityError:
                    # Another writer stored the same key between our check and our insert.
                    continue
            return self._add_feedback(prediction_id, label, reviewer_id, idempotency_key, comment)

        return self._retried(add, "storing feedback")

    def _retried(self, operation: Callable[[int], Any], what: str) -> Any:
        return retried(operation, seconds=self.retry_seconds, what=what, url=self.url, on_retry=self.on_retry)

    def _add_feedback(self, prediction_id: str, label: str, reviewer_id: str, idempotency_key: str,
                      comment: str | None) -> FeedbackResult:
        with self.session.begin() as session:
            seen = session.scalars(select(Feedback).where(Feedback.reviewer_id == reviewer_id,
                                                          Feedback.idempotency_key == idempotency_key)).first()
            if seen is not None:
                changed = [name for name, stored, sent in (("prediction_id", seen.prediction_id, prediction_id),
                                                           ("label", seen.label, label),
                                                           ("comment", seen.comment, comment)) if stored != sent]
                if changed:
                    raise Conflict(
                        f"idempotency key {idempotency_key!r} was already used for your feedback {seen.id}, "
                        f"with a different {' and '.join(changed)}: a replay must repeat the prediction_id, "
                        f"label and comment exactly. Send new feedback (a correction too) with a new key.")
                return FeedbackResult(seen.id, False, self._open_adjudication(session, prediction_id))
            # Lock the prediction row (PostgreSQL) so that two reviewers' labels are judged
            # for conflict one after the other; SQLite's BEGIN IMMEDIATE already serialises.
            prediction = session.scalars(
                select(Prediction).where(Prediction.id == prediction_id).with_for_update()).first()
            if prediction is None:
                raise NotFound(f"no prediction {prediction_id!r}")
            row = Feedback(prediction_id=prediction_id, label=label, reviewer_id=reviewer_id, comment=comment,
                           idempotency_key=idempotency_key)
            session.add(row)
            session.flush()
            latest = self._latest_labels(session, prediction_id)
            adjudication = session.scalars(select(Adjudication).where(Adjudication.prediction_id == prediction_id)).first()
            if len(set(latest.values())) > 1 and adjudication is None:
                adjudication = Adjudication(prediction_id=prediction_id, labels_in_conflict=sorted(set(latest.values())))
                session.add(adjudication)
                session.flush()
                return FeedbackResult(row.id, True, adjudication.id)
            return FeedbackResult(row.id, True, self._open_adjudication(session, prediction_id))

    def open_reviews(self) -> list[dict[str, Any]]:
        """The adjudication queue, oldest first, with every feedback row of each case."""
        with self.session() as session:
            queue = session.scalars(select(Adjudication).where(~_resolved(Adjudication.id))
                                    .order_by(Adjudication.id)).all()
            return [{
                "id": case.id, "prediction_id": case.prediction_id, "created_at": case.created_at.isoformat(),
                "labels_in_conflict": sorted(set(self._latest_labels(session, case.prediction_id).values())),
                "feedback": [_feedback_dict(row) for row in self._feedback_of(session, case.prediction_id)],
            } for case in queue]

    def resolve(self, adjudication_id: int, label: str, reviewer_id: str, reason: str | None = None) -> dict[str, Any]:
        """Settle a case (a resolution row beside it); from now on ``label`` is the prediction's
        confirmed label.

        Raises:
            NotFound: no such adjudication.
            Conflict: it was already resolved.
        """
        with self.session.begin() as session:
            # Locked (PostgreSQL) so that two reviewers resolving at once are judged one after the
            # other; the unique adjudication_id of a resolution stands behind it.
            case = session.scalars(select(Adjudication).where(Adjudication.id == adjudication_id).with_for_update()).first()
            if case is None:
                raise NotFound(f"no adjudication {adjudication_id}")
            earlier = self._resolution(session, adjudication_id)
            if earlier is not None:
                raise Conflict(f"adjudication {adjudication_id} was already resolved as {earlier.resolved_label!r} "
                               f"by {earlier.resolved_by}")
            session.add(AdjudicationResolution(adjudication_id=adjudication_id, resolved_label=label,
                                               resolved_by=reviewer_id, reason=reason))
            return {"id": case.id, "prediction_id": case.prediction_id, "resolved_label": label,
                    "resolved_by": reviewer_id}

    def confirmed_labels(self, after_feedback_id: int = 0) -> list[dict[str, Any]]:
        """Predictions whose label is confirmed, for training: one row each, with provenance.

        Args:
            after_feedback_id: only predictions with feedback newer than this row (an export
                keeps the highest id it exported).

        Returns:
            ``prediction_id``, ``input_sha256``, ``model_version``, ``label``, ``how``
            (``agreed`` or ``adjudicated``), ``reviewers``, ``last_feedback_id``.
        """
        # A few set-wise queries, not a handful per prediction: the monitoring report reads
        # every confirmed label on each request (10,000 labelled predictions took 15 s).
        touched = select(Feedback.prediction_id).where(Feedback.id > after_feedback_id).distinct()
        with self.session() as session:
            rows = session.execute(select(Feedback.id, Feedback.prediction_id, Feedback.reviewer_id, Feedback.label)
                                   .where(Feedback.prediction_id.in_(touched)).order_by(Feedback.id)).all()
            predictions = {row.id: row for row in session.execute(
                select(Prediction.id, Prediction.input_sha256, Prediction.model_version)
                .where(Prediction.id.in_(touched))).all()}
            cases = dict(session.execute(
                select(Adjudication.prediction_id, AdjudicationResolution.resolved_label)
                .outerjoin(AdjudicationResolution, AdjudicationResolution.adjudication_id == Adjudication.id)
                .where(Adjudication.prediction_id.in_(touched))).all())
        latest: dict[str, dict[str, str]] = {}
        last_id: dict[str, int] = {}
        for row in rows:  # in id order: a reviewer's later label replaces their earlier one
            latest.setdefault(row.prediction_id, {})[row.reviewer_id] = row.label
            last_id[row.prediction_id] = row.id
        confirmed = []
        for prediction_id in sorted(latest):
            settled = confirmation(latest[prediction_id], prediction_id in cases, cases.get(prediction_id))
            if settled is None:
                continue  # still in conflict: it waits for adjudication
            prediction = predictions[prediction_id]
            confirmed.append({
                "prediction_id": prediction_id, "input_sha256": prediction.input_sha256,
                "model_version": prediction.model_version, "label": settled[0], "how": settled[1],
                "reviewers": sorted(latest[prediction_id]), "last_feedback_id": last_id[prediction_id],
            })
        return confirmed

    def live_performance(self, model_name: str, positive_class: str) -> list[dict[str, Any]]:
        """Per served version, from clinicians' confirmed labels: how many predictions, how many
        confirmed, agreement of the decision with the clinicians, and sensitivity and
        specificity for ``positive_class`` (None when there are no cases to compute them on);
        also the share of positive decisions over all predictions (prediction drift shows here).
        """
        confirmed = {case["prediction_id"]: case["label"] for case in self.confirmed_labels()}
        with self.session() as session:
            rows = session.execute(select(Prediction.id, Prediction.model_version, Prediction.decision)
                                   .where(Prediction.model_name == model_name)).all()
        versions: dict[str, list[tuple[str, str | None]]] = {}
        for prediction_id, version, decision in rows:
            versions.setdefault(version, []).append((decision, confirmed.get(prediction_id)))
        return [{"version": version, **_figures(versions[version], positive_class)}
                for version in sorted(versions, key=_version_order)]

    def shadow_performance(self, model_name: str, positive_class: str) -> list[dict[str, Any]]:
        """Each shadow candidate beside the served version, on the same cases: for every pair of
        served version and candidate, the predictions the candidate also scored, how often the
        two decisions differ, and the figures of `live_performance` for the served decisions and
        for the candidate's decisions on exactly those cases (so a candidate is judged on live,
        confirmed cases before anyone promotes it).

        Returns:
            One entry per (``served_version``, ``candidate``): ``candidate_version``,
            ``run_id``, ``operating_threshold`` (the candidate's, latest), ``scored``,
            ``confirmed``, ``decisions_differ``, ``served`` and ``shadow`` (each: predictions,
            confirmed, agreement, sensitivity, specificity, positive_rate, confusion).
        """
        confirmed = {case["prediction_id"]: case["label"] for case in self.confirmed_labels()}
        with self.session() as session:
            rows = session.execute(
                select(Prediction.id, Prediction.model_version, Prediction.decision, ShadowPrediction.candidate,
                       ShadowPrediction.model_version, ShadowPrediction.run_id, ShadowPrediction.decision,
                       ShadowPrediction.operating_threshold)
                .join(ShadowPrediction, ShadowPrediction.prediction_id == Prediction.id)
                .where(Prediction.model_name == model_name)
                .order_by(ShadowPrediction.id)).all()
        pairs: dict[tuple[str, str], dict[str, Any]] = {}
        for prediction_id, served_version, served, candidate, version, run_id, shadow, threshold in rows:
            entry = pairs.setdefault((served_version, candidate), {"served": [], "shadow": []})
            entry.update(candidate_version=version, run_id=run_id, operating_threshold=threshold)
            truth = confirmed.get(prediction_id)
            entry["served"].append((served, truth))
            entry["shadow"].append((shadow, truth))
        report = []
        for served_version, candidate in sorted(pairs, key=lambda key: (_version_order(key[0]), key[1])):
            entry = pairs[(served_version, candidate)]
            served = _figures(entry["served"], positive_class)
            report.append({
                "served_version": served_version, "candidate": candidate,
                "candidate_version": entry["candidate_version"], "run_id": entry["run_id"],
                "operating_threshold": entry["operating_threshold"],
                "scored": served["predictions"], "confirmed": served["confirmed"],
                "decisions_differ": sum(a != b for (a, _), (b, _) in zip(entry["served"], entry["shadow"])),
                "served": served, "shadow": _figures(entry["shadow"], positive_class),
            })
        return report

    # ---------------------------------------------------------------------------------------
    # the clinicians' pages: worklist, a case's history, the access log
    # ---------------------------------------------------------------------------------------

    def worklist(self, reviewer_id: str, model_name: str, positive_class: str, *, model_version: str | None = None,
                 decision: str | None = None, since: str | None = None, order: str = "newest",
                 limit: int = 50) -> tuple[list[dict[str, Any]], int]:
        """The predictions awaiting ``reviewer_id``'s label (none of their feedback yet).
        ``feedback.reviewer_id`` and ``feedback.prediction_id`` are indexed, so the "not yet
        labelled by me" test is an index probe per prediction.

        Args:
            reviewer_id: the clinician.
            model_name: the registered model served.
            positive_class: the class the operating threshold applies to.
            model_version, decision: only predictions of this version, with this decision.
            since: only predictions made on or after this date (``YYYY-MM-DD``, UTC).
            order: ``newest`` first, or ``uncertain``: the probability of the positive class
                closest to the operating threshold first (the cases nearest to the other decision).
            limit: at most this many rows.

        Returns:
            (the rows: ``id``, ``created_at``, ``model_version``, ``decision``, ``probability``
            of the decided class, ``margin``: the positive class's probability's distance to the
            threshold; how many await in all).
        """
        from datetime import datetime, timezone

        query = (select(Prediction.id, Prediction.created_at, Prediction.model_version, Prediction.decision,
                        Prediction.probabilities, Prediction.operating_threshold)
                 .where(Prediction.model_name == model_name,
                        ~exists().where(Feedback.prediction_id == Prediction.id,
                                        Feedback.reviewer_id == reviewer_id)))
        if model_version:
            query = query.where(Prediction.model_version == str(model_version))
        if decision:
            query = query.where(Prediction.decision == decision)
        if since:
            query = query.where(Prediction.created_at >= datetime.fromisoformat(since).replace(tzinfo=timezone.utc))
        from sqlalchemy import func

        newest = (Prediction.created_at.desc(), Prediction.id)
        if order == "uncertain":  # ordered and limited by the database (JSON_EXTRACT, ->>)
            margin = func.abs(Prediction.probabilities[positive_class].as_float() - Prediction.operating_threshold)
            ordered = query.order_by(margin, *newest)
        else:
            ordered = query.order_by(*newest)
        with self.session() as session:
            awaiting = int(session.scalar(select(func.count()).select_from(query.subquery())))
            rows = session.execute(ordered.limit(limit)).all()
        return [{"id": row.id, "created_at": row.created_at.isoformat(timespec="seconds"),
                 "model_version": row.model_version, "decision": row.decision,
                 "probability": row.probabilities.get(row.decision),
                 "margin": abs(float(row.probabilities.get(positive_class, 0.0)) - row.operating_threshold)}
                for row in rows], awaiting

    def case_history(self, prediction_id: str) -> dict[str, Any]:
        """Who said what about a prediction, and when: every feedback row (oldest first), its
        adjudication and resolution when there is one, and its confirmed label (None while
        there is none; see the module docstring)."""
        with self.session() as session:
            rows = [_feedback_dict(row) for row in self._feedback_of(session, prediction_id)]
            latest = self._latest_labels(session, prediction_id)
            case = session.scalars(select(Adjudication).where(Adjudication.prediction_id == prediction_id)).first()
            resolution = None if case is None else self._resolution(session, case.id)
        adjudication = None if case is None else {
            "id": case.id, "created_at": case.created_at.isoformat(), "labels_in_conflict": case.labels_in_conflict,
            "resolution": None if resolution is None else {
                "label": resolution.resolved_label, "by": resolution.resolved_by, "reason": resolution.reason,
                "at": resolution.resolved_at.isoformat()}}
        settled = confirmation(latest, case is not None, resolution.resolved_label if resolution else None)
        return {"feedback": rows, "adjudication": adjudication, "confirmed_label": settled[0] if settled else None}

    def record_view(self, prediction_id: str, viewer: str, role: str, page: str) -> int:
        """Append one view of a case to the access log; its row id.

        Raises:
            NotFound: no such prediction.
        """
        with self.session.begin() as session:
            if session.get(Prediction, prediction_id) is None:
                raise NotFound(f"no prediction {prediction_id!r}")
            row = CaseView(prediction_id=prediction_id, viewer=viewer, role=role, page=page)
            session.add(row)
            session.flush()
            return row.id

    def access_log(self, *, prediction_id: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        """The newest views of cases first (of one prediction, when given)."""
        query = select(CaseView).order_by(CaseView.id.desc()).limit(limit)
        if prediction_id is not None:
            query = query.where(CaseView.prediction_id == prediction_id)
        with self.session() as session:
            return [{"id": row.id, "viewed_at": row.viewed_at.isoformat(timespec="seconds"),
                     "prediction_id": row.prediction_id, "viewer": row.viewer, "role": row.role, "page": row.page}
                    for row in session.scalars(query).all()]

    def feedback_count(self) -> int:
        from sqlalchemy import func

        with self.session() as session:
            return int(session.scalar(select(func.count()).select_from(Feedback)))

    # ---------------------------------------------------------------------------------------

    @staticmethod
    def _feedback_of(session: Any, prediction_id: str) -> list[Feedback]:
        return list(session.scalars(select(Feedback).where(Feedback.prediction_id == prediction_id)
                                    .order_by(Feedback.id)).all())

    def _latest_labels(self, session: Any, prediction_id: str) -> dict[str, str]:
        """Each reviewer's most recent label (a correction replaces that reviewer's earlier one)."""
        latest: dict[str, str] = {}
        for row in self._feedback_of(session, prediction_id):
            latest[row.reviewer_id] = row.label
        return latest

    @staticmethod
    def _open_adjudication(session: Any, prediction_id: str) -> int | None:
        return session.scalars(select(Adjudication.id).where(Adjudication.prediction_id == prediction_id,
                                                             ~_resolved(Adjudication.id))).first()

    @staticmethod
    def _resolution(session: Any, adjudication_id: int) -> AdjudicationResolution | None:
        return session.scalars(select(AdjudicationResolution)
                               .where(AdjudicationResolution.adjudication_id == adjudication_id)).first()


def confirmation(latest: dict[str, str], adjudicated: bool, resolved_label: str | None) -> tuple[str, str] | None:
    """A prediction's confirmed label and how it was reached (``agreed`` or ``adjudicated``), or
    None while there is none (see the module docstring).

    Args:
        latest: each reviewer's latest label.
        adjudicated: the prediction has an adjudication (open or resolved).
        resolved_label: its resolution's label, once resolved.
    """
    if resolved_label is not None:
        return resolved_label, "adjudicated"
    if not adjudicated and len(set(latest.values())) == 1:
        return next(iter(latest.values())), "agreed"
    return None


def _resolved(adjudication_id: Any) -> Any:
    """SQL: the adjudication has a resolution."""
    return exists().where(AdjudicationResolution.adjudication_id == adjudication_id)


def _feedback_dict(row: Feedback) -> dict[str, Any]:
    return {"id": row.id, "label": row.label, "reviewer_id": row.reviewer_id, "comment": row.comment,
            "created_at": row.created_at.isoformat()}


def _version_order(version: str) -> tuple[int, str]:
    return len(version), version  # "2" before "10"


def _figures(cases: list[tuple[str, str | None]], positive_class: str) -> dict[str, Any]:
    """Live figures of (decision, confirmed label or None) pairs: ``predictions``,
    ``confirmed``, ``agreement``, ``sensitivity``, ``specificity`` (None when there are no cases
    to compute them on), ``positive_rate`` (over all predictions) and ``confusion``."""
    from pipelines.model.metrics import operating_point

    judged = [(decision, truth) for decision, truth in cases if truth is not None]
    point = operating_point([truth == positive_class for _, truth in judged],
                            [decision == positive_class for decision, _ in judged])
    positive_decisions = sum(decision == positive_class for decision, _ in cases)
    return {
        "predictions": len(cases), "confirmed": len(judged),
        # Agreement is over every class (the decision is the confirmed label), not only positive/negative.
        "agreement": sum(decision == truth for decision, truth in judged) / len(judged) if judged else None,
        "sensitivity": point["sensitivity"],
        "specificity": point["specificity"],
        "positive_rate": positive_decisions / len(cases) if cases else None,
        "confusion": point["confusion"],
    }
