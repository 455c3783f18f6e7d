"""The clinicians' pages, served by ``medloop serve`` beside the API under ``/pages``.

- **Worklist** (clinician): the cases awaiting the signed-in clinician's label, newest or least
  certain first, filtered by date, model version and decision, with the count left; ``j``/``k``
  (or the arrow keys) move between cases, Enter opens one.
- **Case** (clinician): the de-identified image (window/level for DICOM, zoom, the Grad-CAM overlay
  blended by a slider) or, for a table model, the instance's features beside their declared
  ranges and the training distribution, and the permutation-importance picture of the model; the
  calibrated probability, the decision at the operating threshold, the model version with a link
  to its model card; ``c`` confirms the decision, ``1``.. pick a class (a correction), with an
  optional comment; ``n``/``p`` next/previous case; the case's own history.
- **Adjudication** (reviewer): the cases clinicians disagree on, each label and comment side by
  side, resolved with a reason.
- **Monitoring** (reviewer): live sensitivity, specificity and agreement per version with counts
  and 95% intervals, drift per statistic against the reference, the shadow candidate beside the
  champion, and what the retraining policy would decide now.
- **Models** (admin): versions, their gates, the promotion history, what is deployed, and rollback
  behind a confirmation; the **access log** (admin): every view of a case.

People sign in once with their token (``medloop token add``), which becomes a session: a random
id in a cookie (HttpOnly, SameSite=Strict, Secure when the request came over TLS), held in this
process and ended after ``serving.session_idle_minutes`` without a request, or at sign-out.
Every form carries the session's CSRF token and a post without it is refused (403). Roles are
the API's (`serving.auth.ROLES`): a page needs the permission its API counterpart needs. The
pages run no inline script (a Content-Security-Policy forbids it) and load nothing from another
host. The same store functions answer the pages and the API (`pipelines.store.feedback`).
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from pipelines.config import Params
from pipelines.workspace import Layout
from serving.auth import Caller, TokenTable
from serving.guards import store_errors, store_outage

log = logging.getLogger("medloop.serving.pages")

PREFIX = "/pages"
SESSION_COOKIE = "medloop_session"
SIGNIN_COOKIE = "medloop_signin"  # double-submit token of the sign-in form (there is no session yet)
STATIC = Path(__file__).resolve().parent / "static"
TEMPLATES = Path(__file__).resolve().parent / "templates"
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
WORKLIST_FILTERS = ("order", "version", "decision", "since")
WORKLIST_PAGE = 50
STATIC_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}


class PageRefusal(Exception):
    """A request the pages refuse, shown to the person as a page (status and one paragraph)."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


@dataclass
class Session:
    caller: Caller
    csrf: str
    last_seen: float = field(default_factory=time.monotonic)


class Sessions:
    """Signed-in people of this process: session id -> `Session`, ended when idle too long."""

    def __init__(self, idle_seconds: float):
        self.idle_seconds = idle_seconds
        self.by_id: dict[str, Session] = {}

    def start(self, caller: Caller) -> str:
        self._forget_idle()
        session_id = secrets.token_urlsafe(32)
        self.by_id[session_id] = Session(caller, secrets.token_urlsafe(32))
        return session_id

    def get(self, session_id: str | None) -> Session | None:
        session = self.by_id.get(session_id or "")
        if session is None:
            return None
        now = time.monotonic()
        if now - session.last_seen > self.idle_seconds:
            self.by_id.pop(session_id, None)
            return None
        session.last_seen = now
        return session

    def end(self, session_id: str | None) -> None:
        self.by_id.pop(session_id or "", None)

    def _forget_idle(self) -> None:
        now = time.monotonic()
        for key in [key for key, session in self.by_id.items() if now - session.last_seen > self.idle_seconds]:
            self.by_id.pop(key, None)


