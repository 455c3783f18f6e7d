"""Engines and schema for the feedback store.

- SQLite (the default, a file in the workspace): WAL journal so readers never block the writer, a
  busy timeout so a writer waits for the lock instead of failing, and ``BEGIN IMMEDIATE`` for
  every transaction so that two writers never both start reading and then collide when they
  upgrade to writing (the cause of "database is locked" under load), and foreign keys on. The
  database file is its owner's alone (0600: it holds clinicians' comments and who asked what),
  and so are its ``-wal`` and ``-shm`` files, which SQLite creates with the database file's mode.
- PostgreSQL (production): by URL, with pre-ping so that a restarted server is reconnected, and a
  connect timeout (5 s unless the URL sets ``connect_timeout``).

A failure of the connection rather than of the statement (the server stopped, restarting, or out
of reach) is retried by `retried`, with growing pauses, for as long as the caller allows; after
that it is `StoreUnavailable`, which the service answers with 503 and Retry-After. Only
operations that are safe to repeat go through it: a write whose first try may have committed
before its connection dropped must find its own row on the next try (an idempotency key, a
prediction id chosen before the first try), never store a second one.

The schema is created and upgraded only by Alembic migrations (`upgrade`), never by
``create_all``, so every deployment's database has a known revision.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

from pipelines.errors import MedloopError, mask_credentials

log = logging.getLogger("medloop.store")
T = TypeVar("T")

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
PRIVATE_FILE_MODE = 0o600
CONNECT_TIMEOUT_SECONDS = 5  # PostgreSQL, unless the URL sets connect_timeout


class StoreError(MedloopError):
    """The store cannot be reached or its schema cannot be brought up to date."""


class StoreUnavailable(StoreError):
    """The database did not answer for as long as the caller would wait (stopped, restarting,
    unreachable): nothing is known to be stored, and the same request may be sent again.

    Attributes:
        seconds: how long the store kept trying.
    """

    def __init__(self, message: str, seconds: float):
        super().__init__(message)
        self.seconds = seconds


def unreachable(exc: BaseException) -> bool:
    """True when ``exc`` says the database cannot take the work now, not that the statement is
    wrong: psycopg2 reports a refused connection, a server shutting down or starting up and an
    administrator's shutdown as OperationalError (a deadlock or a serialization failure too, which
    PostgreSQL's advice is to try again), a connection already closed as InterfaceError; SQLite's
    "database is locked" after its busy timeout is an OperationalError as well. SQLAlchemy marks a
    disconnect it detected as ``connection_invalidated``."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    return isinstance(exc, (OperationalError, InterfaceError)) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated)


FIRST_PAUSE_SECONDS, LONGEST_PAUSE_SECONDS = 0.05, 1.0


def retried(operation: Callable[[int], T], *, seconds: float, what: str, url: str,
            on_retry: Callable[[], None] | None = None) -> T:
    """``operation(attempt)`` (attempt 0, 1, ...), tried again while the database is unreachable
    (`unreachable`), pausing 0.05 s, then twice as long each time (at most 1 s), for at most
    ``seconds`` in all.

    Args:
        operation: the work; it must be safe to repeat (see the module docstring). ``attempt``
            tells a write that an earlier try may have committed.
        seconds: how long to keep trying (0: once).
        what: what the operation does, for the message (``"storing feedback"``).
        url: the database, for the message (its password masked).
        on_retry: called before each new try (the service counts them).

    Raises:
        StoreUnavailable: the database still did not answer when ``seconds`` ran out.
    """
    from sqlalchemy.exc import DBAPIError

    deadline = time.monotonic() + seconds
    pause, attempt = FIRST_PAUSE_SECONDS, 0
    while True:
        try:
            return operation(attempt)
        except DBAPIError as exc:
            if not unreachable(exc):
                raise
            reason = _first_line(exc)
            if time.monotonic() + pause > deadline:
                log.warning("the feedback store did not answer for %.1f s while %s: %s", seconds, what, reason)
                raise StoreUnavailable(
                    f"the feedback store at {mask_credentials(url)} did not answer while {what} (tried for "
                    f"{seconds:g} s; last: {reason})", seconds) from None
            log.info("the feedback store did not answer while %s (%s); trying again in %.2f s", what, reason, pause)
        if on_retry is not None:
            on_retry()
        time.sleep(pause)
        pause, attempt = min(pause * 2, LONGEST_PAUSE_SECONDS), attempt + 1


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def engine_for(url: str, **options: Any) -> Engine:
    """An engine configured for concurrent writers (see module docstring)."""
    if url.startswith("sqlite"):
        private_sqlite_files(url)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
                                                  "check_same_thread": False}, **options)

        @event.listens_for(engine, "connect")
        def _sqlite_settings(dbapi_connection, _record):  # noqa: ANN001 - DBAPI objects
            dbapi_connection.isolation_level = None  # SQLAlchemy, not pysqlite, emits BEGIN
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(connection):  # noqa: ANN001
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if make_url(url).get_backend_name() == "postgresql" and "connect_timeout" not in make_url(url).query:
        # A server that is down on another host may drop the connection attempt silently: without a
        # timeout each try would wait for TCP's (minutes), and no request would get its 503.
        options.setdefault("connect_args", {}).setdefault("connect_timeout", CONNECT_TIMEOUT_SECONDS)
    return create_engine(url, pool_pre_ping=True, **options)


def private_sqlite_files(url: str) -> None:
    """Create the SQLite database of ``url`` with mode 0600 before SQLite opens it, whatever the
    umask, and take group and other permissions off an existing one (and its ``-wal`` and
    ``-shm`` files) that this user owns. An in-memory database, or one whose folder does not
    exist (SQLite's own error then says so), is left alone."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    if not path.exists() and path.parent.is_dir():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE_MODE))  # the umask can only take bits away
    for each in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            status = each.stat()
        except FileNotFoundError:
            continue
        if status.st_uid == os.getuid() and stat.S_IMODE(status.st_mode) & 0o077:
            os.chmod(each, stat.S_IMODE(status.st_mode) & 0o700)


def upgrade(engine: Engine, revision: str = "head") -> str:
    """Bring the schema to ``revision`` with Alembic; the revision now in force."""
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy.exc import OperationalError

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    try:
        command.upgrade(config, revision)
        with engine.connect() as connection:
            return str(MigrationContext.configure(connection).get_current_revision())
    except OperationalError as exc:
        raise StoreError(f"cannot migrate the feedback store at {engine.url!r}: {exc.orig}") from None


def sessions(engine: Engine) -> sessionmaker[Session]:
    """A session factory whose sessions keep loaded values readable after commit."""
    return sessionmaker(engine, expire_on_commit=False)
