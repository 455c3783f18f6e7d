"""Simulated clinicians for the demo: they use the prediction service over its real HTTP API, as
a viewer or an EHR would, and their confirmed labels become the next night's training data.

The cases are items the loop trained on (from the train and validation splits, whose labels are
the truth the clinicians know) plus a few new cases the data set lacks. Seeded, so a demo is
repeatable. What they do:

- one clinician asks for a prediction on each case;
- where the model is right they confirm it, where it is wrong they correct it with the truth;
- on two cases a second clinician disagrees with the first, and a reviewer adjudicates (the
  truth, with a reason);
- the new cases get their label from the clinician who brought them.

Nothing here touches the store or the model directly: everything goes through HTTP, with each
person's own bearer token.
"""

from __future__ import annotations

import base64
import io
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pipelines.config import Params
from pipelines.workspace import Layout

# Who takes part (the keys of the tokens given to `simulate`) and their service roles.
ROLES = {"a": "clinician", "b": "clinician", "reviewer": "reviewer"}
BATCH = 8  # inputs per /predict request


@dataclass
class ClinicDay:
    """What the simulated clinicians did, for the demo's summary."""

    predictions: int = 0
    confirmed: int = 0
    corrected: int = 0
    adjudicated: int = 0
    new_cases: int = 0
    feedback_posts: int = 0
    version: str | None = None
    monitoring: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Case:
    payload: Any  # a feature row (dict) or image bytes
    truth: str
    new: bool


def simulate(params: Params, layout: Layout, base_url: str, tokens: dict[str, str], *, seed: int = 0,
             known_cases: int = 20, new_cases: int = 3) -> ClinicDay:
    """One day in the clinic against the running service at ``base_url``.

    Args:
        tokens: bearer token of each name in `ROLES`.
        known_cases: cases taken from the training data (their label is the truth).
        new_cases: cases the data set does not hold yet.

    Returns:
        The counts of what was done, and the service's ``/monitoring`` answer afterwards.

    Raises:
        RuntimeError: the service refused a request (its answer is in the message).
    """
    import httpx

    rng = np.random.default_rng(seed)
    cases = pick_cases(params, layout, rng, known_cases, new_cases)
    day = ClinicDay()
    classes = list(params.model.classes)
    with httpx.Client(base_url=base_url, timeout=300) as client:
        def post(path: str, who: str, **kwargs) -> dict:
            response = client.post(path, headers={"Authorization": f"Bearer {tokens[who]}"}, **kwargs)
            if response.status_code not in (200, 201):
                raise RuntimeError(f"POST {path} as {who}: {response.status_code} {response.text[:300]}")
            return response.json()

        answers = []
        for start in range(0, len(cases), BATCH):
            chunk = cases[start:start + BATCH]
            answer = post("/predict", "a", json=_predict_body(params, chunk))
            day.version = answer["version"]
            answers += answer["predictions"]
        day.predictions = len(answers)
        disputed = [i for i, case in enumerate(cases) if not case.new][:2]
        for index, (case, answer) in enumerate(zip(cases, answers)):
            key = f"demo-{seed}-{index}"
            post("/feedback", "a", json={"prediction_id": answer["prediction_id"], "label": case.truth,
                                                 "idempotency_key": key})
            day.feedback_posts += 1
            if case.new:
                day.new_cases += 1
            elif answer["decision"] == case.truth:
                day.confirmed += 1
            else:
                day.corrected += 1
            if index in disputed:
                other = next(label for label in classes if label != case.truth)
                opened = post("/feedback", "b", json={"prediction_id": answer["prediction_id"],
                                                              "label": other, "idempotency_key": key + "-b"})
                day.feedback_posts += 1
                post(f"/review/{opened['adjudication_id']}", "reviewer",
                     json={"label": case.truth, "reason": "re-read with the prior study"})
                day.adjudicated += 1
        monitoring = client.get("/monitoring", headers={"Authorization": f"Bearer {tokens['reviewer']}"})
        day.monitoring = monitoring.json() if monitoring.status_code == 200 else {}
    return day


def pick_cases(params: Params, layout: Layout, rng: np.random.Generator, known: int, new: int) -> list[Case]:
    """Cases from the training data (train and validation splits) and new ones made from them:
    the mean of two rows of one class for tables, a slightly brighter copy for images."""
    index = pd.read_parquet(layout.processed / "index.parquet")
    usable = index[index["split"].isin(["train", "validation"])].sort_values("record_id")
    chosen = usable.iloc[rng.permutation(len(usable))[:known + new]]
    if params.model.modality == "image":
        make = _image_payload(params, layout)
    else:
        make = _row_payload(params, layout, usable["record_id"])
    cases = [Case(make(record_id), str(label), False)
             for record_id, label in zip(chosen["record_id"][:known], chosen["label"][:known])]
    for first, label in zip(chosen["record_id"][known:], chosen["label"][known:]):
        twin = usable[(usable["label"] == label) & (usable["record_id"] != first)]["record_id"]
        second = twin.iloc[int(rng.integers(len(twin)))] if len(twin) else first
        cases.append(Case(_new_case(params, make(first), make(second)), str(label), True))
    return cases


def _predict_body(params: Params, cases: list[Case]) -> dict:
    if params.model.modality == "image":
        return {"images": [base64.b64encode(case.payload).decode() for case in cases]}
    return {"instances": [case.payload for case in cases]}


def _image_payload(params: Params, layout: Layout):
    def read(record_id: str) -> bytes:
        return (layout.raw / record_id).read_bytes()
    return read


def _row_payload(params: Params, layout: Layout, record_ids: pd.Series):
    from pipelines.data import manifest

    features = list(params.tabular.features)
    rows = manifest.stored_rows(layout, record_ids)

    def read(record_id: str) -> dict:
        return {name: _number(rows.at[record_id, name]) for name in features}
    return read


def _new_case(params: Params, first: Any, second: Any) -> Any:
    if params.model.modality == "image":
        from PIL import Image

        from pipelines.data.images import decode_image

        spec = params.clean.image
        pixels = decode_image(first, channels=spec.channels, min_side=spec.min_side,
                              max_pixels=spec.max_pixels).pixels
        brighter = np.clip(pixels.astype(np.int16) + 3, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(brighter.squeeze() if brighter.shape[-1] == 1 else brighter).save(buffer, format="PNG")
        return buffer.getvalue()
    row = {}
    for name, spec in params.tabular.features.items():
        values = [value for value in (first[name], second[name]) if value is not None]
        mean = sum(values) / len(values) if values else None
        row[name] = None if mean is None else (round(mean) if spec.dtype == "int" else mean)
    return row


def _number(value: Any) -> float | int | None:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return None
    return value.item() if hasattr(value, "item") else value
