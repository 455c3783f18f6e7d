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
