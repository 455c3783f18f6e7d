"""Promote (a task, not a DVC stage: it changes the model registry): bless a model or refuse it.

The candidate is the run named by ``models/train.json``, judged on ``reports/metrics.json``
(the frozen test set) by `pipelines.registry.gates.evaluate_gates`, against the clinical floors and the
current champion.

- Passed: the run's logged model is registered as a new version of ``model.name``; the decision,
  every gate's verdict, the operating threshold, a metrics summary, the full metrics.json and
  the run's lineage are copied onto the version as tags; alias ``champion`` moves to it and
  ``previous-champion`` to the former champion (which keeps its version number).
- Refused: the registry is not touched at all. The run gets tags
  ``medloop.promotion.decision=refused`` and ``medloop.promotion.reasons`` (every failed gate);
  the full decision is logged with the run as ``promotion/decision.json``.

A human may `override` a refusal (registering and promoting the refused run, recording who and
why) and may `rollback` to the previous champion. Every action is appended to the promotion
history, a JSON list kept as tags of the registered model (see `history`).

Champions are compared on the candidate's frozen test set: the metrics recorded on the champion's
version are used when they were measured on the same set, with the champion's per-case results
from the metrics.json logged with its run (sensitivity and specificity are judged on the paired
difference, case by case; see `pipelines.registry.gates`). When they were measured on another set, or the
per-case results are missing, a ``rescore`` callable (model URI -> metrics.json dict on the
current frozen test set) re-scores the champion; without one the ``same_frozen_test_set`` or the
paired gates fail and say so.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import sys
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

from pipelines.config import Params
from pipelines.errors import GateError, MedloopError
from pipelines.registry.client import (append_history, champion as champion_of, connect, get_run,
                                       history as client_history, is_registered, load_json_list, logged_model,
                                       rescorer, version_of_run, version_with_alias)
from pipelines.values import now_iso
from pipelines.registry.gates import Decision, evaluate_gates
from pipelines.registry.interrupted import answering
from pipelines.registry.tags import (CHAMPION, CLASSES, DECISION, FROZEN_TEST_SET_SHA256, METRICS, MODALITY,
                                     OPERATING_THRESHOLD, OVERRIDDEN_AT, POSITIVE_CLASS, PREFIX, PREVIOUS_CHAMPION,
                                     PROMOTED_VERSION, PROMOTION_ACTOR, PROMOTION_AT, PROMOTION_PREFIX,
                                     PROMOTION_REASON, ROLLED_BACK, RUN_ID, TEST_METRIC_PREFIX, VERDICTS,
                                     WEIGHTS_SHA256)
from pipelines.stage import stage_main
from pipelines.registry.tracking import display_uri
from pipelines.workspace import Layout, read_json

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger("medloop.promote")

DECISION_ARTIFACT = "promotion/decision.json"
METRICS_ARTIFACT = "promotion/metrics.json"

# Run tags are cut at 8000 characters by MLflow: JSON kept in them must fit, or it would be cut
# into invalid JSON.
RUN_TAG_LIMIT = 8000


class PromotionError(MedloopError):
    """Promotion cannot be attempted: a file, run, model or alias it needs is missing."""


class PromotionRefused(GateError):
    """The candidate failed the promotion gates (raised only with ``require_promotion=True``)."""

    def __init__(self, message: str, decision: Decision, run_id: str):
        super().__init__(message)
        self.decision = decision
        self.run_id = run_id


@dataclass(frozen=True)
class PromotionResult:
    """What a promotion, refusal, override or rollback did.

    Attributes:
        action: ``promoted``, ``refused``, ``override``, ``rollback``, or ``unchanged`` (the run
            was registered before; nothing was done).
        passed: True when the registry now serves ``version`` as champion.
        model_name: the registered model.
        run_id: the run judged, registered or restored.
        version: the champion's version after the action (None when refused).
        previous_version: the version aliased ``previous-champion`` after the action.
        decision: every gate's verdict (None for a rollback).
        actor: who acted.
        reason: why (gate summary, the human's reason).
        at: when (UTC, ISO 8601).
    """

    action: str
    passed: bool
    model_name: str
    run_id: str | None
    version: str | None
    previous_version: str | None
    decision: Decision | None
    actor: str
    reason: str
    at: str
    champion_metrics: dict | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain data (for flow results, reports and JSON): the decision as its gate verdicts."""
        return {
            "action": self.action, "passed": self.passed, "model_name": self.model_name,
            "run_id": self.run_id, "version": self.version, "previous_version": self.previous_version,
            "actor": self.actor, "reason": self.reason, "at": self.at,
            "gates": [verdict.to_dict() for verdict in self.decision.verdicts] if self.decision else [],
            "champion_metrics": (self.champion_metrics or {}).get("test"),
        }

    def describe(self) -> str:
        if self.action == "unchanged":
            return f"{self.model_name}: {self.reason}"
        if self.action == "refused":
            assert self.decision is not None
            return (f"run {self.run_id} refused, registry untouched; failed gates:\n"
                    + self.decision.summary())
        previous = f", previous-champion is v{self.previous_version}" if self.previous_version else ""
        verb = {"promoted": "promoted", "override": "promoted by override", "rollback": "restored by rollback"}
        return f"{self.model_name} v{self.version} {verb[self.action]} as champion{previous}"


def run(
    params: Params,
    layout: Layout,
    *,
    actor: str = "medloop",
    require_promotion: bool = False,
    rescore: Callable[[str], dict] | None = None,
) -> PromotionResult:
    """Judge the latest trained and evaluated model and promote it when every gate passes.

    Args:
        params: the configuration (``model.name``, ``tracking``, ``promote`` gates).
        layout: the workspace (reads ``models/train.json`` and ``reports/metrics.json``).
        actor: who asks (the nightly flow by default).
        require_promotion: raise `PromotionRefused` instead of returning a refused result.
        rescore: given a champion's ``models:/<name>/<version>`` URI, its metrics.json on the
            current frozen test set; used only when the champion's recorded metrics are from a
            different frozen test set.

    Returns:
        The result: ``promoted`` (new champion version), ``refused`` (registry untouched) or
        ``unchanged`` (this run is registered already; ``passed`` says whether it is champion).

    Raises:
        PromotionError: train.json or metrics.json is missing or they disagree, the run is not in
            the tracking store, or (when the gates pass) it has no logged model.
        PromotionRefused: the gates failed and ``require_promotion`` is set.
    """
    train_info = read_json(layout.train_json, "run the train stage before promoting", PromotionError)
    candidate = read_json(layout.metrics_json, "run the evaluate stage before promoting", PromotionError)
    run_id = train_info.get("run_id")
    if not run_id:
        raise PromotionError(f"{layout.train_json} names no run_id; re-run train")
    if candidate.get("run_id") != run_id:
        raise PromotionError(
            f"{layout.metrics_json} is for run {candidate.get('run_id')} but {layout.train_json} "
            f"names run {run_id}: re-run evaluate before promoting"
        )
    client = connect(params, layout)
    name = params.model.name
    mlflow_run = get_run(client, run_id, params, layout, PromotionError)

    champion = champion_of(client, name)
    registered = version_of_run(client, name, run_id)
    if registered is not None and mlflow_run.data.tags.get(DECISION) is None:
        # The decision is recorded on the run last: without it, a promotion of this run stopped
        # half-way (the tracking server went away).
        finished = _finish_interrupted(client, name, run_id, registered, champion)
        if finished is not None:
            return finished
        registered = version_of_run(client, name, run_id)  # None unless it was registered by hand
    if registered is not None:
        # A retried task, or a night with nothing retrained: never register the same run twice.
        serving = champion is not None and str(champion.version) == registered
        state = "is champion" if serving else "is not champion now (rolled back?)"
        log.info("run %s is already %s v%s and %s; registry unchanged", run_id, name, registered, state)
        return PromotionResult("unchanged", serving, name, run_id, registered, None, None, actor,
                               f"run {run_id} is already registered as v{registered} and {state}", now_iso())
    champion_metrics = _champion_metrics(champion, candidate, name, rescore)
    decision = evaluate_gates(candidate, champion_metrics, params.promote)
    at = now_iso()
    _log_decision(client, run_id, candidate, decision, actor, at)

    if not decision.passed:
        client.set_tag(run_id, DECISION, "refused")
        client.set_tag(run_id, VERDICTS, _fit_json([f.to_dict() for f in decision.failures], RUN_TAG_LIMIT))
        client.set_tag(run_id, PROMOTION_ACTOR, actor)
        client.set_tag(run_id, PROMOTION_AT, at)
        log.warning("run %s refused: %d gate(s) failed\n%s", run_id, len(decision.failures), decision.summary())
        result = PromotionResult("refused", False, name, run_id, None, None, decision, actor,
                                 decision.summary(), at, champion_metrics)
        if require_promotion:
            raise PromotionRefused(
                f"model {name} run {run_id} was not promoted; the registry is unchanged. Failed gates:\n"
                f"{decision.summary()}\nFull report: {layout.metrics_json} and the run's artifact "
                f"{DECISION_ARTIFACT}",
                decision, run_id,
            )
        return result

    model_id, source = logged_model(client, mlflow_run, PromotionError)
    reason = f"passed all {len(decision.verdicts)} gates"
    tags = _version_tags(mlflow_run, candidate, decision, "promoted", actor, at, reason)
    result = _register_and_crown(client, params, layout, run_id, model_id, source, tags, champion,
                                 "promoted", actor, reason, at, decision)
    return replace(result, champion_metrics=champion_metrics)


def override(
    params: Params,
    layout: Layout,
    run_id: str,
    reason: str,
    actor: str | None = None,
) -> PromotionResult:
    """A human promotes a run the gates refused, on their own authority.

    Args:
        params: the configuration.
        layout: the workspace.
        run_id: the refused MLflow run.
        reason: why the refusal is overridden (required; recorded on the version and in history).
        actor: who overrides (default: ``$MEDLOOP_ACTOR`` or the login name).

    Returns:
        The result: action ``override``, the run's new version is champion.

    Raises:
        PromotionError: no reason given; the run is unknown, was never judged by promote, was
            already promoted, or has no logged model.
    """
    actor = actor or default_actor()
    if not reason or not reason.strip():
        raise PromotionError("an override needs a reason: say why the refused gates may be set aside")
    client = connect(params, layout)
    name = params.model.name
    mlflow_run = get_run(client, run_id, params, layout, PromotionError)
    judged = mlflow_run.data.tags.get(DECISION)
    if judged is None:
        raise PromotionError(
            f"run {run_id} was never judged by promote, so there is no refusal to override; "
            "run `medloop promote` first"
        )
    if judged != "refused":
        version = mlflow_run.data.tags.get(PROMOTED_VERSION, "?")
        raise PromotionError(f"run {run_id} was already registered ({judged}) as {name} v{version}; "
                             "nothing to override")
    model_id, source = logged_model(client, mlflow_run, PromotionError)
    candidate = _run_metrics(run_id)
    refused = load_json_list(mlflow_run.data.tags.get(VERDICTS))
    champion = champion_of(client, name)
    at = now_iso()
    tags = _version_tags(mlflow_run, candidate, None, "override", actor, at, reason)
    tags[VERDICTS] = json.dumps(refused)  # the gates that were set aside
    tags[OVERRIDDEN_AT] = mlflow_run.data.tags.get(PROMOTION_AT, "")
    result = _register_and_crown(client, params, layout, run_id, model_id, source, tags, champion,
                                 "override", actor, reason, at, None)
    log.warning("%s v%s promoted by override of %s: %s", name, result.version, actor, reason)
    return result


def rollback(params: Params, layout: Layout, actor: str | None = None, reason: str = "") -> PromotionResult:
    """Make the previous champion champion again.

    The version that was champion becomes ``previous-champion``, so a second rollback undoes the
    first. Nothing is registered or deleted.

    Args:
        params: the configuration.
        layout: the workspace.
        actor: who rolls back (default: ``$MEDLOOP_ACTOR`` or the login name).
        reason: why (recorded in the history).

    Returns:
        The result: action ``rollback``; ``version`` is the restored champion.

    Raises:
        PromotionError: the model is not registered or has no previous champion.
    """
    actor = actor or default_actor()
    client = connect(params, layout)
    name = params.model.name
    if not is_registered(client, name):
        raise PromotionError(f"model {name} is not registered in {display_uri(params, layout)}: "
                             "nothing to roll back")
    previous = version_with_alias(client, name, PREVIOUS_CHAMPION)
    if previous is None:
        raise PromotionError(f"model {name} has no {PREVIOUS_CHAMPION} alias: there is no earlier "
                             "champion to roll back to")
    current = champion_of(client, name)
    at = now_iso()
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, current.version)
        client.set_model_version_tag(name, current.version, ROLLED_BACK, json.dumps(
            {"at": at, "actor": actor, "reason": reason, "restored_version": str(previous.version)}))
    else:
        client.delete_registered_model_alias(name, PREVIOUS_CHAMPION)
    client.set_registered_model_alias(name, CHAMPION, previous.version)
    demoted = str(current.version) if current is not None else None
    append_history(client, name, {
        "version": str(previous.version), "alias": CHAMPION, "action": "rollback", "actor": actor,
        "reason": reason, "at": at, "replaced": demoted,
    })
    log.warning("%s rolled back to v%s (was v%s) by %s", name, previous.version, demoted, actor)
    return PromotionResult("rollback", True, name, previous.run_id, str(previous.version), demoted,
                           None, actor, reason, at)


