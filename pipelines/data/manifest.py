"""The raw-data manifest: one row per item collect ever saw, append-only.

Each collect run that finds something new writes one batch folder,
``data/raw/batches/<batch_id>/``, holding the stored (de-identified) items and the batch's
``manifest.parquet``. The manifest of the workspace is the union of all batches. Items that could
not be stored (unreadable, impossible to de-identify, vanished) still get a row, with
``status = "rejected"`` and the reason, so clean can put them on the quarantine list: nothing
disappears without a trace.

``data/raw/index.json`` pins the archive in one small file: for each batch, the SHA-256 of each
file at its top (``manifest.parquet``, a table's ``rows.parquet``); the images below are pinned
by their ``content_hash`` in the manifest. Clean depends on this file instead of the whole of
``data/raw``, so DVC need not walk every stored image of the archive several times a night; clean
checks the index against the batches (`check_index`) and each image it decodes against its
content hash, so the pin is verified, never assumed. Collect writes it with each batch.

DVC records each batch on its own (``data/raw/batches/<batch_id>.dvc``) and the index beside it
(``data/raw/index.json.dvc``, `Layout.raw_record`), so a night's ``dvc add`` hashes that night's batch, not every
file of the archive; a batch never changes once collected.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Iterable

import pandas as pd

from pipelines.config import METADATA_SUBGROUPS
from pipelines.errors import MedloopError
from pipelines.values import utc_now
from pipelines.workspace import Layout

MANIFEST_FILE = "manifest.parquet"
INDEX_FILE = "index.json"

# column -> pandas dtype; the order is the order on disk
COLUMNS: dict[str, str] = {
    "record_id": "string",  # unique: path of the stored item under data/raw (or file#row)
    "item_id": "string",  # keyed hash of the item as the source gave it: "seen before?"
    "content_hash": "string",  # sha256 of what is stored (de-identified bytes or row)
    "batch_id": "string",
    "arrival_time": "datetime64[us, UTC]",
    "source": "string",  # e.g. "image_folder:/data/cxr", "synthetic_cxr"
    "source_ref": "string",  # where in the source: relative path, object key, row number
    "file_format": "string",  # dicom | jpeg | png | row
    "patient_id": "string",  # pseudonym (salted hash)
    "study_year": "Int64",  # Safe Harbor keeps the year of dates only
    "label": "string",  # as the source gave it; clean normalises it
    "label_provenance": "string",  # dataset | clinician
    "sex": "string",
    "age_band": "string",
    "view": "string",
    "site": "string",
    "status": "string",  # stored | rejected
    "reason": "string",  # why rejected (empty when stored)
}

SUBGROUP_COLUMNS = METADATA_SUBGROUPS  # the manifest columns that hold subgroup values


def new_batch_id(now: datetime | None = None) -> str:
    """A sortable batch id such as ``20261122T063700123456Z``."""
    now = now or utc_now()
    return now.strftime("%Y%m%dT%H%M%S%fZ")


def empty() -> pd.DataFrame:
    """A manifest with no rows and the right dtypes."""
    return conform(pd.DataFrame({name: [] for name in COLUMNS}))


def conform(frame: pd.DataFrame) -> pd.DataFrame:
    """Give a manifest frame exactly the manifest columns, in order, with their dtypes."""
    frame = frame.copy()
    for name in COLUMNS:
        if name not in frame.columns:
            frame[name] = pd.NA
    frame = frame[list(COLUMNS)]
    return frame.astype(COLUMNS)


def read(layout: Layout) -> pd.DataFrame:
    """The workspace manifest: every batch's rows, oldest batch first."""
    files = sorted(layout.batches.glob(f"*/{MANIFEST_FILE}"))
    if not files:
        return empty()
    frames = [conform(pd.read_parquet(path)) for path in files]
    return pd.concat(frames, ignore_index=True)


def write_batch(frame: pd.DataFrame, batch_dir: Path) -> Path:
    """Write a batch's manifest into its (not yet published) batch folder."""
    path = batch_dir / MANIFEST_FILE
    conform(frame).to_parquet(path, index=False)
    return path


