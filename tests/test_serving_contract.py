"""Every input answered safely: the service (in process, FastAPI's TestClient against the app
`serving.app.create_app` builds, serving the session's trained tabular champion) answers each
kind of bad input with its exact status and a message naming the problem, never a 5xx, never
echoing more than a short excerpt, and never writing what was sent into any log."""

from __future__ import annotations

import asyncio
import json
import logging

import numpy as np
import pytest

from conftest import in_range_instance, load, serving_settings

LIMIT = 1_000_000  # serving.max_request_bytes of the app under test
CANARIES = ["CANARY-comment-Jane-Roe", "CANARY-name-John-Doe", "CANARY-pid-0042", "CANARY-reason-MRN-77",
            "CANARY-key-id-913", "-5.123457", "1e+308", "51234.5", "987654321987"]


@pytest.fixture(scope="module")
def service(served_workspace, tmp_path_factory):
    """The app from the factory, on the shared champion, with its own store and a 1 MB limit:
    ``{"client", "tokens", "features", "app"}``."""
    from fastapi.testclient import TestClient

    from serving.app import create_app

    layout = served_workspace["layout"]
    store = tmp_path_factory.mktemp("contract") / "store.db"
    with serving_settings(layout, store_url=f"sqlite:///{store}", max_request_bytes=LIMIT, batch_max_size=1):
        app = create_app(layout.params_file, reload_seconds=3600)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield {"client": client, "tokens": served_workspace["tokens"], "app": app,
               "features": load(layout).tabular.features}


def good(features, **values) -> dict:
    return {**in_range_instance(features), **values}


def body_of(instances) -> bytes:
    return json.dumps({"instances": instances}).encode()


def nested(depth: int) -> bytes:
    return b'{"instances": ' + b"[" * depth + b"]" * depth + b"}"


