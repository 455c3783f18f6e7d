"""Shadow mode: a candidate scores every served input off the response path; its answers are
stored, never returned, and judged beside the champion's on the same confirmed cases.

The end-to-end tests run `medloop serve` in its own process with a real MLflow registry: v1 is
champion and the candidate is a second model that promotion refused (``run:<id>``), later
registered as v2 and rolled back so that it is also a registered, non-champion version."""

from __future__ import annotations

import os
import threading
import time

import httpx
import pandas as pd
import pytest
import yaml

from conftest import SALT, copy_world, load
from pipelines import promote
from pipelines.ops.versioning import repro
from test_serving import bearer, instance, start_service, stop


@pytest.fixture(scope="module")
def shadow_workspace(tabular_champion, tmp_path_factory):
    """v1 champion (a copy of the session's tabular champion); a refused run (the candidate),
    then registered as v2 and rolled back."""
    from pipelines.workspace import Layout
    from serving.auth import add_token

    previous = os.environ.get("MEDLOOP_DEID_SALT")
    os.environ["MEDLOOP_DEID_SALT"] = SALT
    tmp_path = tmp_path_factory.mktemp("shadow")
    layout = Layout.at(copy_world(tabular_champion, tmp_path / "world") / "ws")

    # A different model that a gate refuses: no model is perfectly calibrated (ECE 0).
    edited = yaml.safe_load(layout.params_file.read_text())
    edited["train"]["epochs"] = 4
    edited["promote"]["max_ece"] = 0.0
    layout.params_file.write_text(yaml.safe_dump(edited, sort_keys=False))
    assert repro(layout, "evaluate")
    refused = promote.run(load(layout), layout, actor="test")
    assert refused.action == "refused"
    assert promote.override(load(layout), layout, refused.run_id, "test: a registered candidate",
                            actor="test").version == "2"
    assert promote.rollback(load(layout), layout, actor="test", reason="test: v1 serves").version == "1"

    tokens_file = layout.root / ".medloop" / "tokens.json"
    tokens = {role: add_token(tokens_file, f"dr-{role}", role) for role in ("clinician", "reviewer", "admin")}
    yield {"layout": layout, "tokens": tokens, "run_id": refused.run_id, "tmp": tmp_path}
    if previous is None:
        os.environ.pop("MEDLOOP_DEID_SALT", None)
    else:
        os.environ["MEDLOOP_DEID_SALT"] = previous


def set_shadow(layout, reference: str | None) -> None:
    params = yaml.safe_load(layout.params_file.read_text())
    params["serving"]["shadow"] = reference
    layout.params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def registered(layout, version: str):
    """(pyfunc, operating threshold) of a registered version, straight from the registry."""
    import mlflow
    from mlflow import MlflowClient

    from pipelines.registry.tracking import configure

    params = load(layout)
    configure(params, layout)
    tags = MlflowClient().get_model_version(params.model.name, version).tags
    return mlflow.pyfunc.load_model(f"models:/{params.model.name}/{version}"), float(tags["medloop.operating_threshold"])


def probabilities_of(model, layout, rows: list[dict]) -> list[dict[str, float]]:
    features = list(load(layout).tabular.features)
    scored = model.predict(pd.DataFrame([{name: row.get(name) for name in features} for row in rows], columns=features))
    return [{label: float(value) for label, value in row.items()} for _, row in scored.iterrows()]


def measurements(layout, n: int) -> list[dict[str, float]]:
    """Realistic feature rows (the built-in Wisconsin data), so that the two models' answers differ."""
    from tests_support import breast_cancer_frame

    features = list(load(layout).tabular.features)
    frame = breast_cancer_frame(n=n, seed=11)
    return [{name: float(row[name]) for name in features} for _, row in frame.iterrows()]


def figures(decisions: list[str], truths: list[str], positive: str) -> dict:
    pairs = list(zip(decisions, truths))
    tp = sum(d == positive and t == positive for d, t in pairs)
    fn = sum(d != positive and t == positive for d, t in pairs)
    tn = sum(d != positive and t != positive for d, t in pairs)
    fp = sum(d == positive and t != positive for d, t in pairs)
    return {"agreement": sum(d == t for d, t in pairs) / len(pairs),
            "sensitivity": tp / (tp + fn) if tp + fn else None,
            "specificity": tn / (tn + fp) if tn + fp else None,
            "confusion": {"tp": tp, "fn": fn, "tn": tn, "fp": fp}}


def wait_for_shadow(store, prediction_ids: list[str], seconds: float = 60) -> dict[str, dict]:
    deadline = time.monotonic() + seconds
    while True:
        found = {pid: store.shadow_predictions(pid) for pid in prediction_ids}
        if all(found.values()):
            return {pid: rows[0] for pid, rows in found.items()}
        assert time.monotonic() < deadline, f"no shadow answers for {[p for p, r in found.items() if not r]}"
        time.sleep(0.25)


