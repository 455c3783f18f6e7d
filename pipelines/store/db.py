"""Engines and schema for the feedback store.

- SQLite (the default, a file in the workspace): WAL journal so readers never block the writer, a
  busy timeout so a writer waits for the lock instead of failing, and ``BEGIN IMMEDIATE`` for
  every transaction so that two writers never both start reading and then collide when they
  upgrade to writing (the cause of "database is locked" under load), and foreign keys on. The
  database file is its owner's alone (0600: it holds clinicians' comments and who asked what),
  and so are its ``-wal`` and ``-shm`` files, which SQLite creates with the database file's mode.
- PostgreSQL (production): by URL, with pre-ping so that a restarted server is reconnected.

The schema is created and upgraded only by Alembic migrations (`upgrade`), never by
``create_all``, so every deployment's database has a known revision.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

from pipelines.errors import MedloopError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
PRIVATE_FILE_MODE = 0o600


class StoreError(MedloopError):
    """The store cannot be reached or its schema cannot be brought up to date."""


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
