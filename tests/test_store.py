"""The feedback store on both backends: SQLite (a file under tmp_path) and the PostgreSQL server on
127.0.0.1:5432 (a fresh database per test)."""

from __future__ import annotations

import threading

import pytest

from tests_support import fresh_postgres_database


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'feedback.db'}"
        return
    with fresh_postgres_database("medloop_store") as url:
        yield url


@pytest.fixture
def store(store_url):
    from pipelines.store.feedback import FeedbackStore

    opened = FeedbackStore(store_url)
    yield opened
    opened.close()


def predict(store, sha: str = "a" * 64) -> str:
    return store.record_prediction(
        model_name="pneumonia-cxr", model_version="3", input_sha256=sha, modality="image",
        probabilities={"NORMAL": 0.2, "PNEUMONIA": 0.8}, decision="PNEUMONIA", operating_threshold=0.41,
        requested_by="clinician-token-1", input_metadata={"sex": "F", "age_band": "40-49"})


@pytest.mark.integration
def test_migrations_create_exactly_the_models_schema_and_rerun_as_a_no_op(store_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from pipelines.store.db import engine_for, upgrade
    from pipelines.store.models import Base

    engine = engine_for(store_url)
    assert upgrade(engine) == "0004"
    assert upgrade(engine) == "0004"
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    engine.dispose()


@pytest.mark.integration
def test_an_existing_0001_store_upgrades_to_0002_keeping_its_rows(store_url):
    """A store made before shadow mode (revision 0001, with predictions and feedback in it) is
    brought to the newest revision on open: its rows are kept and shadow answers can be stored for them."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import inspect, text

    from pipelines.store.db import engine_for, upgrade
    from pipelines.store.feedback import FeedbackStore
    from pipelines.store.models import Base

    engine = engine_for(store_url)
    assert upgrade(engine, "0001") == "0001"
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO predictions (id, created_at, model_name, model_version, input_sha256, modality, "
            "input_metadata, probabilities, decision, operating_threshold, requested_by) VALUES "
            "('p-old', '2026-11-30 10:00:00+00:00', 'pneumonia-cxr', '3', :sha, 'image', '{}', "
            "'{\"NORMAL\": 0.3, \"PNEUMONIA\": 0.7}', 'PNEUMONIA', 0.41, 'dr-a')"), {"sha": "c" * 64})
        connection.execute(text(
            "INSERT INTO feedback (created_at, prediction_id, label, reviewer_id, idempotency_key) VALUES "
            "('2026-11-30 11:00:00+00:00', 'p-old', 'PNEUMONIA', 'dr-a', 'old-key')"))
    assert "shadow_predictions" not in inspect(engine).get_table_names()
    engine.dispose()

    store = FeedbackStore(store_url)  # migrates on open
    try:
        assert store.revision == "0004"
        with store.engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
        assert "shadow_predictions" in inspect(store.engine).get_table_names()
        assert store.prediction("p-old")["probabilities"] == {"NORMAL": 0.3, "PNEUMONIA": 0.7}
        assert [case["label"] for case in store.confirmed_labels()] == ["PNEUMONIA"]
        stored = store.record_shadow_predictions(
            candidate="4", model_name="pneumonia-cxr", model_version="4", run_id="r4", operating_threshold=0.5,
            answers=[{"prediction_id": "p-old", "probabilities": {"NORMAL": 0.6, "PNEUMONIA": 0.4},
                      "decision": "NORMAL"}])
        assert stored == 1 and store.shadow_predictions("p-old")[0]["decision"] == "NORMAL"
    finally:
        store.close()


@pytest.mark.integration
def test_shadow_answers_are_stored_once_and_judged_on_the_same_confirmed_cases(store):
    """Served v1 and candidate run:abc on the same five cases, four of them confirmed: the
    report puts both sets of figures side by side, and v2's cases (not shadow-scored) are apart."""
    truths = ["PNEUMONIA", "PNEUMONIA", "NORMAL", "NORMAL", None]
    served = ["PNEUMONIA", "NORMAL", "NORMAL", "PNEUMONIA", "NORMAL"]
    shadow = ["PNEUMONIA", "PNEUMONIA", "NORMAL", "NORMAL", "PNEUMONIA"]
    answers = []
    for n, (truth, decision, candidate_decision) in enumerate(zip(truths, served, shadow)):
        prediction = store.record_prediction(
            model_name="pneumonia-cxr", model_version="1", input_sha256=f"{n:064x}", modality="image",
            probabilities={"NORMAL": 0.5, "PNEUMONIA": 0.5}, decision=decision, operating_threshold=0.5,
            requested_by="t")
        if truth is not None:
            store.add_feedback(prediction, truth, "dr-a", f"k{n}")
        answers.append({"prediction_id": prediction, "decision": candidate_decision,
                        "probabilities": {"NORMAL": 0.1 * n, "PNEUMONIA": 1 - 0.1 * n}})
    unshadowed = store.record_prediction(
        model_name="pneumonia-cxr", model_version="2", input_sha256="f" * 64, modality="image",
        probabilities={"NORMAL": 0.5, "PNEUMONIA": 0.5}, decision="NORMAL", operating_threshold=0.5, requested_by="t")
    store.add_feedback(unshadowed, "NORMAL", "dr-a", "k-v2")

    record = dict(candidate="run:abc", model_name="pneumonia-cxr", model_version=None, run_id="abc",
                  operating_threshold=0.37)
    assert store.record_shadow_predictions(**record, answers=answers[:3]) == 3
    assert store.record_shadow_predictions(**record, answers=answers) == 2  # the first three are kept once
    [kept] = store.shadow_predictions(answers[1]["prediction_id"])
    assert kept["probabilities"] == {"NORMAL": 0.1, "PNEUMONIA": 0.9} and kept["decision"] == "PNEUMONIA"
    assert kept["candidate"] == "run:abc" and kept["model_version"] is None and kept["run_id"] == "abc"
    assert kept["operating_threshold"] == 0.37
    assert store.shadow_predictions(unshadowed) == []

    [entry] = store.shadow_performance("pneumonia-cxr", "PNEUMONIA")
    assert {key: entry[key] for key in ("served_version", "candidate", "candidate_version", "run_id",
                                        "operating_threshold", "scored", "confirmed", "decisions_differ")} == {
        "served_version": "1", "candidate": "run:abc", "candidate_version": None, "run_id": "abc",
        "operating_threshold": 0.37, "scored": 5, "confirmed": 4, "decisions_differ": 3}
    assert entry["served"] == {"predictions": 5, "confirmed": 4, "agreement": 0.5, "sensitivity": 0.5,
                               "specificity": 0.5, "positive_rate": 0.4, "confusion": {"tp": 1, "fn": 1, "tn": 1, "fp": 1}}
    assert entry["shadow"] == {"predictions": 5, "confirmed": 4, "agreement": 1.0, "sensitivity": 1.0,
                               "specificity": 1.0, "positive_rate": 0.6, "confusion": {"tp": 2, "fn": 0, "tn": 2, "fp": 0}}
    # The served versions' own report is unchanged by shadow answers.
    first, second = store.live_performance("pneumonia-cxr", "PNEUMONIA")
    assert first["predictions"] == 5 and first["agreement"] == 0.5 and second["confirmed"] == 1


@pytest.mark.integration
def test_feedback_is_idempotent_and_a_reused_key_for_other_feedback_is_refused(store):
    from pipelines.store.feedback import Conflict, NotFound

    prediction = predict(store)
    first = store.add_feedback(prediction, "PNEUMONIA", "dr-a", "key-1", comment="left lower lobe")
    again = store.add_feedback(prediction, "PNEUMONIA", "dr-a", "key-1", comment="left lower lobe")
    assert first.created and not again.created and again.feedback_id == first.feedback_id
    assert store.feedback_count() == 1
    with pytest.raises(Conflict, match="key-1"):
        store.add_feedback(prediction, "NORMAL", "dr-a", "key-1", comment="left lower lobe")
    with pytest.raises(NotFound, match="no prediction 'nope'"):
        store.add_feedback("nope", "NORMAL", "dr-a", "key-2")
    assert store.feedback_count() == 1


@pytest.mark.integration
def test_a_replay_must_repeat_every_field_and_keys_belong_to_their_author(store):
    """The same key with only the comment changed is refused, not answered as a replay that
    drops the comment; another reviewer's identical key is a different key, and a refusal names
    only the caller's own feedback."""
    from pipelines.store.feedback import Conflict

    prediction, other = predict(store, "a" * 64), predict(store, "b" * 64)
    mine = store.add_feedback(prediction, "PNEUMONIA", "dr-a", "k1", comment="first read")
    for changed, field in [(dict(comment="second read"), "comment"), (dict(comment=None), "comment"),
                           (dict(label="NORMAL"), "label"), (dict(prediction_id=other), "prediction_id"),
                           (dict(label="NORMAL", comment="second read"), "label and comment")]:
        post = {"prediction_id": prediction, "label": "PNEUMONIA", "comment": "first read", **changed}
        with pytest.raises(Conflict) as refused:
            store.add_feedback(post["prediction_id"], post["label"], "dr-a", "k1", comment=post["comment"])
        assert str(refused.value) == (
            f"idempotency key 'k1' was already used for your feedback {mine.feedback_id}, with a different "
            f"{field}: a replay must repeat the prediction_id, label and comment exactly. Send new feedback "
            f"(a correction too) with a new key.")
    assert store.feedback_count() == 1

    theirs = store.add_feedback(prediction, "PNEUMONIA", "dr-b", "k1", comment="first read")  # same key, other author
    assert theirs.created and theirs.feedback_id != mine.feedback_id
    with pytest.raises(Conflict) as refused:
        store.add_feedback(prediction, "NORMAL", "dr-b", "k1")
    assert f"your feedback {theirs.feedback_id}," in str(refused.value)
    assert f"feedback {mine.feedback_id}" not in str(refused.value)
    assert not store.add_feedback(prediction, "PNEUMONIA", "dr-a", "k1", comment="first read").created
    assert store.feedback_count() == 2


@pytest.mark.integration
def test_a_correction_adds_a_row_and_the_latest_label_counts(store):
    prediction = predict(store)
    store.add_feedback(prediction, "NORMAL", "dr-a", "k1")
    store.add_feedback(prediction, "PNEUMONIA", "dr-a", "k2", comment="second look: right lower lobe")
    assert store.feedback_count() == 2  # nothing overwritten
    [confirmed] = store.confirmed_labels()
    assert confirmed["label"] == "PNEUMONIA" and confirmed["how"] == "agreed" and confirmed["reviewers"] == ["dr-a"]
    assert store.open_reviews() == []


@pytest.mark.integration
def test_conflicting_reviewers_wait_for_adjudication(store):
    from pipelines.store.feedback import Conflict, NotFound

    agreed, disputed = predict(store, "a" * 64), predict(store, "b" * 64)
    store.add_feedback(agreed, "PNEUMONIA", "dr-a", "k1")
    store.add_feedback(agreed, "PNEUMONIA", "dr-b", "k2")
    store.add_feedback(disputed, "PNEUMONIA", "dr-a", "k3")
    result = store.add_feedback(disputed, "NORMAL", "dr-b", "k4")
    assert result.adjudication_id is not None

    [case] = store.open_reviews()
    assert case["prediction_id"] == disputed and case["labels_in_conflict"] == ["NORMAL", "PNEUMONIA"]
    assert [row["reviewer_id"] for row in case["feedback"]] == ["dr-a", "dr-b"]
    # Only the agreed case may enter training while the other waits.
    assert [c["prediction_id"] for c in store.confirmed_labels()] == [agreed]

    store.resolve(case["id"], "PNEUMONIA", "dr-senior", reason="consolidation visible on lateral")
    confirmed = {c["prediction_id"]: c for c in store.confirmed_labels()}
    assert confirmed[disputed]["label"] == "PNEUMONIA" and confirmed[disputed]["how"] == "adjudicated"
    assert store.open_reviews() == []
    with pytest.raises(Conflict, match="already resolved"):
        store.resolve(case["id"], "NORMAL", "dr-other")
    with pytest.raises(NotFound):
        store.resolve(999, "NORMAL", "dr-other")
    # The export mark: nothing newer than the last feedback row.
    last = max(c["last_feedback_id"] for c in confirmed.values())
    assert store.confirmed_labels(after_feedback_id=last) == []


@pytest.mark.slow
@pytest.mark.integration
def test_concurrent_writers_store_exactly_the_unique_feedback(store):
    """8 writers, 400 posts, 10% of them repeats of an earlier idempotency key: no errors (no
    'database is locked' on SQLite), and exactly the unique ones stored."""
    predictions = [predict(store, f"{i:064x}") for i in range(20)]
    errors: list[BaseException] = []
    keys = [f"key-{n}" for n in range(360)]

    def writer(worker: int) -> None:
        try:
            for n in range(worker, 400, 8):
                key = keys[n] if n < 360 else keys[n - 360]  # the last 40 repeat earlier keys
                index = int(key.split("-")[1])
                store.add_feedback(predictions[index % 20], "PNEUMONIA", f"dr-{index % 3}", key)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted on below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert store.feedback_count() == 360


APPEND_ONLY_TABLES = ["predictions", "feedback", "adjudications", "adjudication_resolutions", "deployments",
                      "shadow_predictions", "access_log"]


@pytest.mark.integration
def test_the_database_refuses_to_update_or_delete_any_stored_row(store):
    """Append-only is the database's rule, not only the application's: a raw UPDATE or DELETE
    on any table of the store is refused with an error naming the table, and the row stays."""
    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError

    prediction = predict(store)
    store.add_feedback(prediction, "PNEUMONIA", "dr-a", "k1")
    [case_id] = [store.add_feedback(prediction, "NORMAL", "dr-b", "k2").adjudication_id]
    store.resolve(case_id, "PNEUMONIA", "dr-senior", reason="lateral view")
    store.record_deployment("pneumonia-cxr", "3", "test")
    store.record_view(prediction, "dr-a", "clinician", "case")
    store.record_shadow_predictions(candidate="4", model_name="pneumonia-cxr", model_version="4", run_id=None,
                                    operating_threshold=0.5, answers=[{"prediction_id": prediction, "decision": "NORMAL",
                                                                       "probabilities": {"NORMAL": 0.6, "PNEUMONIA": 0.4}}])
    statements = {table: [("UPDATE", f"UPDATE {table} SET id = id"), ("DELETE", f"DELETE FROM {table}")]
                  for table in APPEND_ONLY_TABLES}
    if store.engine.dialect.name == "postgresql":
        for table in APPEND_ONLY_TABLES:
            statements[table].append(("TRUNCATE", f"TRUNCATE {table} CASCADE"))
    for table, refused in statements.items():
        for operation, statement in refused:
            with pytest.raises(IntegrityError) as error, store.engine.begin() as connection:
                connection.execute(text(statement))
            assert f"the feedback store is append-only: {operation} on {table} is refused" in str(error.value.orig)
        with store.engine.connect() as connection:
            assert connection.execute(text(f"SELECT count(*) FROM {table}")).scalar() >= 1, table
    assert store.feedback_count() == 2
    [confirmed] = store.confirmed_labels()
    assert confirmed["label"] == "PNEUMONIA" and confirmed["how"] == "adjudicated"


@pytest.mark.integration
def test_a_0002_store_upgrades_keeping_its_resolutions_and_takes_keys_per_author(store_url):
    """A store at 0002 with one resolved and one open adjudication: after the upgrade, the
    resolution is its own row (the case is still adjudicated), the open case still waits, and
    a second reviewer may use the first one's key."""
    from sqlalchemy import text

    from pipelines.store.db import engine_for, upgrade
    from pipelines.store.feedback import FeedbackStore

    engine = engine_for(store_url)
    assert upgrade(engine, "0002") == "0002"
    with engine.begin() as connection:
        for n, prediction in enumerate(("p-resolved", "p-open")):
            connection.execute(text(
                "INSERT INTO predictions (id, created_at, model_name, model_version, input_sha256, modality, "
                "input_metadata, probabilities, decision, operating_threshold, requested_by) VALUES "
                "(:id, '2026-11-30 10:00:00+00:00', 'pneumonia-cxr', '3', :sha, 'image', '{}', "
                "'{\"NORMAL\": 0.3, \"PNEUMONIA\": 0.7}', 'PNEUMONIA', 0.41, 'dr-a')"), {"id": prediction, "sha": f"{n:064x}"})
            for reviewer, label in (("dr-a", "PNEUMONIA"), ("dr-b", "NORMAL")):
                connection.execute(text(
                    "INSERT INTO feedback (created_at, prediction_id, label, reviewer_id, idempotency_key) VALUES "
                    "('2026-11-30 11:00:00+00:00', :prediction, :label, :reviewer, :key)"),
                    {"prediction": prediction, "label": label, "reviewer": reviewer, "key": f"{reviewer}-{n}"})
        connection.execute(text(
            "INSERT INTO adjudications (created_at, prediction_id, status, labels_in_conflict, resolved_label, "
            "resolved_by, resolved_at, reason) VALUES ('2026-11-30 12:00:00+00:00', 'p-resolved', 'resolved', "
            "'[\"NORMAL\", \"PNEUMONIA\"]', 'NORMAL', 'dr-senior', '2026-11-30 13:00:00+00:00', 're-read')"))
        connection.execute(text(
            "INSERT INTO adjudications (created_at, prediction_id, status, labels_in_conflict) VALUES "
            "('2026-11-30 12:00:00+00:00', 'p-open', 'open', '[\"NORMAL\", \"PNEUMONIA\"]')"))
    engine.dispose()

    store = FeedbackStore(store_url)
    try:
        assert store.revision == "0004"
        [confirmed] = store.confirmed_labels()
        assert confirmed["prediction_id"] == "p-resolved" and confirmed["label"] == "NORMAL"
        assert confirmed["how"] == "adjudicated"
        [waiting] = store.open_reviews()
        assert waiting["prediction_id"] == "p-open" and waiting["labels_in_conflict"] == ["NORMAL", "PNEUMONIA"]
        assert store.add_feedback("p-open", "NORMAL", "dr-c", "dr-a-1").created  # dr-a's key, dr-c's feedback
        assert store.resolve(waiting["id"], "PNEUMONIA", "dr-senior")["resolved_label"] == "PNEUMONIA"
        assert {case["prediction_id"]: case["label"] for case in store.confirmed_labels()} == {
            "p-resolved": "NORMAL", "p-open": "PNEUMONIA"}
    finally:
        store.close()


def test_the_sqlite_store_and_its_wal_files_are_private_to_their_owner(tmp_path):
    """Created 0600 under a permissive umask; an existing world-readable store is made 0600
    when it is opened."""
    import os
    import stat

    from pipelines.store.feedback import FeedbackStore

    def modes(name: str) -> dict[str, int]:
        return {path.name: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.glob(f"{name}*")}

    previous = os.umask(0o022)
    try:
        store = FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}")
        store.add_feedback(predict(store), "PNEUMONIA", "dr-a", "k1", comment="free text")
        assert modes("feedback.db") == {"feedback.db": 0o600, "feedback.db-wal": 0o600, "feedback.db-shm": 0o600}
        store.close()

        (tmp_path / "old.db").touch(mode=0o644)
        store = FeedbackStore(f"sqlite:///{tmp_path / 'old.db'}")
        predict(store)
        assert modes("old.db") == {"old.db": 0o600, "old.db-wal": 0o600, "old.db-shm": 0o600}
        store.close()
    finally:
        os.umask(previous)


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path):
    from pipelines.store.db import engine_for

    engine = engine_for(f"sqlite:///{tmp_path / 'x.db'}")
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()