def history(params: Params, layout: Layout) -> list[dict]:
    """Every promotion, override and rollback of ``model.name``, oldest first.

    Each entry: ``version``, ``alias``, ``action`` (promoted | override | rollback), ``actor``,
    ``reason``, ``at`` (and ``replaced``: the champion it displaced). Empty before the first.
    """
    return client_history(connect(params, layout), params.model.name)


def earlier_decision(params: Params, layout: Layout, run_id: str | None) -> dict[str, Any] | None:
    """The decision promote recorded on MLflow run ``run_id`` (its ``medloop.promotion.*`` tags:
    promoted, override or refused, with the gates' verdicts), or None when it was never judged.
    MLflow is the record, so a re-cloned workspace knows what was judged."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        judged = connect(params, layout).get_run(run_id).data.tags
    except MlflowException:
        return None
    if judged.get(DECISION) is None:
        return None
    return {"action": judged[DECISION], "passed": judged[DECISION] in ("promoted", "override"),
            "model_name": params.model.name, "run_id": run_id, "version": judged.get(PROMOTED_VERSION),
            "actor": judged.get(PROMOTION_ACTOR), "at": judged.get(PROMOTION_AT),
            "gates": load_json_list(judged.get(VERDICTS))}


def judge_once(params: Params, layout: Layout, *, actor: str) -> dict[str, Any]:
    """The nightly promote: judge the trained model (`run`, the champion re-scored when needed)
    unless an earlier run judged it already; then say so and judge nothing again.

    Returns:
        `PromotionResult.as_dict`, or for a model judged before its earlier decision with action
        ``unchanged`` and ``passed`` False: an old verdict is no reason to deploy (the champion
        may have been rolled back since).
    """
    run_id = read_json(layout.train_json, "run the train stage before promoting", PromotionError).get("run_id")
    with answering(params, layout, f"judging run {run_id} for promotion",
                   "The champion is still a version whose promotion was complete; the next run of promote "
                   "finishes or redoes what this one began."):
        earlier = earlier_decision(params, layout, run_id)
        if earlier is not None:
            return {**earlier, "action": "unchanged", "passed": False,
                    "reason": f"run {run_id} was already judged ({earlier['action']}) on {earlier.get('at')}"}
        return run(params, layout, actor=actor, rescore=rescorer(params, layout)).as_dict()


def default_actor() -> str:
    """Who is acting: ``$MEDLOOP_ACTOR`` or the login name."""
    return os.environ.get("MEDLOOP_ACTOR") or getpass.getuser()


# --------------------------------------------------------------------------------------------
# reading inputs
# --------------------------------------------------------------------------------------------


def _run_metrics(run_id: str) -> dict:
    metrics = _logged_metrics(run_id)
    if not metrics:
        raise PromotionError(f"run {run_id} has no {METRICS_ARTIFACT} artifact: run promote on it first")
    return metrics


def _logged_metrics(run_id: str | None) -> dict:
    """The metrics.json promote logged with a run; empty when there is none."""
    import mlflow

    if not run_id:
        return {}
    try:
        return json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{METRICS_ARTIFACT}"))
    except Exception:  # noqa: BLE001 - any failure means the same thing: not logged
        return {}


# --------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------


def _champion_metrics(champion, candidate: dict, name: str, rescore) -> dict | None:
    """The champion's metrics.json on the candidate's frozen test set, with its per-case results.

    The version's tag holds the metrics without the per-case results (they would outgrow a
    tag); those are read from the metrics.json that promote logged with the champion's run.
    When the recorded metrics are from another frozen test set, or their per-case results
    cannot be found (a champion promoted before they were recorded), ``rescore`` re-scores the
    champion on the current frozen test set.
    """
    if champion is None:
        return None
    recorded = champion.tags.get(METRICS)
    metrics = json.loads(recorded) if recorded else {}
    same_set = metrics.get("frozen_test_set_sha256") == candidate.get("frozen_test_set_sha256")
    if same_set and "test_cases" not in metrics:
        logged = _logged_metrics(champion.run_id)
        if logged.get("frozen_test_set_sha256") == metrics.get("frozen_test_set_sha256") and logged.get("test_cases"):
            metrics = {**metrics, "test_cases": logged["test_cases"]}
    if (not same_set or "test_cases" not in metrics) and rescore:
        log.info("re-scoring champion v%s on the current frozen test set", champion.version)
        metrics = rescore(f"models:/{name}/{champion.version}")
    return metrics


def _register_and_crown(
    client: "MlflowClient", params: Params, layout: Layout, run_id: str, model_id: str | None,
    source: str, tags: dict[str, str], champion, action: str, actor: str, reason: str, at: str,
    decision: Decision | None,
) -> PromotionResult:
    import mlflow

    name = params.model.name
    if not is_registered(client, name):
        client.create_registered_model(
            name,
            tags={MODALITY: params.model.modality,
                  POSITIVE_CLASS: params.model.positive_class,
                  CLASSES: json.dumps(params.model.classes)},
            description=f"medloop {params.model.modality} model screening for "
                        f"{params.model.positive_class}; served alias: {CHAMPION}",
        )
    version = mlflow.register_model(source, name, tags=tags).version
    version = str(version)
    former = str(champion.version) if champion is not None else None
    # previous-champion first: a crash between the two leaves both aliases on the old champion,
    # which still serves correctly.
    if former is not None:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, former)
    client.set_registered_model_alias(name, CHAMPION, version)
    append_history(client, name, {"version": version, "alias": CHAMPION, "action": action,
                                   "actor": actor, "reason": reason, "at": at, "replaced": former})
    _record_on_run(client, run_id, action, version, actor, at)
    log.info("%s v%s is champion (%s by %s)", name, version, action, actor)
    return PromotionResult(action, True, name, run_id, version, former, decision, actor, reason, at)


def _finish_interrupted(client: "MlflowClient", name: str, run_id: str, version: str,
                        champion) -> PromotionResult | None:
    """A promotion of ``run_id`` that stopped after registering ``version`` (the tracking server
    went away). Made champion already: the record is finished (history, the run's tags) and the
    result is the promotion's. Not champion: the version was never served and its decision never
    recorded, so it is deleted and None returned: the run is judged again, against the champion
    of now. (A version registered by hand, without promote's tags, is left alone.)"""
    if champion is None or str(champion.version) != version:
        if client.get_model_version(name, version).tags.get(DECISION) is None:
            return None
        client.delete_model_version(name, version)
        log.warning("%s v%s was registered from run %s by a promotion that stopped before making it champion; "
                    "it was never served and is deleted, and the run is judged again", name, version, run_id)
        return None
    tags = champion.tags
    action, actor = tags.get(DECISION, "promoted"), tags.get(PROMOTION_ACTOR, "medloop")
    at, reason = tags.get(PROMOTION_AT) or now_iso(), tags.get(PROMOTION_REASON, "")
    entries = client_history(client, name)
    if entries and entries[-1].get("version") == version:
        former = entries[-1].get("replaced")
    else:
        previous = version_with_alias(client, name, PREVIOUS_CHAMPION)
        former = str(previous.version) if previous is not None and str(previous.version) != version else None
        append_history(client, name, {"version": version, "alias": CHAMPION, "action": action, "actor": actor,
                                       "reason": reason, "at": at, "replaced": former})
    _record_on_run(client, run_id, action, version, actor, at)
    log.warning("%s v%s was made champion by a promotion that stopped before recording it; the record is "
                "finished", name, version)
    return PromotionResult(action, True, name, run_id, version, former, None, actor, reason, at)


def _record_on_run(client: "MlflowClient", run_id: str, action: str, version: str, actor: str, at: str) -> None:
    """The decision on the run, written last: a run without it was never fully promoted."""
    client.set_tag(run_id, PROMOTED_VERSION, version)
    client.set_tag(run_id, PROMOTION_ACTOR, actor)
    client.set_tag(run_id, PROMOTION_AT, at)
    if action != "override":
        client.set_tag(run_id, VERDICTS, "[]")
    client.set_tag(run_id, DECISION, action)


def _version_tags(mlflow_run, metrics: dict, decision: Decision | None, action: str, actor: str,
                  at: str, reason: str) -> dict[str, str]:
    """Everything a version carries: decision, lineage, threshold, metrics (all strings)."""
    tags = {key: value for key, value in mlflow_run.data.tags.items()
            if key.startswith(PREFIX) and not key.startswith(PROMOTION_PREFIX)}
    test = metrics.get("test") or {}
    tags.update({
        DECISION: action,
        PROMOTION_ACTOR: actor,
        PROMOTION_AT: at,
        PROMOTION_REASON: reason,
        RUN_ID: mlflow_run.info.run_id,
        OPERATING_THRESHOLD: str(metrics.get("operating_threshold")),
        POSITIVE_CLASS: str(metrics.get("positive_class")),
        FROZEN_TEST_SET_SHA256: str(metrics.get("frozen_test_set_sha256")),
        WEIGHTS_SHA256: str(metrics.get("weights_sha256")),
        # Without the per-case results, which would outgrow a tag; they stay in the run's
        # promotion/metrics.json artifact, where promote reads them when this is champion.
        METRICS: json.dumps({k: v for k, v in metrics.items() if k != "test_cases"}, sort_keys=True),
    })
    for key in ("auroc", "sensitivity", "specificity", "ece", "n"):
        if test.get(key) is not None:
            tags[TEST_METRIC_PREFIX + key] = str(test[key])
    if decision is not None:
        tags[VERDICTS] = json.dumps([verdict.to_dict() for verdict in decision.verdicts])
    return tags


def _log_decision(client: "MlflowClient", run_id: str, metrics: dict, decision: Decision,
                  actor: str, at: str) -> None:
    """The full decision and the metrics judged, kept with the run (the tags may be cut short)."""
    record = {"actor": actor, "at": at, **decision.to_dict()}
    client.log_text(run_id, json.dumps(record, indent=2), DECISION_ARTIFACT)
    client.log_text(run_id, json.dumps(metrics, indent=2, sort_keys=True), METRICS_ARTIFACT)


def _fit_json(items: list[dict], limit: int) -> str:
    """JSON of ``items`` within ``limit`` characters: details dropped, then the tail summarised."""
    text = json.dumps(items)
    if len(text) <= limit:
        return text
    short = [{k: v for k, v in item.items() if k != "detail"} for item in items]
    for keep in range(len(short), -1, -1):
        rest = len(short) - keep
        tail = [{"gate": f"... {rest} more", "detail": f"see {DECISION_ARTIFACT}"}] if rest else []
        text = json.dumps(short[:keep] + tail)
        if len(text) <= limit:
            return text
    return "[]"


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.promote``: judge and promote; a refusal exits with status 1."""
    return stage_main(
        "promote",
        lambda params, layout: run(params, layout, actor=default_actor(), require_promotion=True,
                                   rescore=rescorer(params, layout)),
        PromotionResult.describe,
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