def stored_rows(layout: Layout, record_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """The stored table rows of data/raw (de-identified, as collect wrote them), indexed by
    record id (``<batch file>#<row>``); only ``record_ids`` when given."""
    raw = read(layout)
    stored = raw[raw["status"] == "stored"]
    if record_ids is not None:
        stored = stored[stored["record_id"].isin(set(record_ids))]
    parts = []
    for batch_file, group in stored.groupby(stored["record_id"].str.split("#").str[0]):
        table = pd.read_parquet(layout.raw / batch_file)
        part = table.iloc[group["record_id"].str.split("#").str[1].astype(int).to_numpy()].copy()
        part.index = group["record_id"].to_numpy()
        parts.append(part)
    return pd.concat(parts) if parts else pd.DataFrame()


def index_path(layout: Layout) -> Path:
    return layout.raw / INDEX_FILE


def batch_ids(layout: Layout) -> list[str]:
    """The batches in ``data/raw/batches``, oldest first."""
    return sorted(path.name for path in layout.batches.iterdir() if path.is_dir()) if layout.batches.is_dir() else []


def batch_index(layout: Layout, extra: dict[str, Path] | None = None) -> dict:
    """The index of the batches in ``data/raw`` (and ``extra``: batch id -> a folder not yet
    published): ``{"batches": {batch id: {file name: SHA-256}}}`` for the files at each batch's
    top, in sorted order."""
    folders = {path.name: path for path in layout.batches.iterdir() if path.is_dir()} if layout.batches.is_dir() else {}
    folders.update(extra or {})
    batches = {}
    for batch_id in sorted(folders):
        files = sorted(path for path in folders[batch_id].iterdir() if path.is_file())
        batches[batch_id] = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in files}
    return {"batches": batches}


def write_index(index: dict, folder: Path) -> Path:
    """Write ``index`` into ``folder`` (beside its final place, for an atomic rename); the file."""
    path = folder / f"{INDEX_FILE}.{os.getpid()}"
    path.write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return path


def publish_index(layout: Layout, written: Path) -> None:
    """Put an index `write_index` wrote in its place, in one rename."""
    os.replace(written, index_path(layout))


def index_is_current(layout: Layout) -> bool:
    """Whether ``data/raw/index.json`` describes the batches as they are (`check_index` passes)."""
    try:
        check_index(layout)
    except MedloopError:
        return False
    return True


def check_index(layout: Layout) -> None:
    """Raise a clear error unless ``data/raw/index.json`` describes the batches as they are."""
    path = index_path(layout)
    if not path.is_file():
        raise MedloopError(f"{path}: missing; `medloop collect` writes it (run it once: it indexes the "
                           "batches already collected even when nothing is new)")
    try:
        recorded = json.loads(path.read_text())["batches"]
        if not all(isinstance(files, dict) for files in recorded.values()):
            raise TypeError("a batch's entry is not a table of files")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise MedloopError(f"{path}: not an index of batches; run `medloop collect` to write it again") from None
    actual = batch_index(layout)["batches"]
    for batch_id in sorted(set(recorded) | set(actual)):
        if batch_id not in actual:
            problem = "is listed in the index but not in data/raw/batches"
        elif batch_id not in recorded:
            problem = "is in data/raw/batches but not in the index"
        elif recorded[batch_id] != actual[batch_id]:
            names = sorted(name for name in set(recorded[batch_id]) | set(actual[batch_id])
                           if recorded[batch_id].get(name) != actual[batch_id].get(name))
            problem = f"changed since collect indexed it ({', '.join(names)})"
        else:
            continue
        raise MedloopError(f"{path}: batch {batch_id} {problem}. data/raw changes only through `medloop "
                           "collect`; restore the batch (`dvc pull -R data/raw` fetches and checks out "
                           "every batch) or run `medloop collect`, which indexes the batches as they are")
