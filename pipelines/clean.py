"""Clean (DVC stage): from everything collected to the items fit for the quality gate.

Reads the whole of ``data/raw``'s manifest (all batches) and writes the outputs below from it.
The per-image work (decode, checks, PNG) is done only for content no earlier night cleaned with
the same settings and code (`pipelines.ops.item_cache`), on the engine ``compute`` names
(`pipelines.ops.compute`: this machine, or a Dask cluster); everything that spans batches
(duplicates, clinician labels) is decided on the manifest every night, so the outputs are the
same bytes as a full recompute. The outputs are published only when complete:

- ``data/clean/records.parquet``: one row per usable item, labels normalised to
  ``model.classes``; for images the decoded metadata (size, channels, intensity statistics) and
  a lossless PNG in the configured channels under ``data/clean/images/`` with its SHA-256
  (``image_sha256``: what preprocess keys its reuse on, without reading every PNG again); for
  tables the typed features.
- ``data/clean/intake.parquet``: every collected item, accepted or not, with the reason.
- ``reports/quarantine.csv``: every item that was not accepted, with its source and the reason
  (unreadable, unknown label, duplicate, wrong type, a DICOM whose header breaks
  ``clean.image.dicom``, a transfer syntax no installed decoder reads, ...). Nothing is dropped
  without a row here.

A clinician's confirmed label (label provenance ``clinician``, from the feedback exports)
overrides the label of the same item collected before it: the same pixels for images, the same
feature values for tables. The earlier record keeps its identity (record id, patient, split) and
takes the latest clinician label, its provenance and ``label_batch_id`` (the batch the label came
in); the feedback item itself is listed in the intake as merged, not quarantined. An item that a
clinician labelled first and the dataset brings again later keeps the clinician's label. The
frozen test set's labels are never changed by this: preprocess keeps the labels it froze.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.data import manifest
from pipelines.config import Params
from pipelines.errors import MedloopError
from pipelines.ops.compute import item_map, staged_directory
from pipelines.ops.item_cache import ItemCache
from pipelines.stage import stage_main
from pipelines.workspace import Layout

log = logging.getLogger("medloop.clean")

QUARANTINE_COLUMNS = ["item", "source", "reason", "batch_id", "record_id"]
RECORD_BASE_COLUMNS = [
    "record_id", "content_hash", "batch_id", "arrival_time", "source", "source_ref",
    "patient_id", "study_year", "label", "label_provenance", "label_batch_id",
]
CLINICIAN = "clinician"
IMAGE_COLUMNS = [
    "image_path", "width", "height", "channels", "mean_intensity", "std_intensity",
    "min_intensity", "max_intensity", "conversion", "image_sha256",
]


@dataclass(frozen=True)
class CleanResult:
    accepted: int
    quarantined: int
    records: str
    quarantine: str


def run(params: Params, layout: Layout) -> CleanResult:
    """Clean every collected item; see the module docstring for the outputs."""
    if layout.batches.is_dir():
        manifest.check_index(layout)  # what DVC knows of data/raw (clean's dependency) is the truth
    raw = manifest.read(layout)
    if raw.empty:
        raise MedloopError(f"{layout.raw}: nothing collected yet; run `medloop collect` first")
    layout.reports.mkdir(parents=True, exist_ok=True)

    verdicts = Verdicts(raw)
    verdicts.quarantine_unstored()
    verdicts.normalise_labels(params.model.classes, params.clean.label_aliases)
    with staged_directory(layout.clean) as out:
        if params.model.modality == "image":
            records = _clean_images(params, layout, out, verdicts)
        else:
            records = _clean_rows(params, layout, verdicts)
        records.to_parquet(out / layout.clean_records.name, index=False)
        verdicts.intake().to_parquet(out / layout.clean_intake.name, index=False)
    quarantine = verdicts.quarantine()
    quarantine.to_csv(layout.quarantine_csv, index=False)
    log.info("clean: %d accepted, %d quarantined (%s)", len(records), len(quarantine), layout.quarantine_csv)
    return CleanResult(len(records), len(quarantine), str(layout.clean_records), str(layout.quarantine_csv))


class Verdicts:
    """The manifest plus one verdict per item: accepted, or quarantined with a reason."""

    def __init__(self, raw: pd.DataFrame):
        self.raw = raw.reset_index(drop=True)
        self.reason = pd.Series("", index=self.raw.index, dtype="object")
        self.merged = pd.Series("", index=self.raw.index, dtype="object")
        self.notes = pd.Series("", index=self.raw.index, dtype="object")
        self.label = pd.Series(pd.NA, index=self.raw.index, dtype="string")
        self.provenance = self.raw["label_provenance"].fillna("dataset").astype("string")
        self.label_batch = self.raw["batch_id"].astype("string")

    @property
    def accepted(self) -> pd.Series:
        """Items that become records (neither quarantined nor merged into another)."""
        return (self.reason == "") & (self.merged == "")

    def reject(self, index, reason: str) -> None:
        """Quarantine one item (or several), keeping the first reason found."""
        index = pd.Index(np.atleast_1d(index))
        still_open = index[self.accepted.loc[index]]
        self.reason.loc[still_open] = reason

    def note(self, index, text: str) -> None:
        """Keep a remark on an accepted item (shown as its reason in the intake)."""
        self.notes.loc[index] = text

    def is_clinician(self, index) -> bool:
        return self.provenance.loc[index] == CLINICIAN

    def merge_label(self, index, keeper) -> None:
        """A clinician's label for an item collected before: the earlier record takes it."""
        self.label.loc[keeper] = self.label.loc[index]
        self.provenance.loc[keeper] = CLINICIAN
        self.label_batch.loc[keeper] = self.raw.at[index, "batch_id"]
        self.merged.loc[index] = (f"merged: clinician label {self.label.loc[index]!r} applied to "
                                  f"{self.raw.at[keeper, 'source_ref']}")

    def quarantine_unstored(self) -> None:
        unstored = self.raw["status"] != "stored"
        self.reason.loc[unstored] = self.raw.loc[unstored, "reason"].fillna("not stored").astype(str)

    def normalise_labels(self, classes: list[str], aliases: dict[str, str]) -> None:
        lookup = {name.lower(): name for name in classes}
        lookup.update({raw.lower(): target for raw, target in aliases.items()})
        raw_labels = self.raw["label"].astype("string")
        self.label = raw_labels.str.strip().str.lower().map(lookup).astype("string")
        expected = ", ".join(classes)
        for index in self.raw.index[self.label.isna() & self.accepted]:
            given = raw_labels.loc[index]
            if given is pd.NA or not str(given).strip():
                self.reject(index, f"no label (expected one of {expected})")
            else:
                self.reject(index, f"unknown label {str(given)[:40]!r} (expected one of {expected}; "
                                   f"map it with clean.label_aliases)")

    def intake(self) -> pd.DataFrame:
        raw = self.raw
        return pd.DataFrame({
            "record_id": raw["record_id"].fillna(raw["source_ref"]).astype("string"),
            "batch_id": raw["batch_id"].astype("string"),
            # A merged clinician label was taken in (by the record it labels): accepted.
            "accepted": (self.reason == "").astype(bool),
            "reason": self.reason.where(self.reason != "", self.merged.where(self.merged != "", self.notes))
            .astype("string"),
        })

    def quarantine(self) -> pd.DataFrame:
        rejected = self.reason != ""
        raw = self.raw[rejected]
        return pd.DataFrame({
            "item": raw["source_ref"].astype("string"),
            "source": raw["source"].astype("string"),
            "reason": self.reason[rejected].astype("string"),
            "batch_id": raw["batch_id"].astype("string"),
            "record_id": raw["record_id"].astype("string"),
        }, columns=QUARANTINE_COLUMNS)

    def records(self, extra: pd.DataFrame | None = None) -> pd.DataFrame:
        """Accepted items with the base columns (and the given per-item columns)."""
        keep = self.accepted
        own = ("label", "label_provenance", "label_batch_id")
        frame = self.raw.loc[keep, [c for c in RECORD_BASE_COLUMNS if c not in own]].copy()
        frame["label"] = self.label[keep]
        frame["label_provenance"] = self.provenance[keep]
        frame["label_batch_id"] = self.label_batch[keep]
        frame = frame[RECORD_BASE_COLUMNS]
        for column in manifest.SUBGROUP_COLUMNS:
            frame[column] = self.raw.loc[keep, column]
        if extra is not None:
            frame = frame.join(extra.loc[keep[keep].index.intersection(extra.index)])
        return frame.reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------