@pytest.mark.integration
def test_live_performance_per_version_from_confirmed_labels(store):
    def case(version: str, decision: str, truth: str | None, n: int) -> None:
        prediction = store.record_prediction(
            model_name="pneumonia-cxr", model_version=version, input_sha256=f"{n:064x}", modality="image",
            probabilities={"NORMAL": 0.5, "PNEUMONIA": 0.5}, decision=decision, operating_threshold=0.5,
            requested_by="t")
        if truth is not None:
            store.add_feedback(prediction, truth, "dr-a", f"k{n}")

    cases = [("1", "PNEUMONIA", "PNEUMONIA"), ("1", "PNEUMONIA", "NORMAL"), ("1", "NORMAL", "NORMAL"),
             ("1", "NORMAL", "PNEUMONIA"), ("1", "NORMAL", None), ("2", "PNEUMONIA", "PNEUMONIA")]
    for n, (version, decision, truth) in enumerate(cases):
        case(version, decision, truth, n)
    first, second = store.live_performance("pneumonia-cxr", "PNEUMONIA")
    assert first == {"version": "1", "predictions": 5, "confirmed": 4, "agreement": 0.5, "sensitivity": 0.5,
                     "specificity": 0.5, "positive_rate": 0.4, "confusion": {"tp": 1, "fn": 1, "tn": 1, "fp": 1}}
    assert second["sensitivity"] == 1.0 and second["specificity"] is None and second["agreement"] == 1.0


