"""Promotion against a real MLflow registry (SQLite under tmp_path) with real logged models.

Each "training run" logs a tiny real pyfunc model (fixed probabilities, no TensorFlow) and the
test writes models/train.json and reports/metrics.json as train and evaluate would.
(No ``from __future__ import annotations`` here: MLflow reads the model's predict() type hints,
which must be real types, not strings.)
"""

import json
import shutil
import warnings

import pytest

from pipelines import promote
from pipelines.errors import GateError, MedloopError
from pipelines.model.metrics import case_outcomes
from pipelines.registry.client import append_history
from pipelines.registry.tags import HISTORY_PAGES
from pipelines.registry.tracking import configure, dumps, lineage_tags, tracking_uri
from pipelines.workspace import Layout
from conftest import load, make_workspace, tabular_params

FROZEN = "f" * 64


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """One real workspace (git + DVC) per module; each test promotes in its own copy of it.

    The MLflow database is created here once (its schema migrations take seconds); each copy
    creates its own experiment, with artifacts inside the copy.
    """
    from mlflow import MlflowClient

    layout = make_workspace(tmp_path_factory.mktemp("template"), tabular_params())
    MlflowClient(tracking_uri(load(layout), layout)).search_experiments()
    return layout


@pytest.fixture
def workspace(template, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDLOOP_ACTOR", "dr.test")
    layout = Layout.at(shutil.copytree(template.root, tmp_path / "ws", symlinks=True))
    params = load(layout)
    configure(params, layout)
    return params, layout


def candidate(params, layout, *, log_model=True, subgroup_auroc=0.90, **test):
    """A finished training run with a real logged model, plus train.json and metrics.json."""
    import mlflow
    import numpy as np
    import pandas as pd

    class FixedProbabilities(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
            n = len(model_input)
            return pd.DataFrame({"benign": np.full(n, 0.3), "malignant": np.full(n, 0.7)})

    experiment_id = configure(params, layout)
    with mlflow.start_run(experiment_id=experiment_id) as run, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlflow.set_tags(lineage_tags(params, layout))
        if log_model:
            mlflow.pyfunc.log_model(name="model", python_model=FixedProbabilities(), pip_requirements=["mlflow"])
    run_id = run.info.run_id
    # A test set large enough (400 positives, 600 negatives) for two models with the same
    # per-case results to be shown non-inferior within the margin 0.02.
    values = {"n": 1000, "n_positive": 400, "auroc": 0.95, "auprc": 0.9, "sensitivity": 0.92,
              "specificity": 0.85, "ece": 0.05, "auroc_ci": [0.92, 0.98]}
    values.update(test)
    caught, cleared = round(values["sensitivity"] * 400), round(values["specificity"] * 600)
    flagged = [1] * caught + [0] * (400 - caught) + [0] * cleared + [1] * (600 - cleared)
    test_cases = case_outcomes([1] * 400 + [0] * 600, flagged, 0.5)
    metrics = {
        "positive_class": "malignant", "classes": ["benign", "malignant"],
        "operating_threshold": 0.42, "threshold_source": "validation", "test": values,
        "validation": values,
        "subgroups": {"site": {
            "north": {"n": 60, "n_positive": 22, "auroc": subgroup_auroc, "sensitivity": 0.9, "specificity": 0.8},
            "south": {"n": 54, "n_positive": 20, "auroc": 0.93, "sensitivity": 0.9, "specificity": 0.8},
        }},
        "test_cases": test_cases,
        "frozen_test_set_sha256": FROZEN, "weights_sha256": "w-" + run_id, "run_id": run_id,
    }
    layout.models.mkdir(parents=True, exist_ok=True)
    layout.reports.mkdir(parents=True, exist_ok=True)
    layout.train_json.write_text(dumps({"run_id": run_id, "experiment_id": experiment_id}))
    layout.metrics_json.write_text(dumps(metrics))
    return run_id


def registry(params):
    from mlflow import MlflowClient

    client = MlflowClient()
    versions = client.search_model_versions(f"name = '{params.model.name}'")
    return client, sorted(int(v.version) for v in versions)


def aliases(client, params) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model(params.model.name).aliases.items()}


@pytest.mark.slow
def test_promotion_story_promote_refuse_override_rollback(workspace):
    params, layout = workspace
    name = params.model.name

    # 1. The first model passes the floors: version 1, champion, no previous champion.
    first_run = candidate(params, layout, auroc=0.90, auroc_ci=[0.86, 0.94])
    first = promote.run(params, layout)
    assert (first.action, first.passed, first.version, first.previous_version) == ("promoted", True, "1", None)
    client, versions = registry(params)
    assert versions == [1] and aliases(client, params) == {"champion": "1"}
    v1 = client.get_model_version(name, "1")
    assert v1.run_id == first_run
    assert v1.tags["medloop.promotion.decision"] == "promoted"
    assert v1.tags["medloop.promotion.actor"] == "medloop"
    assert v1.tags["medloop.operating_threshold"] == "0.42"
    assert v1.tags["medloop.metrics.test_auroc"] == "0.9"
    assert v1.tags["medloop.params_hash"] == params.digest()  # lineage copied from the run
    assert json.loads(v1.tags["medloop.metrics"])["frozen_test_set_sha256"] == FROZEN
    reasons = json.loads(v1.tags["medloop.promotion.reasons"])
    assert {"min_auroc", "min_sensitivity", "max_ece", "non_inferiority"} <= {r["gate"] for r in reasons}
    assert all(r["passed"] for r in reasons)
    assert promote.history(params, layout)[0]["action"] == "promoted"

    # 2. A better model: v2 champion, v1 previous-champion and still version 1.
    candidate(params, layout, auroc=0.95)
    second = promote.run(params, layout)
    assert (second.version, second.previous_version) == ("2", "1")
    # The version's metrics tag leaves out the per-case results; the champion's were read from
    # its run and paired with the candidate's case by case.
    assert "test_cases" not in json.loads(v1.tags["medloop.metrics"])
    paired = {r.gate: r for r in second.decision.verdicts}["non_inferiority.sensitivity"]
    assert paired.passed and paired.detail.startswith(
        "sensitivity 368/400 against the champion's 368/400 on the same positive cases: the same number "
        "of missed cases (32 of 400)")
    client, versions = registry(params)
    assert versions == [1, 2] and aliases(client, params) == {"champion": "2", "previous-champion": "1"}
    assert client.get_model_version(name, "1").run_id == first_run
    # A retried task promotes nothing twice.
    again = promote.run(params, layout)
    assert (again.action, again.passed, again.version) == ("unchanged", True, "2")
    assert registry(params)[1] == [1, 2] and len(promote.history(params, layout)) == 2

    # 3. A worse model is refused; the registry is untouched; the run carries the reasons.
    worse_run = candidate(params, layout, auroc=0.90, auroc_ci=[0.87, 0.93])
    worse = promote.run(params, layout)
    assert (worse.action, worse.passed, worse.version) == ("refused", False, None)
    client, versions = registry(params)
    assert versions == [1, 2] and aliases(client, params) == {"champion": "2", "previous-champion": "1"}
    tags = client.get_run(worse_run).data.tags
    assert tags["medloop.promotion.decision"] == "refused"
    failed = {r["gate"]: r for r in json.loads(tags["medloop.promotion.reasons"])}
    assert set(failed) == {"non_inferiority.auroc", "non_inferiority.auroc_ci"}
    assert failed["non_inferiority.auroc"]["observed"] == 0.90
    assert failed["non_inferiority.auroc"]["required"] == pytest.approx(0.93)
    assert "margin" in failed["non_inferiority.auroc"]["detail"]
    import mlflow

    decision_file = json.loads(mlflow.artifacts.load_text(f"runs:/{worse_run}/{promote.DECISION_ARTIFACT}"))
    assert decision_file["passed"] is False and decision_file["actor"] == "medloop"

    # ... and a flow that requires promotion ends failed with each gate, observed vs required.
    with pytest.raises(promote.PromotionRefused) as refused:
        promote.run(params, layout, require_promotion=True)
    assert isinstance(refused.value, GateError)
    assert "non_inferiority.auroc:" in str(refused.value) and "required 0.9300" in str(refused.value)
    assert registry(params)[1] == [1, 2]

    # 4. A subgroup failure is refused too.
    subgroup_run = candidate(params, layout, subgroup_auroc=0.60)
    assert not promote.run(params, layout).passed
    failed = json.loads(client.get_run(subgroup_run).data.tags["medloop.promotion.reasons"])
    assert {r["gate"] for r in failed} == {"subgroup_min_auroc[site=north]",
                                           "non_inferiority.subgroup_auroc[site=north]"}
    assert registry(params)[1] == [1, 2]

    # 5. A human overrides the refusal of the worse run: registered and promoted, with who and why.
    overridden = promote.override(params, layout, worse_run, reason="site audit: AUROC dip is label noise")
    assert (overridden.action, overridden.version, overridden.previous_version) == ("override", "3", "2")
    client, versions = registry(params)
    assert versions == [1, 2, 3] and aliases(client, params) == {"champion": "3", "previous-champion": "2"}
    v3 = client.get_model_version(name, "3")
    assert v3.run_id == worse_run
    assert v3.tags["medloop.promotion.decision"] == "override"
    assert v3.tags["medloop.promotion.actor"] == "dr.test"
    assert v3.tags["medloop.promotion.reason"] == "site audit: AUROC dip is label noise"
    assert {r["gate"] for r in json.loads(v3.tags["medloop.promotion.reasons"])} == set(failed_gates(client, worse_run))
    with pytest.raises(promote.PromotionError, match="already registered"):
        promote.override(params, layout, worse_run, reason="again")

    # 6. Rollback restores the previous champion; a second rollback undoes the first.
    back = promote.rollback(params, layout, reason="override regretted")
    assert (back.action, back.version, back.previous_version, back.actor) == ("rollback", "2", "3", "dr.test")
    assert aliases(client, params) == {"champion": "2", "previous-champion": "3"}
    promote.rollback(params, layout, actor="dr.other")
    assert aliases(client, params) == {"champion": "3", "previous-champion": "2"}
    assert registry(params)[1] == [1, 2, 3]

    # 7. History lists every action, in order (refusals never touch the registry).
    entries = promote.history(params, layout)
    assert [(e["action"], e["version"], e["actor"]) for e in entries] == [
        ("promoted", "1", "medloop"), ("promoted", "2", "medloop"), ("override", "3", "dr.test"),
        ("rollback", "2", "dr.test"), ("rollback", "3", "dr.other"),
    ]
    assert entries[2]["reason"] == "site audit: AUROC dip is label noise"
    assert entries[3]["replaced"] == "3" and all(e["alias"] == "champion" for e in entries)


def failed_gates(client, run_id):
    return [r["gate"] for r in json.loads(client.get_run(run_id).data.tags["medloop.promotion.reasons"])]


def test_a_refused_first_model_creates_nothing_in_the_registry(workspace):
    params, layout = workspace
    run_id = candidate(params, layout, sensitivity=0.80)
    result = promote.run(params, layout)
    assert not result.passed and "min_sensitivity" in result.reason
    client, versions = registry(params)
    assert versions == [] and client.search_registered_models() == []
    assert promote.history(params, layout) == []
    assert failed_gates(client, run_id) == ["min_sensitivity"]


def test_rollback_without_a_previous_champion_is_a_clear_error(workspace):
    params, layout = workspace
    with pytest.raises(promote.PromotionError, match="not registered"):
        promote.rollback(params, layout)
    candidate(params, layout)
    promote.run(params, layout)
    with pytest.raises(promote.PromotionError, match="no previous-champion alias"):
        promote.rollback(params, layout)


def test_override_refuses_unknown_runs_unjudged_runs_and_runs_without_a_model(workspace):
    params, layout = workspace
    with pytest.raises(promote.PromotionError, match="not in the tracking store"):
        promote.override(params, layout, "0" * 32, reason="trust me")
    unjudged = candidate(params, layout)
    with pytest.raises(promote.PromotionError, match="never judged"):
        promote.override(params, layout, unjudged, reason="trust me")
    with pytest.raises(promote.PromotionError, match="needs a reason"):
        promote.override(params, layout, unjudged, reason=" ")
    modelless = candidate(params, layout, log_model=False, auroc=0.5)
    assert not promote.run(params, layout).passed
    with pytest.raises(promote.PromotionError, match="no logged model"):
        promote.override(params, layout, modelless, reason="trust me")
    assert registry(params)[1] == []


def test_stale_metrics_and_missing_inputs_are_refused_before_anything_happens(workspace):
    params, layout = workspace
    with pytest.raises(MedloopError, match="train.json is missing"):
        promote.run(params, layout)
    candidate(params, layout)
    layout.train_json.write_text(json.dumps({"run_id": "another"}))
    with pytest.raises(promote.PromotionError, match="re-run evaluate"):
        promote.run(params, layout)


def test_a_champion_scored_on_another_frozen_test_set_is_rescored_or_refused(workspace):
    params, layout = workspace
    candidate(params, layout)
    promote.run(params, layout)
    run_id = candidate(params, layout)
    metrics = json.loads(layout.metrics_json.read_text())
    metrics["frozen_test_set_sha256"] = "e" * 64
    layout.metrics_json.write_text(json.dumps(metrics))

    refused = promote.run(params, layout)
    assert [f.gate for f in refused.decision.failures] == ["same_frozen_test_set"]

    scored = []

    def rescore(uri):
        import mlflow

        scored.append(uri)
        mlflow.pyfunc.load_model(uri)  # the champion's real model is reachable by that URI
        return {**metrics, "run_id": "champion"}

    promoted = promote.run(params, layout, rescore=rescore)
    assert scored == [f"models:/{params.model.name}/1"]
    assert (promoted.action, promoted.version) == ("promoted", "2")
    assert promoted.run_id == run_id


def test_a_champion_without_per_case_results_is_rescored_or_refused(workspace):
    """A champion promoted before per-case results were recorded: same frozen test set, but
    nothing to pair case by case, so it is re-scored (or the paired gates say what to do)."""
    from mlflow import MlflowClient

    params, layout = workspace
    first_run = candidate(params, layout)
    promote.run(params, layout)
    logged = json.loads(layout.metrics_json.read_text())
    del logged["test_cases"]
    MlflowClient().log_text(first_run, json.dumps(logged), promote.METRICS_ARTIFACT)  # as an older promote left it
    candidate(params, layout)
    refused = promote.run(params, layout)
    assert [f.gate for f in refused.decision.failures] == ["non_inferiority.sensitivity", "non_inferiority.specificity"]
    assert "re-score the champion" in refused.decision.failures[0].detail

    rescored = []
    metrics = json.loads(layout.metrics_json.read_text())
    promoted = promote.run(params, layout, rescore=lambda uri: rescored.append(uri) or {**metrics, "run_id": first_run})
    assert rescored == [f"models:/{params.model.name}/1"] and promoted.action == "promoted"


def test_history_survives_more_entries_than_one_tag_holds(workspace):
    params, layout = workspace
    from mlflow import MlflowClient

    client = MlflowClient()
    client.create_registered_model(params.model.name)
    for number in range(60):
        append_history(client, params.model.name, {
            "version": str(number), "alias": "champion", "action": "rollback", "actor": "a",
            "reason": "r" * 40, "at": "2026-01-01T00:00:00+00:00", "replaced": None})
    tags = client.get_registered_model(params.model.name).tags
    assert all(len(value) <= 5000 for value in tags.values())
    assert int(tags[HISTORY_PAGES]) >= 2
    assert [e["version"] for e in promote.history(params, layout)] == [str(n) for n in range(60)]


def test_a_promotion_the_tracking_server_cut_short_is_redone_or_finished_by_the_next(workspace):
    """The registry states a promotion leaves when its tracking server goes away half-way (made
    here with MLflow's own calls, in promote's order): a version registered but never made
    champion is never served, so the next promote deletes it and judges the run again; a version
    made champion whose decision never reached the run gets the rest of its record."""
    import mlflow

    from pipelines.registry.client import get_run, logged_model
    from pipelines.registry.tags import CHAMPION, DECISION, PREVIOUS_CHAMPION

    params, layout = workspace
    name = params.model.name
    candidate(params, layout)
    assert promote.run(params, layout).version == "1"
    client = mlflow.MlflowClient()

    def register_as_promote_begins(run_id: str) -> str:
        _, source = logged_model(client, get_run(client, run_id, params, layout))
        return str(mlflow.register_model(source, name, tags={DECISION: "promoted"}).version)

    # Cut after the version was registered, before any alias moved.
    second_run = candidate(params, layout)
    assert register_as_promote_begins(second_run) == "2"
    redone = promote.run(params, layout)
    assert (redone.action, redone.version, redone.previous_version) == ("promoted", "3", "1")
    client, versions = registry(params)
    assert versions == [1, 3] and aliases(client, params) == {CHAMPION: "3", PREVIOUS_CHAMPION: "1"}
    assert client.get_run(second_run).data.tags[DECISION] == "promoted"

    # Cut after the champion alias moved, before the history and the run's decision.
    third_run = candidate(params, layout)
    version = register_as_promote_begins(third_run)
    client.set_registered_model_alias(name, PREVIOUS_CHAMPION, "3")
    client.set_registered_model_alias(name, CHAMPION, version)
    finished = promote.run(params, layout)
    assert (finished.action, finished.passed, finished.version, finished.previous_version) == ("promoted", True, "4", "3")
    assert registry(params)[1] == [1, 3, 4]
    assert client.get_run(third_run).data.tags["medloop.promotion.version"] == "4"
    assert [entry["version"] for entry in promote.history(params, layout)] == ["1", "3", "4"]
    assert promote.run(params, layout).action == "unchanged"  # judged now: never again


def test_a_tracking_server_that_does_not_answer_is_one_paragraph_in_deploy_and_lineage(workspace, monkeypatch):
    """Deploying, and naming the night's commit on its run, against a tracking server that is not
    there: one paragraph that names the server, what was being done and what that left."""
    from conftest import free_port
    from pipelines import deploy
    from pipelines.registry import lineage
    from pipelines.registry.interrupted import TrackingUnavailable

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own minutes of retries
    params, layout = workspace
    gone = f"http://127.0.0.1:{free_port()}"
    params = params.model_copy(update={"tracking": params.tracking.model_copy(update={"uri": gone})})

    with pytest.raises(TrackingUnavailable) as refused:
        deploy.run(params, layout, "1")
    message = str(refused.value)
    assert message.startswith(f"the MLflow tracking server {gone} did not answer while deploying")
    assert "connection refused" in message and "`medloop deploy`" in message and "Traceback" not in message

    with pytest.raises(TrackingUnavailable) as unnamed:
        lineage.record_commit(params, layout, "a" * 32, "1", "c" * 40, "breast-cancer-mlp-v1")
    message = str(unnamed.value)
    assert "did not answer while naming commit cccccccccccc" in message
    assert "(tag breast-cancer-mlp-v1) is made" in message and "do not name it yet" in message