def _clean_images(params: Params, layout: Layout, out: Path, verdicts: Verdicts) -> pd.DataFrame:
    spec = params.clean.image
    images_dir = out / "images"
    images_dir.mkdir()
    todo = verdicts.raw.index[verdicts.accepted]
    chosen = verdicts.raw.loc[todo]
    raw, target = str(layout.raw), str(images_dir)  # plain strings: this runs once per item of the archive
    jobs = [
        (os.path.join(raw, record_id), target, digest, spec.channels, spec.min_side, spec.max_pixels, spec.dicom)
        for record_id, digest in zip(chosen["record_id"].tolist(), chosen["content_hash"].tolist())
    ]
    outcomes = _reuse_or_clean(params, layout, images_dir, jobs)
    metadata: dict[int, dict] = {}
    first_with_pixels: dict[str, int] = {}  # pixel hash -> index of the item kept
    kept_paths: set[str] = set()
    for index, outcome in zip(todo, outcomes):
        if "problem" in outcome:
            verdicts.reject(index, outcome["problem"])
            continue
        pixel_hash = outcome.pop("pixel_hash")
        header_warnings = outcome.pop("header_warnings")
        if header_warnings:
            verdicts.note(index, "accepted with a DICOM header warning: " + "; ".join(header_warnings))
            # The record id is a content hash, never the source path (which may carry a name).
            log.warning("clean: %s kept despite its DICOM header: %s",
                        verdicts.raw.at[index, "record_id"], "; ".join(header_warnings))
        if pixel_hash in first_with_pixels:
            keeper = first_with_pixels[pixel_hash]
            if verdicts.is_clinician(index):
                verdicts.merge_label(index, keeper)
            else:
                verdicts.reject(index, f"duplicate image: same pixels as {verdicts.raw.at[keeper, 'source_ref']}")
            if outcome["image_path"] not in kept_paths:
                Path(out / outcome["image_path"]).unlink(missing_ok=True)
            continue
        first_with_pixels[pixel_hash] = index
        kept_paths.add(outcome["image_path"])
        metadata[index] = outcome
    extra = pd.DataFrame.from_dict(metadata, orient="index", columns=IMAGE_COLUMNS)
    records = verdicts.records(extra)
    for column in ("width", "height", "channels"):
        records[column] = records[column].astype("int64")
    return records


