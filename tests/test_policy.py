"""The retraining policy: confirmed labels waiting, cooldown, the nightly run due soon, drift.
The policy flow against a real Prefect server is tested in test_schedule_integration.py, on
that module's server."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone


from conftest import load, make_workspace, tabular_params
from pipelines.monitoring import policy
from pipelines.ops import report, runs
from pipelines.store.feedback import FeedbackStore
from pipelines.workspace import database_url


def _workspace(tmp_path, schedule=None, **rules):
    params = tabular_params()
    params["retrain_policy"].update({"min_new_labels": 3, "cooldown_hours": 6, "on_drift": False, **rules})
    params["schedule"].update(schedule or {})
    return make_workspace(tmp_path, params)


def _confirm(layout, count: int, start: int = 0) -> None:
    store = FeedbackStore(database_url(layout, load(layout).serving.store_url))
    for index in range(start, start + count):
        prediction = store.record_prediction(
            model_name="m", model_version="1", input_sha256=f"{index:064x}", modality="tabular",
            probabilities={"benign": 0.3, "malignant": 0.7}, decision="malignant", operating_threshold=0.5,
            requested_by="dr-a", input_metadata={"features": {"x": index}})
        store.add_feedback(prediction, "benign", "dr-a", f"key-{index}")
    store.close()


def test_enough_confirmed_labels_start_a_retrain_and_fewer_do_not(tmp_path):
    layout = _workspace(tmp_path)
    _confirm(layout, 2)
    quiet = policy.decide(load(layout), layout)
    assert (quiet.retrain, quiet.new_labels, quiet.reasons) == (False, 2, [])
    _confirm(layout, 1, start=2)
    due = policy.decide(load(layout), layout)
    assert due.retrain and due.reasons == ["3 new confirmed labels >= 3"]
    assert due.reason == "policy: 3 new confirmed labels >= 3"


def test_the_cooldown_and_a_nightly_run_due_soon_hold_a_retrain_back(tmp_path):
    layout = _workspace(tmp_path)
    _confirm(layout, 3)
    now = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)
    last = {"model": "m", "outcome": "promoted", "started_at": (now - timedelta(hours=2)).isoformat()}
    runs.record(load(layout), layout, last)
    held = policy.decide(load(layout), layout, now=now)
    assert not held.retrain and held.reasons
    assert held.held_back_by.startswith("cooldown: the last retrain started 2 h 00 min ago")
    # MLflow is the record: without the run log (a re-cloned workspace) the cooldown still holds,
    # and the run log is rebuilt from MLflow.
    (layout.state / report.RUNS_FILE).unlink()
    again = policy.decide(load(layout), layout, now=now)
    assert again.held_back_by == held.held_back_by and again.last_run_started == held.last_run_started
    assert runs.recent(load(layout), layout) == [last]
    assert (layout.state / report.RUNS_FILE).is_file()
    later = now + timedelta(hours=5)
    nightly_soon = policy.decide(load(layout), layout, now=later, next_nightly=later + timedelta(minutes=30))
    assert not nightly_soon.retrain
    assert nightly_soon.held_back_by.startswith("the nightly retrain is due in 30 min")
    free = policy.decide(load(layout), layout, now=later, next_nightly=later + timedelta(hours=12))
    assert free.retrain and free.held_back_by is None


def test_drift_starts_a_retrain_only_when_judged_and_only_with_on_drift(tmp_path):
    import numpy as np

    from pipelines.monitoring import drift
    from test_drift import NOW, rows, tabular_reference

    layout = _workspace(tmp_path, on_drift=True)
    params = load(layout)
    params = params.model_copy(update={"monitoring": params.monitoring.model_copy(update={"min_inputs": 30})})
    rng = np.random.default_rng(4)
    reference = tabular_reference({"mean_radius": rng.normal(14, 3, 500)}, rng.uniform(0, 1, 300))
    shifted = drift.drift_report(params, reference, rows([{"mean_radius": v} for v in rng.normal(22, 3, 60)],
                                                         list(rng.uniform(0, 1, 60))), now=NOW)
    steady = drift.drift_report(params, reference, rows([{"mean_radius": v} for v in rng.normal(14, 3, 300)],
                                                        list(rng.uniform(0, 1, 300))), now=NOW)
    few = drift.drift_report(params, reference, rows([{"mean_radius": 40.0}] * 5), now=NOW)
    decided = policy.decide(params, layout, drift=shifted, now=NOW)
    assert decided.retrain and decided.reasons[0].startswith("drift: feature 'mean_radius': PSI ")
    assert decided.drift["drifted"] is True
    assert not policy.decide(params, layout, drift=steady, now=NOW).retrain
    assert not policy.decide(params, layout, drift=few, now=NOW).retrain  # not judged: too few inputs
    off = params.model_copy(update={"retrain_policy": params.retrain_policy.model_copy(update={"on_drift": False})})
    assert not policy.decide(off, layout, drift=shifted, now=NOW).retrain
