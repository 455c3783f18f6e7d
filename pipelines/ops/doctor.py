"""`medloop doctor`: every endpoint and credential the params name, checked before a night runs.

Each check reaches the real thing (connects to the database, asks the MLflow server with the
credentials the environment holds, heads the S3 bucket, calls the Prefect API's health) and says,
in one line, whether it answered. Nothing here writes: a check may fail, it never changes a store.
No secret is printed: URLs are shown with passwords masked, secrets only by where they come from.

A check is ``ok``, ``warn`` (works, but something deserves attention, or it is optional and does
not answer), ``fail`` (required and not usable: the night would fail) or ``off`` (not
configured). `failed` says whether the night should not start.
"""

from __future__ import annotations

import base64
import os
import stat
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from pipelines.config import Params
from pipelines.errors import MedloopError, mask_credentials
from pipelines.secrets import read_secret, secret_source
from pipelines.workspace import Layout, database_url

TIMEOUT_SECONDS = 20.0  # a busy server (basic-auth hashes each password) may take seconds to answer
OK, WARN, FAIL, OFF = "ok", "warn", "fail", "off"


@dataclass(frozen=True)
class Check:
    """One thing checked: what, where (masked), its status and why."""

    name: str
    where: str
    status: str
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)


def run(params: Params, layout: Layout) -> list[Check]:
    """Every check, in the order a night needs them."""
    checks: list[Callable[[Params, Layout], Check]] = [
        check_salt, check_tracking, check_artifacts, check_feedback_store, check_dvc_remote, check_source,
        check_prefect, check_tls, check_tokens, check_params_hold_no_password,
    ]
    return [_guarded(check, params, layout) for check in checks]


def failed(checks: list[Check]) -> bool:
    """Whether a required check failed (the night should not start)."""
    return any(check.status == FAIL for check in checks)


# -- the checks ---------------------------------------------------------------------------


def check_salt(params: Params, _layout: Layout) -> Check:
    from pipelines.deid.keys import MIN_SALT_LENGTH

    name = params.deid.salt_env
    value = read_secret(name)
    where = secret_source(name)
    if not value:
        return Check("de-identification salt", where, FAIL, "not set: collect cannot pseudonymise patients")
    if len(value) < MIN_SALT_LENGTH:
        return Check("de-identification salt", where, FAIL, f"{len(value)} characters; a salt needs {MIN_SALT_LENGTH}")
    return Check("de-identification salt", where, OK, f"{len(value)} characters")


def check_tracking(params: Params, layout: Layout) -> Check:
    from pipelines.registry.tracking import tracking_uri

    uri = tracking_uri(params, layout)
    where = mask_credentials(uri)
    if uri.startswith(("http://", "https://")):
        return _mlflow_server(uri, params.tracking.experiment)
    if "://" in uri and not uri.startswith("file:"):
        return _database("MLflow tracking store", uri)
    return Check("MLflow tracking store", where, OK, "local store in the workspace")


def check_artifacts(params: Params, layout: Layout) -> Check:
    root = params.tracking.artifact_root
    if root.startswith("s3://"):
        bucket = root[len("s3://"):].split("/", 1)[0]
        return _s3_bucket("MLflow artifacts", root, bucket, os.environ.get("MLFLOW_S3_ENDPOINT_URL"))
    if "://" in root:
        return Check("MLflow artifacts", mask_credentials(root), OFF, "stored where the tracking server says")
    if params.tracking.uri.startswith(("http://", "https://")):
        return Check("MLflow artifacts", root, OK, "new experiments: served by the tracking server "
                     "(artifact_root applies to experiments this workspace creates on a local store)")
    return _folder("MLflow artifacts", root if Path(root).is_absolute() else str(layout.root / root))


def check_feedback_store(params: Params, layout: Layout) -> Check:
    return _database("feedback store", database_url(layout, params.serving.store_url))


def check_dvc_remote(params: Params, layout: Layout) -> Check:
    storage = params.storage
    url = storage.dvc_remote
    if url.startswith("s3://"):
        check = _s3_bucket("DVC remote", url, url[len("s3://"):].split("/", 1)[0], storage.s3_endpoint_url)
        if check.status == OK and storage.s3_server_side_encryption:
            return Check(check.name, check.where, OK, f"{check.detail}; pushes ask for {storage.s3_server_side_encryption}")
        return check
    if "://" in url:
        return Check("DVC remote", mask_credentials(url), WARN, "not checked: only folders and s3:// are known here")
    return _folder("DVC remote", url if Path(url).is_absolute() else str(layout.root / url))


def check_source(params: Params, _layout: Layout) -> Check:
    source = params.source
    if source.kind == "s3":
        where = f"s3://{source.bucket}/{source.prefix}"
        return _s3_bucket("collect's source", where, source.bucket, source.endpoint_url, prefix=source.prefix)
    if source.kind == "sql":
        return _database("collect's source", source.url)
    if source.kind in ("image_folder", "csv", "parquet"):
        path = Path(source.path)
        if path.exists() and os.access(path, os.R_OK):
            return Check("collect's source", str(path), OK, "readable")
        return Check("collect's source", str(path), FAIL, "not found or not readable")
    return Check("collect's source", source.kind, OK, "built into medloop")