def _reuse_or_clean(params: Params, layout: Layout, images_dir: Path, jobs: list[tuple]) -> list[dict]:
    """`clean_one_image` for every job, reusing earlier nights' results of the same stored
    content, settings and code (`pipelines.ops.item_cache`); new results go on ``compute``'s
    engine and into the cache. A problem is never cached (an unreadable file may be readable
    tomorrow); it is cheap to find again."""
    from pipelines.data import images
    from pipelines.deid import image_metadata

    cache = ItemCache.open(layout.state, "clean", [sys.modules[__name__], images, image_metadata],
                           params.clean.image.model_dump(mode="json"))
    outcomes: list[dict | None] = []
    previous = str(layout.clean / "images")  # last night's output (a persistent DVC output)
    for job in jobs:
        digest = job[2]  # the stored file's content hash
        header = cache.header(digest)
        if header is not None:
            name = f"{digest}.png"
            _keep_or_write(os.path.join(previous, name), os.path.join(job[1], name), header, cache, digest)
        outcomes.append(header)
    missing = [position for position, outcome in enumerate(outcomes) if outcome is None]
    with item_map(params.compute, "clean") as items:
        computed = items.map(clean_one_image, [jobs[position] for position in missing], chunksize=32)
    for position, outcome in zip(missing, computed):
        outcomes[position] = outcome
        if "problem" not in outcome:
            cache.put(jobs[position][2], outcome, Path(images_dir, f"{jobs[position][2]}.png").read_bytes())
    log.info("clean: images %s", cache.describe())
    return outcomes  # type: ignore[return-value]


def _keep_or_write(previous: str, target: str, header: dict, cache: ItemCache, key: str) -> None:
    """Put the cached PNG of ``key`` at ``target``. Where last night's output holds the same bytes
    (its SHA-256 is the cached one's: read and compared, not assumed), link that file instead, so
    that it keeps its inode and times and DVC need not hash it again; only otherwise is the
    cached copy read."""
    try:
        with open(previous, "rb") as existing:
            same = hashlib.sha256(existing.read()).hexdigest() == header["image_sha256"]
        if same:
            os.link(previous, target)
            return
    except OSError:
        pass  # not there, or no hard links on this file system: write it
    png = cache.payload(key)
    if png is None:  # the entry went away since its header was read (a concurrent prune)
        raise MedloopError(f"clean: the cached result of {key[:12]} disappeared while in use; run clean again")
    Path(target).write_bytes(png)


