"""What every router of the service shares: the `Service` (settings, the feedback store, the
champion and its shadow, the batcher, the Prometheus figures), built once per app by
`serving.app.create_app` and kept on ``app.state.service``, and the two dependencies a route
declares: `service_of` (the service) and `caller` (the caller, with a role that may do the
route's action).

A router in a module of its own (``serving.predict``, ``serving.feedback`` and the others) reads
what it needs through these, so that adding a part of the service is adding one more router to
`serving.app.ROUTERS`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fastapi import HTTPException, Request

from pipelines.config import Params, load_params
from pipelines.errors import mask_credentials
from pipelines.workspace import Layout, database_url
from serving import scoring
from serving.auth import Caller, TokenTable
from serving.batching import MicroBatcher
from serving.model import ModelManager
from serving.shadow import ShadowScorer


@dataclass
class Figures:
    """The service's Prometheus figures (``GET /metrics``), in one registry of its own."""

    registry: Any
    requests: Any
    latency: Any
    served_version: Any
    feedback_posts: Any
    predictions_made: Any
    batch_inputs: Any
    unusable_outputs: Any
    store_retries: Any

    @classmethod
    def create(cls) -> Figures:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        registry = CollectorRegistry()
        return cls(
            registry=registry,
            requests=Counter("medloop_requests_total", "HTTP requests", ["endpoint", "status"], registry=registry),
            latency=Histogram("medloop_request_seconds", "request latency", ["endpoint"], registry=registry,
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)),
            served_version=Gauge("medloop_model_version", "version in service", ["model"], registry=registry),
            feedback_posts=Counter("medloop_feedback_total", "feedback posts", ["outcome"], registry=registry),
            predictions_made=Counter("medloop_predictions_total", "inputs scored", ["model", "version"],
                                     registry=registry),
            batch_inputs=Histogram("medloop_batch_inputs", "inputs scored per model call (micro-batching)",
                                   registry=registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128)),
            unusable_outputs=Counter("medloop_unusable_outputs_total", "model outputs that were not a finite "
                                     "probability (refused, never decided)", ["model", "version"], registry=registry),
            store_retries=Counter("medloop_store_retries_total", "writes to the feedback store tried again because "
                                  "the database did not answer (a restart)", registry=registry),
        )


@dataclass
class Service:
    """One running service: built by `create` from the workspace's params, started and stopped by
    the app's lifespan.

    Attributes:
        params: the workspace's resolved params.
        layout: the workspace.
        salt: the de-identification salt (as collect uses it).
        store_url: the feedback store's database URL.
        store: the feedback store (`pipelines.store.feedback.FeedbackStore`).
        tokens: the callers' tokens.
        manager: the champion (and the shadow candidate), reloaded when it moves.
        inputs_dir: the de-identified uploads, kept for the feedback export.
        reload_seconds: how often the champion is looked up.
        figures: the Prometheus figures.
        batcher: the micro-batcher, or None when serving.batch_max_size is 1.
        prediction_writer: the threads that store predictions.
        shadow: the shadow candidate's scorer (its answers are stored, never returned).
    """

    params: Params
    layout: Layout
    salt: bytes
    store_url: str
    store: Any
    tokens: TokenTable
    manager: ModelManager
    inputs_dir: Path
    reload_seconds: float
    figures: Figures
    batcher: MicroBatcher | None
    prediction_writer: ThreadPoolExecutor
    shadow: ShadowScorer

    @classmethod
    def create(cls, params_file: str | Path, reload_seconds: float | None = None) -> Service:
        """The service for the workspace holding ``params_file`` (nothing started yet)."""
        from pipelines.deid.keys import load_salt
        from pipelines.store.feedback import FeedbackStore

        params_path = Path(params_file).resolve()
        layout = Layout.at(params_path.parent)
        params = load_params(params_path)
        spec = params.serving
        salt = load_salt(params.deid.salt_env)
        store_url = database_url(layout, spec.store_url)
        figures = Figures.create()
        store = FeedbackStore(store_url, retry_seconds=spec.store_retry_seconds, on_retry=figures.store_retries.inc)
        tokens = TokenTable(_in_workspace(spec.tokens_file, layout))
        manager = ModelManager(params, layout)
        inputs_dir = layout.state / "serving" / "inputs"  # de-identified uploads, for the feedback export
        inputs_dir.mkdir(parents=True, exist_ok=True)
        # serving.batch_max_size 1 turns micro-batching off: each request is then scored on its own.
        batcher = (MicroBatcher(scoring.probabilities, spec.batch_max_size, spec.batch_max_wait_ms / 1000,
                                figures.batch_inputs.observe) if spec.batch_max_size > 1 else None)
        # Predictions are stored by threads of their own, so that waiting on the database never holds
        # up preparing and scoring; one for SQLite, which takes one writer at a time anyway (more would
        # only wait on its lock), several for a server database.
        prediction_writer = ThreadPoolExecutor(1 if store.url.startswith("sqlite") else 4,
                                               thread_name_prefix="medloop-store")
        return cls(
            params=params, layout=layout, salt=salt, store_url=store_url, store=store, tokens=tokens,
            manager=manager, inputs_dir=inputs_dir,
            reload_seconds=reload_seconds if reload_seconds is not None else spec.reload_seconds, figures=figures,
            batcher=batcher, prediction_writer=prediction_writer,
            # serving.shadow: logged, never returned
            shadow=ShadowScorer(manager, store, params, inputs_dir, figures.registry),
        )

    def shadow_status(self) -> dict | None:
        """The shadow candidate as /readyz and /monitoring show it: None when none is configured."""
        manager = self.manager
        if not manager.shadow_reference:
            return None
        if manager.shadow is not None:
            return manager.shadow.describe()
        error = mask_credentials(manager.shadow_error) if manager.shadow_error else "not loaded yet"
        return {"candidate": manager.shadow_reference, "loaded": False, "error": error}


def service_of(request: Request) -> Service:
    """The dependency that hands a route the app's `Service`."""
    return request.app.state.service


def caller(permission: str) -> Callable[[Request], Caller]:
    """The dependency that admits a caller whose role may do ``permission``: 401 without a known
    bearer token, 403 when the role may not."""

    def check(request: Request) -> Caller:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise HTTPException(401, "missing bearer token (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})
        who = service_of(request).tokens.caller(token.strip())
        if who is None:
            raise HTTPException(401, "unknown token", headers={"WWW-Authenticate": "Bearer"})
        if not who.may(permission):
            raise HTTPException(403, f"role {who.role} may not {permission}")
        return who

    return check


def _in_workspace(value: str, layout: Layout) -> Path:
    path = Path(value)
    return path if path.is_absolute() else layout.root / path
