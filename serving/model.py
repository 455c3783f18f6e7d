"""The model in service: ``models:/<name>@champion``, kept as a local copy so that the service
keeps serving while MLflow is down, and swapped atomically when the champion moves.

A request takes the `Served` object once and uses it to the end, so a reload never drops or
mixes requests in flight; a version that fails to download or load leaves the old one serving
(and the failure is reported by `ModelManager.last_error` and ``/readyz``).

Shadow mode: when ``serving.shadow`` names a candidate (a registered version ``"7"``, or
``"run:<id>"`` for a run's logged model, e.g. one that promotion refused), the manager loads it
too, into the same cache (``v<N>/`` or ``run-<id>/``), with its own operating threshold: a
version's tag ``medloop.operating_threshold``, or for a run the same tag set by evaluate (else
the threshold in its ``evaluation/metrics.json``). It is `ModelManager.shadow`; a candidate that
cannot be loaded is reported in `ModelManager.shadow_error`, retried at each `refresh`, and never
stops the champion from serving. The candidate is fixed for the life of the process.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import Params
from pipelines.errors import MedloopError
from pipelines.registry.tags import CHAMPION, METRICS, OPERATING_THRESHOLD, POSITIVE_CLASS, RUN_ID
from pipelines.values import now_iso
from pipelines.workspace import Layout

log = logging.getLogger("medloop.serving")

CURRENT_FILE = "current.json"


@dataclass(frozen=True)
class Served:
    """One loaded version: the pyfunc (raw input in, probabilities out) and its decision rule."""

    name: str
    version: str
    model: Any
    classes: list[str]
    positive_class: str
    operating_threshold: float
    loaded_at: str = field(default_factory=now_iso)

    def decide(self, probabilities: dict[str, float]) -> str:
        """The positive class at or above the operating threshold; otherwise the most likely other."""
        if probabilities[self.positive_class] >= self.operating_threshold:
            return self.positive_class
        others = {label: p for label, p in probabilities.items() if label != self.positive_class}
        return max(others, key=others.get)


@dataclass(frozen=True)
class Candidate:
    """The shadow candidate: scored on every input the champion scores, its answers logged only.

    Attributes:
        reference: as configured in ``serving.shadow``: ``"7"`` or ``"run:<id>"``.
        version: its registered version (None for a run that is not registered).
        run_id: the MLflow run that trained it, when known.
        served: its pyfunc and decision rule (``served.version`` is ``reference``).
    """

    reference: str
    version: str | None
    run_id: str | None
    served: Served

    def describe(self) -> dict[str, Any]:
        """What ``/readyz`` and ``/monitoring`` show of it."""
        return {"candidate": self.reference, "loaded": True, "version": self.version, "run_id": self.run_id,
                "operating_threshold": self.served.operating_threshold, "loaded_at": self.served.loaded_at}


class ModelManager:
    """Loads the champion, checks for a new one, and swaps it in; loads the shadow candidate
    (see module docstring)."""

    def __init__(self, params: Params, layout: Layout, cache: Path | None = None):
        self.params = params
        self.layout = layout
        self.cache = cache or layout.state / "serving" / params.model.name
        self.current: Served | None = None
        self.last_error: str | None = None
        self.shadow_reference: str | None = params.serving.shadow
        self.shadow: Candidate | None = None
        self.shadow_error: str | None = None
        self._lock = threading.Lock()  # one download or load at a time (champion or candidate)

    def start(self) -> None:
        """Load the champion from the registry, or, when that fails, the last local copy; then the
        shadow candidate, if one is configured (its failure is logged, never raised)."""
        if not self._refresh_champion():
            self._load_cached()
        self.load_shadow()

    def refresh(self) -> bool:
        """Serve the champion if it moved; True when a new version is now served. A shadow
        candidate that could not be loaded yet is tried again."""
        changed = self._refresh_champion()
        if self.shadow_reference and self.shadow is None:
            self.load_shadow()
        return changed

    def load_shadow(self) -> bool:
        """Load the shadow candidate (from the local copy when there is one, else from MLflow);
        True when it is loaded now. A failure is kept in `shadow_error` and logged."""
        reference = self.shadow_reference
        if not reference:
            return False
        with self._lock:  # requests never wait on this lock
            if self.shadow is not None:
                return True
            try:
                candidate = self._load_candidate(reference)
            except Exception as exc:  # noqa: BLE001 - a broken candidate must never stop the service
                error = f"{type(exc).__name__}: {exc}"
                if error != self.shadow_error:  # once per distinct failure, not at every retry
                    log.error("shadow candidate %s cannot be loaded (the champion serves without it): %s",
                              reference, error)
                self.shadow_error = error
                return False
            self.shadow, self.shadow_error = candidate, None
            log.info("shadow candidate %s loaded (version %s, run %s, operating threshold %s)", reference,
                     candidate.version, candidate.run_id, candidate.served.operating_threshold)
            return True

    def _refresh_champion(self) -> bool:
        with self._lock:  # one reload at a time; requests never wait on this lock
            try:
                version, tags = self._champion()
                if self.current is not None and self.current.version == version:
                    return False
                served = self._load(version, self._download(version, tags))
            except Exception as exc:  # noqa: BLE001 - any failure leaves the old model serving
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.error("reload failed, still serving %s: %s",
                          f"v{self.current.version}" if self.current else "nothing", self.last_error)
                return False
            previous = self.current.version if self.current else None
            # Only a copy that loaded is the one to fall back on after a restart.
            (self.cache / CURRENT_FILE).write_text(json.dumps({"version": version}))
            self.current = served
            self.last_error = None
            log.info("serving %s v%s (was %s)", served.name, served.version, previous or "nothing")
            return True

    # ---------------------------------------------------------------------------------------

    def _champion(self) -> tuple[str, dict[str, str]]:
        from pipelines.registry.client import champion, connect

        version = champion(connect(self.params, self.layout), self.params.model.name)
        if version is None:
            raise MedloopError(f"model {self.params.model.name} has no {CHAMPION} in the registry: "
                               "promote a model first")
        return str(version.version), dict(version.tags)

    def _download(self, version: str, tags: dict[str, str]) -> Path:
        """The version's pyfunc and decision rule under the cache (downloaded once)."""
        target = self.cache / f"v{version}"
        if not (target / "medloop.json").is_file():
            rule = self._rule(version, tags, metrics={}, what=f"{self.params.model.name} v{version}")
            self._fetch(f"models:/{self.params.model.name}/{version}", rule, target)
        return target

    def _fetch(self, model_uri: str, rule: dict[str, Any], target: Path) -> None:
        """Download a pyfunc and write its decision rule beside it, published by one rename."""
        import mlflow

        staging = target.parent / f".{target.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        mlflow.artifacts.download_artifacts(model_uri, dst_path=str(staging / "model"))
        (staging / "medloop.json").write_text(json.dumps(rule, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # a partial download is never taken for a copy

    def _rule(self, version: str, tags: dict[str, str], metrics: dict[str, Any], what: str) -> dict[str, Any]:
        """The decision rule recorded with a version or run: classes, positive class, threshold."""
        recorded = json.loads(tags.get(METRICS, "{}")) or metrics
        threshold = tags.get(OPERATING_THRESHOLD)
        if threshold in (None, "", "None"):
            threshold = recorded.get("operating_threshold")
        if threshold in (None, "", "None"):
            raise MedloopError(f"{what} has no operating threshold (tag {OPERATING_THRESHOLD}): "
                               "evaluate it before serving it")
        return {
            "name": self.params.model.name, "version": version,
            "classes": recorded.get("classes") or list(self.params.model.classes),
            "positive_class": tags.get(POSITIVE_CLASS) or recorded.get("positive_class")
            or self.params.model.positive_class,
            "operating_threshold": float(threshold),
            "run_id": tags.get(RUN_ID),
        }

    def _load_candidate(self, reference: str) -> Candidate:
        """The shadow candidate from its local copy, or downloaded from MLflow first."""
        if reference.startswith("run:"):
            run_id = reference.removeprefix("run:")
            folder = self.cache / f"run-{run_id}"
            if not (folder / "medloop.json").is_file():
                self._fetch_run(run_id, reference, folder)
            return Candidate(reference, None, run_id, self._load(reference, folder))
        folder = self.cache / f"v{reference}"
        if not (folder / "medloop.json").is_file():
            folder = self._download(reference, self._version_tags(reference))
        rule = json.loads((folder / "medloop.json").read_text())
        served = self._load(reference, folder)
        return Candidate(reference, reference, rule.get("run_id"), served)

    def _version_tags(self, version: str) -> dict[str, str]:
        from pipelines.registry.client import connect

        return dict(connect(self.params, self.layout).get_model_version(self.params.model.name, version).tags)

    def _fetch_run(self, run_id: str, reference: str, folder: Path) -> None:
        """A run's logged pyfunc (as promote would register it) and its decision rule."""
        import mlflow

        from pipelines.evaluate import MLFLOW_ARTIFACT_PATH
        from pipelines.registry.client import connect, get_run, logged_model

        client = connect(self.params, self.layout)
        mlflow_run = get_run(client, run_id, self.params, self.layout)
        tags = dict(mlflow_run.data.tags)
        metrics: dict[str, Any] = {}
        if tags.get(OPERATING_THRESHOLD) in (None, "", "None"):
            try:
                metrics = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{MLFLOW_ARTIFACT_PATH}/metrics.json"))
            except Exception:  # noqa: BLE001 - no evaluation: _rule says what is missing
                metrics = {}
        rule = {**self._rule(reference, tags, metrics, what=f"run {run_id}"), "run_id": run_id}
        _model_id, source = logged_model(client, mlflow_run)
        self._fetch(source, rule, folder)

    def _load(self, version: str, folder: Path) -> Served:
        from pipelines.model import pyfunc

        rule = json.loads((folder / "medloop.json").read_text())
        model = pyfunc.load(str(folder / "model"))
        return Served(rule["name"], str(version), model, list(rule["classes"]), rule["positive_class"],
                      float(rule["operating_threshold"]))

    def _load_cached(self) -> None:
        marker = self.cache / CURRENT_FILE
        if not marker.is_file():
            log.error("no champion could be loaded and there is no local copy in %s: not ready", self.cache)
            return
        version = json.loads(marker.read_text())["version"]
        try:
            self.current = self._load(version, self.cache / f"v{version}")
            log.warning("MLflow unreachable (%s): serving the local copy of v%s", self.last_error, version)
        except Exception as exc:  # noqa: BLE001
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error("the local copy of v%s cannot be loaded: %s", version, self.last_error)
