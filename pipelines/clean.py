"""Clean (DVC stage): from everything collected to the items fit for the quality gate.

Reads the whole of ``data/raw``'s manifest (all batches) and writes the outputs below from it.
The per-image work (decode, checks, PNG) is done only for content no earlier night cleaned with
the same settings and code (`pipelines.ops.item_cache`), on the engine ``compute`` names
(`pipelines.ops.compute`: this machine, or a Dask cluster); everything that spans batches
(duplicates, clinician labels) is decided on the manifest every night, so the outputs are the
same bytes as a full recompute. The outputs are published only when complete:

- ``data/clean/records.parquet``: one row per usable item, labels normalised to
  ``model.classes``; for images the decoded metadata (size, channels, intensity statistics) and
  a lossless PNG in the configured channels with its SHA-256 (``image_sha256``: what preprocess
  keys its reuse on, without reading every PNG again) and its place (``image_path``); for tables
  the typed features.
- ``data/clean/images/<batch_id>.zip``: each batch's usable images, one pack per batch
  (`pipelines.data.packs`), and ``data/clean/packs.json`` (each pack's members and size): a
  night writes its own batch's pack and links the others from last night's output, so DVC
  hashes a few new files, not one per image of the archive.
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
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.data import manifest, packs
from pipelines.config import Params
from pipelines.errors import MedloopError
from pipelines.ops.compute import KeptFiles, item_map, staged_directory
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
PACKS_FILE = "packs.json"
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
    from pipelines.data import images
    from pipelines.deid import image_metadata

    spec = params.clean.image
    (out / "images").mkdir()
    todo = verdicts.raw.index[verdicts.accepted]
    chosen = verdicts.raw.loc[todo]
    cache = ItemCache.open(layout.state, "clean", [sys.modules[__name__], images, image_metadata, packs],
                           params.clean.image.model_dump(mode="json"))
    layout.tmp.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="clean-", dir=layout.tmp) as loose:  # this night's new PNGs
        raw = str(layout.raw)  # plain strings: this runs once per item of the archive
        digests = chosen["content_hash"].tolist()
        jobs = [(os.path.join(raw, record_id), loose, digest, spec.channels, spec.min_side, spec.max_pixels, spec.dicom)
                for record_id, digest in zip(chosen["record_id"].tolist(), digests)]
        batch_ids = chosen["batch_id"].tolist()
        outcomes = _reuse_or_clean(params, cache, jobs, batch_ids)
        metadata: dict[int, dict] = {}
        first_with_pixels: dict[str, int] = {}  # pixel hash -> index of the item kept
        for index, digest, batch_id, outcome in zip(todo, digests, batch_ids, outcomes):
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
                continue
            first_with_pixels[pixel_hash] = index
            outcome["image_path"] = packs.image_path(batch_id, f"{digest}.png")
            metadata[index] = outcome
        _write_packs(layout, out, cache, {job[2]: job for job in jobs}, list(metadata.values()))
    extra = pd.DataFrame.from_dict(metadata, orient="index", columns=IMAGE_COLUMNS)
    records = verdicts.records(extra)
    for column in ("width", "height", "channels"):
        records[column] = records[column].astype("int64")
    return records


def _reuse_or_clean(params: Params, cache: ItemCache, jobs: list[tuple], batch_ids: list[str]) -> list[dict]:
    """`clean_one_image` for every job, reusing earlier nights' results of the same stored
    content, settings and code (`pipelines.ops.item_cache`; a batch's results are read at once);
    new results go on ``compute``'s engine and into the cache (their PNGs also stay in the job's
    folder for this night's packs). A problem is never cached (an unreadable file may be readable
    tomorrow); it is cheap to find again."""
    batches: dict[str, list[int]] = {}
    for position, batch_id in enumerate(batch_ids):
        batches.setdefault(batch_id, []).append(position)
    outcomes: list[dict | None] = [None] * len(jobs)
    apart = []  # the batches whose results were not read at once
    for positions in batches.values():
        headers, together = cache.headers([jobs[p][2] for p in positions])  # [2]: the content hash
        for position, header in zip(positions, headers):
            outcomes[position] = header
        if not together:
            apart.append(positions)
    missing = [position for position, outcome in enumerate(outcomes) if outcome is None]
    with item_map(params.compute, "clean") as items:
        computed = items.map(clean_one_image, [jobs[position] for position in missing], chunksize=32)
    for position, outcome in zip(missing, computed):
        outcomes[position] = outcome
        if "problem" not in outcome:
            folder, key = jobs[position][1], jobs[position][2]
            cache.put(key, outcome, Path(folder, f"{key}.png").read_bytes())
    for positions in apart:
        found = [outcomes[p] for p in positions]
        if not any("problem" in outcome for outcome in found):  # type: ignore[operator]
            cache.keep_together([jobs[p][2] for p in positions], found)  # type: ignore[arg-type]
    log.info("clean: images %s", cache.describe())
    return outcomes  # type: ignore[return-value]


def _write_packs(layout: Layout, out: Path, cache: ItemCache, job_of: dict[str, tuple], kept: list[dict]) -> None:
    """Write each batch's usable images into its pack (`pipelines.data.packs`), in record order,
    and ``packs.json`` beside them: each pack's members digest and size, and the code version.

    A pack whose members are those of last night's pack of the same batch, written with the same
    code, is hard-linked from last night's output (a persistent DVC output) while it is still the
    file last night wrote (`KeptFiles`): it keeps its inode and times, so DVC need not hash it
    again, and its images are not read. Only the packs that changed are written: a night's new
    batch, or every pack after a change of code or settings.
    """
    previous = _previous_packs(layout.clean, cache.version)
    files = KeptFiles(cache.folder / "kept-packs.json")
    by_batch: dict[str, list[tuple[str, str]]] = {}  # pack -> (member, its PNG's SHA-256), in record order
    for outcome in kept:
        name, member = packs.split(outcome["image_path"])
        by_batch.setdefault(name, []).append((member, outcome["image_sha256"]))
    summary, linked = {}, 0
    for name, members in by_batch.items():
        digest = packs.members_digest(members)
        target = out / name
        if previous.get(name) == digest and files.keep(layout.clean / name, target, name):
            linked += 1
        else:
            packs.write(target, ((member, _png(cache, job_of, member, sha256)) for member, sha256 in members))
        files.note(name, target)
        summary[name] = {"members": digest, "bytes": target.stat().st_size}
    (out / PACKS_FILE).write_text(json.dumps({"version": cache.version, "packs": summary}, indent=1, sort_keys=True) + "\n")
    files.save()
    log.info("clean: %d of %d packs kept from the last run (same images, same code)", linked, len(summary))


def _previous_packs(clean: Path, version: str) -> dict[str, str]:
    """Last run's packs (pack name -> members digest) written with the same code and settings;
    nothing when there is no such run."""
    try:
        recorded = json.loads((clean / PACKS_FILE).read_text())
        if recorded.get("version") != version:
            return {}
        return {name: entry["members"] for name, entry in recorded["packs"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _png(cache: ItemCache, job_of: dict[str, tuple], member: str, sha256: str) -> bytes:
    """A cleaned PNG for a pack: this night's from its job's folder, an earlier night's from the
    cache, checked against the SHA-256 its record carries. One missing from the cache or damaged
    there is made again from the stored file (and put back in the cache)."""
    key = member.removesuffix(".png")
    job = job_of[key]
    fresh = Path(job[1], member)
    png = fresh.read_bytes() if fresh.exists() else cache.payload(key)
    if png is not None and hashlib.sha256(png).hexdigest() == sha256:
        return png
    outcome = clean_one_image(job)  # writes the PNG into the job's folder
    png = fresh.read_bytes() if "problem" not in outcome else None
    if png is None or hashlib.sha256(png).hexdigest() != sha256:
        raise MedloopError(f"clean: the cleaned image {key[:12]} cannot be made again as it was recorded "
                           f"({outcome.get('problem', 'other bytes')}); delete {cache.folder} and run clean again")
    cache.put(key, outcome, png)
    return png


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
    png = encode_png(pixels)
    Path(images_dir, f"{digest}.png").write_bytes(png)
    shape = "x".join(str(d) for d in pixels.shape).encode()
    return {
        "pixel_hash": hashlib.sha256(shape + pixels.tobytes()).hexdigest(),
        "image_path": "",  # its pack's, set by the stage (`pipelines.data.packs`)
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