def clean_one_image(job: tuple) -> dict:
    """Decode, check and convert one stored image (runs in a worker process)."""
    from pipelines.data.images import ImageProblem, decode_image, encode_png, intensity_stats

    path, images_dir, digest, channels, min_side, max_pixels, dicom_header = job
    try:
        data = Path(path).read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:  # the manifest (clean's DVC dependency) pins it
            return {"problem": "stored file changed since collect: its SHA-256 is not the manifest's content_hash"}
        image = decode_image(data, channels=channels, min_side=min_side, max_pixels=max_pixels,
                             dicom_header=dicom_header)
    except ImageProblem as exc:
        return {"problem": str(exc)}
    except OSError as exc:
        return {"problem": f"stored file unreadable: {exc.strerror or exc}"}
    except Exception as exc:  # a decoder bug must cost one image, not the whole stage
        log.exception("clean: unexpected error decoding %s", Path(path).name)
        return {"problem": f"could not decode the image ({type(exc).__name__}); the traceback is in the log"}
    pixels = image.pixels
    name = f"images/{digest}.png"
    png = encode_png(pixels)
    Path(images_dir, f"{digest}.png").write_bytes(png)
    shape = "x".join(str(d) for d in pixels.shape).encode()
    return {
        "pixel_hash": hashlib.sha256(shape + pixels.tobytes()).hexdigest(),
        "image_path": name,
        "width": int(pixels.shape[1]),
        "height": int(pixels.shape[0]),
        "channels": int(pixels.shape[2]),
        **intensity_stats(pixels),
        "conversion": image.conversion,
        "image_sha256": hashlib.sha256(png).hexdigest(),
        "header_warnings": list(image.header_warnings),
    }


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------


def _clean_rows(params: Params, layout: Layout, verdicts: Verdicts) -> pd.DataFrame:
    schema = params.tabular
    rows = _stored_rows(layout, verdicts.raw)
    features = pd.DataFrame(index=verdicts.raw.index)
    for name, spec in schema.features.items():
        given = rows[name]
        values = pd.to_numeric(given, errors="coerce").astype("float64")
        not_number = given.notna() & values.isna()
        for index in not_number[not_number].index:
            verdicts.reject(index, f"field {name!r} is not a number ({_describe_value(given.loc[index])})")
        infinite = np.isinf(values)
        for index in infinite[infinite].index:
            verdicts.reject(index, f"field {name!r} is infinite ({given.loc[index]})")
        if spec.dtype == "int":
            fractional = values.notna() & ~infinite & (values != np.floor(values))
            for index in fractional[fractional].index:
                verdicts.reject(index, f"field {name!r} must be a whole number (got {values.loc[index]})")
        features[name] = values.where(~infinite)
    for name in schema.subgroups:
        if name not in manifest.SUBGROUP_COLUMNS:
            features[name] = rows[name].astype("string") if name in rows else pd.NA
    _merge_clinician_rows(verdicts, features[list(schema.features)])
    # Same de-identified content as an earlier item: keep the first, quarantine the rest.
    content = verdicts.raw["content_hash"]
    first_ref = {}
    for index in verdicts.raw.index[verdicts.accepted]:
        digest = content.loc[index]
        if digest in first_ref:
            verdicts.reject(index, f"duplicate row: same values as {first_ref[digest]}")
        else:
            first_ref[digest] = verdicts.raw.at[index, "source_ref"]
    return verdicts.records(features)


def _merge_clinician_rows(verdicts: Verdicts, features: pd.DataFrame) -> None:
    """A clinician's row with the same feature values as an earlier row labels that row; a
    dataset row repeating a row a clinician labelled is a duplicate of it."""
    keys = pd.util.hash_pandas_object(features, index=False)
    first: dict[int, int] = {}
    for index in verdicts.raw.index[verdicts.accepted]:
        key = int(keys.loc[index])
        keeper = first.get(key)
        if keeper is None:
            first[key] = index
        elif verdicts.is_clinician(index):
            verdicts.merge_label(index, keeper)
        elif verdicts.is_clinician(keeper):
            verdicts.reject(index, f"duplicate row: same values as {verdicts.raw.at[keeper, 'source_ref']}, "
                                   "which a clinician labelled")


def _stored_rows(layout: Layout, raw: pd.DataFrame) -> pd.DataFrame:
    """The stored rows of every batch, aligned with the manifest's index (missing for unstored)."""
    parts = []
    stored = raw[raw["status"] == "stored"]
    for batch_file, group in stored.groupby(stored["record_id"].str.split("#").str[0], sort=False):
        table = pd.read_parquet(layout.raw / batch_file)
        positions = group["record_id"].str.split("#").str[1].astype(int).to_numpy()
        part = table.iloc[positions].copy()
        part.index = group.index
        parts.append(part)
    if not parts:
        return pd.DataFrame(index=raw.index)
    return pd.concat(parts).reindex(raw.index)


def _describe_value(value) -> str:
    # Never echo free text into a report: it could be an identifier typed into the wrong column.
    text = str(value)
    if len(text) <= 12 and all(ch in "0123456789.,-+eE " for ch in text):
        return f"got {text!r}"
    return f"got text of {len(text)} characters"


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        "clean", run, lambda r: f"clean: {r.accepted} accepted, {r.quarantined} quarantined -> {r.quarantine}", argv
    )


if __name__ == "__main__":
    sys.exit(main())