def router(params: Params, layout: Layout, store: Any, manager: Any, tokens: TokenTable) -> APIRouter:
    """The pages for the service of ``params`` (its store, model manager and tokens)."""
    import jinja2

    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True)
    environment.filters["percent"] = _percent
    environment.filters["number"] = _number
    sessions = Sessions(params.serving.session_idle_minutes * 60)
    inputs_dir = layout.state / "serving" / "inputs"
    pages = APIRouter(prefix=PREFIX, include_in_schema=False)
    classes = list(params.model.classes)

    def render(request: Request, template: str, session: Session | None, status: int = 200, **values: Any) -> Response:
        body = environment.get_template(template).render(
            prefix=PREFIX, who=session.caller if session else None, csrf=session.csrf if session else "",
            model_name=params.model.name, path=request.url.path, **values)
        return secured(HTMLResponse(body, status_code=status))

    def signed_in(request: Request, permission: str) -> Session:
        session = sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is None:
            raise PageRefusal(401, "You are not signed in, or your session ended after "
                                   f"{params.serving.session_idle_minutes:g} minutes without activity: sign in "
                                   "with your token again.")
        if not session.caller.may(permission):
            raise PageRefusal(403, f"Your role ({session.caller.role}) may not open this page: it needs the "
                                   f"{permission} permission. Ask an administrator if you need it.")
        return session

    async def form_of(request: Request, session: Session) -> dict[str, str]:
        """The posted form, once its CSRF token is the session's (else 403)."""
        form = await posted_form(request)
        if not hmac.compare_digest(form.get("csrf", "").encode(), session.csrf.encode()):
            raise PageRefusal(403, "This form came without a valid security token (CSRF), so nothing was "
                                   "changed. Reload the page and send it again.")
        return form

    async def guarded(request: Request, handler) -> Response:
        try:
            return await handler()
        except PageRefusal as refusal:
            if refusal.status == 401 and request.method == "GET":
                target = f"{PREFIX}/signin?{urlencode({'next': str(request.url.path)})}"
                return secured(RedirectResponse(target, status_code=303))
            session = sessions.get(request.cookies.get(SESSION_COOKIE))
            return render(request, "error.html", session, status=refusal.status, detail=refusal.detail)
        except store_errors() as exc:  # the store restarting: a page that says so, not the API's JSON
            retry_after = store_outage(request.method, request.url.path, exc, params.serving.store_retry_seconds)
            done = ("Send the form again (a label is kept once, however often its form is sent)"
                    if request.method == "POST" else "Reload the page")
            response = render(request, "error.html", sessions.get(request.cookies.get(SESSION_COOKIE)), status=503,
                              detail=f"The feedback store is not answering (it may be restarting), so this could "
                                     f"not be completed. {done} in {retry_after} seconds.")
            response.headers["Retry-After"] = str(retry_after)
            return response

    # ------------------------------------------------------------------ static files, sign-in

    @pages.get("/static/{name}")
    def static(name: str) -> Response:
        path = STATIC / name
        if name not in {item.name for item in STATIC.iterdir()} or path.suffix not in STATIC_TYPES:
            raise HTTPException(404, f"no static file {name!r}")
        return secured(FileResponse(path, media_type=STATIC_TYPES[path.suffix]), cache=True)

    @pages.get("")
    @pages.get("/")
    def home(request: Request) -> Response:
        session = sessions.get(request.cookies.get(SESSION_COOKIE))
        return secured(RedirectResponse(f"{PREFIX}/worklist" if session else f"{PREFIX}/signin", status_code=303))

    @pages.get("/signin")
    def signin_form(request: Request, next: str = "") -> Response:  # noqa: A002 - the form's field
        token = secrets.token_urlsafe(32)
        response = render(request, "signin.html", None, signin_csrf=token, next=_local(next), problem=None)
        response.set_cookie(SIGNIN_COOKIE, token, httponly=True, samesite="strict", path=PREFIX,
                            secure=request.url.scheme == "https")
        return response

    @pages.post("/signin")
    async def signin(request: Request) -> Response:
        form = await posted_form(request)
        expected = request.cookies.get(SIGNIN_COOKIE, "")
        if not expected or not hmac.compare_digest(form.get("csrf", "").encode(), expected.encode()):
            return render(request, "error.html", None, status=403,
                          detail="The sign-in form came without its security token (CSRF). Open the sign-in "
                                 "page again and sign in from there.")
        caller = tokens.caller(form.get("token", "").strip()) if form.get("token") else None
        if caller is None:
            token = secrets.token_urlsafe(32)
            response = render(request, "signin.html", None, status=401, signin_csrf=token,
                              next=_local(form.get("next", "")),
                              problem="That token is not known to this service. Paste the whole token you "
                                      "were given (medloop token add), or ask an administrator for one.")
            response.set_cookie(SIGNIN_COOKIE, token, httponly=True, samesite="strict", path=PREFIX,
                                secure=request.url.scheme == "https")
            return response
        log.info("pages: %s (%s) signed in", caller.name, caller.role)
        response = secured(RedirectResponse(_local(form.get("next", "")) or f"{PREFIX}/worklist", status_code=303))
        response.set_cookie(SESSION_COOKIE, sessions.start(caller), httponly=True, samesite="strict", path=PREFIX,
                            secure=request.url.scheme == "https")
        response.delete_cookie(SIGNIN_COOKIE, path=PREFIX)
        return response

    @pages.post("/signout")
    async def signout(request: Request) -> Response:
        async def handler() -> Response:
            session = signed_in(request, "predict")
            await form_of(request, session)
            sessions.end(request.cookies.get(SESSION_COOKIE))
            response = secured(RedirectResponse(f"{PREFIX}/signin", status_code=303))
            response.delete_cookie(SESSION_COOKIE, path=PREFIX)
            return response
        return await guarded(request, handler)

    # ------------------------------------------------------------------ worklist and case

    @pages.get("/worklist")
    async def worklist(request: Request) -> Response:
        async def handler() -> Response:
            session = signed_in(request, "feedback")
            filters = _filters(request.query_params)
            cases, left = await asyncio.to_thread(_worklist, store, params, session.caller.name, filters)
            return render(request, "worklist.html", session, cases=cases, left=left, filters=filters,
                          list_query=urlencode(filters), classes=classes, limit=WORKLIST_PAGE)
        return await guarded(request, handler)

    @pages.get("/cases/{prediction_id}")
    async def case(request: Request, prediction_id: str) -> Response:
        async def handler() -> Response:
            session = signed_in(request, "feedback")
            prediction = await asyncio.to_thread(_prediction, store, prediction_id)
            await asyncio.to_thread(store.record_view, prediction_id, session.caller.name, session.caller.role, "case")
            filters = _filters(parse_qs(request.query_params.get("list", "")))
            cases, _left = await asyncio.to_thread(_worklist, store, params, session.caller.name, filters)
            ids = [item["id"] for item in cases]
            here = ids.index(prediction_id) if prediction_id in ids else -1
            previous = ids[here - 1] if here > 0 else None
            following = next((other for other in ids[here + 1:] if other != prediction_id), None)
            history = await asyncio.to_thread(store.case_history, prediction_id)
            features = _features(params, manager, prediction) if prediction["modality"] != "image" else None
            return render(request, "case.html", session, case=prediction, history=history, features=features,
                          classes=classes, list_query=urlencode(filters), previous=previous, following=following,
                          nonce=uuid.uuid4().hex,
                          decided_probability=prediction["probabilities"].get(prediction["decision"]),
                          positive=params.model.positive_class,
                          dicom=prediction["input_metadata"].get("format") == "dicom",
                          explain=prediction["modality"] == "image" and _served_version(manager) == prediction["model_version"])
        return await guarded(request, handler)

    @pages.get("/cases/{prediction_id}/image")
    async def case_image(request: Request, prediction_id: str, center: float | None = None,
                         width: float | None = None) -> Response:
        async def handler() -> Response:
            signed_in(request, "feedback")
            prediction = await asyncio.to_thread(_prediction, store, prediction_id)
            png = await asyncio.to_thread(image_png, inputs_dir, prediction, center, width)
            return secured(Response(png, media_type="image/png"))
        return await guarded(request, handler)

    @pages.get("/cases/{prediction_id}/gradcam.png")
    async def case_gradcam(request: Request, prediction_id: str) -> Response:
        async def handler() -> Response:
            signed_in(request, "feedback")
            prediction = await asyncio.to_thread(_prediction, store, prediction_id)
            png = await asyncio.to_thread(_gradcam_png, manager, params, inputs_dir, prediction)
            return secured(Response(png, media_type="image/png"))
        return await guarded(request, handler)

    @pages.post("/cases/{prediction_id}/feedback")
    async def case_feedback(request: Request, prediction_id: str) -> Response:
        from pipelines.store.feedback import Conflict, NotFound

        async def handler() -> Response:
            session = signed_in(request, "feedback")
            form = await form_of(request, session)
            label, comment = form.get("label", ""), form.get("comment", "").strip() or None
            list_query = urlencode(_filters(parse_qs(form.get("list", ""))))
            if label not in classes:
                raise PageRefusal(422, f"The label {label[:100]!r} is not one of this model's classes "
                                       f"({', '.join(classes)}); choose one of them.")
            if comment and len(comment) > 5000:
                raise PageRefusal(422, f"The comment has {len(comment)} characters; at most 5000 are kept. "
                                       "Shorten it and send it again.")
            key = f"page:{form.get('nonce', '')[:64]}:{label}"
            try:
                await asyncio.to_thread(store.add_feedback, prediction_id, label, session.caller.name, key, comment)
            except NotFound as exc:
                raise PageRefusal(404, str(exc)) from None
            except Conflict:
                raise PageRefusal(409, "This form was already sent with another comment, so your earlier label "
                                       "stands. Open the case again to label it anew.") from None
            filters = _filters(parse_qs(list_query))
            cases, _left = await asyncio.to_thread(_worklist, store, params, session.caller.name, filters)
            following = next((item["id"] for item in cases if item["id"] != prediction_id), None)
            target = (f"{PREFIX}/cases/{following}?{urlencode({'list': list_query})}" if following
                      else f"{PREFIX}/worklist?{list_query}")
            return secured(RedirectResponse(target, status_code=303))
        return await guarded(request, handler)

    # ------------------------------------------------------------------ reviewer pages

    @pages.get("/adjudication")
    async def adjudication(request: Request) -> Response:
        async def handler() -> Response:
            session = signed_in(request, "review")
            queue = await asyncio.to_thread(store.open_reviews)
            for item in queue:
                item["case"] = await asyncio.to_thread(store.prediction, item["prediction_id"])
                await asyncio.to_thread(store.record_view, item["prediction_id"], session.caller.name,
                                        session.caller.role, "adjudication")
            return render(request, "adjudication.html", session, queue=queue, classes=classes)
        return await guarded(request, handler)

    @pages.post("/adjudication/{adjudication_id}")
    async def resolve(request: Request, adjudication_id: int) -> Response:
        from pipelines.store.feedback import Conflict, NotFound

        async def handler() -> Response:
            session = signed_in(request, "review")
            form = await form_of(request, session)
            label, reason = form.get("label", ""), form.get("reason", "").strip()
            if label not in classes:
                raise PageRefusal(422, f"Choose the resolved label, one of {', '.join(classes)}.")
            if not reason:
                raise PageRefusal(422, "Say why in the reason field: the resolution is kept with it.")
            try:
                await asyncio.to_thread(store.resolve, adjudication_id, label, session.caller.name, reason[:5000])
            except NotFound as exc:
                raise PageRefusal(404, f"{exc}; open the case from the adjudication page.") from None
            except Conflict as exc:
                raise PageRefusal(409, f"{exc}; the adjudication page shows the cases still open.") from None
            return secured(RedirectResponse(f"{PREFIX}/adjudication", status_code=303))
        return await guarded(request, handler)

    @pages.get("/monitoring")
    async def monitoring(request: Request) -> Response:
        async def handler() -> Response:
            session = signed_in(request, "review")
            report = await asyncio.to_thread(monitoring_report, params, layout, store, manager)
            return render(request, "monitoring.html", session, report=report, charts=_charts(report))
        return await guarded(request, handler)

    # ------------------------------------------------------------------ admin pages

    @pages.get("/models")
    async def models(request: Request) -> Response:
        from pipelines.promote import PREVIOUS_CHAMPION

        async def handler() -> Response:
            session = signed_in(request, "admin")
            registry = await asyncio.to_thread(_registry, params, layout)
            deployments = await asyncio.to_thread(store.deployments, params.model.name)
            return render(request, "models.html", session, registry=registry, deployments=deployments,
                          served=_served_version(manager), rolled_back=request.query_params.get("rolled_back") == "1",
                          can_roll_back=any(PREVIOUS_CHAMPION in version["aliases"] for version in registry["versions"]),
                          previous_champion=PREVIOUS_CHAMPION)
        return await guarded(request, handler)

    @pages.post("/models/rollback")
    async def rollback(request: Request) -> Response:
        from pipelines import promote
        from pipelines.errors import MedloopError

        async def handler() -> Response:
            session = signed_in(request, "admin")
            form = await form_of(request, session)
            if form.get("confirm") != "yes":
                raise PageRefusal(422, "Rollback needs its confirmation: tick the box that says you mean it.")
            reason = form.get("reason", "").strip()
            if not reason:
                raise PageRefusal(422, "Say why you roll back in the reason field: it is kept in the history.")
            try:
                result = await asyncio.to_thread(promote.rollback, params, layout, session.caller.name, reason[:2000])
            except MedloopError as exc:
                raise PageRefusal(409, str(exc)) from None
            await asyncio.to_thread(manager.refresh)
            log.warning("pages: %s rolled %s back to v%s", session.caller.name, params.model.name, result.version)
            return secured(RedirectResponse(f"{PREFIX}/models?rolled_back=1", status_code=303))
        return await guarded(request, handler)

    @pages.get("/models/{version}/card")
    async def card(request: Request, version: str) -> Response:
        async def handler() -> Response:
            session = signed_in(request, "predict")
            text = await asyncio.to_thread(_card, params, layout, version)
            return render(request, "card.html", session, version=version, card=text)
        return await guarded(request, handler)

    @pages.get("/models/{version}/importance.png")
    async def importance(request: Request, version: str) -> Response:
        async def handler() -> Response:
            signed_in(request, "predict")
            png = await asyncio.to_thread(_artifact, params, layout, version, "plots/permutation_importance.png")
            if png is None:
                raise PageRefusal(404, f"version {version} has no permutation-importance picture")
            return secured(Response(png, media_type="image/png"), cache=True)
        return await guarded(request, handler)

    @pages.get("/access-log")
    async def access_log(request: Request) -> Response:
        async def handler() -> Response:
            session = signed_in(request, "admin")
            views = await asyncio.to_thread(store.access_log, prediction_id=request.query_params.get("case") or None)
            return render(request, "access_log.html", session, views=views)
        return await guarded(request, handler)

    return pages


