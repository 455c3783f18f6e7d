"""Production settings without the production servers: secrets from the environment or private
files, `medloop doctor` against real local things (PostgreSQL at 127.0.0.1:5432, an S3 server, a
closed port for "unreachable"), `medloop serve` over TLS, S3 server-side encryption asked for."""

from __future__ import annotations

import json
import os
import ssl
import sys
import urllib.request

import pytest
import yaml
from typer.testing import CliRunner

from conftest import free_port, load, make_workspace, serving_settings, tabular_params
from tests_support import POSTGRES_URL, self_signed_certificate

PASSWORD = "pw-CANARY-7f3e9a"


def write_params(layout, change) -> None:
    params = yaml.safe_load(layout.params_file.read_text())
    change(params)
    layout.params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def doctor(layout) -> tuple[int, dict, str]:
    from medloop.cli import app

    table = CliRunner().invoke(app, ["doctor", "-w", str(layout.root)], env={"COLUMNS": "200"})
    answer = CliRunner().invoke(app, ["doctor", "-w", str(layout.root), "--json"])
    assert answer.exit_code == table.exit_code, table.output
    return answer.exit_code, {check["name"]: check for check in json.loads(answer.output)}, table.output


def test_a_secret_comes_from_the_environment_or_a_file_only_its_owner_reads(tmp_path, monkeypatch):
    from pipelines.deid.keys import load_salt
    from pipelines.secrets import SecretError, export_file_secrets, read_secret

    monkeypatch.delenv("MEDLOOP_DEID_SALT")
    secret = tmp_path / "salt"
    secret.write_text("from-a-file-0123456789\n")
    secret.chmod(0o644)
    monkeypatch.setenv("MEDLOOP_DEID_SALT_FILE", str(secret))
    with pytest.raises(SecretError, match=rf"mode is 644: group or others may read it. Run `chmod 600 {secret}`"):
        load_salt("MEDLOOP_DEID_SALT")
    secret.chmod(0o600)
    assert load_salt("MEDLOOP_DEID_SALT") == b"from-a-file-0123456789"
    monkeypatch.setenv("MEDLOOP_DEID_SALT", "from-the-environment-01")  # the variable wins over the file
    assert read_secret("MEDLOOP_DEID_SALT") == "from-the-environment-01"
    monkeypatch.setenv("MEDLOOP_DEID_SALT_FILE", str(tmp_path / "absent"))
    monkeypatch.delenv("MEDLOOP_DEID_SALT")
    with pytest.raises(SecretError, match="MEDLOOP_DEID_SALT_FILE names .*absent, which cannot be read"):
        read_secret("MEDLOOP_DEID_SALT")

    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD_FILE", str(secret))
    assert export_file_secrets() == ["MLFLOW_TRACKING_PASSWORD"]
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "from-a-file-0123456789"


@pytest.mark.integration
def test_doctor_says_everything_answers(tmp_path, s3_bucket, s3_endpoint, monkeypatch):
    from pipelines.ops.versioning import configure_remote

    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="export/cases.csv", Body=b"a,b\n1,2\n")
    certfile, keyfile = self_signed_certificate(tmp_path / "tls")
    salt_file = tmp_path / "salt"
    salt_file.write_text("a-salt-from-a-private-file-0123")
    salt_file.chmod(0o600)
    monkeypatch.delenv("MEDLOOP_DEID_SALT")
    monkeypatch.setenv("MEDLOOP_DEID_SALT_FILE", str(salt_file))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    layout = make_workspace(tmp_path, tabular_params())

    def production(params):
        params["tracking"]["uri"] = POSTGRES_URL + "?sslmode=disable"  # MLflow's store, straight in PostgreSQL
        params["serving"]["store_url"] = POSTGRES_URL + "?sslmode=prefer"
        params["serving"]["tls"] = {"certfile": str(certfile), "keyfile": str(keyfile)}
        params["storage"].update(dvc_remote=f"s3://{bucket}/dvc", s3_endpoint_url=s3_endpoint,
                                 s3_server_side_encryption="AES256")
        params["source"] = {"kind": "s3", "bucket": bucket, "prefix": "export", "endpoint_url": s3_endpoint}

    write_params(layout, production)
    code, checks, table = doctor(layout)
    assert code == 0, table
    assert {name: check["status"] for name, check in checks.items()} == {
        "de-identification salt": "ok", "MLflow tracking store": "ok", "MLflow artifacts": "ok",
        "feedback store": "ok", "DVC remote": "ok", "collect's source": "ok", "Prefect API": "off",
        "service TLS": "ok", "service tokens": "warn", "secrets in params": "ok"}
    assert checks["de-identification salt"]["where"] == f"file {salt_file} (MEDLOOP_DEID_SALT_FILE)"
    assert checks["feedback store"]["detail"].startswith("connected (PostgreSQL ")
    assert checks["feedback store"]["detail"].endswith("sslmode=prefer)")
    assert checks["collect's source"]["detail"] == f"objects listed at {s3_endpoint}"
    assert checks["DVC remote"]["detail"] == f"bucket reachable at {s3_endpoint}; pushes ask for AES256"
    assert checks["service TLS"]["detail"].startswith("CN=127.0.0.1, valid until ")
    assert "everything required answers" in table and "a-salt-from" not in table

    # DVC's remote asks S3 for server-side encryption, and stops asking when params say null.
    configure_remote(layout, load(layout).storage)
    assert "sse = AES256" in (layout.root / ".dvc" / "config").read_text()
    write_params(layout, lambda p: p["storage"].update(s3_server_side_encryption=None))
    configure_remote(layout, load(layout).storage)
    assert "sse" not in (layout.root / ".dvc" / "config").read_text()


