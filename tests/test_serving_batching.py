"""Micro-batching and Grad-CAM in the prediction service, for real: `medloop serve` on 127.0.0.1 in
its own process, serving a trained and registered model (the tabular MLP of conftest's
``served_workspace``, and a tiny CNN trained here), with concurrent clients.

Probabilities are answered to 6 decimals. A batched model call may sum a row's products in
another order than a call on that row alone (the kernels block by batch size), which moves a
float32 probability by a rounding step (~1e-7 for the MLP); through a CNN's stacked convolutions
the steps add up (1.5e-5 measured on a tiny CNN), so "the same answer" below means the same
decision and probabilities within 1e-4, far below any clinically meaningful difference."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re

import httpx
import numpy as np
import pytest

from conftest import SALT, copy_world, load, serving_settings
from test_serving import bearer, instance, start_service, stop
from tests_support import pydicom_test_file

SAME = 1e-4  # see the module docstring
FLOAT_NOISE = 1e-12  # 0.930822 - 0.930821 is 1.00000000003e-06 in binary floating point


def metric(text: str, name: str, default: float | None = None) -> float:
    """One sample of the Prometheus text (``name`` with its labels, as printed); ``default`` when
    it is absent (a labelled counter appears with its first increment)."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    if match is None and default is not None:
        return default
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def assert_same_answer(got: dict, expected: dict, threshold: float, positive: str) -> None:
    assert set(got["probabilities"]) == set(expected["probabilities"])
    for label, p in expected["probabilities"].items():
        assert abs(got["probabilities"][label] - p) <= SAME + FLOAT_NOISE, (label, got, expected)
    if abs(expected["probabilities"][positive] - threshold) > SAME:
        assert got["decision"] == expected["decision"], (got, expected)