def check_prefect(_params: Params, _layout: Layout) -> Check:
    url = os.environ.get("PREFECT_API_URL", "")
    if not url:
        return Check("Prefect API", "PREFECT_API_URL not set", OFF,
                     "flows run on a temporary local server; `medloop schedule` and workers need it")
    answer = _http_get(url.rstrip("/") + "/health", _prefect_headers())
    if isinstance(answer, int) and answer == 200:
        return Check("Prefect API", mask_credentials(url), OK, "healthy")
    if isinstance(answer, int) and answer in (401, 403):
        return Check("Prefect API", mask_credentials(url), FAIL,
                     f"refused the credentials ({answer}): check PREFECT_API_AUTH_STRING or PREFECT_API_KEY")
    return Check("Prefect API", mask_credentials(url), FAIL, _unreachable(answer))


def check_tls(params: Params, layout: Layout) -> Check:
    tls = params.serving.tls
    if tls is None:
        return Check("service TLS", "serving.tls: null", OFF, "plain HTTP: keep it on 127.0.0.1 or behind a TLS proxy")
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    cert_path, key_path = resolve(tls.certfile, layout), resolve(tls.keyfile, layout)
    where = f"{cert_path}, {key_path}"
    try:
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        password = read_secret(tls.keyfile_password_env) if tls.keyfile_password_env else None
        key = load_pem_private_key(key_path.read_bytes(), password=password.encode() if password else None)
    except OSError as exc:
        return Check("service TLS", where, FAIL, f"cannot read {exc.filename}: {exc.strerror}")
    except (ValueError, TypeError) as exc:
        return Check("service TLS", where, FAIL, f"not a PEM certificate and key: {exc}")
    mode = stat.S_IMODE(key_path.stat().st_mode)
    if mode & 0o077:
        return Check("service TLS", where, FAIL, f"the key's mode is {mode:o}: run `chmod 600 {key_path}`")
    if certificate.public_key().public_numbers() != key.public_key().public_numbers():
        return Check("service TLS", where, FAIL, "the key does not belong to the certificate")
    expires = certificate.not_valid_after_utc
    days = (expires.timestamp() - time.time()) / 86400
    if days < 0:
        return Check("service TLS", where, FAIL, f"the certificate expired on {expires:%Y-%m-%d}")
    subject = certificate.subject.rfc4514_string()
    return Check("service TLS", where, WARN if days < 14 else OK, f"{subject}, valid until {expires:%Y-%m-%d}")


def check_tokens(params: Params, layout: Layout) -> Check:
    path = resolve(params.serving.tokens_file, layout)
    admin = params.serving.admin_token_env
    if not path.is_file():
        return Check("service tokens", str(path), WARN, "none yet: nobody can call the service (`medloop token add`)")
    mode = stat.S_IMODE(path.stat().st_mode)
    detail = f"{path.name} mode {mode:o}"
    if params.serving.url and not read_secret(admin):
        return Check("service tokens", str(path), WARN,
                     f"{detail}; serving.url is set but {secret_source(admin)}: deploy cannot ask it to reload")
    return Check("service tokens", str(path), OK, detail)


def check_params_hold_no_password(params: Params, layout: Layout) -> Check:
    """params.yaml is committed to git: a password written in one of its URLs is a leaked secret."""
    urls = {"tracking.uri": params.tracking.uri, "serving.store_url": params.serving.store_url,
            "storage.dvc_remote": params.storage.dvc_remote}
    if params.source.kind == "sql":
        urls["source.url"] = params.source.url
    leaking = [key for key, url in urls.items() if mask_credentials(url) != url]
    if leaking:
        return Check("secrets in params", str(layout.params_file), WARN,
                     f"{', '.join(leaking)} hold a password, which git keeps: use PGPASSWORD or PGPASSFILE "
                     f"(PostgreSQL), MLFLOW_TRACKING_PASSWORD (MLflow) instead")
    return Check("secrets in params", str(layout.params_file), OK, "no password in a URL")


# -- helpers ------------------------------------------------------------------------------


def resolve(value: str, layout: Layout) -> Path:
    """A path from params: relative ones are inside the workspace."""
    path = Path(value)
    return path if path.is_absolute() else layout.root / path


def _guarded(check: Callable[[Params, Layout], Check], params: Params, layout: Layout) -> Check:
    try:
        return check(params, layout)
    except MedloopError as exc:  # a secret file others may read, ...
        return Check(check.__name__.removeprefix("check_").replace("_", " "), "-", FAIL, mask_credentials(str(exc)))