@pytest.mark.integration
def test_an_export_picks_up_late_adjudications_and_corrections_once(store_url, tmp_path):
    """P1 is disputed, P2 agreed: the export takes P2. P1 resolved later and P2 corrected later
    are each exported in the next export, and nothing is exported twice."""
    import pandas as pd

    from conftest import make_workspace, tabular_params
    from pipelines.config import load_params
    from pipelines import feedback_export

    params = tabular_params()
    params["serving"]["store_url"] = store_url
    layout = make_workspace(tmp_path, params)
    from pipelines.store.feedback import FeedbackStore

    opened = FeedbackStore(store_url)
    disputed = opened.record_prediction(model_name="m", model_version="1", input_sha256="a" * 64, modality="tabular",
                                        probabilities={"benign": 0.4, "malignant": 0.6}, decision="malignant",
                                        operating_threshold=0.5, requested_by="t", input_metadata={"features": {"x": 1}})
    agreed = opened.record_prediction(model_name="m", model_version="1", input_sha256="b" * 64, modality="tabular",
                                      probabilities={"benign": 0.4, "malignant": 0.6}, decision="malignant",
                                      operating_threshold=0.5, requested_by="t", input_metadata={"features": {"x": 2}})
    opened.add_feedback(disputed, "malignant", "dr-a", "k1")
    opened.add_feedback(disputed, "benign", "dr-b", "k2")
    opened.add_feedback(agreed, "malignant", "dr-a", "k3")
    params_now = load_params(layout.params_file)

    first = feedback_export.run(params_now, layout)
    assert first.exported == 1
    [case] = opened.open_reviews()
    opened.resolve(case["id"], "benign", "dr-senior")
    opened.add_feedback(agreed, "benign", "dr-a", "k4")  # a correction after the export
    second = feedback_export.run(params_now, layout)
    rows = pd.read_parquet(layout.feedback / "exports" / second.export_id / "labels.parquet").set_index("prediction_id")
    assert set(rows.index) == {disputed, agreed}
    assert rows.loc[disputed, "confirmed_by"] == "adjudicated" and rows.loc[disputed, "supersedes_label"] == ""
    assert rows.loc[agreed, "label"] == "benign" and rows.loc[agreed, "supersedes_label"] == "malignant"
    assert feedback_export.run(params_now, layout).export_id is None
    assert feedback_export.exported_labels(layout) == {disputed: "benign", agreed: "benign"}
    opened.close()