@pytest.mark.slow
@pytest.mark.integration
def test_a_refused_run_shadows_the_champion_and_is_judged_on_the_same_confirmed_cases(shadow_workspace):
    from pipelines.store.feedback import FeedbackStore

    layout, tokens, run_id = shadow_workspace["layout"], shadow_workspace["tokens"], shadow_workspace["run_id"]
    store_url = f"sqlite:///{shadow_workspace['tmp'] / 'shadow-e2e.db'}"
    set_shadow(layout, f"run:{run_id}")
    params = load(layout)
    positive, classes = params.model.positive_class, params.model.classes
    champion, _ = registered(layout, "1")
    candidate, candidate_threshold = registered(layout, "2")  # the same model as the run
    process, base = start_service(layout, store_url)
    store = FeedbackStore(store_url)
    try:
        client = httpx.Client(base_url=base, timeout=60)
        ready = client.get("/readyz").json()
        assert ready["version"] == "1"
        assert ready["shadow"] == {**ready["shadow"], "candidate": f"run:{run_id}", "loaded": True, "version": None,
                                   "run_id": run_id, "operating_threshold": candidate_threshold}

        rows = measurements(layout, 4)
        answers = []
        for batch in (rows[:3], rows[3:]):
            response = client.post("/predict", json={"instances": batch}, headers=bearer(tokens["clinician"]))
            assert response.status_code == 200, response.text
            body = response.json()
            # Only the champion's answers: its version, its probabilities, nothing of the shadow.
            assert body["version"] == "1" and "shadow" not in response.text and f"run:{run_id}" not in response.text
            answers += body["predictions"]
        expected_champion = probabilities_of(champion, layout, rows)
        expected_candidate = probabilities_of(candidate, layout, rows)
        assert any(abs(c[positive] - s[positive]) > 1e-3 for c, s in zip(expected_champion, expected_candidate))
        for answer, expected in zip(answers, expected_champion):
            assert answer["probabilities"] == pytest.approx(expected, abs=1e-5)

        ids = [answer["prediction_id"] for answer in answers]
        shadows = wait_for_shadow(store, ids)
        for prediction_id, expected in zip(ids, expected_candidate):
            kept = shadows[prediction_id]
            assert kept["probabilities"] == pytest.approx(expected, abs=1e-5)
            assert kept["candidate"] == f"run:{run_id}" and kept["run_id"] == run_id and kept["model_version"] is None
            assert kept["operating_threshold"] == candidate_threshold
            said_positive = kept["probabilities"][positive] >= candidate_threshold
            assert (kept["decision"] == positive) == said_positive
        assert len(store.shadow_predictions(ids[0])) == 1

        # Clinicians confirm three of the four cases.
        truths = [classes[1], classes[0], classes[1]]
        for n, (prediction_id, label) in enumerate(zip(ids, truths)):
            posted = client.post("/feedback", json={"prediction_id": prediction_id, "label": label,
                                                    "idempotency_key": f"shadow-{n}"},
                                 headers=bearer(tokens["clinician"]))
            assert posted.status_code == 201
        report = client.get("/monitoring", headers=bearer(tokens["reviewer"])).json()
        assert report["shadow"]["candidate"] == f"run:{run_id}" and report["shadow"]["loaded"]
        [served] = report["versions"]
        assert served["version"] == "1" and served["predictions"] == 4 and served["confirmed"] == 3
        [beside] = served["shadow"]
        assert beside["candidate"] == f"run:{run_id}" and beside["run_id"] == run_id
        assert beside["scored"] == 4 and beside["confirmed"] == 3
        served_decisions = [answer["decision"] for answer in answers[:3]]
        shadow_decisions = [shadows[pid]["decision"] for pid in ids[:3]]
        for key, value in figures(served_decisions, truths, positive).items():
            assert beside["served"][key] == value and served[key] == value
        for key, value in figures(shadow_decisions, truths, positive).items():
            assert beside["shadow"][key] == value
        assert beside["decisions_differ"] == sum(
            answer["decision"] != shadows[pid]["decision"] for answer, pid in zip(answers, ids))

        metrics = client.get("/metrics").text
        assert f'medloop_shadow_predictions_total{{candidate="run:{run_id}"}} 4.0' in metrics
        assert "medloop_shadow_dropped_total 0.0" in metrics and "medloop_shadow_failures_total 0.0" in metrics
    finally:
        stop(process)
        store.close()
        set_shadow(layout, None)


@pytest.mark.slow
@pytest.mark.integration
def test_a_candidate_that_cannot_load_never_stops_the_champion(shadow_workspace):
    from pipelines.store.feedback import FeedbackStore

    layout, tokens = shadow_workspace["layout"], shadow_workspace["tokens"]
    store_url = f"sqlite:///{shadow_workspace['tmp'] / 'shadow-broken.db'}"
    set_shadow(layout, "99")
    process, base = start_service(layout, store_url)
    try:
        ready = httpx.get(base + "/readyz", timeout=30)
        assert ready.status_code == 200 and ready.json()["version"] == "1"
        shadow = ready.json()["shadow"]
        assert shadow["candidate"] == "99" and shadow["loaded"] is False and "99" in shadow["error"]
        answer = httpx.post(base + "/predict", json={"instances": [instance(layout)]},
                            headers=bearer(tokens["clinician"]), timeout=60)
        assert answer.status_code == 200 and answer.json()["version"] == "1"
        [prediction] = answer.json()["predictions"]
    finally:
        stop(process)
        set_shadow(layout, None)
    store = FeedbackStore(store_url)
    assert store.prediction(prediction["prediction_id"])["model_version"] == "1"
    assert store.shadow_predictions(prediction["prediction_id"]) == []
    store.close()