def _mlflow_server(uri: str, experiment: str) -> Check:
    from urllib.parse import quote

    where = mask_credentials(uri)
    health = _http_get(uri.rstrip("/") + "/health", {})
    if health != 200:
        return Check("MLflow tracking server", where, FAIL, _unreachable(health))
    user = read_secret("MLFLOW_TRACKING_USERNAME")
    password = read_secret("MLFLOW_TRACKING_PASSWORD")
    token = read_secret("MLFLOW_TRACKING_TOKEN")
    headers = {}
    if user and password:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    elif token:
        headers["Authorization"] = f"Bearer {token}"
    answer = _http_get(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?experiment_name={quote(experiment)}",
                       headers)
    who = f"as {user}" if user else "without credentials"
    if answer == 200:
        return Check("MLflow tracking server", where, OK, f"healthy; experiment {experiment!r} readable {who}")
    if answer == 404:
        return Check("MLflow tracking server", where, OK, f"healthy {who}; experiment {experiment!r} is made by the first run")
    if answer == 401:
        return Check("MLflow tracking server", where, FAIL, f"refused {who} (401): set MLFLOW_TRACKING_USERNAME and "
                     f"MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_PASSWORD_FILE)")
    if answer == 403:
        return Check("MLflow tracking server", where, FAIL, f"{user} may not read experiment {experiment!r} (403): "
                     f"ask an MLflow admin for a permission")
    return Check("MLflow tracking server", where, FAIL, _unreachable(answer))


def _database(name: str, url: str) -> Check:
    from sqlalchemy import create_engine, make_url, text
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import NullPool

    where = mask_credentials(url)
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - SQLAlchemy's parse errors have several types
        return Check(name, where, FAIL, "not a database URL (dialect://user@host:port/database)")
    if parsed.get_backend_name() == "sqlite":
        folder = Path(parsed.database or ".").parent
        if os.access(folder, os.W_OK):
            return Check(name, where, OK, "SQLite file (one machine)")
        return Check(name, where, FAIL, f"folder {folder} is not writable")
    arguments = {"connect_timeout": int(TIMEOUT_SECONDS)} if parsed.get_backend_name() == "postgresql" else {}
    engine = create_engine(parsed, connect_args=arguments, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            version = connection.execute(text("select version()")).scalar() or ""
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", exc) or exc).strip().splitlines()[0]
        return Check(name, where, FAIL, f"cannot connect: {mask_credentials(reason)}")
    finally:
        engine.dispose()
    ssl = parsed.query.get("sslmode")
    return Check(name, where, OK, f"connected ({' '.join(str(version).split()[:2])}"
                 f"{', sslmode=' + str(ssl) if ssl else ''})")


def _s3_bucket(name: str, where: str, bucket: str, endpoint_url: str | None, prefix: str | None = None) -> Check:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client("s3", endpoint_url=endpoint_url, config=Config(
        connect_timeout=TIMEOUT_SECONDS, read_timeout=TIMEOUT_SECONDS, retries={"max_attempts": 1}))
    at = f" at {endpoint_url}" if endpoint_url else ""
    try:
        if prefix is None:
            client.head_bucket(Bucket=bucket)
            detail = "bucket reachable"
        else:
            listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix.strip("/"), MaxKeys=1)
            detail = "objects listed" if listed.get("KeyCount") else "bucket reachable, nothing under the prefix yet"
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "?")
        hint = {"403": "credentials refused (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)",
                "AccessDenied": "credentials refused (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)",
                "404": f"bucket {bucket!r} does not exist", "NoSuchBucket": f"bucket {bucket!r} does not exist",
                "InvalidAccessKeyId": "unknown access key (AWS_ACCESS_KEY_ID)",
                "SignatureDoesNotMatch": "wrong secret key (AWS_SECRET_ACCESS_KEY)"}.get(code, f"refused ({code})")
        return Check(name, where, FAIL, hint + at)
    except BotoCoreError as exc:
        return Check(name, where, FAIL, f"unreachable{at}: {type(exc).__name__}"
                     + (": no credentials in the environment" if "Credentials" in type(exc).__name__ else ""))
    return Check(name, where, OK, detail + at)


def _folder(name: str, path: str) -> Check:
    folder = Path(path)
    existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if existing is not None and os.access(existing, os.W_OK):
        return Check(name, path, OK, "local folder, writable" + ("" if folder.exists() else " (made on first use)"))
    return Check(name, path, FAIL, "not writable")


def _http_get(url: str, headers: dict[str, str]) -> int | str:
    """The HTTP status of a GET, or why none came (a short reason)."""
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except urllib.error.URLError as exc:
        return str(exc.reason)
    except OSError as exc:
        return str(exc)


def _unreachable(answer: int | str) -> str:
    if isinstance(answer, int):
        return f"answered HTTP {answer}"
    return f"unreachable: {mask_credentials(answer)}"


def _prefect_headers() -> dict[str, str]:
    auth = read_secret("PREFECT_API_AUTH_STRING")
    if auth:
        return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}
    key = read_secret("PREFECT_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}