# ------------------------------------------------------------------------------------------------


def secured(response: Response, cache: bool = False) -> Response:
    """Every answer of the pages: the Content-Security-Policy (no inline script, nothing from
    another host), no framing, no sniffing, no referrer, and no caching of what may be clinical."""
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "private, max-age=300" if cache else "no-store"
    return response


async def posted_form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body as {field: last value} (the body's size is
    already bounded by `serving.guards.RequestGuard`)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise PageRefusal(415, f"A page form is sent as application/x-www-form-urlencoded, not "
                               f"{content_type[:80] or '(none)'}.")
    fields = parse_qs((await request.body()).decode("utf-8", errors="replace"), keep_blank_values=True)
    return {name: values[-1] for name, values in fields.items()}


def monitoring_report(params: Params, layout: Layout, store: Any, manager: Any) -> dict[str, Any]:
    """What the monitoring page shows: live figures per version (with 95% Wilson intervals), the
    shadow candidate's figures beside each, the served version's drift per statistic, and what
    the retraining policy would decide now (checked, nothing started)."""
    from pipelines.model.metrics import wilson_interval
    from pipelines.monitoring import policy
    from serving.monitoring import served_drift
    from pipelines.workspace import database_url

    name, positive = params.model.name, params.model.positive_class
    versions = store.live_performance(name, positive)
    shadows = store.shadow_performance(name, positive)
    for version in versions:
        confusion = version["confusion"]
        positives, negatives = confusion["tp"] + confusion["fn"], confusion["tn"] + confusion["fp"]
        version["intervals"] = {
            "sensitivity": wilson_interval(confusion["tp"], positives),
            "specificity": wilson_interval(confusion["tn"], negatives),
            "agreement": wilson_interval(confusion["tp"] + confusion["tn"], version["confirmed"]),
        }
        version["counts"] = {"sensitivity": f"{confusion['tp']}/{positives}",
                             "specificity": f"{confusion['tn']}/{negatives}",
                             "agreement": f"{confusion['tp'] + confusion['tn']}/{version['confirmed']}"}
        version["shadow"] = [entry for entry in shadows if entry["served_version"] == version["version"]]
    drift_report = served_drift(manager.current, params, database_url(layout, params.serving.store_url))
    decision = policy.decide(params, layout, drift=drift_report if params.retrain_policy.on_drift else None)
    shadow = manager.shadow.describe() if getattr(manager, "shadow", None) is not None else None
    return {"model": name, "positive_class": positive, "versions": versions, "shadow": shadow,
            "shadow_reference": getattr(manager, "shadow_reference", None),
            "drift": drift_report.as_dict() if drift_report else None,
            "policy": {"headline": policy.headline(decision), **decision.as_dict()},
            "deployments": store.deployments(name)}