async def post_all(base: str, token: str, requests: list[dict], clients: int) -> list[httpx.Response]:
    """Every request at once, over ``clients`` connections."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits, headers=bearer(token)) as client:
        answers = await asyncio.gather(*(client.post("/predict", **request) for request in requests),
                                       return_exceptions=True)
    failed = [repr(answer) for answer in answers if isinstance(answer, Exception)]
    assert not failed, f"{len(failed)} requests got no answer, e.g. {failed[0]}"
    return answers


def stored_predictions(layout, ids: list[str]) -> dict[str, dict]:
    from pipelines.store.feedback import FeedbackStore
    from pipelines.workspace import database_url

    store = FeedbackStore(database_url(layout, load(layout).serving.store_url))
    try:
        return {prediction_id: store.prediction(prediction_id) for prediction_id in ids}
    finally:
        store.close()


# ------------------------------------------------------------------------------------------------
# tables: the MLP of test_serving
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.integration
def test_concurrent_predictions_equal_unbatched_ones_and_are_all_stored(served_workspace):
    layout, tokens = served_workspace["layout"], served_workspace["tokens"]
    params = load(layout)
    rows = [instance(layout, shift=n / 7) for n in range(40)]
    rows[5][next(iter(rows[5]))] = None  # a missing measurement: imputed inside the batch
    token = tokens["clinician"]

    # Micro-batching off: every input scored on its own.
    with serving_settings(layout, batch_max_size=1):
        process, base = start_service(layout)
        try:
            single = [httpx.post(base + "/predict", json={"instances": [row]}, headers=bearer(token), timeout=60)
                      for row in rows]
            unbatched_metrics = httpx.get(base + "/metrics").text
        finally:
            stop(process)
    assert {answer.status_code for answer in single} == {200}
    reference = [answer.json()["predictions"][0] for answer in single]
    threshold = single[0].json()["operating_threshold"]
    assert metric(unbatched_metrics, "medloop_batch_inputs_count") == 0

    # Micro-batching on: 200 requests at once from 50 clients, some of them with three inputs.
    plan = [[n % 40] if n % 10 else [n % 40, (n + 1) % 40, (n + 2) % 40] for n in range(200)]
    with serving_settings(layout, batch_max_size=16, batch_max_wait_ms=20):
        process, base = start_service(layout)
        try:
            before = httpx.get(base + "/metrics").text
            answers = asyncio.run(post_all(base, token, [{"json": {"instances": [rows[i] for i in indices]}}
                                                         for indices in plan], clients=50))
            metrics = httpx.get(base + "/metrics").text
            # The tabular model has no heat map to give, and only Grad-CAM is offered.
            gradcam = httpx.post(base + "/predict?explain=gradcam", json={"instances": [rows[0]]},
                                 headers=bearer(token), timeout=60)
            unknown = httpx.post(base + "/predict?explain=shap", json={"instances": [rows[0]]},
                                 headers=bearer(token), timeout=60)
            infinity = json.dumps({"instances": [{**rows[0], "mean_radius": 1e999}]})  # "Infinity": Python's JSON
            infinite = httpx.post(base + "/predict", content=infinity, timeout=60,
                                  headers={**bearer(token), "Content-Type": "application/json"})
        finally:
            stop(process)
    refused = [answer.text for answer in answers if answer.status_code != 200]
    assert refused == [], refused[:3]
    ids = []
    for indices, answer in zip(plan, answers):
        body = answer.json()
        assert body["model"] == params.model.name and body["version"] == "1" and body["operating_threshold"] == threshold
        assert len(body["predictions"]) == len(indices)
        for index, prediction in zip(indices, body["predictions"]):
            assert set(prediction) == {"probabilities", "decision", "prediction_id"}
            assert_same_answer(prediction, reference[index], threshold, params.model.positive_class)
            ids.append(prediction["prediction_id"])
    inputs = sum(len(indices) for indices in plan)
    assert len(set(ids)) == inputs == 240

    # The requests were scored together: fewer model calls than requests, none above 16 inputs.
    calls = metric(metrics, "medloop_batch_inputs_count") - metric(before, "medloop_batch_inputs_count")
    assert metric(metrics, "medloop_batch_inputs_sum") - metric(before, "medloop_batch_inputs_sum") == inputs
    assert calls < len(plan), f"{calls} model calls for {len(plan)} requests: nothing was batched"
    assert metric(metrics, 'medloop_batch_inputs_bucket{le="16.0"}') == metric(metrics, "medloop_batch_inputs_count")
    series = f'medloop_predictions_total{{model="{params.model.name}",version="1"}}'
    assert metric(metrics, series) - metric(before, series, default=0.0) == inputs

    # Every prediction is stored, as answered, with its caller.
    stored = stored_predictions(layout, ids)
    by_id = {p["prediction_id"]: p for answer in answers for p in answer.json()["predictions"]}
    for prediction_id, row in stored.items():
        assert row["probabilities"] == by_id[prediction_id]["probabilities"]
        assert row["decision"] == by_id[prediction_id]["decision"]
        assert row["requested_by"] == "dr-clinician" and row["model_version"] == "1"

    assert gradcam.status_code == 422 and "image model" in gradcam.json()["detail"]
    assert unknown.status_code == 422 and "explain=gradcam" in unknown.json()["detail"]
    assert infinite.status_code == 422 and "mean_radius must be a finite number" in infinite.json()["detail"]


@pytest.mark.slow
def test_batched_scaling_and_scoring_equal_the_pyfunc(served_workspace):
    """The service's batch path (NumPy scaling, one Keras call, the model's calibrator) gives what
    the registered pyfunc gives for the same rows: the scaled features bit for bit, the calibrated
    probabilities to float32."""
    import mlflow
    import pandas as pd

    from pipelines.model.architectures import class_columns, class_probabilities
    from pipelines.registry.tracking import configure
    from serving import scoring
    from serving.model import Served

    layout = served_workspace["layout"]
    params = load(layout)
    configure(params, layout)
    model = mlflow.pyfunc.load_model(f"models:/{params.model.name}/1")
    python_model = model.unwrap_python_model()
    features = list(params.tabular.features)
    rows = [instance(layout, shift=n / 3) for n in range(20)]
    rows[3][features[0]] = None
    rows[4] = {name: None for name in features}
    frame = pd.DataFrame(rows, columns=features)

    scaled = scoring.scaled_features(python_model.scaler, rows)
    expected = python_model.prepare(frame)
    assert scaled.dtype == expected.dtype and np.array_equal(scaled, expected)

    served = Served(params.model.name, "1", model, list(params.model.classes), params.model.positive_class, 0.5)
    parts = scoring.probabilities(served, [rows[:1], rows[1:8], rows[8:]])
    assert [len(part) for part in parts] == [1, 7, 12]
    by_pyfunc = model.predict(frame)[list(params.model.classes)].to_numpy()
    assert np.abs(np.concatenate(parts) - by_pyfunc).max() <= 2.5e-7
    # Both are calibrated, by the temperature fitted at training that the model carries.
    calibrator = python_model.calibrator
    assert calibrator.method == "temperature" and calibrator.temperature != 1.0
    own = class_columns(python_model.model.predict_on_batch(expected))
    np.testing.assert_array_equal(by_pyfunc, calibrator.apply(class_probabilities(python_model.model, expected)))
    assert np.abs(np.concatenate(parts) - calibrator.apply(own)).max() <= 2.5e-7
    assert np.abs(own - by_pyfunc).max() > 1e-3  # ... and calibration changed them


# ------------------------------------------------------------------------------------------------
# images: a tiny CNN
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_workspace(tiny_cnn_champion, tmp_path_factory):
    """A copy of the session's tiny CNN world (a 2-epoch CNN on 48 synthetic radiographs, 64x64),
    a clinician's token, and unseen studies of a later night (DICOM and JPEG files)."""
    from pipelines.config import SyntheticCxrSource
    from pipelines.data.sources.synthetic_cxr import SyntheticCxrSourceReader
    from pipelines.workspace import Layout
    from serving.auth import add_token

    tmp_path = tmp_path_factory.mktemp("serving-images")
    layout = Layout.at(copy_world(tiny_cnn_champion["folder"], tmp_path / "world") / "ws")
    token = add_token(layout.root / ".medloop" / "tokens.json", "dr-x", "clinician")
    source = SyntheticCxrSource(**tiny_cnn_champion["params"]["source"])
    files = [item.read() for item in SyntheticCxrSourceReader(source).night_items(3)]
    return {"layout": layout, "token": token, "version": tiny_cnn_champion["version"], "files": files[:12]}