# (kind, method, path, role or None, Content-Type, body: function of the features -> bytes, status, phrase)
CASES = [
    ("value far beyond the range (1e308)", "post", "/predict", "clinician", "application/json",
     lambda f: body_of([good(f, mean_radius=1e308)]), 422,
     "instances[0].mean_radius must be between 0 and 60 (its declared range in tabular.features), got 1e+308"),
    ("value below the declared minimum", "post", "/predict", "clinician", "application/json",
     lambda f: body_of([good(f, mean_radius=-5.123457)]), 422, "mean_radius must be between 0 and 60"),
    ("value above the declared maximum", "post", "/predict", "clinician", "application/json",
     lambda f: body_of([good(f, mean_area=51234.5)]), 422, "mean_area must be between 0 and 6000"),
    ("Infinity", "post", "/predict", "clinician", "application/json",
     lambda f: body_of([good(f, mean_radius=float("inf"))]), 422, "mean_radius must be a finite number"),
    ("NaN", "post", "/predict", "clinician", "application/json",
     lambda f: body_of([good(f, mean_radius=float("nan"))]), 422, "mean_radius must be a finite number"),
    ("a 5,000-digit integer", "post", "/predict", "clinician", "application/json",
     lambda f: b'{"instances": [{"mean_radius": ' + b"7" * 5000 + b"}]}", 422, "numbers may have at most 40"),
    ("a 39-digit integer (beyond every range)", "post", "/predict", "clinician", "application/json",
     lambda f: body_of([good(f, mean_radius=987654321987 * 10**27)]), 422, "mean_radius must be between 0 and 60"),
    ("a string for a number", "post", "/predict", "clinician", "application/json",
     lambda f: body_of([good(f, mean_radius="high")]), 422, "must be a number or null, got str"),
    ("a boolean for a number", "post", "/predict", "clinician", "application/json",
     lambda f: body_of([good(f, mean_radius=True)]), 422, "must be a number or null, got bool"),
    ("an empty instance", "post", "/predict", "clinician", "application/json",
     lambda f: body_of([{}]), 422, "instances[0] misses 30 of its 30 features"),
    ("an all-null instance", "post", "/predict", "clinician", "application/json",
     lambda f: body_of([dict.fromkeys(f)]), 422, "misses 30 of its 30 features"),
    ("over the missing share (7 of 30)", "post", "/predict", "clinician", "application/json",
     lambda f: body_of([good(f, **dict.fromkeys(list(f)[:7]))]), 422,
     "misses 7 of its 30 features (absent or null); at most 20% may be missing (serving.max_missing_share)"),
    ("a field that is not a feature", "post", "/predict", "clinician", "application/json",
     lambda f: body_of([good(f, patient_name="CANARY-name-John-Doe")]), 422,
     "instances[0] has fields that are not features: ['patient_name']"),
    ("a top-level field besides instances", "post", "/predict", "clinician", "application/json",
     lambda f: json.dumps({"instances": [good(f)], "mrn": "CANARY-key-id-913"}).encode(), 422,
     "the request has fields other than 'instances': 'mrn'"),
    ("instances not a list", "post", "/predict", "clinician", "application/json",
     lambda f: b'{"instances": {"mean_radius": 3}}', 422, "expected a JSON object with a non-empty list 'instances'"),
    ("an empty list of instances", "post", "/predict", "clinician", "application/json",
     lambda f: b'{"instances": []}', 422, "non-empty list 'instances'"),
    ("an instance that is not an object", "post", "/predict", "clinician", "application/json",
     lambda f: b'{"instances": [3]}', 422, "instances[0] is not an object of feature values"),
    ("65 instances in one request", "post", "/predict", "clinician", "application/json",
     lambda f: body_of([good(f)] * 65), 422, "65 inputs in one request; at most 64"),
    ("JSON nested 5,000 deep", "post", "/predict", "clinician", "application/json",
     lambda f: nested(5000), 422, "JSON nested deeper than 32 levels"),
    ("JSON nested 100,000 deep", "post", "/predict", "clinician", "application/json",
     lambda f: nested(100_000), 422, "JSON nested deeper than 32 levels"),
    ("not JSON", "post", "/predict", "clinician", "application/json",
     lambda f: b'{"instances": [', 422, "body is not valid JSON"),
    ("not UTF-8", "post", "/predict", "clinician", "application/json",
     lambda f: b'{"instances": ["\xff\xfe"]}', 422, "not valid UTF-8"),
    ("a lone surrogate in a feature name", "post", "/predict", "clinician", "application/json",
     lambda f: b'{"instances": [{"\\ud800": 1}]}', 422, "lone surrogate"),
    ("a text body", "post", "/predict", "clinician", "text/plain",
     lambda f: b"CANARY-comment-Jane-Roe", 415, "Content-Type 'text/plain' is not accepted"),
    ("an image to a tabular model", "post", "/predict", "clinician", "image/png",
     lambda f: b"\x89PNG\r\n\x1a\n", 415, "takes JSON features, not image/png"),
    ("explanation not offered", "post", "/predict?explain=shap", "clinician", "application/json",
     lambda f: body_of([good(f)]), 422, "explain='shap' is not offered"),
    ("Grad-CAM for a tabular model", "post", "/predict?explain=gradcam", "clinician", "application/json",
     lambda f: body_of([good(f)]), 422, "explain=gradcam needs an image model"),
    ("a declared body over the limit, no token", "post", "/predict", None, "application/json",
     lambda f: b"[" + b" " * LIMIT + b"]", 413, f"is over the limit of {LIMIT} bytes (serving.max_request_bytes)"),
    ("no token", "post", "/predict", None, "application/json",
     lambda f: body_of([good(f)]), 401, "missing bearer token"),
    ("a lone surrogate in a feedback comment", "post", "/feedback", "clinician", "application/json",
     lambda f: b'{"prediction_id": "CANARY-pid-0042", "label": "malignant", "idempotency_key": "k1", '
               b'"comment": "CANARY-comment-Jane-Roe \\ud800"}', 422, "the string at body.comment holds a lone surrogate"),
    ("a lone surrogate in a feedback label", "post", "/feedback", "clinician", "application/json",
     lambda f: b'{"prediction_id": "CANARY-pid-0042", "label": "\\udfff", "idempotency_key": "k1"}', 422,
     "the string at body.label holds a lone surrogate"),
    ("an undeclared field in feedback", "post", "/feedback", "clinician", "application/json",
     lambda f: json.dumps({"prediction_id": "CANARY-pid-0042", "label": "malignant", "idempotency_key": "k2",
                           "patient_name": "CANARY-name-John-Doe"}).encode(), 422,
     "body.patient_name: Extra inputs are not permitted"),
    ("a 6,000-character comment", "post", "/feedback", "clinician", "application/json",
     lambda f: json.dumps({"prediction_id": "CANARY-pid-0042", "label": "malignant", "idempotency_key": "k3",
                           "comment": "CANARY-comment-Jane-Roe " * 250}).encode(), 422,
     "body.comment: String should have at most 5000 characters (got 'CANARY-comment-Jane-Roe CANARY-comment-... "
     "(6000 characters))"),
    ("a label that is not a class", "post", "/feedback", "clinician", "application/json",
     lambda f: json.dumps({"prediction_id": "CANARY-pid-0042", "label": "cancer?", "idempotency_key": "k4"}).encode(),
     422, "label 'cancer?' is not one of ['benign', 'malignant']"),
    ("a missing field in feedback", "post", "/feedback", "clinician", "application/json",
     lambda f: json.dumps({"label": "malignant", "idempotency_key": "k5"}).encode(), 422,
     "body.prediction_id: Field required"),
    ("feedback on an unknown prediction", "post", "/feedback", "clinician", "application/json",
     lambda f: json.dumps({"prediction_id": "CANARY-pid-0042", "label": "malignant",
                           "idempotency_key": "k6"}).encode(), 404, "CANARY-pid-0042"),
    ("feedback as a list", "post", "/feedback", "clinician", "application/json",
     lambda f: b"[1, 2]", 422, "body: Input should be a valid dictionary"),
    ("a 5,000-digit number in feedback", "post", "/feedback", "clinician", "application/json",
     lambda f: b'{"prediction_id": ' + b"9" * 5000 + b"}", 422, "a JSON number of 5000 characters"),
    ("feedback nested 100,000 deep", "post", "/feedback", "clinician", "application/json",
     lambda f: b'{"comment": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 422, "JSON nested deeper than 32 levels"),
    ("feedback with an unknown token", "post", "/feedback", "nobody", "application/json",
     lambda f: json.dumps({"prediction_id": "CANARY-pid-0042", "label": "malignant",
                           "idempotency_key": "k7"}).encode(), 401, "unknown token"),
    ("a case id of 2^63", "post", f"/review/{2**63}", "reviewer", "application/json",
     lambda f: b'{"label": "benign"}', 422, "adjudication_id: Input should be less than or equal to 9223372036854775807"),
    ("a case id of 2^70", "post", f"/review/{2**70}", "reviewer", "application/json",
     lambda f: b'{"label": "benign"}', 422, "path.adjudication_id: Input should be less than or equal to"),
    ("a case id of 0", "post", "/review/0", "reviewer", "application/json",
     lambda f: b'{"label": "benign"}', 422, "path.adjudication_id: Input should be greater than or equal to 1"),
    ("a case id that is not a number", "post", "/review/abc", "reviewer", "application/json",
     lambda f: b'{"label": "benign"}', 422, "path.adjudication_id: Input should be a valid integer"),
    ("a case that does not exist", "post", "/review/987654", "reviewer", "application/json",
     lambda f: b'{"label": "benign"}', 404, "987654"),
    ("a lone surrogate in a review reason", "post", "/review/1", "reviewer", "application/json",
     lambda f: b'{"label": "benign", "reason": "CANARY-reason-MRN-77 \\ud800"}', 422,
     "the string at body.reason holds a lone surrogate"),
    ("an undeclared field in a review", "post", "/review/1", "reviewer", "application/json",
     lambda f: b'{"label": "benign", "mrn": "CANARY-reason-MRN-77"}', 422, "body.mrn: Extra inputs are not permitted"),
    ("a review by a clinician", "post", "/review/1", "clinician", "application/json",
     lambda f: b'{"label": "benign"}', 403, "role clinician may not review"),
    ("reload by a clinician", "post", "/admin/reload", "clinician", None, lambda f: b"", 403,
     "role clinician may not admin"),
]


def send(service, case):
    _kind, method, path, role, content_type, body, _status, _phrase = case
    headers = {}
    if role is not None:
        headers["Authorization"] = f"Bearer {service['tokens'].get(role, 'not-a-token')}"
    if content_type is not None:
        headers["Content-Type"] = content_type
    return service["client"].request(method.upper(), path, content=body(service["features"]), headers=headers)


def test_enough_kinds_of_bad_input():
    assert len({case[0] for case in CASES}) == len(CASES) >= 30


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_refused_with_its_reason(service, case):
    answer = send(service, case)
    status, phrase = case[6], case[7]
    assert answer.status_code == status, answer.text[:500]
    detail = answer.json()["detail"]
    assert isinstance(detail, str) and phrase in detail, detail[:500]
    assert len(answer.content) < 1500  # at most a short excerpt of what was sent comes back


@pytest.mark.slow
def test_no_log_holds_what_the_bad_requests_sent(service):
    """Every request of the table again, with a handler on the root and medloop loggers: no
    free text, feature value or identifier sent reaches a log record (message or traceback)."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(logging.Formatter().format(record))

    handler = Keep(level=logging.DEBUG)
    loggers = [logging.getLogger(), logging.getLogger("medloop")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    try:
        statuses = {case[0]: send(service, case).status_code for case in CASES}
        logging.getLogger("medloop.serving").info("canary handler check")
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)
    assert all(status < 500 for status in statuses.values()), statuses
    assert any("canary handler check" in text for text in records)  # the handler did see the service's log
    leaked = [(needle, text[:200]) for text in records for needle in CANARIES if needle in text]
    assert leaked == []


@pytest.mark.slow
def test_a_chunked_body_over_the_limit_is_refused_before_the_token_and_before_parsing(service):
    """No Content-Length, no token: the body is counted as it arrives and refused with 413 once
    it passes the limit; the client's remaining chunks are never read."""
    chunk = b"x" * 65536
    pulled = 0

    def chunks():
        nonlocal pulled
        for _ in range(80):  # 5 MB in all, five times the limit
            pulled += 1
            yield chunk

    answer = service["client"].post("/feedback", content=chunks(), headers={"Content-Type": "application/json"})
    assert answer.status_code == 413 and f"over the limit of {LIMIT} bytes" in answer.json()["detail"]
    assert "content-length" not in {key.lower() for key in answer.request.headers}

    # The same at the ASGI level, where the chunks arrive one by one: reading stops at the limit.
    pulled = 0
    stream = chunks()
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": next(stream), "more_body": True}

    async def collect(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/feedback", "raw_path": b"/feedback", "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {}}
    asyncio.run(service["app"](scope, receive, collect))
    assert sent[0]["status"] == 413
    assert pulled == LIMIT // len(chunk) + 1  # one chunk past the limit, not the 80 the client had


@pytest.mark.slow
def test_a_valid_request_still_gets_its_decision(service):
    """The contract refuses only what it must: an in-range case with a few missing values is decided."""
    features = service["features"]
    row = good(features, **dict.fromkeys(list(features)[:6]))  # 6 of 30 missing: 20%, the most allowed
    answer = service["client"].post("/predict", json={"instances": [row]},
                                    headers={"Authorization": f"Bearer {service['tokens']['clinician']}"})
    assert answer.status_code == 200, answer.text
    [prediction] = answer.json()["predictions"]
    assert prediction["decision"] in ("benign", "malignant")
    assert abs(sum(prediction["probabilities"].values()) - 1) < 1e-5


@pytest.mark.slow
def test_docs_pages_are_off_and_the_openapi_document_is_served(service):
    client = service["client"]
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    document = client.get("/openapi.json").json()
    body = document["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    radius = body["properties"]["instances"]["items"]["properties"]["mean_radius"]["anyOf"][0]
    assert radius == {"type": "number", "minimum": 0, "maximum": 60}
    assert document["paths"]["/feedback"]["post"]["responses"]["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Problem"}
    assert "# TYPE medloop_unusable_outputs_total counter" in client.get("/metrics").text


def test_a_model_output_that_is_not_a_probability_is_never_decided():
    from serving.model import Served
    from serving.scoring import NotAProbability, Prepared, answers

    served = Served("breast-cancer-mlp", "3", None, ["benign", "malignant"], "malignant", 0.4)
    prepared = Prepared([{}, {}], ["a", "b"], [{}, {}])
    decided = answers(served, np.array([[0.7, 0.3], [0.2, 0.8]], dtype=np.float32), prepared)
    assert [answer["decision"] for answer in decided] == ["benign", "malignant"]
    for broken in ([0.7, 0.3], [np.nan, np.nan]), ([0.7, 0.3], [np.inf, 0.0]), ([0.7, 0.3], [1.5, -0.5]):
        with pytest.raises(NotAProbability, match=r"model output not a finite probability for input 1 "
                                                  r"\(breast-cancer-mlp v3 gave"):
            answers(served, np.array(broken, dtype=np.float32), prepared)


@pytest.mark.parametrize(("value", "problem"), [
    (None, None), (30, None), (0, None), (60.0, None),
    (-5, "must be between 0 and 60 (its declared range in tabular.features), got -5"),
    (1e308, "must be between 0 and 60 (its declared range in tabular.features), got 1e+308"),
    (10**400, "must be a finite number (null when missing), got an integer beyond the float range"),
    (float("nan"), "must be a finite number (null when missing), got nan"),
    ("3", "must be a number or null, got str"), (False, "must be a number or null, got bool"),
])
def test_a_feature_value_is_held_to_its_declaration(value, problem):
    from pipelines.config import FeatureSpec

    assert FeatureSpec(dtype="float", min=0, max=60).problem(value) == problem


def test_an_int_feature_takes_whole_numbers_and_an_undeclared_bound_does_not_limit():
    from pipelines.config import FeatureSpec

    assert FeatureSpec(dtype="int", min=0).problem(2.5) == "must be a whole number, got 2.5"
    assert FeatureSpec(dtype="int", min=0).problem(3.0) is None
    assert FeatureSpec(dtype="int", min=0).problem(-1) == "must be at least 0 (its declared range in tabular.features), got -1"
    assert FeatureSpec(dtype="int").problem(-(10**9)) is None


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_finds_no_server_error_and_no_schema_violation(service, mode):
    """Schemathesis generates requests from the app's own OpenAPI document (valid ones, then
    ones that break it) for every operation, as an admin; each answer is no 5xx, has a
    documented status, content type and body schema, and (negative) refuses what breaks the schema."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
    )

    client = service["client"]
    schema = schemathesis.openapi.from_dict(client.get("/openapi.json").json())
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    if mode == "negative":
        checks.append(negative_data_rejection)
    admin = {"Authorization": f"Bearer {service['tokens']['admin']}"}
    strategy = schema.as_strategy(generation_mode=GenerationMode(mode))
    seen: set[tuple[str, int]] = set()

    @given(case=strategy)
    @settings(max_examples=25 * len(client.get("/openapi.json").json()["paths"]), deadline=None, database=None,
              derandomize=True, suppress_health_check=list(HealthCheck))
    def answered_by_the_contract(case):
        sent = case.as_transport_kwargs(base_url="http://testserver", headers=admin)
        data = sent.pop("data", None)
        if data is not None:
            sent["content"] = data
        response = client.request(sent.pop("method"), sent.pop("url"), **sent)
        seen.add((f"{case.method} {case.path}", response.status_code))
        case.validate_response(response, checks=checks, headers=sent.get("headers"))

    answered_by_the_contract()
    assert {"POST /predict", "POST /feedback", "POST /review/{adjudication_id}"} <= {operation for operation, _ in seen}
    # Valid inputs are decided (positive), invalid ones refused (negative): both paths were taken.
    assert ("POST /predict", 200 if mode == "positive" else 422) in seen, sorted(seen)
