"""Small data builders shared by tests (not fixtures: plain functions)."""

from __future__ import annotations

import contextlib

import pandas as pd

from pipelines.config import BreastCancerSource
from pipelines.sources.breast_cancer import BreastCancerReader


def breast_cancer_frame(n: int = 40, seed: int = 5) -> pd.DataFrame:
    """Rows in the shape of a hospital export: identifiers, measurements, diagnosis."""
    reader = BreastCancerReader(BreastCancerSource(kind="builtin_breast_cancer", seed=seed, nights=1))
    return reader.full_table().head(n).reset_index(drop=True)


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
