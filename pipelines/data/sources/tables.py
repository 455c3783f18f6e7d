"""Tabular sources: CSV or Parquet files, and tables or queries through SQLAlchemy.

A whole source that cannot be read (missing file, unreachable database, unparseable CSV) is a
`SourceError` naming it; nothing is written then, so the previous data version stays intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pandas as pd

from pipelines.config import SqlSource, TableFileSource
from pipelines.errors import SourceError
from pipelines.data.sources.base import SourceState, TableChunk

CSV_SUFFIXES = {".csv", ".tsv", ".txt"}
PARQUET_SUFFIXES = {".parquet", ".pq"}


class TableFileReader:
    """One CSV or Parquet file, or every such file in a folder (sorted by name)."""

    def __init__(self, spec: TableFileSource):
        self.spec = spec
        self.path = Path(spec.path).expanduser()
        self.name = f"{spec.kind}:{self.path}"

    def chunks(self, state: SourceState) -> Iterator[TableChunk]:
        if self.path.is_dir():
            suffixes = CSV_SUFFIXES if self.spec.kind == "csv" else PARQUET_SUFFIXES
            files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in suffixes)
            if not files:
                raise SourceError(f"source.path {self.path}: no {self.spec.kind} files in folder")
        elif self.path.is_file():
            files = [self.path]
        else:
            raise SourceError(f"source.path {self.path}: file not found")
        for path in files:
            yield TableChunk(frame=read_table_file(path, self.spec.kind), origin=str(path))


def read_table_file(path: Path, kind: str) -> pd.DataFrame:
    """Read one file as strings-preserving as pandas allows; errors name the file."""
    try:
        if kind == "csv":
            sep = "\t" if path.suffix.lower() == ".tsv" else ","
            # keep_default_na=False + explicit na_values: an empty cell is missing, but a
            # literal "NA" patient name or "None" label is not silently turned into NaN.
            return pd.read_csv(path, sep=sep, keep_default_na=False, na_values=[""])
        return pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise SourceError(f"{path}: file is empty (no header row)") from None
    except pd.errors.ParserError as exc:
        raise SourceError(f"{path}: not a well-formed CSV: {exc}") from None
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (OSError, ValueError) as exc:
        raise SourceError(f"{path}: cannot read as {kind}: {exc}") from None


class SqlReader:
    """A table or a query through an SQLAlchemy URL (PostgreSQL, SQLite, ...)."""

    def __init__(self, spec: SqlSource):
        self.spec = spec
        self.name = f"sql:{mask_url(spec.url)}"

    def chunks(self, state: SourceState) -> Iterator[TableChunk]:
        import sqlalchemy as sa

        what = f"table {self.spec.table}" if self.spec.table else "query"
        try:
            engine = sa.create_engine(self.spec.url)
        except Exception as exc:  # noqa: BLE001 - any URL problem is reported the same way
            raise SourceError(f"source.url {mask_url(self.spec.url)}: invalid database URL: {exc}") from None
        try:
            with engine.connect() as connection:
                if self.spec.table:
                    table = _quoted(engine, self.spec.table)
                    frame = pd.read_sql(sa.text(f"SELECT * FROM {table}"), connection)
                else:
                    frame = pd.read_sql(sa.text(self.spec.query), connection)
        except sa.exc.OperationalError as exc:
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
            raise SourceError(
                f"source.url {mask_url(self.spec.url)}: cannot reach the database: {reason}"
            ) from None
        except sa.exc.SQLAlchemyError as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            raise SourceError(f"source {self.name}: reading {what} failed: {reason}") from None
        finally:
            engine.dispose()
        yield TableChunk(frame=frame, origin=f"{self.name} {what}")


def mask_url(url: str) -> str:
    """The URL with any password replaced by ***, for messages and the manifest."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparseable URL has no password we can find
        return url.split("@")[-1] if "@" in url else url


def _quoted(engine, table: str) -> str:
    # Quote each dotted part with the dialect's rules so odd names cannot inject SQL.
    preparer = engine.dialect.identifier_preparer
    return ".".join(preparer.quote(part) for part in table.split("."))