def _filters(query: Any) -> dict[str, str]:
    """The worklist's filters from a query (a mapping, or parse_qs's lists), known keys only."""
    filters = {}
    for key in WORKLIST_FILTERS:
        value = query.get(key) if hasattr(query, "get") else None
        if isinstance(value, list):
            value = value[-1] if value else None
        if value:
            filters[key] = str(value)[:40]
    if filters.get("order") not in (None, "newest", "uncertain"):
        filters.pop("order")
    since = filters.get("since")
    if since is not None:
        from datetime import date

        try:
            date.fromisoformat(since)
        except ValueError:
            filters.pop("since")
    return filters


def _worklist(store: Any, params: Params, reviewer: str, filters: dict[str, str]) -> tuple[list[dict], int]:
    return store.worklist(reviewer, params.model.name, params.model.positive_class, model_version=filters.get("version"),
                          decision=filters.get("decision"), since=filters.get("since"),
                          order=filters.get("order", "newest"), limit=WORKLIST_PAGE)


def _prediction(store: Any, prediction_id: str) -> dict[str, Any]:
    from pipelines.store.feedback import NotFound

    try:
        return store.prediction(prediction_id)
    except NotFound:
        raise PageRefusal(404, f"There is no case {prediction_id[:40]!r}; open it from the worklist.") from None


