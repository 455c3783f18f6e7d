"""The command line as a user runs it: a real `medloop` process each time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import free_port, make_workspace, tabular_params

MEDLOOP = [sys.executable, "-m", "medloop"]


def medloop(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    environment.update(env or {})
    return subprocess.run([*MEDLOOP, *args], capture_output=True, text=True, env=environment, timeout=timeout)


def test_help_lists_every_command():
    done = medloop("--help")
    assert done.returncode == 0
    for command in ("run", "status", "schedule", "worker", "ui", "lineage", "promote", "rollback", "demo", "policy"):
        assert f" {command} " in done.stdout


def test_python_m_medloop_inside_a_workspace_uses_the_installed_code(tmp_path):
    """A workspace holds its own copy of pipelines/ (for DVC); `python -m medloop` run from
    inside it must not import that copy instead of the installed medloop's."""
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "__init__.py").write_text("raise SystemExit('the workspace copy was imported')\n")
    done = subprocess.run([*MEDLOOP, "status", "-w", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert "the workspace copy was imported" not in done.stdout + done.stderr
    assert "is not a medloop workspace (no .dvc folder)" in " ".join((done.stdout + done.stderr).split())


def test_status_of_a_new_workspace_and_schedule_without_a_server(tmp_path):
    layout = make_workspace(tmp_path, tabular_params())
    status = medloop("status", "-w", str(layout.root))
    assert status.returncode == 0, status.stderr
    assert "champion: none (model breast-cancer-mlp is not registered" in status.stdout
    assert "last runs: none yet" in status.stdout
    assert "next scheduled run: unknown - PREFECT_API_URL is not set" in " ".join(status.stdout.split())

    schedule = medloop("schedule", "-w", str(layout.root))
    assert schedule.returncode == 1
    assert "error: PREFECT_API_URL is not set" in schedule.stderr and "Traceback" not in schedule.stderr

    lineage = medloop("lineage", "-w", str(layout.root))
    assert lineage.returncode == 1 and "is not registered" in lineage.stderr


def test_run_refuses_a_folder_that_is_not_a_workspace(tmp_path):
    done = medloop("run", "-w", str(tmp_path))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert str(tmp_path) in " ".join(done.stderr.split())


@pytest.mark.slow
@pytest.mark.integration
def test_ui_starts_mlflow_and_prefect_on_localhost_and_stops_on_ctrl_c(tmp_path):
    layout = make_workspace(tmp_path, tabular_params())
    # An experiment that exists only in this workspace's store, to recognise it through the UI.
    import mlflow

    from conftest import load
    from pipelines.registry.tracking import configure

    configure(load(layout), layout)
    mlflow_port, prefect_port = free_port(), free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    # Started the way `medloop ui &` starts it from a script: with SIGINT ignored, which Python
    # keeps unless told otherwise. Ctrl-C must stop it all the same.
    process = subprocess.Popen([*MEDLOOP, "ui", "-w", str(layout.root), "--mlflow-port", str(mlflow_port),
                                "--prefect-port", str(prefect_port)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    lines = []
    try:
        deadline = time.monotonic() + 240
        while not any("Ctrl-C" in line for line in lines):
            line = process.stdout.readline()
            assert line or process.poll() is None, "".join(lines)
            lines.append(line)
            assert time.monotonic() < deadline, "".join(lines)
        output = "".join(lines)
        assert f"MLflow UI:  http://127.0.0.1:{mlflow_port}" in output
        assert f"Prefect UI: http://127.0.0.1:{prefect_port}" in output
        with urllib.request.urlopen(f"http://127.0.0.1:{prefect_port}/api/health", timeout=10) as answer:
            assert answer.status == 200
        # The MLflow server reads the workspace's own store.
        search = f"http://127.0.0.1:{mlflow_port}/api/2.0/mlflow/experiments/search?max_results=10"
        with urllib.request.urlopen(search, timeout=10) as answer:
            names = [experiment["name"] for experiment in json.loads(answer.read())["experiments"]]
        assert load(layout).tracking.experiment in names
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    assert process.returncode == 0
    for port in (mlflow_port, prefect_port):
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)


def test_init_by_profile_name_and_errors_in_one_paragraph_before_and_during_a_run(tmp_path):
    """A shipped profile is found by name from any folder; the DVC remote is the workspace's own;
    a config error stops `medloop run` before any flow starts; an error inside the flow is one
    paragraph on the terminal, its traceback in the workspace's log."""
    import shutil

    import yaml

    from conftest import ROOT, SALT

    created = subprocess.run([*MEDLOOP, "init", "ws", "--params", "breast_cancer"], capture_output=True, text=True,
                             cwd=tmp_path, timeout=120)
    assert created.returncode == 0, created.stderr
    ws = tmp_path / "ws"
    assert (ws / "params.yaml").read_text() == (ROOT / "profiles" / "breast_cancer.yaml").read_text()
    assert f"url = {ws / 'dvc-remote'}" in (ws / ".dvc" / "config").read_text()
    assert subprocess.run(["git", "-C", str(ws), "status", "--porcelain"], capture_output=True,
                          text=True).stdout == ""  # the remote folder is not git's business
    unknown = medloop("init", str(tmp_path / "other"), "--params", "no_such_profile")
    assert unknown.returncode == 1 and "shipped profiles: breast_cancer" in " ".join(unknown.stderr.split())

    params = yaml.safe_load((ws / "params.yaml").read_text())
    good = yaml.safe_dump(params, sort_keys=False)
    (ws / "params.yaml").write_text(good.replace("- benign\n  - malignant\n", "- No\n  - Yes\n")
                                    .replace("positive_class: malignant", "positive_class: 'Yes'"))
    refused = medloop("run", "-w", str(ws), env={"MEDLOOP_DEID_SALT": SALT})
    assert refused.returncode == 1
    message = " ".join(refused.stderr.split())
    assert "model.classes.0: Input should be a valid string (got False)" in message
    assert 'quote it ("No")' in message and "Traceback" not in refused.stdout + refused.stderr
    assert not (ws / "logs").exists() and not (ws / "data").exists()  # no flow started

    # A source that carries an undeclared identifier: the flow fails in collect; the person gets
    # one paragraph naming the file and column, the log the traceback, and nobody the identifiers.
    from tests_support import breast_cancer_frame

    rows = breast_cancer_frame(12)
    rows["patient_name"] = "ZZCANARY^PETUNIA"
    rows["ssn"] = "CANARY-123-45-6789"
    source = tmp_path / "export.csv"
    rows.to_csv(source, index=False)
    params["source"] = {"kind": "csv", "path": str(source)}
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    failed = medloop("run", "-w", str(ws), env={"MEDLOOP_DEID_SALT": SALT})
    assert failed.returncode == 1
    message = " ".join(failed.stderr.split())
    assert f"error: {source}: column(s) 'ssn' not declared in params" in message
    assert "Traceback" not in failed.stdout + failed.stderr
    log = (ws / "logs" / "medloop.log").read_text()
    assert "Traceback" in log and "DeidentificationError" in log
    for text in (failed.stdout, failed.stderr, log):
        assert "CANARY" not in text and "PETUNIA" not in text
    shutil.rmtree(ws)