def content_type(data: bytes) -> str:
    return "application/dicom" if data[128:132] == b"DICM" else "image/jpeg" if data[:2] == b"\xff\xd8" else "image/png"


def small_png(side: int = 8) -> bytes:
    """A valid PNG, too small for the model (``clean.image.min_side`` is 64)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side), 90, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow
@pytest.mark.integration
def test_a_bad_image_in_a_concurrent_burst_fails_only_its_own_request(image_workspace):
    layout, token, files = image_workspace["layout"], image_workspace["token"], image_workspace["files"]
    params = load(layout)
    with serving_settings(layout, batch_max_size=32, batch_max_wait_ms=50):
        process, base = start_service(layout)
        try:
            headers = bearer(token)
            # One at a time first: each image scored alone.
            single = [httpx.post(base + "/predict", content=data, timeout=60,
                                 headers={**headers, "Content-Type": content_type(data)}) for data in files]
            # Then all at once, with a PNG too small to use, an upload that is no image at all,
            # and a JSON batch holding a good image and the bad one.
            burst = [{"content": data, "headers": {"Content-Type": content_type(data)}} for data in files]
            burst.insert(5, {"content": small_png(), "headers": {"Content-Type": "image/png"}})
            burst.insert(9, {"content": b"not an image", "headers": {"Content-Type": "image/png"}})
            # A CT slice is not a chest radiograph: refused on its header, as clean quarantines it.
            burst.append({"content": pydicom_test_file("CT_small.dcm"), "headers": {"Content-Type": "application/dicom"}})
            burst.append({"json": {"images": [base64.b64encode(data).decode() for data in (files[0], small_png())]}})
            answers = asyncio.run(post_all(base, token, burst, clients=len(burst)))
            metrics = httpx.get(base + "/metrics").text
        finally:
            stop(process)
    assert {answer.status_code for answer in single} == {200}
    threshold = single[0].json()["operating_threshold"]
    too_small, not_image, computed_tomography, mixed = answers[5], answers[9], answers[-2], answers[-1]
    assert computed_tomography.status_code == 422, computed_tomography.text
    assert computed_tomography.json()["detail"].startswith(
        "image 0 is not what the model was built for: DICOM Modality is 'CT', not one of CR, DX")
    assert too_small.status_code == 422, too_small.text
    assert too_small.json()["detail"].startswith("image 0 cannot be used") and "64" in too_small.json()["detail"]
    assert not_image.status_code == 422 and "not an image" in not_image.json()["detail"]
    assert mixed.status_code == 422 and mixed.json()["detail"].startswith("image 1 cannot be used")
    good = [answer for n, answer in enumerate(answers[:-2]) if n not in (5, 9)]
    assert [answer.status_code for answer in good] == [200] * len(files)
    for answer, alone in zip(good, single):
        [prediction] = answer.json()["predictions"]
        assert_same_answer(prediction, alone.json()["predictions"][0], threshold, params.model.positive_class)
    ids = [answer.json()["predictions"][0]["prediction_id"] for answer in good]
    assert set(stored_predictions(layout, ids)) == set(ids)
    assert metric(metrics, "medloop_batch_inputs_count") < len(files) * 2  # some of the burst shared a call


@pytest.mark.slow
@pytest.mark.integration
def test_gradcam_heat_map_of_each_image_as_the_model_saw_it(image_workspace):
    import mlflow
    from PIL import Image

    from pipelines.deid.files import deidentify_image
    from pipelines.model.gradcam import gradcam, overlay_png
    from pipelines.registry.tracking import configure

    layout, token, files = image_workspace["layout"], image_workspace["token"], image_workspace["files"]
    params = load(layout)
    dicom = next(data for data in files if content_type(data) == "application/dicom")
    jpeg = next(data for data in files if content_type(data) == "image/jpeg")
    process, base = start_service(layout)
    try:
        headers = bearer(token)
        plain = httpx.post(base + "/predict", content=dicom, headers={**headers, "Content-Type": "application/dicom"},
                           timeout=60)
        explained = httpx.post(base + "/predict?explain=gradcam", content=dicom, timeout=120,
                               headers={**headers, "Content-Type": "application/dicom"})
        batch = httpx.post(base + "/predict?explain=gradcam", headers=headers, timeout=120, json={
            "images": [base64.b64encode(jpeg).decode(), base64.b64encode(dicom).decode()]})
        unusable = httpx.post(base + "/predict?explain=gradcam", content=small_png(), timeout=60,
                              headers={**headers, "Content-Type": "image/png"})
    finally:
        stop(process)
    assert plain.status_code == 200 and explained.status_code == 200, explained.text
    assert "explanation" not in plain.json()["predictions"][0]
    [answer] = explained.json()["predictions"]
    threshold = plain.json()["operating_threshold"]
    assert_same_answer(answer, plain.json()["predictions"][0], threshold, params.model.positive_class)
    explanation = answer["explanation"]
    assert explanation["method"] == "gradcam" and explanation["class"] == answer["decision"]
    heat_map = Image.open(io.BytesIO(base64.b64decode(explanation["image_png"])))
    assert heat_map.format == "PNG" and heat_map.mode == "RGB" and heat_map.size == (64, 64)  # the model's input size
    assert batch.status_code == 200 and [p["explanation"]["class"] for p in batch.json()["predictions"]] == \
        [p["decision"] for p in batch.json()["predictions"]]
    assert batch.json()["predictions"][1]["explanation"]["image_png"] == explanation["image_png"]
    assert unusable.status_code == 422 and unusable.json()["detail"].startswith("image 0 cannot be used")

    # The same map, made here from the registered model: the de-identified image as the model
    # takes it, explained for the decided class.
    configure(params, layout)
    model = mlflow.pyfunc.load_model(f"models:/{params.model.name}/{image_workspace['version']}")
    python_model = model.unwrap_python_model()
    import pandas as pd

    _format, stored, _meta = deidentify_image(dicom, SALT.encode())
    pixels = python_model.prepare(pd.DataFrame({"image": [stored]}))
    target = np.array([list(python_model.classes).index(answer["decision"])])
    [cam] = gradcam(python_model.model, pixels, target, len(python_model.classes))
    expected = np.asarray(Image.open(io.BytesIO(overlay_png(pixels[0], cam))), dtype=np.int16)
    assert np.abs(np.asarray(heat_map, dtype=np.int16) - expected).max() <= 1
    # ... and not the map of the image alone: the heat map is laid over it.
    plain_image = np.asarray(Image.fromarray(pixels[0].astype(np.uint8).repeat(3 // pixels.shape[-1], axis=-1)),
                             dtype=np.int16)
    assert np.abs(np.asarray(heat_map, dtype=np.int16) - plain_image).max() > 10
