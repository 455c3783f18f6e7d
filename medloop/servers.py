"""``medloop ui``: the MLflow UI and a Prefect server, started on 127.0.0.1 as child processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from pipelines.config import load_params
from pipelines.errors import MedloopError
from pipelines.registry.tracking import artifact_location, tracking_uri
from pipelines.ops.versioning import tool_env
from pipelines.workspace import Layout

STARTUP_SECONDS = 120


def serve_uis(layout: Layout, mlflow_port: int, prefect_port: int | None, console: Any) -> None:
    """Start the UIs, print their addresses once they answer, and wait for Ctrl-C (or SIGTERM),
    then stop them.

    Raises:
        MedloopError: a server exited or did not answer within STARTUP_SECONDS.
    """
    params = load_params(layout.params_file)
    env = {**tool_env(), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops the children like Ctrl-C does
    # Ctrl-C must stop them even when started from a script or a shell that ignores SIGINT in
    # what it runs in the background (Python then leaves SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    children: list[tuple[str, subprocess.Popen]] = []
    logs = layout.logs
    logs.mkdir(parents=True, exist_ok=True)
    try:
        mlflow_url = f"http://127.0.0.1:{mlflow_port}"
        children.append(("MLflow", start_server(
            "MLflow", [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri(params, layout),
                       "--default-artifact-root", artifact_location(params, layout), "--host", "127.0.0.1",
                       "--port", str(mlflow_port), "--workers", "1"],
            # medloop runs no MLflow jobs (GenAI evaluation, trace rollups): no idle job-runner processes
            {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, logs / "mlflow-ui.log", mlflow_url + "/health")))
        if prefect_port is not None:
            prefect_url = f"http://127.0.0.1:{prefect_port}"
            children.append(("Prefect", start_server("Prefect", prefect_server_command(prefect_port), env,
                                                     logs / "prefect-server.log", prefect_url + "/api/health")))
        console.print(f"MLflow UI:  {mlflow_url}  (experiment {params.tracking.experiment}, model {params.model.name})",
                      highlight=False)
        if prefect_port is not None:
            console.print(f"Prefect UI: http://127.0.0.1:{prefect_port}  "
                          f"(export PREFECT_API_URL=http://127.0.0.1:{prefect_port}/api to schedule on it)", highlight=False)
        console.print("Ctrl-C stops them.")
        while all(process.poll() is None for _, process in children):
            time.sleep(0.5)
        stopped = [name for name, process in children if process.poll() is not None]
        raise MedloopError(f"{', '.join(stopped)} stopped unexpectedly; see {logs}")
    except KeyboardInterrupt:
        console.print("stopping")
    finally:
        for _, process in children:
            stop_server(process)


def start_server(name: str, command: list[str], env: dict[str, str], log_path: Path, health_url: str,
                 timeout: float = STARTUP_SECONDS) -> subprocess.Popen:
    """Start a server as a child process (its own process group, output to ``log_path``) and wait
    until ``health_url`` answers 200.

    Raises:
        MedloopError: it exited or did not answer in time (the message points at its log).
    """
    with open(log_path, "ab") as handle:  # the child keeps its own descriptor
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise MedloopError(f"the {name} server exited with status {process.returncode} (port in use?); "
                                   f"see {log_path}")
            try:
                with urllib.request.urlopen(health_url, timeout=2) as answer:
                    if answer.status == 200:
                        return process
            except OSError:
                pass
            time.sleep(0.5)
        raise MedloopError(f"the {name} server did not answer at {health_url} within {timeout:.0f} s; see {log_path}")
    except BaseException:
        stop_server(process)  # never leave a half-started server behind (Ctrl-C included)
        raise


def uvicorn_tls(params: Any, layout: Layout) -> dict[str, str]:
    """uvicorn's TLS options for ``serving.tls`` (empty without it): the service then speaks
    HTTPS only, and a plain HTTP request to its port fails the TLS handshake.

    Raises:
        MedloopError: the certificate or key cannot be used (unreadable, mismatched, expired, or
            a key that others may read); the message says which and what to do.
    """
    from pipelines.ops.doctor import FAIL, check_tls, resolve
    from pipelines.secrets import read_secret

    tls = params.serving.tls
    if tls is None:
        return {}
    check = check_tls(params, layout)
    if check.status == FAIL:
        raise MedloopError(f"serving.tls in {layout.params_file}: {check.detail} ({check.where})")
    options = {"ssl_certfile": str(resolve(tls.certfile, layout)), "ssl_keyfile": str(resolve(tls.keyfile, layout))}
    if tls.keyfile_password_env:
        options["ssl_keyfile_password"] = read_secret(tls.keyfile_password_env) or ""
    return options


def prefect_server_command(port: int) -> list[str]:
    return [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]


def stop_server(process: subprocess.Popen) -> None:
    """Stop a server started by `start_server` (SIGTERM to its group, then SIGKILL)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt
