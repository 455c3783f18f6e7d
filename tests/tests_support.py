"""Small data builders shared by tests (not fixtures: plain functions)."""

from __future__ import annotations

import contextlib

import pandas as pd

from pipelines.config import BreastCancerSource
from pipelines.data.sources.breast_cancer import BreastCancerReader


def breast_cancer_frame(n: int = 40, seed: int = 5) -> pd.DataFrame:
    """Rows in the shape of a hospital export: identifiers, measurements, diagnosis."""
    reader = BreastCancerReader(BreastCancerSource(kind="builtin_breast_cancer", seed=seed, nights=1))
    return reader.full_table().head(n).reset_index(drop=True)


def sign_in_to_pages(client, token: str):
    """Sign ``client`` (httpx or Starlette's TestClient) in to the clinicians' pages through the
    sign-in form, with its CSRF token and cookie; the sign-in's answer (303 when it worked)."""
    form = client.get("/pages/signin")
    csrf = form.text.split('name="csrf" value="')[1].split('"')[0]
    return client.post("/pages/signin", data={"csrf": csrf, "token": token, "next": ""}, follow_redirects=False)


POSTGRES_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


@contextlib.contextmanager
def fresh_postgres_database(prefix: str):
    """A new, empty database on the PostgreSQL server at 127.0.0.1:5432; dropped afterwards.
    Yields its URL."""
    import uuid

    from sqlalchemy import create_engine, text

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"),
                               {"name": name})
            connection.execute(text(f'DROP DATABASE "{name}"'))
        admin.dispose()


def daily_cron_away_from_now(timezone: str = "UTC", hours_ahead: int = 12) -> tuple[str, str]:
    """A daily cron that fires about ``hours_ahead`` hours after the test's own clock, in ``timezone``.

    Schedules in tests are chosen relative to the clock the test runs at, so that no scheduled run
    falls due while the test runs and no "nightly run due soon" rule depends on the hour of day.
    The local hour 02 is skipped: daylight saving makes it missing or doubled on some days.

    Returns:
        The cron expression and the ``"HH:MM"`` local time it fires at.
    """
    from datetime import datetime, timedelta
    from zoneinfo import ZoneInfo

    at = datetime.now(ZoneInfo(timezone)) + timedelta(hours=hours_ahead)
    hour = 3 if at.hour == 2 else at.hour
    return f"{at.minute} {hour} * * *", f"{hour:02d}:{at.minute:02d}"


def pydicom_test_file(name: str) -> bytes:
    """A DICOM test file that ships inside pydicom (no download)."""
    from pathlib import Path

    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom test file {name} is not installed"
    return Path(path).read_bytes()


def dicom_file_bytes(dataset) -> bytes:
    """A data set written as a DICOM Part-10 file."""
    import io

    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def chest_dicom(name: str, **tags: str | None) -> bytes:
    """A pydicom test file relabelled as a chest radiograph (Modality CR, BodyPartExamined CHEST),
    with the given tags changed; ``None`` removes a tag."""
    import io

    import pydicom

    dataset = pydicom.dcmread(io.BytesIO(pydicom_test_file(name)))
    dataset.Modality, dataset.BodyPartExamined = "CR", "CHEST"
    for keyword, value in tags.items():
        if value is None:
            if keyword in dataset:
                delattr(dataset, keyword)
        else:
            setattr(dataset, keyword, value)
    return dicom_file_bytes(dataset)


def self_signed_certificate(folder, host: str = "127.0.0.1", days: int = 30):
    """A self-signed certificate for ``host`` (an IP address) and its key, written as PEM files
    (the key 0600) into ``folder``; returns ``(certfile, keyfile)``."""
    import datetime
    import ipaddress
    import os
    from pathlib import Path

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=days))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
                                  critical=False)
                   .sign(key, hashes.SHA256()))
    certfile, keyfile = folder / "service.crt", folder / "service.key"
    certfile.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    os.chmod(keyfile, 0o600)
    return certfile, keyfile


class PostgresServer:
    """A PostgreSQL server of a test's own on 127.0.0.1, which the test may stop, start and
    restart (the shared server at 127.0.0.1:5432 is not the test's to restart).

    Made with the machine's ``initdb`` and ``pg_ctl`` (Debian's ``/usr/lib/postgresql/<n>/bin``, or
    ``pg_ctl`` on PATH) in a fresh folder: trust authentication for the ``postgres`` role, TCP
    only (no Unix socket), fsync off (the data only has to outlive a clean restart, not a power
    cut; commits are still acknowledged only once PostgreSQL has them). PostgreSQL refuses to run
    as root, so as root the server runs as the ``postgres`` user (``runuser``), in a folder it owns.
    Use it through `own_postgres`.

    Attributes:
        url: the ``postgres`` database, as SQLAlchemy takes it.
    """

    def __init__(self, folder, bindir, port: int, as_user: list[str]):
        from pathlib import Path

        self.folder, self.bindir, self.port, self.as_user = Path(folder), Path(bindir), port, as_user
        self.data = self.folder / "data"
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"

    def _pg_ctl(self, *args: str) -> None:
        import subprocess

        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
                   "-c fsync=off -c full_page_writes=off")
        command = [*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.folder / "log"),
                   "-w", "-t", "60", *args]
        if args[-1] in ("start", "restart"):
            command[-1:-1] = ["-o", options]
        done = subprocess.run(command, capture_output=True, text=True, timeout=90)
        assert done.returncode == 0, f"pg_ctl {' '.join(args)}: {done.stdout}{done.stderr}"

    def initialise(self) -> None:
        import subprocess

        done = subprocess.run([*self.as_user, str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust",
                               "-U", "postgres", "-E", "UTF8", "--no-sync"], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, f"initdb: {done.stdout}{done.stderr}"

    def start(self) -> None:
        self._pg_ctl("start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` rolls back open transactions and ends every connection."""
        self._pg_ctl("-m", mode, "stop")

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: what an operator does to apply a setting or a minor upgrade."""
        self._pg_ctl("-m", "fast", "restart")


def postgres_bindir():
    """The folder of ``initdb`` and ``pg_ctl``: the newest ``/usr/lib/postgresql/<n>/bin``, else
    the one on PATH; None when PostgreSQL's server is not installed."""
    import shutil
    from pathlib import Path

    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                   key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0)
    if found:
        return found[-1].parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


@contextlib.contextmanager
def own_postgres():
    """A running `PostgresServer` of the test's own, on a free port; stopped and removed
    afterwards. Skips the test when PostgreSQL's server programs are not installed (the shared
    server of the other tests comes from the same packages)."""
    import os
    import pwd
    import shutil
    import socket
    import tempfile

    import pytest

    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL's server programs (initdb, pg_ctl) are not installed")
    as_user: list[str] = []
    # Not under pytest's tmp_path: its folders are 0700, and the server may run as another user.
    folder = tempfile.mkdtemp(prefix="medloop-pg-")
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(folder)
            pytest.skip("running as root without a `postgres` user to run PostgreSQL as")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = PostgresServer(folder, bindir, port, as_user)
    try:
        server.initialise()
        server.start()
        yield server
    finally:
        try:
            server.stop("immediate")
        except AssertionError:
            pass  # already stopped (or never started: initdb's message is the one that matters)
        shutil.rmtree(folder, ignore_errors=True)


def drain_prefect_workers(timeout: float) -> list[str]:
    """Send what this process's Prefect log and event workers hold, waiting at most ``timeout``
    seconds for each; the names of those that had not finished.

    Each worker is one per process, bound to the API it first sent to: a test world with its own
    Prefect server drains them before stopping that server, so that later flows in the process
    start fresh workers bound to their own server (not retries against a server that is gone)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    return [worker.__name__ for worker in (APILogWorker, EventsWorker)
            if worker.drain_all(timeout=timeout, at_exit=False)[1]]
