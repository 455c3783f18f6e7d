"""The retrain flow, run for real: Prefect (its test harness starts a local server), DVC, git, a
real trained MLP and a real SQLite MLflow registry. Notifications go through Apprise to an HTTP
receiver on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import yaml

from conftest import copy_world, free_port, load, make_workspace, passing_params, registry
from pipelines.ops.versioning import git


@pytest.fixture
def receiver(monkeypatch):
    """An HTTP endpoint on 127.0.0.1 that keeps what Apprise posts; its URL is in
    MEDLOOP_NOTIFY_URL (the variable the profiles name)."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(json.loads(body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    port = free_port()
    server = HTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MEDLOOP_NOTIFY_URL", f"json://127.0.0.1:{port}/alerts")
    yield received
    server.shutdown()


@pytest.mark.slow
def test_promote_then_nothing_changed_then_a_training_param_change(tmp_path, prefect_server):
    from prefect.client.orchestration import get_client

    from flows.retrain import retrain

    params = passing_params()
    layout = make_workspace(tmp_path, params)
    name = params["model"]["name"]

    first = retrain(str(layout.params_file))
    assert first["outcome"] == "promoted", first.get("promotion")
    assert first["collect"]["stored"] > 0 and all(first["stages"].values())
    assert first["promotion"]["version"] == "1"
    assert first["deploy"]["action"] == "deployed" and first["deploy"]["version"] == "1"
    # dvc.lock and the .dvc files committed, named after the version, and the commit tagged.
    head = git(layout, "rev-parse", "HEAD").stdout.strip()
    assert first["publish"] == {**first["publish"], "commit": head, "git_tag": f"{name}-v1", "new_commit": True}
    assert git(layout, "log", "-1", "--format=%s").stdout.startswith(f"{name} v1: promoted")
    assert git(layout, "rev-list", "-n", "1", f"{name}-v1").stdout.strip() == head
    assert git(layout, "status", "--porcelain").stdout.strip() == ""
    committed = git(layout, "show", "--name-only", "--format=", "HEAD").stdout.split()
    assert "dvc.lock" in committed and "data/raw/index.json.dvc" in committed
    # Data pushed: every object of this data version is on the remote.
    remote = tmp_path / "ws-remote"
    assert remote.is_dir() and any(p.is_file() for p in remote.rglob("*"))
    from pipelines.ops.versioning import dvc

    cloud = dvc(layout, "status", "--cloud").stdout
    assert "new:" not in cloud and "missing:" not in cloud, cloud
    # The MLflow run and the version carry the commit and the flow run.
    client = registry(layout)
    version = client.get_model_version(name, "1")
    assert version.tags["medloop.commit"] == head and version.tags["medloop.commit_tag"] == f"{name}-v1"
    assert client.get_run(version.run_id).data.tags["medloop.commit"] == head
    assert version.tags["medloop.flow_run_id"] == first["flow_run_id"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    deployed = json.loads(client.get_registered_model(name).tags["medloop.deployed"])
    assert deployed["version"] == "1" and deployed["flow_run_id"] == first["flow_run_id"]
    # ... and in the feedback store's deployments table (what was served when).
    from pipelines.store.feedback import FeedbackStore
    from pipelines.workspace import database_url

    store = FeedbackStore(database_url(layout, load(layout).serving.store_url))
    [served] = store.deployments(name)
    store.close()
    assert served["version"] == "1" and served["actor"] == "medloop-nightly" and served["flow_run_id"] == first["flow_run_id"]
    # `medloop lineage` tells where version 1 came from.
    from test_cli import medloop

    shown = json.loads(medloop("lineage", "--json", "-w", str(layout.root)).stdout)
    assert shown["version"] == "1" and shown["commit"] == head and shown["git_tag"] == f"{name}-v1"
    assert shown["flow_run_id"] == first["flow_run_id"] and shown["promotion"]["decision"] == "promoted"
    assert shown["gates"] and all(gate["passed"] for gate in shown["gates"])
    # The data version is the one the tagged commit holds.
    assert shown["data"]["raw"] and shown["data"]["raw"] in git(layout, "show", f"{name}-v1:data/raw/index.json.dvc").stdout
    assert shown["params_hash"] and shown["params"]
    # The run's Prefect artifact says what happened.
    with get_client(sync_client=True) as prefect:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        artifacts = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"retrain-{name}"])))
    markdown = max(artifacts, key=lambda a: a.created).data
    assert f"{name} v1 promoted as champion" in markdown
    assert "| min_auroc |" in markdown and "Data Docs" in markdown and "mlflow_run" in markdown

    # The builtin source releases 4 nights; release all, so that the next runs find nothing new.
    while retrain(str(layout.params_file))["collect"]["stored"]:
        pass
    versions_before = {str(v.version) for v in client.search_model_versions(f"name = '{name}'")}
    commits_before = git(layout, "rev-list", "--count", "HEAD").stdout

    unchanged = retrain(str(layout.params_file))
    assert unchanged["outcome"] == "nothing-changed"
    assert "stages" not in unchanged and "promotion" not in unchanged
    assert {str(v.version) for v in client.search_model_versions(f"name = '{name}'")} == versions_before
    assert git(layout, "rev-list", "--count", "HEAD").stdout == commits_before

    # Only a training param changes: DVC reruns train and evaluate, not the data stages.
    edited = yaml.safe_load(layout.params_file.read_text())
    edited["train"]["epochs"] = 14
    layout.params_file.write_text(yaml.safe_dump(edited, sort_keys=False))
    retrained = retrain(str(layout.params_file))
    assert retrained["stages"] == {"clean": False, "validate": False, "preprocess": False,
                                   "train": True, "evaluate": True}
    assert retrained["outcome"] == "promoted", retrained.get("promotion")
    assert {"train", "evaluate", "promote", "publish", "total"} <= set(retrained["seconds"])

    # The run log feeds `medloop status`.
    from pipelines.ops.report import recent_runs

    outcomes = [run["outcome"] for run in recent_runs(layout, 3)]
    assert outcomes[:2] == [retrained["outcome"], "nothing-changed"]