def _served_version(manager: Any) -> str | None:
    return manager.current.version if manager.current is not None else None


def _features(params: Params, manager: Any, prediction: dict[str, Any]) -> list[dict[str, Any]]:
    """The instance's features beside their declared ranges and, when the version that decided
    is the one served, the training distribution it was scaled with (mean and SD)."""
    values = prediction["input_metadata"].get("features", {})
    scaler = None
    served = manager.current
    if served is not None and served.version == prediction["model_version"]:
        scaler = getattr(served.model.unwrap_python_model(), "scaler", None)
    rows = []
    for name, spec in params.tabular.features.items():
        value = values.get(name)
        mean = scaler["mean"].get(name) if scaler else None
        std = scaler["std"].get(name) if scaler else None
        z = (value - mean) / std if value is not None and mean is not None and std else None
        rows.append({"name": name, "value": value, "min": spec.min, "max": spec.max, "mean": mean, "std": std,
                     "unusual": z is not None and abs(z) > 2, "z": z})
    return rows


def image_png(inputs_dir: Path, prediction: dict[str, Any], center: float | None, width: float | None) -> bytes:
    """The stored de-identified image as PNG at full resolution; a DICOM image through the
    window (``center``, ``width``; default: its own window, else its full range)."""
    import numpy as np
    from PIL import Image

    stored = prediction["input_metadata"].get("file")
    path = inputs_dir / stored if stored else None
    if path is None or not path.is_file():
        raise PageRefusal(404, "The image of this case is not kept by this service (it keeps the images it "
                               "scored in .medloop/serving/inputs).")
    if prediction["input_metadata"].get("format") == "dicom":
        import pydicom

        dataset = pydicom.dcmread(path)
        pixels = dataset.pixel_array.astype(np.float64)
        pixels = pixels * float(getattr(dataset, "RescaleSlope", 1) or 1) + float(getattr(dataset, "RescaleIntercept", 0) or 0)
        center = center if center is not None else _first(getattr(dataset, "WindowCenter", None))
        width = width if width is not None else _first(getattr(dataset, "WindowWidth", None))
        if center is None or not width:
            low, high = float(pixels.min()), float(pixels.max())
        else:
            low, high = center - width / 2, center + width / 2
        scaled = np.clip((pixels - low) / max(high - low, 1e-9), 0, 1)
        if getattr(dataset, "PhotometricInterpretation", "") == "MONOCHROME1":
            scaled = 1 - scaled
        image = Image.fromarray(np.round(scaled * 255).astype(np.uint8))
    else:
        image = Image.open(path)
        image.load()
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _first(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value[0]) if hasattr(value, "__len__") and not isinstance(value, str) else float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _gradcam_png(manager: Any, params: Params, inputs_dir: Path, prediction: dict[str, Any]) -> bytes:
    """The served version's Grad-CAM heat map of the stored image, for the class it decided
    (`serving.scoring.explain_gradcam`, as ``/predict?explain=gradcam`` gives it)."""
    import base64

    import pandas as pd

    from pipelines.model.pyfunc import IMAGE_COLUMN
    from serving import scoring

    served = manager.current
    if served is None or served.version != prediction["model_version"]:
        raise PageRefusal(409, f"Version {prediction['model_version']} decided this case and is no longer served, "
                               "so its heat map cannot be drawn here.")
    stored = prediction["input_metadata"].get("file")
    path = inputs_dir / stored if stored else None
    if path is None or not path.is_file():
        raise PageRefusal(404, "The image of this case is not kept by this service.")
    pixels = scoring.pyfunc_of(served).prepare(pd.DataFrame({IMAGE_COLUMN: [path.read_bytes()]}))
    prepared = scoring.Prepared(pixels, [prediction["input_sha256"]], [{}])
    _scored, [explanation] = scoring.explain_gradcam(served, prepared)
    return base64.b64decode(explanation["image_png"])