@pytest.mark.integration
def test_doctor_names_what_does_not_answer_and_never_shows_a_password(tmp_path, monkeypatch):
    closed = free_port()
    certfile, keyfile = self_signed_certificate(tmp_path / "tls")
    other_cert, _ = self_signed_certificate(tmp_path / "other")
    monkeypatch.setenv("MEDLOOP_DEID_SALT", "short")
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{closed}/api")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "medloop-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PASSWORD)
    layout = make_workspace(tmp_path, tabular_params())

    def broken(params):
        params["tracking"]["uri"] = f"http://127.0.0.1:{closed}"
        params["serving"]["store_url"] = f"postgresql://medloop:{PASSWORD}@127.0.0.1:{closed}/feedback"
        params["serving"]["tls"] = {"certfile": str(other_cert), "keyfile": str(keyfile)}
        params["storage"].update(dvc_remote="s3://medloop/dvc", s3_endpoint_url=f"http://127.0.0.1:{closed}")

    write_params(layout, broken)
    code, checks, table = doctor(layout)
    assert code == 1
    status = {name: check["status"] for name, check in checks.items()}
    assert status == {"de-identification salt": "fail", "MLflow tracking server": "fail", "MLflow artifacts": "ok",
                      "feedback store": "fail", "DVC remote": "fail", "collect's source": "ok", "Prefect API": "fail",
                      "service TLS": "fail", "service tokens": "warn", "secrets in params": "warn"}
    assert checks["de-identification salt"]["detail"] == "5 characters; a salt needs 16"
    assert checks["MLflow tracking server"]["detail"] == "unreachable: [Errno 111] Connection refused"
    assert checks["feedback store"]["where"] == f"postgresql://medloop:***@127.0.0.1:{closed}/feedback"
    assert checks["feedback store"]["detail"].startswith("cannot connect: ")
    assert checks["DVC remote"]["detail"].startswith(f"unreachable at http://127.0.0.1:{closed}: ")
    assert checks["service TLS"]["detail"] == "the key does not belong to the certificate"
    assert "serving.store_url hold a password, which git keeps: use PGPASSWORD" in checks["secrets in params"]["detail"]
    assert "6 required check(s) failed" in table
    assert PASSWORD not in table and PASSWORD not in json.dumps(checks)

    # A TLS key others may read is refused, by doctor and by `medloop serve` alike.
    write_params(layout, lambda p: p["serving"].update(tls={"certfile": str(certfile), "keyfile": str(keyfile)}))
    keyfile.chmod(0o644)
    assert doctor(layout)[1]["service TLS"]["detail"] == f"the key's mode is 644: run `chmod 600 {keyfile}`"
    from medloop.servers import uvicorn_tls
    from pipelines.errors import MedloopError

    with pytest.raises(MedloopError, match=r"serving.tls in .*params.yaml: the key's mode is 644"):
        uvicorn_tls(load(layout), layout)


@pytest.mark.slow
def test_the_service_speaks_tls_itself_and_refuses_plain_http(served_workspace, tmp_path, monkeypatch):
    from medloop.servers import start_server, stop_server

    layout = served_workspace["layout"]
    certfile, keyfile = self_signed_certificate(tmp_path / "tls")
    port = free_port()
    monkeypatch.setenv("SSL_CERT_FILE", str(certfile))  # this test's client trusts the certificate
    with serving_settings(layout, tls={"certfile": str(certfile), "keyfile": str(keyfile)}):
        command = [sys.executable, "-m", "medloop", "serve", "-w", str(layout.root), "--port", str(port)]
        server = start_server("medloop serve", command, dict(os.environ), tmp_path / "serve.log",
                              f"https://127.0.0.1:{port}/healthz")
        try:
            context = ssl.create_default_context(cafile=str(certfile))
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/readyz", context=context, timeout=30) as answer:
                assert answer.status == 200
            with pytest.raises(OSError):  # plain HTTP on the TLS port: the handshake fails, no answer
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10).read()
            with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
                urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=ssl.create_default_context(
                    cafile=str(self_signed_certificate(tmp_path / "other")[0])), timeout=10)
        finally:
            stop_server(server)