@pytest.mark.slow
@pytest.mark.integration
def test_a_registered_version_as_candidate_takes_its_threshold_and_its_local_copy(shadow_workspace, tmp_path,
                                                                                 monkeypatch):
    """Shadow "2": loaded with v2's operating threshold and run id; a restart with MLflow out of
    reach loads both champion and candidate from the local copies."""
    from pipelines.config import load_params
    from serving.model import ModelManager

    layout, run_id = shadow_workspace["layout"], shadow_workspace["run_id"]
    set_shadow(layout, "2")
    try:
        params = load_params(layout.params_file)
    finally:
        set_shadow(layout, None)
    _, threshold = registered(layout, "2")
    manager = ModelManager(params, layout, cache=tmp_path / "cache")
    manager.start()
    assert manager.current.version == "1" and manager.shadow_error is None
    assert (manager.shadow.reference, manager.shadow.version, manager.shadow.run_id) == ("2", "2", run_id)
    assert manager.shadow.served.operating_threshold == threshold

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    offline = params.model_copy(update={"tracking": params.tracking.model_copy(
        update={"uri": "http://127.0.0.1:9"})})  # nothing listens there
    again = ModelManager(offline, layout, cache=tmp_path / "cache")
    again.start()
    assert again.current.version == "1" and again.shadow.version == "2" and again.shadow_error is None


def test_the_shadow_queue_is_bounded_and_a_failing_candidate_is_only_counted(tmp_path):
    """The worker is held inside the candidate: one request waits in a queue of one, the next
    is dropped (counted), and a candidate that raises is counted and logged, never raised."""
    from prometheus_client import CollectorRegistry

    from conftest import tabular_params
    from pipelines.config import Params
    from pipelines.store.feedback import FeedbackStore
    from pipelines.workspace import Layout
    from serving.model import Candidate, ModelManager, Served
    from serving.shadow import ShadowScorer

    raw = tabular_params()
    raw["serving"]["shadow"] = "run:abc"
    params = Params.model_validate(raw)
    classes, positive = params.model.classes, params.model.positive_class
    features = list(params.tabular.features)

    class HeldCandidate:
        """A candidate that waits for the test before answering (or fails when told to)."""

        def __init__(self):
            self.entered, self.release, self.fail = threading.Event(), threading.Event(), False

        def predict(self, frame):
            self.entered.set()
            self.release.wait(30)
            if self.fail:
                raise RuntimeError("candidate broke")
            return pd.DataFrame([{classes[0]: 0.25, positive: 0.75}] * len(frame), index=frame.index)

    model = HeldCandidate()
    manager = ModelManager(params, Layout.at(tmp_path))
    manager.shadow = Candidate("run:abc", None, "abc", Served(params.model.name, "run:abc", model, classes, positive, 0.8))
    store = FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}")
    registry = CollectorRegistry()
    scorer = ShadowScorer(manager, store, params, tmp_path, registry, queue_size=1)
    scorer.start()

    def predicted(n: int) -> str:
        return store.record_prediction(model_name=params.model.name, model_version="1", input_sha256=f"{n:064x}",
                                       modality="tabular", probabilities={classes[0]: 0.9, positive: 0.1},
                                       decision=classes[0], operating_threshold=0.5, requested_by="t",
                                       input_metadata={"features": {features[0]: float(n)}})

    try:
        first, second, third = predicted(1), [predicted(2), predicted(3)], [predicted(4), predicted(5), predicted(6)]
        assert scorer.submit([first])
        assert model.entered.wait(10)  # the worker holds the first request inside the candidate
        started = time.perf_counter()
        assert scorer.submit(second)  # waits in the queue
        assert not scorer.submit(third)  # the queue is full: dropped, at once
        assert time.perf_counter() - started < 1
        assert registry.get_sample_value("medloop_shadow_dropped_total") == 3
        model.release.set()
        deadline = time.monotonic() + 10
        while registry.get_sample_value("medloop_shadow_predictions_total", {"candidate": "run:abc"}) != 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        [kept] = store.shadow_predictions(first)
        # 0.75 is below the candidate's own threshold 0.8: its decision is the other class.
        assert kept["decision"] == classes[0] and kept["probabilities"] == {classes[0]: 0.25, positive: 0.75}
        assert [store.shadow_predictions(pid) for pid in third] == [[], [], []]

        model.fail = True
        assert scorer.submit([predicted(7)])
        deadline = time.monotonic() + 10
        while registry.get_sample_value("medloop_shadow_failures_total") != 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert scorer.submit([predicted(8)])  # the worker lives on
    finally:
        scorer.stop()
        store.close()