def _registry(params: Params, layout: Layout) -> dict[str, Any]:
    """The registered versions (newest first) with their aliases, gates and decision, and the
    promotion history (newest first)."""
    from pipelines import promote
    from pipelines.registry import tags as registry_tags
    from pipelines.registry.client import connect, is_registered

    client = connect(params, layout)
    name = params.model.name
    if not is_registered(client, name):
        return {"versions": [], "history": []}
    aliases: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(name).aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    versions = []
    for version in sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version), reverse=True):
        tags = version.tags or {}
        try:
            gates = json.loads(tags.get(registry_tags.VERDICTS, "[]"))
        except json.JSONDecodeError:
            gates = []
        versions.append({"version": str(version.version), "run_id": version.run_id,
                         "aliases": sorted(aliases.get(str(version.version), [])),
                         "created": time.strftime("%Y-%m-%d %H:%M", time.gmtime(version.creation_timestamp / 1000)),
                         "gates": [gate for gate in gates if isinstance(gate, dict)],
                         "threshold": tags.get(registry_tags.OPERATING_THRESHOLD)})
    return {"versions": versions, "history": list(reversed(promote.history(params, layout)))}


def _artifact(params: Params, layout: Layout, version: str, path: str) -> bytes | None:
    """A file the evaluation logged with the run of registered ``version`` (None when absent)."""
    import tempfile

    from mlflow.exceptions import MlflowException

    from pipelines.evaluate import MLFLOW_ARTIFACT_PATH
    from pipelines.registry.client import connect

    if not version.isdigit():
        return None
    client = connect(params, layout)
    try:
        run_id = client.get_model_version(params.model.name, version).run_id
        with tempfile.TemporaryDirectory() as folder:
            local = client.download_artifacts(run_id, f"{MLFLOW_ARTIFACT_PATH}/{path}", folder)
            return Path(local).read_bytes()
    except (MlflowException, OSError):
        return None


