"""The prediction service for real: `medloop serve` on 127.0.0.1 in its own process, serving a
trained and registered model from a real MLflow registry, with the feedback store on SQLite or on
the PostgreSQL server at 127.0.0.1:5432."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid

import httpx
import pytest
import yaml

from conftest import SALT, copy_world, free_port, in_range_instance, load
from pipelines import promote
from pipelines.ops.versioning import repro
from tests_support import fresh_postgres_database


def start_service(layout, store_url: str | None = None, port: int | None = None):
    """`medloop serve` in a child process; returns (process, base URL) once /healthz answers."""
    if store_url is not None:
        params = yaml.safe_load(layout.params_file.read_text())
        params["serving"]["store_url"] = store_url
        layout.params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    port = port or free_port()
    process = subprocess.Popen([sys.executable, "-m", "medloop", "serve", "-w", str(layout.root), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "MEDLOOP_DEID_SALT": SALT})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, process.stdout.read().decode()
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return process, base
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the service did not become ready"
        time.sleep(0.5)


def stop(process) -> None:
    process.terminate()
    process.wait(timeout=30)


def instance(layout, shift: float = 0.0) -> dict:
    """A case inside every declared range (the service refuses one outside); see `in_range_instance`."""
    return in_range_instance(load(layout).tabular.features, shift)


def champion_version(layout) -> str:
    from mlflow import MlflowClient

    from pipelines.registry.tags import CHAMPION
    from pipelines.registry.tracking import configure

    params = load(layout)
    configure(params, layout)
    return str(MlflowClient().get_model_version_by_alias(params.model.name, CHAMPION).version)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.slow
@pytest.mark.integration
def test_predict_feedback_adjudication_and_reload(served_workspace):
    layout, tokens = served_workspace["layout"], served_workspace["tokens"]
    original_params = layout.params_file.read_text()
    process, base = start_service(layout)
    try:
        client = httpx.Client(base_url=base, timeout=60)
        ready = client.get("/readyz").json()
        assert ready["ready"] and ready["version"] == "1" and ready["model"] == "breast-cancer-mlp"

        # Auth and roles.
        assert client.post("/predict", json={"instances": [instance(layout)]}).status_code == 401
        assert client.post("/predict", json={"instances": [instance(layout)]}, headers=bearer("nope")).status_code == 401
        assert client.get("/review", headers=bearer(tokens["clinician"])).status_code == 403
        assert client.post("/admin/reload", headers=bearer(tokens["reviewer"])).status_code == 403

        # A batch of three.
        answer = client.post("/predict", json={"instances": [instance(layout, s) for s in (0, 1, 2)]},
                             headers=bearer(tokens["clinician"]))
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["version"] == "1" and len(body["predictions"]) == 3
        positive, negative = load(layout).model.positive_class, load(layout).model.classes[0]
        assert negative != positive
        for prediction in body["predictions"]:
            assert abs(sum(prediction["probabilities"].values()) - 1) < 1e-5
            # The decision is the positive class at or above the operating threshold, else the other.
            at_threshold = prediction["probabilities"][positive] >= body["operating_threshold"]
            assert prediction["decision"] == (positive if at_threshold else negative), (prediction, body["operating_threshold"])
            uuid.UUID(prediction["prediction_id"])
        first, second = (p["prediction_id"] for p in body["predictions"][:2])

        # Malformed input gets a clear 4xx naming the problem.
        bad = client.post("/predict", json={"instances": [{**instance(layout), "patient_name": "X"}]},
                          headers=bearer(tokens["clinician"]))
        assert bad.status_code == 422 and "patient_name" in bad.json()["detail"]
        assert client.post("/predict", content=b"\x89PNG...", headers={**bearer(tokens["clinician"]),
                           "Content-Type": "image/png"}).status_code == 415
        wrong_type = client.post("/predict", json={"instances": [{next(iter(instance(layout))): "high"}]},
                                 headers=bearer(tokens["clinician"]))
        assert wrong_type.status_code == 422 and "must be a number" in wrong_type.json()["detail"]
        too_many = client.post("/predict", json={"instances": [instance(layout)] * 65},
                               headers=bearer(tokens["clinician"]))
        assert too_many.status_code == 422 and too_many.json()["detail"] == "65 inputs in one request; at most 64"

        # Feedback: stored once per idempotency key; the reviewer is the caller.
        label = load(layout).model.classes[1]
        other = load(layout).model.classes[0]
        post = {"prediction_id": first, "label": label, "idempotency_key": "fb-1"}
        stored = client.post("/feedback", json=post, headers=bearer(tokens["clinician"]))
        assert stored.status_code == 201 and stored.json()["reviewer"] == "dr-clinician"
        replay = client.post("/feedback", json=post, headers=bearer(tokens["clinician"]))
        assert replay.status_code == 200 and replay.json()["feedback_id"] == stored.json()["feedback_id"]
        # A replay repeats every field: a changed comment is refused, naming the caller's own row.
        changed = client.post("/feedback", json={**post, "comment": "on second look"}, headers=bearer(tokens["clinician"]))
        assert changed.status_code == 409 and changed.json()["detail"].startswith(
            f"idempotency key 'fb-1' was already used for your feedback {stored.json()['feedback_id']}, "
            f"with a different comment:")
        assert client.post("/feedback", json={**post, "label": "cancer?"},
                           headers=bearer(tokens["clinician"])).status_code == 422
        assert client.post("/feedback", json={**post, "prediction_id": "missing", "idempotency_key": "fb-x"},
                           headers=bearer(tokens["clinician"])).status_code == 404

        # Two clinicians disagree on the second case: it goes to the adjudication queue.
        client.post("/feedback", json={"prediction_id": second, "label": label, "idempotency_key": "fb-2"},
                    headers=bearer(tokens["clinician"]))
        # Another clinician's "fb-2" is a different key: stored, no collision.
        conflict = client.post("/feedback", json={"prediction_id": second, "label": other, "idempotency_key": "fb-2"},
                               headers=bearer(tokens["clinician2"]))
        assert conflict.status_code == 201 and conflict.json()["reviewer"] == "dr-clinician2"
        assert conflict.json()["adjudication_id"] is not None
        [case] = client.get("/review", headers=bearer(tokens["reviewer"])).json()["open"]
        assert case["prediction_id"] == second
        resolved = client.post(f"/review/{case['id']}", json={"label": label, "reason": "re-read"},
                               headers=bearer(tokens["reviewer"]))
        assert resolved.status_code == 200 and resolved.json()["resolved_by"] == "dr-reviewer"
        assert client.get("/review", headers=bearer(tokens["reviewer"])).json()["open"] == []

        # The nightly export takes exactly the confirmed labels into data/feedback (DVC), once.
        import pandas as pd

        from pipelines import feedback_export

        exported = feedback_export.run(load(layout), layout)
        assert exported.exported == 2 and exported.missing_inputs == 0 and exported.dvc_file == "data/feedback.dvc"
        labels = pd.read_parquet(layout.feedback / "exports" / exported.export_id / "labels.parquet")
        by_id = labels.set_index("prediction_id")
        assert set(by_id.index) == {first, second}
        assert (labels["label_provenance"] == "clinician").all() and (labels["label"] == label).all()
        assert by_id.loc[first, "confirmed_by"] == "agreed" and by_id.loc[second, "confirmed_by"] == "adjudicated"
        assert '"' in by_id.loc[first, "features"] and by_id.loc[first, "model_version"] == "1"
        assert feedback_export.run(load(layout), layout).export_id is None
        third = body["predictions"][2]["prediction_id"]
        client.post("/feedback", json={"prediction_id": third, "label": other, "idempotency_key": "fb-4"},
                    headers=bearer(tokens["clinician"]))
        assert feedback_export.run(load(layout), layout).exported == 1

        monitored = client.get("/monitoring", headers=bearer(tokens["reviewer"])).json()
        live = monitored["versions"]
        assert live[0]["version"] == "1" and live[0]["predictions"] >= 3 and live[0]["confirmed"] == 3
        # Drift of v1 against the reference it carries: a handful of inputs is not judged.
        assert monitored["drift"]["judged"] is False and monitored["drift"]["inputs"] >= 3
        assert live[0]["agreement"] is not None and 0 <= live[0]["positive_rate"] <= 1
        assert client.get("/monitoring", headers=bearer(tokens["clinician"])).status_code == 403

        metrics = client.get("/metrics").text
        assert 'medloop_model_version{model="breast-cancer-mlp"} 1.0' in metrics
        assert 'medloop_feedback_total{outcome="stored"} 4.0' in metrics
        assert 'medloop_feedback_total{outcome="replayed"} 1.0' in metrics
        assert 'medloop_feedback_total{outcome="conflict"} 1.0' in metrics

        # A new champion: the service reloads to it on request (and on its interval).
        edited = yaml.safe_load(layout.params_file.read_text())
        edited["train"]["epochs"] = 12
        layout.params_file.write_text(yaml.safe_dump(edited, sort_keys=False))
        assert repro(layout, "evaluate")
        result = promote.run(load(layout), layout, actor="test")
        if not result.passed:
            result = promote.override(load(layout), layout, result.run_id, "test: a second version", actor="test")
        reloaded = client.post("/admin/reload", headers=bearer(tokens["admin"])).json()
        assert reloaded["reloaded"] and reloaded["version"] == result.version
        again = client.post("/predict", json={"instances": [instance(layout)]}, headers=bearer(tokens["clinician"]))
        assert again.json()["version"] == result.version
    finally:
        stop(process)
        # The workspace is shared by the session's serving tests: v1 serves again, with its params.
        layout.params_file.write_text(original_params)
        if champion_version(layout) != "1":
            promote.rollback(load(layout), layout, actor="test", reason="test: the shared workspace serves v1 again")


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_fifty_clients_two_thousand_feedback_posts(served_workspace, backend, request):
    """50 concurrent clients send 2,000 feedback posts, 10% of them repeating an earlier
    idempotency key: no request fails and exactly the unique ones are stored."""
    from pipelines.store.feedback import FeedbackStore

    layout, tokens = served_workspace["layout"], served_workspace["tokens"]
    if backend == "postgresql":
        store_url = request.getfixturevalue("store_url_postgresql")
    else:
        store_url = f"sqlite:///{served_workspace['tmp'] / f'load-{uuid.uuid4().hex[:6]}.db'}"
    original_params = layout.params_file.read_text()
    process, base = start_service(layout, store_url)
    layout.params_file.write_text(original_params)  # read at start; the shared workspace keeps its store
    try:
        predicted = httpx.post(base + "/predict", json={"instances": [instance(layout, s / 10) for s in range(50)]},
                               headers=bearer(tokens["clinician"]), timeout=60).json()["predictions"]
        ids = [p["prediction_id"] for p in predicted]
        unique = 1800
        posts = [(ids[n % 50], f"load-{n}") for n in range(unique)]
        posts += [posts[n * 9] for n in range(200)]  # 10% of the posts repeat an earlier key
        label = load(layout).model.classes[1]
        statuses: list[int] = []

        async def client(worker: int) -> None:
            async with httpx.AsyncClient(base_url=base, timeout=120, headers=bearer(tokens["clinician"])) as http:
                for prediction_id, key in posts[worker::50]:
                    answer = await http.post("/feedback", json={"prediction_id": prediction_id, "label": label,
                                                                "idempotency_key": key})
                    statuses.append(answer.status_code)

        async def run_all() -> None:
            await asyncio.gather(*(client(worker) for worker in range(50)))

        asyncio.run(run_all())
        assert len(statuses) == 2000
        assert set(statuses) <= {200, 201}, sorted(set(statuses))
        assert statuses.count(201) == unique and statuses.count(200) == 200
    finally:
        stop(process)
    store = FeedbackStore(store_url)
    assert store.feedback_count() == unique
    store.close()


@pytest.fixture
def store_url_postgresql():
    with fresh_postgres_database("medloop_load") as url:
        yield url


@pytest.mark.slow
@pytest.mark.integration
def test_images_are_de_identified_on_arrival_and_scored(tiny_cnn_champion, tmp_path):
    """A DICOM upload with a full fake patient header, and a JSON batch of a JPEG and a PNG:
    scored by a registered CNN, and no planted identifier reaches the store."""
    import base64
    import io

    from PIL import Image

    from pipelines.config import SyntheticCxrSource
    from pipelines.data.sources.synthetic_cxr import SyntheticCxrSourceReader
    from pipelines.workspace import Layout
    from serving.auth import add_token

    params, version = tiny_cnn_champion["params"], tiny_cnn_champion["version"]
    layout = Layout.at(copy_world(tiny_cnn_champion["folder"], tmp_path / "world") / "ws")
    token = add_token(layout.root / ".medloop" / "tokens.json", "dr-x", "clinician")

    source = SyntheticCxrSourceReader(SyntheticCxrSource(**params["source"]))
    items = source.night_items(3)
    planted = source.planted_identifiers(3)
    dicom = next(item for item in items if item.read()[128:132] == b"DICM").read()
    jpeg = next(item for item in items if item.read()[:2] == b"\xff\xd8").read()
    png = io.BytesIO()
    Image.fromarray(__import__("numpy").full((96, 96), 120, dtype="uint8")).save(png, format="PNG")

    process, base = start_service(layout)
    try:
        headers = bearer(token)
        one = httpx.post(base + "/predict", content=dicom, headers={**headers, "Content-Type": "application/dicom"},
                         timeout=60)
        assert one.status_code == 200, one.text
        [answer] = one.json()["predictions"]
        assert set(answer["probabilities"]) == {"NORMAL", "PNEUMONIA"}
        at_threshold = answer["probabilities"]["PNEUMONIA"] >= one.json()["operating_threshold"]
        assert answer["decision"] == ("PNEUMONIA" if at_threshold else "NORMAL") and one.json()["version"] == version
        batch = httpx.post(base + "/predict", headers=headers, timeout=60, json={
            "images": [base64.b64encode(jpeg).decode(), base64.b64encode(png.getvalue()).decode()]})
        assert batch.status_code == 200 and len(batch.json()["predictions"]) == 2
        not_image = httpx.post(base + "/predict", content=b"hello", headers={**headers, "Content-Type": "image/png"})
        assert not_image.status_code == 422 and "not an image" in not_image.json()["detail"]
        confirmed = httpx.post(base + "/feedback", headers=headers, json={
            "prediction_id": answer["prediction_id"], "label": "PNEUMONIA", "idempotency_key": "img-1"})
        assert confirmed.status_code == 201
    finally:
        stop(process)
    # The export carries the de-identified image itself, with its de-identified metadata.
    import pandas as pd

    from pipelines import feedback_export

    exported = feedback_export.run(load(layout), layout)
    [row] = pd.read_parquet(layout.feedback / "exports" / exported.export_id / "labels.parquet").to_dict("records")
    image = layout.feedback / "exports" / exported.export_id / row["record"]
    assert row["status"] == "exported" and image.is_file() and row["label"] == "PNEUMONIA"
    assert row["patient_id"].startswith("pt") and not any(i.encode() in image.read_bytes() for i in planted)
    # What the store keeps about the DICOM: de-identified metadata only.
    import sqlite3

    with sqlite3.connect(layout.root / ".medloop" / "feedback.db") as connection:
        rows = dict(connection.execute("SELECT id, input_metadata FROM predictions").fetchall())
    kept = __import__("json").loads(rows[answer["prediction_id"]])
    assert kept["format"] == "dicom" and kept["patient_id"].startswith("pt") and "age_band" in kept
    # Its drift summary, from the same model pass: intensity and the embedding's components,
    # comparable with the reference the version carries.
    assert set(kept["drift"]) >= {"intensity_mean", "intensity_std", "embedding_pc1"}
    assert 0 <= kept["drift"]["intensity_mean"] <= 255
    from pipelines.monitoring import drift
    from pipelines.monitoring.reference import load_reference

    reference = load_reference(layout.state / "serving" / load(layout).model.name / f"v{version}" / "model")
    report = drift.report_from_store(load(layout), reference, f"sqlite:///{layout.root / '.medloop' / 'feedback.db'}",
                                     version)
    assert report.inputs == 3 and not report.judged  # three inputs: too few to judge
    assert {s.name for s in report.statistics} >= {"intensity_mean", "embedding_pc1"}
    database = (layout.root / ".medloop" / "feedback.db").read_bytes()
    wal = layout.root / ".medloop" / "feedback.db-wal"
    stored = database + (wal.read_bytes() if wal.exists() else b"")
    leaked = [identifier for identifier in planted if identifier.encode() in stored]
    assert leaked == []