@pytest.mark.slow
def test_a_refused_model_leaves_the_registry_alone_and_is_reported(tmp_path, prefect_server, receiver):
    from flows.retrain import retrain

    params = passing_params()
    params["promote"]["min_auroc"] = 0.99999  # no model reaches this
    layout = make_workspace(tmp_path, params)
    name = params["model"]["name"]

    summary = retrain(str(layout.params_file))
    assert summary["outcome"] == "refused"
    assert any(g["gate"] == "min_auroc" and not g["passed"] for g in summary["promotion"]["gates"])
    client = registry(layout)
    assert client.search_registered_models(f"name = '{name}'") == []
    # The data version is still committed (and pushed), without a version tag.
    assert git(layout, "log", "-1", "--format=%s").stdout.startswith(f"{name}: run ")
    assert "refused" in git(layout, "log", "-1", "--format=%s").stdout
    assert git(layout, "tag").stdout.strip() == ""
    assert summary["publish"]["git_tag"] is None
    assert client.get_run(summary["promotion"]["run_id"]).data.tags["medloop.commit"] == summary["publish"]["commit"]
    # The team hears about it, with the failed gate named.
    assert len(receiver) == 1
    assert "refused" in receiver[0]["title"] and "min_auroc" in receiver[0]["message"]

    # The second night's data makes a new model, judged (and refused) in turn.
    again = retrain(str(layout.params_file))
    assert again["collect"]["stored"] > 0  # the builtin source releases a second night
    assert again["outcome"] == "refused"
    assert again["promotion"]["run_id"] != summary["promotion"]["run_id"]
    # Nothing new the night after: the refused model is not judged again, even without the run
    # log (a re-cloned workspace): MLflow is the record of what was judged.
    from datetime import datetime

    from pipelines.ops import runs

    (layout.state / "runs.jsonl").unlink()
    receiver.clear()
    quiet = retrain(str(layout.params_file))
    assert quiet["outcome"] == "nothing-changed" and "promotion" not in quiet
    assert receiver == []
    # Each run is an MLflow record; the newest is the one the policy cooldown counts from.
    assert runs.last_started(load(layout), layout) == datetime.fromisoformat(quiet["started_at"])


@pytest.mark.slow
def test_a_failed_data_gate_fails_the_run_notifies_and_keeps_the_champion(tmp_path, prefect_server, receiver,
                                                                           tabular_champion):
    from prefect.states import State

    from flows.retrain import retrain
    from pipelines.ops.report import recent_runs
    from pipelines.workspace import Layout

    params = passing_params()  # the champion's (v1, on the first night)
    layout = Layout.at(copy_world(tabular_champion, tmp_path / "world") / "ws")

    edited = yaml.safe_load(layout.params_file.read_text())
    edited["validate"]["min_new_items"] = 10_000  # no night brings that many
    layout.params_file.write_text(yaml.safe_dump(edited, sort_keys=False))
    state: State = retrain(str(layout.params_file), return_state=True)
    assert state.is_failed()
    assert "stage 'validate' failed" in state.message

    # The hook logged it, notified, and recorded it for `medloop status`.
    assert len(receiver) == 1
    assert "failed" in receiver[0]["title"] and "validate" in receiver[0]["message"]
    assert recent_runs(layout, 1)[0]["outcome"] == "failed"
    # Nothing downstream ran; the champion is untouched.
    client = registry(layout)
    assert str(client.get_model_version_by_alias(params["model"]["name"], "champion").version) == "1"
    assert len(client.search_model_versions(f"name = '{params['model']['name']}'")) == 1


def test_one_run_at_a_time_per_workspace(tmp_path):
    from pipelines.workspace import Layout, WorkspaceBusy, exclusive

    layout = Layout.at(tmp_path)
    with exclusive(layout):
        with pytest.raises(WorkspaceBusy, match=r"already in progress \(pid \d+ since"):
            with exclusive(layout):
                pass
    with exclusive(layout):  # released when the holder is done
        pass


def test_retry_delays_are_the_tasks_own_unless_the_environment_names_them(monkeypatch):
    from tasks.retrain import promote_task, push_task
    from tasks.retries import RETRY_DELAYS_ENV

    monkeypatch.delenv(RETRY_DELAYS_ENV, raising=False)
    assert (list(promote_task.retry_delay_seconds), list(push_task.retry_delay_seconds)) == ([5, 30, 120], [10, 60, 300])
    monkeypatch.setenv(RETRY_DELAYS_ENV, "0.5,1")
    delays = promote_task.retry_delay_seconds
    assert [delays[min(retry, len(delays) - 1)] for retry in range(3)] == [0.5, 1.0, 1.0]  # as Prefect looks them up
    assert promote_task.retries == 3  # the number of retries stays the task's own
    monkeypatch.setenv(RETRY_DELAYS_ENV, "soon")
    with pytest.raises(ValueError, match=r"MEDLOOP_RETRY_DELAYS='soon' is not a comma-separated list of seconds"):
        len(promote_task.retry_delay_seconds)
