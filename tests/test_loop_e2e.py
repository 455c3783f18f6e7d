"""The whole loop for real, once around: the retrain flow makes and deploys v1; `medloop serve`
serves it; clinicians predict, confirm, correct and disagree; a reviewer adjudicates; the next
retrain exports their labels, collects them with provenance ``clinician`` into a new data
version, trains and promotes v2, whose lineage names that data version, and the service, told
by deploy, answers with v2."""

from __future__ import annotations

import httpx
import pandas as pd
import pytest

from conftest import free_port, load, make_workspace, passing_params
from pipelines.data import manifest
from pipelines.ops.versioning import git
from test_feedback_merge import collect_rows
from test_serving import bearer, start_service, stop


@pytest.mark.slow
@pytest.mark.integration
def test_the_loop_round_trip(tmp_path, prefect_server, monkeypatch):
    from flows.retrain import retrain
    from pipelines.registry.lineage import version_lineage
    from serving.auth import add_token

    port = free_port()
    params = passing_params()
    params["serving"]["url"] = f"http://127.0.0.1:{port}"  # deploy tells the service to reload
    # Night 2 must give a second version: the non-inferiority margin is not what is tested here.
    params["promote"]["non_inferiority_margin"] = 0.3
    layout = make_workspace(tmp_path, params)
    name = params["model"]["name"]
    classes = params["model"]["classes"]

    first = retrain(str(layout.params_file), "test: night 1")
    assert first["outcome"] == "promoted" and first["promotion"]["version"] == "1"

    tokens_file = layout.root / ".medloop" / "tokens.json"
    tokens = {who: add_token(tokens_file, f"dr-{who}", role) for who, role in
              (("a", "clinician"), ("b", "clinician"), ("reviewer", "reviewer"), ("admin", "admin"))}
    monkeypatch.setenv("MEDLOOP_SERVICE_TOKEN", tokens["admin"])
    process, base = start_service(layout, port=port)
    try:
        client = httpx.Client(base_url=base, timeout=60)
        features = list(load(layout).tabular.features)
        records = pd.read_parquet(layout.clean_records).set_index("record_id")
        rows = collect_rows(layout)
        chosen = records.index[:3]
        cases = [{n: float(rows.loc[r, n]) for n in features} for r in chosen]
        cases.append({n: value * 1.01 for n, value in cases[0].items()})  # a case the data set lacks
        answer = client.post("/predict", json={"instances": cases}, headers=bearer(tokens["a"]))
        assert answer.status_code == 200, answer.text
        assert answer.json()["version"] == "1"
        agreed, corrected, disputed, new_case = (p["prediction_id"] for p in answer.json()["predictions"])
        label = {r: records.loc[r, "label"] for r in chosen}
        flip = {r: next(c for c in classes if c != label[r]) for r in chosen}

        def feedback(prediction_id, value, who, key):
            response = client.post("/feedback", json={"prediction_id": prediction_id, "label": value,
                                                      "idempotency_key": key}, headers=bearer(tokens[who]))
            assert response.status_code in (200, 201), response.text
            return response.json()

        feedback(agreed, label[chosen[0]], "a", "k1")
        feedback(corrected, label[chosen[1]], "a", "k2")
        feedback(corrected, flip[chosen[1]], "a", "k3")  # the same clinician corrects herself
        feedback(disputed, label[chosen[2]], "a", "k4")
        assert feedback(disputed, flip[chosen[2]], "b", "k5")["adjudication_id"] is not None
        feedback(new_case, classes[0], "a", "k6")
        [case] = client.get("/review", headers=bearer(tokens["reviewer"])).json()["open"]
        resolved = client.post(f"/review/{case['id']}", json={"label": flip[chosen[2]], "reason": "re-read"},
                               headers=bearer(tokens["reviewer"]))
        assert resolved.status_code == 200, resolved.text

        second = retrain(str(layout.params_file), "test: night 2")
        assert second["feedback_export"]["exported"] == 4
        assert second["outcome"] == "promoted", second.get("promotion")
        assert second["promotion"]["version"] == "2"

        # The new data version holds the confirmed labels, with provenance.
        raw = manifest.read(layout)
        from_clinicians = raw[raw["source"] == "feedback"]
        assert len(from_clinicians) == 4 and set(from_clinicians["label_provenance"]) == {"clinician"}
        after = pd.read_parquet(layout.clean_records).set_index("record_id")
        assert after.loc[chosen[1], "label"] == flip[chosen[1]]  # the correction wins
        assert after.loc[chosen[2], "label"] == flip[chosen[2]]  # the adjudicated label
        assert after.loc[chosen[0], "label"] == label[chosen[0]]
        assert (after.loc[list(chosen), "label_provenance"] == "clinician").all()
        assert (after["label_provenance"] == "clinician").sum() == 4  # three relabelled, one new case

        # v2's lineage names that data version: the committed .dvc hashes at its tag.
        lineage = version_lineage(load(layout), layout, "2")
        assert lineage["git_tag"] == f"{name}-v2" and lineage["trigger"] == "test: night 2"
        for folder, record in (("raw", "data/raw/index.json.dvc"), ("feedback", "data/feedback.dvc")):
            committed = git(layout, "show", f"{name}-v2:{record}").stdout
            assert lineage["data"][folder] and lineage["data"][folder] in committed

        # Deploy told the service; it now answers with v2.
        assert second["deploy"]["version"] == "2"
        ready = client.get("/readyz").json()
        assert ready["version"] == "2", ready
        again = client.post("/predict", json={"instances": cases[:1]}, headers=bearer(tokens["a"]))
        assert again.json()["version"] == "2"
    finally:
        stop(process)
