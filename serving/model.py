"""The model in service: ``models:/<name>@champion``, kept as a local copy so that the service
keeps serving while MLflow is down, and swapped atomically when the champion moves.

A request takes the `Served` object once and uses it to the end, so a reload never drops or
mixes requests in flight; a version that fails to download or load leaves the old one serving
(and the failure is reported by `ModelManager.last_error` and ``/readyz``).
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipelines.config import Params
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
    loaded_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def decide(self, probabilities: dict[str, float]) -> str:
        """The positive class at or above the operating threshold; otherwise the most likely other."""
        if probabilities[self.positive_class] >= self.operating_threshold:
            return self.positive_class
        others = {label: p for label, p in probabilities.items() if label != self.positive_class}
        return max(others, key=others.get)


class ModelManager:
    """Loads the champion, checks for a new one, and swaps it in (see module docstring)."""

    def __init__(self, params: Params, layout: Layout, cache: Path | None = None):
        self.params = params
        self.layout = layout
        self.cache = cache or layout.state / "serving" / params.model.name
        self.current: Served | None = None
        self.last_error: str | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Load the champion from the registry, or, when that fails, the last local copy."""
        if not self.refresh():
            self._load_cached()

    def refresh(self) -> bool:
        """Serve the champion if it moved; True when a new version is now served."""
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
        from mlflow import MlflowClient

        from pipelines.promote import CHAMPION
        from pipelines.tracking import configure

        configure(self.params, self.layout)
        version = MlflowClient().get_model_version_by_alias(self.params.model.name, CHAMPION)
        return str(version.version), dict(version.tags)

    def _download(self, version: str, tags: dict[str, str]) -> Path:
        """The version's pyfunc and decision rule under the cache (downloaded once)."""
        import mlflow

        target = self.cache / f"v{version}"
        if not (target / "medloop.json").is_file():
            staging = self.cache / f".v{version}.partial"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            mlflow.artifacts.download_artifacts(f"models:/{self.params.model.name}/{version}", dst_path=str(staging / "model"))
            rule = {
                "name": self.params.model.name, "version": version,
                "classes": json.loads(tags.get("medloop.metrics", "{}")).get("classes") or list(self.params.model.classes),
                "positive_class": tags.get("medloop.positive_class") or self.params.model.positive_class,
                "operating_threshold": float(tags["medloop.operating_threshold"]),
            }
            (staging / "medloop.json").write_text(json.dumps(rule, indent=2))
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)  # a partial download is never taken for a copy
        return target

    def _load(self, version: str, folder: Path) -> Served:
        import mlflow

        rule = json.loads((folder / "medloop.json").read_text())
        model = mlflow.pyfunc.load_model(str(folder / "model"))
        return Served(rule["name"], str(rule["version"]), model, list(rule["classes"]), rule["positive_class"],
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
