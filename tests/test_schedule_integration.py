"""The schedule for real: `prefect server start` on 127.0.0.1 (SQLite), `medloop schedule` creates
the work pool and the deployment from infra/prefect.yaml, `medloop worker` runs it, and runs are
triggered through the API. A backlog of due runs ends with one run done and the rest cancelled."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from zoneinfo import ZoneInfo

import pytest

from conftest import ROOT, free_port, load, make_workspace, passing_params, registry
from tests_support import daily_cron_away_from_now

RUN_SECONDS = 600


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A real Prefect server on 127.0.0.1 with its own home (and SQLite database)."""
    from medloop.servers import prefect_server_command, start_server, stop_server

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "PREFECT_API_URL": "",
           # The scheduler plans runs every 60 s by default; the test need not wait that long.
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2"}
    url = f"http://127.0.0.1:{port}/api"
    server = start_server("Prefect", prefect_server_command(port), env, home / "server.log", url + "/health")
    yield {"url": url, "home": str(home)}
    stop_server(server)


@pytest.fixture
def on_prefect_api(prefect_api, monkeypatch):
    """This test's child processes and its own Prefect client talk to the real server (the
    session's test harness, when a flow test started it, is set aside meanwhile)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    monkeypatch.setenv("PREFECT_API_URL", prefect_api["url"])
    monkeypatch.setenv("PREFECT_HOME", prefect_api["home"])
    with temporary_settings(updates={PREFECT_API_URL: prefect_api["url"], PREFECT_HOME: prefect_api["home"]}):
        yield prefect_api


@pytest.mark.slow
@pytest.mark.integration
def test_schedule_worker_and_a_backlog_of_due_runs(tmp_path, on_prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType

    params = passing_params()
    # Schedules far from the test's own clock: no scheduled nightly run or policy check falls due
    # (and races the three runs below for the worker) while the test runs, at any hour.
    nightly_cron, nightly_at = daily_cron_away_from_now("Europe/Paris")
    params["schedule"].update(work_pool="medloop-test", deployment="nightly-test", cron=nightly_cron,
                              timezone="Europe/Paris")
    params["retrain_policy"]["check_cron"] = daily_cron_away_from_now(hours_ahead=11)[0]
    layout = make_workspace(tmp_path, params)
    env = {**os.environ, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_LOGGING_LEVEL": "INFO"}
    medloop = [sys.executable, "-m", "medloop"]

    scheduled = subprocess.run([*medloop, "schedule", "-w", str(layout.root)], env=env, capture_output=True,
                               text=True, cwd=tmp_path, timeout=300)
    assert scheduled.returncode == 0, scheduled.stdout + scheduled.stderr
    assert "scheduled retrain/nightly-test on work pool medloop-test" in scheduled.stdout

    with get_client(sync_client=True) as client:
        pool = client.read_work_pool("medloop-test")
        assert pool.type == "process"
        deployment = client.read_deployment_by_name("retrain/nightly-test")
        assert deployment.parameters == {"params_file": str(layout.params_file)}
        assert deployment.global_concurrency_limit.limit == 1
        assert deployment.concurrency_options.collision_strategy.value == "CANCEL_NEW"
        [schedule] = deployment.schedules
        assert schedule.schedule.cron == nightly_cron and schedule.schedule.timezone == "Europe/Paris"
        # The nightly schedule has put runs on the calendar; `medloop status` reports the next one.
        from flows.deployments import next_scheduled_run

        deadline = time.monotonic() + 60
        while (due := next_scheduled_run(load(layout))) is None and time.monotonic() < deadline:
            time.sleep(1)
        assert due is not None and due.timestamp() > time.time()
        assert due.astimezone(ZoneInfo("Europe/Paris")).strftime("%H:%M") == nightly_at

        # Three runs due now, as after a worker outage: only one may run.
        runs = [client.create_flow_run_from_deployment(deployment.id) for _ in range(3)]

    worker_log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen([*medloop, "worker", "-w", str(layout.root)], env=env, stdout=worker_log,
                              stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    try:
        final = wait_for_final(runs, worker, tmp_path)
    finally:
        os.killpg(worker.pid, 15)
        worker.wait(timeout=60)

    states = sorted(run.state.type.value for run in final)
    assert states == ["CANCELLED", "CANCELLED", "COMPLETED"], (
        [(run.state.type, run.state.message) for run in final], (tmp_path / "worker.log").read_text()[-4000:])
    [done] = [run for run in final if run.state.type == StateType.COMPLETED]
    assert all("concurrency limit" in run.state.message for run in final if run is not done)

    # MLflow has the run, and the registry the version, made by that flow run.
    client = registry(layout)
    champion = client.get_model_version_by_alias(params["model"]["name"], "champion")
    assert str(champion.version) == "1"
    assert champion.tags["medloop.flow_run_id"] == str(done.id)
    assert client.get_run(champion.run_id).data.tags["medloop.flow_run_id"] == str(done.id)

    status = subprocess.run([*medloop, "status", "-w", str(layout.root)], env=env, capture_output=True,
                            text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert f"champion: {params['model']['name']} v1" in status.stdout
    assert "next scheduled run: 20" in status.stdout and "Europe/Paris" in status.stdout


def wait_for_final(runs, worker, tmp_path):
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + RUN_SECONDS
    with get_client(sync_client=True) as client:
        while True:
            current = [client.read_flow_run(run.id) for run in runs]
            if all(run.state is not None and run.state.is_final() for run in current):
                return current
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-4000:]
            assert time.monotonic() < deadline, (
                [(run.state.type, run.state.message) for run in current], (tmp_path / "worker.log").read_text()[-4000:])
            time.sleep(2)


def test_prefect_yaml_declares_the_nightly_and_the_policy_deployments():
    import yaml

    spec = yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())
    nightly, policy_check = spec["deployments"][:2]  # the third, the train job: test_train_job.py
    assert nightly["entrypoint"] == "flows/retrain.py:retrain"
    assert policy_check["entrypoint"] == "flows/policy.py:retrain_policy"
    assert policy_check["schedules"][0]["cron"] == "{{ $MEDLOOP_POLICY_CRON }}"
    for deployment in (nightly, policy_check):
        assert deployment["parameters"] == {"params_file": "{{ $MEDLOOP_PARAMS_FILE }}"}
        assert deployment["work_pool"]["name"] == "{{ $MEDLOOP_WORK_POOL }}"
        assert deployment["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
        assert (ROOT / deployment["entrypoint"].split(":")[0]).is_file()


@pytest.mark.slow
@pytest.mark.integration
def test_the_policy_flow_starts_the_retrain_deployment_with_its_reason(tmp_path, on_prefect_api):
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    from pipelines.monitoring import policy
    from test_policy import _confirm, _workspace

    # The nightly run is due about 12 h after the test's clock, well outside the 6 h cooldown, so the
    # policy's "nightly run due soon" rule holds nothing back at any hour of the day.
    nightly_cron = daily_cron_away_from_now()[0]
    layout = _workspace(tmp_path, on_drift=True,  # no champion yet: drift is checked, and absent
                        schedule={"cron": nightly_cron, "timezone": "UTC"},
                        check_cron=daily_cron_away_from_now(hours_ahead=11)[0])
    params = load(layout)
    medloop = [sys.executable, "-m", "medloop"]
    scheduled = subprocess.run([*medloop, "schedule", "-w", str(layout.root)], env=dict(os.environ),
                               capture_output=True, text=True, timeout=300)
    assert scheduled.returncode == 0, scheduled.stdout + scheduled.stderr
    assert f"retrain-policy/{params.retrain_policy.deployment}" in scheduled.stdout

    def retrain_runs() -> list:
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=[params.schedule.deployment])))

    def started_by_policy() -> list:
        return [run for run in retrain_runs() if "trigger:policy" in run.tags]

    _confirm(layout, 2)
    checked = subprocess.run([*medloop, "policy", "-w", str(layout.root), "--json"], env=dict(os.environ),
                             capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    decision = json.loads(checked.stdout[checked.stdout.index("{"):])
    assert decision["retrain"] is False and decision["flow_run_id"] is None and decision["drift"] is None
    assert started_by_policy() == []

    _confirm(layout, 1, start=2)
    checked = subprocess.run([*medloop, "policy", "-w", str(layout.root), "--json"], env=dict(os.environ),
                             capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    decision = json.loads(checked.stdout[checked.stdout.index("{"):])
    assert decision["retrain"] is True
    started = started_by_policy()
    assert [str(run.id) for run in started] == [decision["flow_run_id"]]
    assert started[0].parameters["reason"] == "policy: 3 new confirmed labels >= 3"
    assert started[0].parameters["params_file"] == str(layout.params_file)
    assert "trigger:policy" in started[0].tags
    logged = [json.loads(line) for line in (layout.state / policy.POLICY_FILE).read_text().splitlines()]
    assert [entry["retrain"] for entry in logged] == [False, True]