def _card(params: Params, layout: Layout, version: str) -> str:
    card = _artifact(params, layout, version, "model_card.md")
    if card is None:
        raise PageRefusal(404, f"Version {version[:20]!r} of {params.model.name} has no model card in the registry.")
    return card.decode("utf-8", errors="replace")


def _local(target: str) -> str:
    """``target`` when it is a path of these pages (never another host: an open redirect)."""
    return target if target.startswith(PREFIX + "/") and "//" not in target and "\\" not in target else ""


def _percent(value: Any) -> str:
    return "n/a" if value is None else f"{100 * float(value):.1f}%"


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


# ------------------------------------------------------------------------------------------------
# the monitoring page's pictures: SVG drawn here (no script, no third-party library)


CHART_WIDTH, CHART_HEIGHT, CHART_MARGIN = 560, 220, 44


def _charts(report: dict[str, Any]) -> dict[str, Any]:
    """Per figure (sensitivity, specificity, agreement): one point per version with its 95%
    interval as a whisker, positioned on a 0..100% axis; and the drift statistics' PSI as bars
    against the threshold."""
    charts = {}
    versions = report["versions"]
    plot_width = CHART_WIDTH - 2 * CHART_MARGIN
    plot_height = CHART_HEIGHT - 2 * CHART_MARGIN
    step = plot_width / max(len(versions), 1)

    def y(value: float) -> float:
        return CHART_MARGIN + plot_height * (1 - value)

    for figure in ("sensitivity", "specificity", "agreement"):
        points = []
        for index, version in enumerate(versions):
            x = CHART_MARGIN + step * (index + 0.5)
            value, interval = version[figure], version["intervals"][figure]
            points.append({"x": round(x, 1), "label": f"v{version['version']}", "count": version["counts"][figure],
                           "value": value, "y": None if value is None else round(y(value), 1),
                           "low": None if interval is None else round(y(interval[0]), 1),
                           "high": None if interval is None else round(y(interval[1]), 1)})
        charts[figure] = {"points": points, "ticks": [{"y": round(y(t), 1), "label": f"{int(t * 100)}%"}
                                                       for t in (0, 0.25, 0.5, 0.75, 1)]}
    drift = report.get("drift") or {}
    statistics = [stat for stat in drift.get("statistics", []) + ([drift["prediction"]] if drift.get("prediction") else [])
                  if stat.get("psi") is not None]
    threshold = (drift.get("thresholds") or {}).get("psi_threshold")
    top = max([stat["psi"] for stat in statistics] + [threshold or 0, 1e-9])
    bar = 18
    charts["drift"] = {
        "height": CHART_MARGIN + bar * len(statistics) + 10,
        "bars": [{"y": CHART_MARGIN + bar * index, "width": round((CHART_WIDTH - 220) * stat["psi"] / top, 1),
                  "label": stat["label"][:40], "psi": stat["psi"], "drifted": stat.get("drifted")}
                 for index, stat in enumerate(statistics)],
        "threshold_x": None if threshold is None else round(200 + (CHART_WIDTH - 220) * threshold / top, 1),
        "threshold": threshold,
    }
    charts["size"] = {"width": CHART_WIDTH, "height": CHART_HEIGHT, "margin": CHART_MARGIN,
                      "right": CHART_WIDTH - CHART_MARGIN, "bottom": CHART_HEIGHT - CHART_MARGIN}
    return charts
