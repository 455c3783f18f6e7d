"""Collect: bring what is new from the configured source into ``data/raw/``, de-identified.

Collect reads the outside world, so it is a task and not a DVC stage. It is incremental: an item
whose keyed content hash is already in the manifest is not collected again, so running collect
twice with nothing new changes nothing. New items are de-identified in memory, written into a
staging folder with their batch manifest, and published by one rename, so a failure half-way
leaves the previous data version exactly as it was. Then ``dvc add`` records the new batch and
the index (`record_batches`): the new version.

Items that cannot be stored (unreadable, impossible to de-identify, vanished from the source,
duplicated within the batch) are still recorded in the manifest as ``rejected`` or
``duplicate`` with the reason; clean turns them into quarantine entries.

Clinicians' confirmed labels come in the same way: every row of the feedback exports under
``data/feedback/exports/`` (see ``pipelines.feedback_export``) that no earlier batch holds is
stored with its image or feature values, source ``feedback``, label provenance ``clinician``.
Clean then lets a clinician's label override the dataset's label of the same item.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from pipelines.data import manifest
from pipelines.config import DEFAULT_PARAMS_FILE, Params, load_params
from pipelines.deid.keys import content_hash, keyed_hash, load_salt, pseudonym
from pipelines.deid.files import EXTENSIONS, deidentify_image
from pipelines.errors import DeidentificationError, DiskFullError, MedloopError, is_disk_full, says_disk_full
from pipelines.data.sources import open_source
from pipelines.data.sources.base import ItemUnavailable, SourceState
from pipelines.ops.compute import item_map
from pipelines.ops.versioning import dvc
from pipelines.values import utc_now
from pipelines.workspace import Layout

log = logging.getLogger("medloop.collect")

STORED, REJECTED, DUPLICATE = "stored", "rejected", "duplicate"
NIGHT_REF = re.compile(r"^night-(\d+)")


@dataclass(frozen=True)
class CollectResult:
    """What one collect run did.

    Attributes:
        batch_id: the new batch, or None when nothing new arrived.
        stored: items de-identified and stored.
        rejected: items recorded but not stored (reason in the manifest).
        duplicates: items repeated within this batch (recorded, not stored twice).
        already_collected: items skipped because an earlier batch has them.
        dvc_file: the ``.dvc`` file of ``data/raw/index.json``, which pins every batch (when
            DVC recorded something).
    """

    batch_id: str | None
    stored: int
    rejected: int
    duplicates: int
    already_collected: int
    dvc_file: str | None

    @property
    def changed(self) -> bool:
        return self.batch_id is not None

    def as_dict(self) -> dict:
        return asdict(self)


def run(params: Params, layout: Layout, *, night: int | None = None) -> CollectResult:
    """Collect new items from the source into a new batch under data/raw.

    Args:
        params: the workspace's params.
        layout: the workspace.
        night: for the built-in sources, release this night instead of the next one.

    Returns:
        What was collected; ``batch_id`` is None when nothing was new.
    """
    layout.require()
    _require_checked_out(layout)
    salt = load_salt(params.deid.salt_env)
    known = manifest.read(layout)
    source = open_source(params)
    state = _source_state(known, source.name, night)
    batch_id = manifest.new_batch_id()
    arrival = utc_now()
    staging = layout.tmp / batch_id
    index_file = manifest.index_path(layout)
    indexed = index_file.read_bytes() if index_file.exists() else None
    written = None  # the new index, until it is in place
    try:
        staging.mkdir(parents=True)
        seen = set(known["item_id"].dropna())
        if params.model.modality == "image":
            rows = _collect_images(source, state, salt, seen, staging, batch_id, params.compute)
        else:
            rows = _collect_tables(params, source, state, salt, seen, staging, batch_id)
        feedback = _collect_feedback(params, layout, salt, seen, staging, batch_id)
        rows["manifest"].extend(feedback["manifest"])
        rows["already"] += feedback["already"]
        counts = _count(rows)
        if not counts["new"]:
            log.info("nothing new from %s (%d already collected)", source.name, counts["already"])
            return CollectResult(None, 0, 0, 0, counts["already"], index_batches(layout))
        parts = [manifest.conform(f) for f in rows.get("frames", [])]
        if rows["manifest"]:
            parts.insert(0, manifest.conform(pd.DataFrame(rows["manifest"])))
        frame = pd.concat(parts, ignore_index=True)
        frame["batch_id"] = batch_id
        frame["arrival_time"] = arrival
        frame["source"] = frame["source"].fillna(source.name)
        manifest.write_batch(frame, staging)
        written = manifest.write_index(manifest.batch_index(layout, {batch_id: staging}), layout.tmp)
        layout.batches.mkdir(parents=True, exist_ok=True)
        staging.rename(layout.batches / batch_id)  # publish: one atomic rename, then the index's
        manifest.publish_index(layout, written)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        log.warning("batch %s: the disk is full while staging it", batch_id, exc_info=True)
        raise DiskFullError(_disk_full(layout, staging.parent, batch_id, "while writing the batch",
                                       "Nothing was published")) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if written is not None:
            written.unlink(missing_ok=True)
    # With this batch, any batch published but never recorded (a collect killed before its `dvc add`).
    unrecorded = set(manifest.batch_ids(layout)) - set(_recorded_batches(layout))
    dvc_file = _record_or_put_back(layout, sorted(unrecorded | {batch_id}), indexed, withdraw=batch_id)
    result = CollectResult(
        batch_id=batch_id,
        stored=counts[STORED],
        rejected=counts[REJECTED],
        duplicates=counts[DUPLICATE],
        already_collected=counts["already"],
        dvc_file=dvc_file.relative_to(layout.root).as_posix(),
    )
    log.info(
        "batch %s from %s: %d stored, %d rejected, %d duplicates, %d already collected",
        batch_id, source.name, result.stored, result.rejected, result.duplicates, result.already_collected,
    )
    return result


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------


def _collect_images(source, state: SourceState, salt: bytes, seen: set[str], staging: Path, batch_id: str,
                    compute) -> dict:
    """Read, de-identify and hash the source's new images, ``CHUNK`` at a time: reading and the
    bookkeeping (what was seen, what repeats) run here in the source's order; de-identifying
    and hashing run on ``compute``'s engine, and their outcomes come back in that order, so
    the batch is the same whichever engine ran."""
    rows: list[dict] = []
    already = 0
    stored_hashes: dict[str, str] = {}
    batch_refs: dict[str, str] = {}  # item_id -> source_ref of its first copy in this batch
    images = staging / "images"
    images.mkdir()
    # One machine: this process (a local pool gained ~10% on de-identification, README); a Dask
    # cluster when compute asks for one.
    with item_map(compute, "collect", local_pool=False) as engine:
        for chunk in _chunks(source.items(state), CHUNK):
            planned: list[dict] = []  # a finished row, or an item waiting for its de-identification
            jobs: list[tuple[bytes, bytes]] = []
            for item in chunk:
                base = {"source_ref": item.source_ref, "label": item.label, "label_provenance": "dataset"}
                if item.problem:
                    # Known-bad without reading it; keyed on the reference so it is recorded once.
                    ref_id = keyed_hash(salt, item.source_ref.encode(), "ref")
                    if ref_id in seen:
                        already += 1
                    else:
                        seen.add(ref_id)
                        planned.append({**base, **_rejected(ref_id, item.problem)})
                    continue
                try:
                    data = item.read()
                except ItemUnavailable as exc:
                    # Keyed on reference *and* batch: if the item comes back, it is collected then.
                    attempt = keyed_hash(salt, f"{item.source_ref}@{batch_id}".encode(), "ref")
                    planned.append({**base, **_rejected(attempt, str(exc))})
                    continue
                item_id = keyed_hash(salt, data)
                if item_id in batch_refs:
                    planned.append({**base, "item_id": item_id, "status": DUPLICATE,
                                    "reason": f"same file content as {batch_refs[item_id]} in this batch"})
                    continue
                if item_id in seen:
                    already += 1
                    continue
                batch_refs[item_id] = item.source_ref
                planned.append({"waiting": len(jobs), "base": base, "item_id": item_id,
                                "patient_hint": item.patient_hint})
                jobs.append((data, salt))
            outcomes = engine.map(deidentify_job, jobs, chunksize=8)
            for plan in planned:
                if "waiting" not in plan:
                    rows.append(plan)
                    continue
                rows.append(_stored_row(plan, outcomes[plan["waiting"]], salt, images, stored_hashes, batch_id))
    return {"manifest": rows, "already": already}


CHUNK = 256  # items read, then de-identified together (bounds the memory a batch holds)


def _chunks(iterable, size: int):
    chunk = []
    for element in iterable:
        chunk.append(element)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def deidentify_job(job: tuple[bytes, bytes]) -> dict:
    """`deidentify_image` and the content hash of its output, for one file (runs on any engine);
    a file that cannot be de-identified gives its reason instead."""
    from pipelines.deid.image_metadata import sniff_format

    data, salt = job
    try:
        file_format, stored, meta = deidentify_image(data, salt)
    except DeidentificationError as exc:
        return {"problem": str(exc), "file_format": sniff_format(data)}
    return {"file_format": file_format, "stored": stored, "meta": meta, "content_hash": content_hash(stored)}


def _stored_row(plan: dict, outcome: dict, salt: bytes, images: Path, stored_hashes: dict[str, str],
                batch_id: str) -> dict:
    base, item_id = plan["base"], plan["item_id"]
    file_format = outcome["file_format"]
    if "problem" in outcome:
        return {**base, **_rejected(item_id, outcome["problem"]), "file_format": file_format}
    digest = outcome["content_hash"]
    if digest in stored_hashes:
        return {**base, "item_id": item_id, "content_hash": digest, "status": DUPLICATE, "file_format": file_format,
                "reason": f"same de-identified content as {stored_hashes[digest]} in this batch"}
    name = f"{digest}.{EXTENSIONS[file_format]}"
    (images / name).write_bytes(outcome["stored"])
    stored_hashes[digest] = base["source_ref"]
    meta = dict(outcome["meta"])
    if not meta.get("patient_id"):
        # No patient in the header: the file name's hint, else the image is its own patient.
        meta["patient_id"] = pseudonym(salt, plan["patient_hint"] or f"item:{item_id}")
    return {
        **base, **meta,
        "record_id": f"batches/{batch_id}/images/{name}",
        "item_id": item_id,
        "content_hash": digest,
        "file_format": file_format,
        "status": STORED,
        "reason": "",
    }


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------


def _collect_tables(params: Params, source, state: SourceState, salt: bytes, seen: set[str],
                    staging: Path, batch_id: str) -> dict:
    from pipelines.deid.tabular import check_columns, deidentify_table

    schema, deid = params.tabular, params.deid
    manifest_rows: list[dict] = []  # rows not stored (duplicates), one dict each
    manifest_frames: list[pd.DataFrame] = []  # stored rows, a frame per chunk
    first_ref: dict[str, str] = {}  # item_id -> where this batch first saw it
    stored_frames: list[pd.DataFrame] = []
    already = 0
    next_row = 0
    for chunk in source.chunks(state):
        frame = chunk.frame
        frame.columns = [str(c) for c in frame.columns]
        check_columns(frame, schema, deid, chunk.origin)
        item_ids = _row_hashes(frame, salt)
        refs = [f"{chunk.origin}#row={chunk.first_row + i}" for i in range(len(frame))]
        # Already collected in an earlier batch: skipped. Repeated within this batch (in this
        # file or an earlier one of the same run): recorded as a duplicate of its first copy.
        is_old = item_ids.isin(seen) & ~item_ids.isin(first_ref.keys())
        already += int(is_old.sum())
        repeated = (item_ids.duplicated(keep="first") | item_ids.isin(first_ref.keys())) & ~is_old
        for item_id, ref, old in zip(item_ids, refs, is_old):
            if not old and item_id not in first_ref:
                first_ref[item_id] = ref
        for index in repeated[repeated].index:
            manifest_rows.append({
                "source_ref": refs[index], "item_id": item_ids[index], "status": DUPLICATE,
                "file_format": "row", "label": _as_label(frame[schema.label].iloc[index]),
                "label_provenance": "dataset",
                "reason": f"duplicate row: same values as {first_ref.get(item_ids[index], 'an earlier row')}",
            })
        fresh = ~is_old & ~repeated
        if not fresh.any():
            continue
        seen.update(item_ids[fresh])
        clean = deidentify_table(frame[fresh.to_numpy()], schema, deid, salt)
        clean = _storable(clean)
        # Without a pseudonymised patient column every row is its own patient.
        missing = clean["patient_id"].isna().to_numpy()
        if missing.any():
            clean.loc[missing, "patient_id"] = [
                pseudonym(salt, f"item:{item_id}") for item_id in item_ids[fresh][missing]
            ]
        count = len(clean)
        row_numbers = range(next_row, next_row + count)
        next_row += count
        clean.insert(0, "item_id", item_ids[fresh].to_numpy())
        clean.insert(1, "content_hash", _row_hashes(clean.drop(columns=["item_id"]), None).to_numpy())
        stored_frames.append(clean)
        subgroups = {name: clean[name] for name in manifest.SUBGROUP_COLUMNS if name in clean.columns}
        batch_manifest = pd.DataFrame({
            "record_id": [f"batches/{batch_id}/rows.parquet#{n}" for n in row_numbers],
            "item_id": clean["item_id"],
            "content_hash": clean["content_hash"],
            "source_ref": pd.Series(refs)[fresh.to_numpy()].to_numpy(),
            "file_format": "row",
            "patient_id": clean["patient_id"],
            "study_year": clean["study_year"],
            "label": clean[schema.label].astype("string"),
            "label_provenance": "dataset",
            "status": STORED,
            "reason": "",
            **{name: values.astype("string") for name, values in subgroups.items()},
        })
        manifest_frames.append(batch_manifest)
    if stored_frames:
        rows = pd.concat(stored_frames, ignore_index=True)
        rows.to_parquet(staging / "rows.parquet", index=False)
    return {"manifest": manifest_rows, "frames": manifest_frames, "already": already}


def _row_hashes(frame: pd.DataFrame, salt: bytes | None) -> pd.Series:
    """One hash per row over its values (keyed when a salt is given); column order ignored.

    A row's text is the sorted column names, then its values as text joined by a separator
    (Arrow builds the joined strings in C; only the hashing is a Python loop).
    """
    import hashlib

    import pyarrow as pa
    import pyarrow.compute as pc

    columns = sorted(frame.columns)
    header = ("\x1e".join(columns) + "\x1d").encode()
    values = [pa.array(frame[c].astype("string").fillna("<NA>").to_numpy(dtype=object), type=pa.string())
              for c in columns]
    joined = pc.binary_join_element_wise(*values, "\x1f").to_pylist() if values else [""] * len(frame)
    if salt is None:
        hashes = [hashlib.sha256(header + text.encode()).hexdigest() for text in joined]
    else:
        hashes = [keyed_hash(salt, header + text.encode()) for text in joined]
    return pd.Series(hashes, index=frame.index)


def _storable(frame: pd.DataFrame) -> pd.DataFrame:
    """Columns of mixed types (a text in a number column) are stored as text: clean judges them."""
    frame = frame.copy()
    for column in frame.columns:
        if frame[column].dtype == object:
            frame[column] = frame[column].astype("string")
    return frame


def _as_label(value) -> str | None:
    return None if pd.isna(value) else str(value)


# ---------------------------------------------------------------------------------------------
# clinicians' confirmed labels (the feedback exports)
# ---------------------------------------------------------------------------------------------

FEEDBACK_SOURCE = "feedback"


def _collect_feedback(params: Params, layout: Layout, salt: bytes, seen: set[str], staging: Path,
                      batch_id: str) -> dict:
    """Every exported label no earlier batch holds, stored with what it refers to.

    An exported image is de-identified again on the way in (it already was, by the service, with
    the same function: this only guards against a hand-edited export). A label whose input the
    service no longer had is recorded as rejected with the reason, so it shows in quarantine.
    """
    from pipelines.feedback_export import LABELS_FILE

    rows: list[dict] = []
    already = 0
    feedback_rows: list[dict] = []
    image_model = params.model.modality == "image"
    for labels_file in sorted((layout.feedback / "exports").glob(f"*/{LABELS_FILE}")):
        export = labels_file.parent
        for case in pd.read_parquet(labels_file).to_dict("records"):
            ref = f"feedback/exports/{export.name}#prediction={case['prediction_id']}"
            item_id = keyed_hash(salt, ref.encode(), "feedback")
            if item_id in seen:
                already += 1
                continue
            seen.add(item_id)
            base = {"source": FEEDBACK_SOURCE, "source_ref": ref, "item_id": item_id, "label": case["label"],
                    "label_provenance": "clinician"}
            if case["status"] != "exported":
                rows.append({**base, "status": REJECTED, "reason": f"clinician label {case['label']!r} without "
                             f"its input: {case['reason'] or case['status']}"})
                continue
            if image_model:
                rows.append(_feedback_image(case, export, base, salt, staging, batch_id))
            else:
                # The service stores only model features (it refuses any other field), so the
                # row needs no de-identification; without a patient it is its own patient.
                features = json.loads(case["features"] or "{}")
                patient = pseudonym(salt, f"item:{item_id}")
                feedback_rows.append({"patient_id": patient, **features, params.tabular.label: case["label"]})
                rows.append({**base, "record_id": f"batches/{batch_id}/{FEEDBACK_ROWS}#{len(feedback_rows) - 1}",
                             "content_hash": content_hash(json.dumps(features, sort_keys=True).encode()),
                             "patient_id": patient, "file_format": "row", "status": STORED, "reason": ""})
    if feedback_rows:
        pd.DataFrame(feedback_rows).to_parquet(staging / FEEDBACK_ROWS, index=False)
    return {"manifest": rows, "already": already}


FEEDBACK_ROWS = "feedback_rows.parquet"


def _feedback_image(case: dict, export: Path, base: dict, salt: bytes, staging: Path, batch_id: str) -> dict:
    path = export / case["record"]
    try:
        file_format, stored, meta = deidentify_image(path.read_bytes(), salt)
    except OSError as exc:
        return {**base, "status": REJECTED, "reason": f"exported image {path.name} unreadable: {exc.strerror or exc}"}
    except DeidentificationError as exc:
        return {**base, "status": REJECTED, "reason": f"exported image {path.name}: {exc}"}
    folder = staging / "feedback"
    folder.mkdir(exist_ok=True)
    # One file per exported label: the same image may come back with a later, corrected label.
    name = f"{export.name}-{case['prediction_id']}.{EXTENSIONS[file_format]}"
    (folder / name).write_bytes(stored)
    exported = {key: case.get(key) or None for key in ("patient_id", "sex", "age_band", "view", "site")}
    year = case.get("study_year")
    return {
        **base, **exported, **{k: v for k, v in meta.items() if v is not None},
        "patient_id": meta.get("patient_id") or exported["patient_id"] or pseudonym(salt, f"item:{case['input_sha256']}"),
        "study_year": int(year) if year not in (None, "") else meta.get("study_year"),
        "record_id": f"batches/{batch_id}/feedback/{name}",
        "content_hash": content_hash(stored), "file_format": file_format, "status": STORED, "reason": "",
    }


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------


def _disk_full(layout: Layout, folder: Path, batch_id: str, when: str, outcome: str) -> str:
    """The one paragraph a person reads when the disk filled up during collect."""
    try:
        free = f"{shutil.disk_usage(folder).free // 1024} KiB free"
    except OSError:
        free = "free space unknown"
    return (f"collect: the disk holding {folder} is full (no space left on device; {free}) {when} "
            f"(batch {batch_id}). {outcome}: {layout.raw} and its DVC record are as they were, and the "
            "same items are collected again on the next run. Free space on that disk and run collect again.")


def index_batches(layout: Layout) -> str | None:
    """When ``data/raw/index.json`` or DVC's records do not describe the batches (a workspace
    collected before the index or per-batch records existed, a batch restored by hand, or one
    published but never recorded), write the index and record the batches with DVC; the index's
    ``.dvc`` file then, else None. Collect runs it on a night with nothing new, and a refresh of
    the workspace's code (`medloop init`) too. A workspace whose recorded batches are not all
    checked out (a clone before ``dvc pull``) is left as it is."""
    if not layout.batches.is_dir():
        return None
    if _not_checked_out(layout):
        log.info("data/raw: some recorded batches are not checked out (`dvc pull -R data/raw`); not indexed")
        return None
    batches = manifest.batch_ids(layout)
    recorded = _recorded_batches(layout)
    if (manifest.index_is_current(layout) and recorded == batches and layout.raw_record.is_file()
            and not layout.raw_folder_record.exists()):
        return None
    index_file = manifest.index_path(layout)
    indexed = index_file.read_bytes() if index_file.exists() else None
    layout.tmp.mkdir(parents=True, exist_ok=True)
    written = manifest.write_index(manifest.batch_index(layout), layout.tmp)
    try:
        manifest.publish_index(layout, written)
    finally:
        written.unlink(missing_ok=True)
    log.info("indexed the batches already collected (%s)", index_file)
    return _record_or_put_back(layout, batches, indexed).relative_to(layout.root).as_posix()


def _record_or_put_back(layout: Layout, batch_ids: list[str], indexed: bytes | None, *,
                        withdraw: str | None = None) -> Path:
    """`record_batches`; if it fails, data/raw and its records are put back as DVC last recorded
    them (``indexed``: the index's earlier bytes; ``withdraw``: a batch just published, removed)
    and a full disk is said in one paragraph."""
    records = _raw_records(layout, batch_ids)
    started = time.time()
    try:
        return record_batches(layout, batch_ids)
    except MedloopError as exc:
        # The batch goes first: on a full disk, that frees the space the records may need.
        if withdraw:
            shutil.rmtree(layout.batches / withdraw, ignore_errors=True)
        _put_back(manifest.index_path(layout), indexed)
        for path, content in records.items():
            _put_back(path, content)
        _drop_dvc_leftovers(layout, started)
        if not says_disk_full(str(exc)):
            raise
        batch = withdraw or batch_ids[-1]
        log.warning("batch %s: the disk is full while DVC records it: %s", batch, exc)
        raise DiskFullError(_disk_full(layout, layout.root / ".dvc", batch,
                                       f"while `dvc add data/raw/batches/{batch}` copied the batch into the DVC cache",
                                       "The batch was withdrawn" if withdraw else "Nothing was recorded")) from None


def _recorded_batches(layout: Layout) -> list[str]:
    """The batches DVC records (``data/raw/batches/<id>.dvc``), oldest first."""
    return sorted(path.stem for path in layout.batches.glob("*.dvc"))


def _not_checked_out(layout: Layout) -> list[str]:
    """Batches DVC records whose folder is not in the workspace."""
    return [batch for batch in _recorded_batches(layout) if not (layout.batches / batch).is_dir()]


def _require_checked_out(layout: Layout) -> None:
    missing = _not_checked_out(layout) if layout.batches.is_dir() else []
    if missing:
        raise MedloopError(
            f"{layout.batches}: {len(missing)} recorded batch(es) are not in the workspace ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}), as in a clone before `dvc pull`. Fetch them with `dvc pull -R "
            "data/raw` before collecting; a batch deleted on purpose is dropped with `dvc remove "
            "data/raw/batches/<batch>.dvc`")


def record_batches(layout: Layout, batch_ids: list[str]) -> Path:
    """``dvc add`` the named batches, each in its own ``data/raw/batches/<id>.dvc``, and the index
    (``data/raw/index.json.dvc``), in one DVC call; the index's record.

    A batch never changes once collected, so recording it alone lets a night's ``dvc add`` hash
    only that night's files (DVC walked and looked up every file of ``data/raw`` each night when
    it was one record). A workspace recorded that way (``data/raw.dvc``) is moved over first:
    that record goes (`dvc remove` keeps the files; DVC's cache already holds them) and every
    batch is recorded.
    """
    legacy = layout.raw_folder_record
    if legacy.exists():
        dvc(layout, "remove", "--quiet", legacy.relative_to(layout.root).as_posix())
        batch_ids = manifest.batch_ids(layout)
        log.info("data/raw: recorded batch by batch from now on (%d batches; data/raw.dvc removed)", len(batch_ids))
    targets = [layout.batches / batch for batch in batch_ids] + [manifest.index_path(layout)]
    dvc(layout, "add", *(path.relative_to(layout.root).as_posix() for path in targets))  # not --quiet: it hides DVC's error too
    return layout.raw_record


def _raw_records(layout: Layout, batch_ids: list[str]) -> dict[Path, bytes | None]:
    """The small files a `record_batches` of ``batch_ids`` may change, with their content now
    (None: not there), to put back if it fails; all batches' when data/raw is still one record."""
    if layout.raw_folder_record.exists():
        batch_ids = manifest.batch_ids(layout) + batch_ids
    paths = [layout.raw_folder_record, layout.root / "data" / ".gitignore", layout.raw / ".gitignore",
             layout.batches / ".gitignore", layout.raw_record,
             *(layout.batch_record(batch) for batch in batch_ids)]
    return {path: path.read_bytes() if path.exists() else None for path in dict.fromkeys(paths)}


def _put_back(path: Path, content: bytes | None) -> None:
    """Give ``path`` its earlier content (None: it did not exist), if a failed command changed it;
    written beside it and renamed over it, so it is never half-written."""
    now = path.read_bytes() if path.exists() else None
    if now == content:
        return
    if content is None:
        path.unlink()
        return
    spare = path.with_name(path.name + ".restore")
    spare.write_bytes(content)
    spare.replace(path)


def _drop_dvc_leftovers(layout: Layout, since: float) -> None:
    """Remove the half-copied files a failed ``dvc add`` left in the workspace's DVC cache.

    DVC copies each file into its cache as ``.<random>.tmp`` and renames it to its hash when the
    copy is whole; a copy cut short (a full disk) stays behind under its temporary name, never an
    object, only taking space. Those written since ``since`` are this run's own: DVC holds the
    workspace's lock while it adds.
    """
    cache = layout.root / ".dvc" / "cache"
    for leftover in cache.glob("files/md5/*/.*.tmp"):
        try:
            if leftover.stat().st_mtime >= since - 1.0:  # the file clock may lag time.time() a tick
                leftover.unlink()
        except FileNotFoundError:
            continue


def _rejected(item_id: str, reason: str) -> dict:
    return {"item_id": item_id, "status": REJECTED, "reason": reason}


def _count(rows: dict) -> dict:
    statuses = pd.concat(
        [pd.Series([row["status"] for row in rows["manifest"]], dtype="object")]
        + [frame["status"].astype(object) for frame in rows.get("frames", [])],
        ignore_index=True,
    )
    counts = {status: int((statuses == status).sum()) for status in (STORED, REJECTED, DUPLICATE)}
    counts["new"] = len(statuses)
    counts["already"] = rows["already"]
    return counts


def _source_state(known: pd.DataFrame, source_name: str, night: int | None) -> SourceState:
    """How far a night-by-night source has got, read from the manifest itself."""
    if night is not None:
        return SourceState(nights_released=night - 1)
    refs = known.loc[known["source"] == source_name, "source_ref"].dropna()
    nights = refs.str.extract(NIGHT_REF, expand=False).dropna()
    released = int(nights.astype(int).max()) if len(nights) else 0
    return SourceState(nights_released=released)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.collect", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS_FILE)
    parser.add_argument("--night", type=int, default=None)
    args = parser.parse_args(argv)
    from pipelines.ops.logs import setup_logging

    layout = Layout.at(".")
    setup_logging(layout)
    try:
        result = run(load_params(args.params), layout, night=args.night)
    except MedloopError as exc:
        print(f"collect failed: {exc}", file=sys.stderr)
        return 1
    print(result.as_dict())
    return 0


if __name__ == "__main__":
    sys.exit(main())
