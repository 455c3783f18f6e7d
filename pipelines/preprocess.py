"""Preprocess (DVC stage): patient-level split, the frozen test set, and training-ready data.

- Every patient belongs to exactly one split, so no patient's images are in both training and
  test. Splits are stratified by the patient's label.
- The test set is frozen: the first run chooses it and writes it to ``data/splits/``; later runs
  read it back and never change its membership, so every model is judged on the same yardstick.
  New patients go to train or validation only; a new item of a test patient is held out (it can
  go neither to test, which is frozen, nor to training, which would leak the patient).
- Until the test set is big enough to judge on (``preprocess.test_set``: items, and cases of
  each class), it is not frozen yet: it keeps growing with new patients, at ``test_fraction`` of
  them, still patient-level and never trained on, and ``test_set.json`` says ``growing`` (promote
  refuses to judge on it). Once big enough it is frozen as version N; raising the minimum in
  params (``medloop testset extend``) grows it again, deliberately, into version N+1.
- Images are resized and contrast-normalised once and written as TFRecord shards of raw uint8
  pixels, which tf.data reads without decoding. An image an earlier night prepared with the same
  size and code is reused (`pipelines.ops.item_cache`); new ones are prepared on the engine
  ``compute`` names (`pipelines.ops.compute`). The shards (``images/<split>-<n>.tfrecord``)
  hold each split's items in record-id order, which starts with the batch id, so a night's new
  items come last; a shard whose items, labels and code are those of last night's shard of the
  same name is hard-linked from last night's output (a persistent DVC output, so DVC need not
  hash it again), the others are written. Either way they are the same bytes as a full
  recompute, published only when complete. Tabular features are imputed and scaled with
  statistics fitted on the training split only; the statistics are saved for serving.

Outputs: ``data/processed/`` (``index.parquet``, ``preprocess.json``, ``images/*.tfrecord`` or
``tabular/*.parquet`` + ``scaler.json``) and ``data/splits/`` (``patients.parquet``,
``frozen_test_set.parquet``; a persistent DVC output, kept between runs).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.config import Params, PreprocessSpec
from pipelines.data import packs
from pipelines.errors import MedloopError
from pipelines.ops.compute import KeptFiles, item_map, staged_directory
from pipelines.ops.item_cache import ItemCache
from pipelines.stage import stage_main
from pipelines.workspace import Layout

log = logging.getLogger("medloop.preprocess")

TRAIN, VALIDATION, TEST, HELD_OUT = "train", "validation", "test", "held_out"
SPLITS = (TRAIN, VALIDATION, TEST)
PATIENTS_FILE = "patients.parquet"
FROZEN_TEST_FILE = "frozen_test_set.parquet"
TEST_SET_FILE = "test_set.json"
GROWING, FROZEN = "growing", "frozen"


@dataclass(frozen=True)
class PreprocessResult:
    counts: dict[str, int]
    frozen_test_set: int
    test_set_created: bool
    output: str


def run(params: Params, layout: Layout) -> PreprocessResult:
    """Split by patient, freeze the test set on first use, and write training-ready data."""
    records = pd.read_parquet(layout.clean_records)
    if records.empty:
        raise MedloopError(f"{layout.clean_records}: no usable records to preprocess")
    spec = params.preprocess
    splits_dir = layout.splits
    splits_dir.mkdir(parents=True, exist_ok=True)
    patients_path, frozen_path = splits_dir / PATIENTS_FILE, splits_dir / FROZEN_TEST_FILE
    state_path = splits_dir / TEST_SET_FILE
    previous = pd.read_parquet(patients_path) if patients_path.exists() else None
    frozen = pd.read_parquet(frozen_path) if frozen_path.exists() else None
    state = json.loads(state_path.read_text()) if state_path.exists() else None
    minimum = test_set_minimum(params)

    created = frozen is None
    growing = created or not big_enough(present_cases(frozen, records, params.model.classes), minimum)
    patients = assign_patients(records, previous, spec, params.model.classes, grow_test=growing)
    if growing:
        frozen = freeze_test_set(records, patients, frozen)
    # A frozen test patient stays a test patient, even after being absent for a while (all
    # their items quarantined in some run): otherwise their new studies could reach training.
    patients.loc[patients["patient_id"].isin(set(frozen["patient_id"])), "split"] = TEST
    # Write, then read back: a later run reads these files, and must see exactly what this run
    # used (same dtypes), or a reproduction from a fresh clone would differ in its bytes.
    _as_text(patients).to_parquet(patients_path, index=False)
    _as_text(frozen).to_parquet(frozen_path, index=False)
    patients, frozen = pd.read_parquet(patients_path), pd.read_parquet(frozen_path)
    items = split_items(records, patients, frozen)
    missing = sorted(set(frozen["record_id"]) - set(items["record_id"]))
    if missing:
        log.warning("%d items of the frozen test set are no longer in data/clean (quarantined since?)", len(missing))
    test_set = test_set_state(frozen, present_cases(frozen, records, params.model.classes), minimum, state)
    state_path.write_text(json.dumps(test_set, indent=2, sort_keys=True) + "\n")

    classes = params.model.classes
    items["label_index"] = items["label"].map({name: i for i, name in enumerate(classes)}).astype("int64")
    with staged_directory(layout.processed) as out:
        if params.model.modality == "image":
            details = _write_image_shards(items, layout, out, params)
        else:
            details = _write_tables(items, out, params)
        counts = {name: int((items["split"] == name).sum()) for name in (*SPLITS, HELD_OUT)}
        summary = {
            "modality": params.model.modality,
            "classes": classes,
            "counts": counts,
            "class_counts": {
                split: {c: int(((items["split"] == split) & (items["label"] == c)).sum()) for c in classes}
                for split in SPLITS
            },
            "patients": {name: int((patients["split"] == name).sum()) for name in SPLITS},
            "frozen_test_set": {"items": len(frozen), "missing_from_clean": len(missing)},
            "test_set": test_set,
            **details,
        }
        (out / "preprocess.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    log.info("preprocess: %s (test set: %s)", counts, describe_test_set(test_set))
    return PreprocessResult(counts, len(frozen), created, str(layout.processed))


# ---------------------------------------------------------------------------------------------
# splitting
# ---------------------------------------------------------------------------------------------


def assign_patients(
    records: pd.DataFrame, previous: pd.DataFrame | None, spec: PreprocessSpec, classes: list[str],
    grow_test: bool | None = None,
) -> pd.DataFrame:
    """Give every patient a split, keeping earlier assignments.

    A patient's stratum is the label of most of their items. While the test set grows (always
    on the first run) new patients are drawn into it: per stratum, those with the smallest keyed
    order hash until the stratum's share of test patients reaches ``test_fraction``. Other
    patients seen for the first time go to validation or train, keeping each stratum's
    validation share at its target.

    Args:
        grow_test: whether new patients may join the test set (default: only on the first run).

    Returns:
        One row per patient: ``patient_id``, ``stratum``, ``split``.
    """
    rank = {name: i for i, name in enumerate(classes)}
    # The label of most of the patient's items; a tie goes to the class listed first.
    counts = (
        records.assign(_rank=records["label"].map(rank))
        .groupby(["patient_id", "_rank"]).size().rename("items").reset_index()
        .sort_values(["patient_id", "items", "_rank"], ascending=[True, False, True], kind="stable")
        .drop_duplicates("patient_id")
    )
    patients = pd.DataFrame({
        "patient_id": counts["patient_id"].astype(str).to_numpy(),
        "stratum": [classes[int(r)] for r in counts["_rank"]],
    })
    patients["order"] = [_order_key(spec.seed, p) for p in patients["patient_id"]]
    patients = patients.sort_values(["stratum", "order"], kind="stable").reset_index(drop=True)
    patients["split"] = pd.NA
    if previous is not None:
        patients = patients.merge(previous[["patient_id", "split"]], on="patient_id", how="left", suffixes=("_new", ""))
        patients = patients.drop(columns=["split_new"])
    grow_test = previous is None if grow_test is None else grow_test
    validation_share = spec.validation_fraction / (1.0 - spec.test_fraction)
    for _, group in patients.groupby("stratum", sort=True):
        new = group.index[group["split"].isna()]
        if grow_test:
            known_test = int((patients.loc[group.index, "split"] == TEST).sum())
            n_test = min(max(_share(len(group), spec.test_fraction) - known_test, 0), len(new))
            patients.loc[new[:n_test], "split"] = TEST
            new = new[n_test:]
        current = patients.loc[group.index, "split"]
        eligible = current[current.fillna("") != TEST]
        known_validation = int((eligible == VALIDATION).sum())
        wanted = _share(len(eligible), validation_share) - known_validation
        n_validation = min(max(wanted, 0), len(new))
        patients.loc[new[:n_validation], "split"] = VALIDATION
        patients.loc[new[n_validation:], "split"] = TRAIN
    patients = patients[["patient_id", "stratum", "split"]]
    if previous is not None:
        # Patients with no usable item this run keep their assignment for when they return.
        absent = previous[~previous["patient_id"].isin(set(patients["patient_id"]))]
        patients = pd.concat([patients, absent[["patient_id", "stratum", "split"]]], ignore_index=True)
    return patients.sort_values("patient_id").reset_index(drop=True)


def freeze_test_set(records: pd.DataFrame, patients: pd.DataFrame,
                    earlier: pd.DataFrame | None = None) -> pd.DataFrame:
    """The test set: every current item of the test patients, with its label now; items of an
    ``earlier`` (growing) test set keep the label and batch they were frozen with."""
    test_patients = set(patients.loc[patients["split"] == TEST, "patient_id"])
    members = records[records["patient_id"].isin(test_patients)]
    if earlier is not None:
        members = members[~members["record_id"].astype(str).isin(set(earlier["record_id"]))]
    added = pd.DataFrame({
        "record_id": members["record_id"].astype(str),
        "patient_id": members["patient_id"].astype(str),
        "label": members["label"].astype(str),
        "frozen_in_batch": members["batch_id"].max() if len(members) else "",
    })
    if earlier is not None:
        added = pd.concat([earlier.astype(str), added], ignore_index=True)
    return added.sort_values("record_id").reset_index(drop=True)


def test_set_minimum(params: Params) -> dict:
    """The smallest test set that may judge a promotion: ``items`` and ``cases_per_class``."""
    spec = params.preprocess.test_set
    cases = spec.min_cases_per_class
    if cases == "auto":
        cases = cases_for_precision(params.promote.min_sensitivity, spec.precision)
    return {"items": spec.min_items, "cases_per_class": cases}


def cases_for_precision(proportion: float, half_width: float, z: float = 1.959964) -> int:
    """The fewest cases whose 95% Wilson interval at ``proportion`` is at most ``2 * half_width``
    wide, i.e. ``half_width`` on each side of the interval's centre (22 cases at a sensitivity
    of 0.85 and 0.15: the interval [0.651, 0.945])."""
    p = min(max(proportion, 0.0), 1.0)
    n = 1
    while True:
        spread = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        if spread <= half_width:
            return n
        n += 1


def present_cases(frozen: pd.DataFrame | None, records: pd.DataFrame, classes: list[str]) -> dict[str, int]:
    """Cases of each class in the test set that are still in data/clean (what evaluate scores)."""
    if frozen is None:
        return {name: 0 for name in classes}
    # As plain objects: pandas' isin on Arrow strings converts each of the archive's ids one by one.
    present = frozen[frozen["record_id"].astype(object).isin(records["record_id"].astype(str).astype(object))]
    return {name: int((present["label"] == name).sum()) for name in classes}


def big_enough(cases: dict[str, int], minimum: dict) -> bool:
    """Whether a test set with these cases may judge a promotion."""
    return (sum(cases.values()) >= minimum["items"]
            and all(count >= minimum["cases_per_class"] for count in cases.values()))


def test_set_state(frozen: pd.DataFrame, cases: dict[str, int], minimum: dict, earlier: dict | None) -> dict:
    """``test_set.json``: growing or frozen, its version, size and the minimum it is held to.

    The version counts the frozen test sets: it goes up each time a set is frozen with other
    members than the last frozen one; while a set grows it names the last frozen version (0
    while the first one grows).
    """
    digest = frozen_membership_sha256(frozen)
    last = earlier or {"version": 0, "status": GROWING, "record_ids_sha256": None}
    # The membership of the last frozen version (older files kept it only while frozen).
    last_frozen = last.get("frozen_record_ids_sha256") or (
        last["record_ids_sha256"] if last["status"] == FROZEN else None)
    if not big_enough(cases, minimum):
        version, status = last["version"], GROWING  # the last frozen version, 0 for none yet
    elif digest == last_frozen:
        version, status = last["version"], FROZEN
    else:
        version, status, last_frozen = last["version"] + 1, FROZEN, digest
    return {"status": status, "version": version, "items": sum(cases.values()), "cases": cases,
            "minimum": minimum, "record_ids_sha256": digest, "frozen_record_ids_sha256": last_frozen}


def frozen_membership_sha256(frozen: pd.DataFrame) -> str:
    """A digest of the test set's record ids (its membership, whatever order)."""
    return hashlib.sha256("\n".join(sorted(frozen["record_id"].astype(str))).encode()).hexdigest()


def describe_test_set(state: dict) -> str:
    """One line, e.g. "frozen v2: 64 items (PNEUMONIA 30, NORMAL 34)" or
    "growing: 14 of 23 PNEUMONIA, 18 of 23 NORMAL, 32 of 50 items"."""
    cases = ", ".join(f"{name} {count}" for name, count in state["cases"].items())
    if state["status"] == FROZEN:
        return f"frozen v{state['version']}: {state['items']} items ({cases})"
    need = state["minimum"]["cases_per_class"]
    parts = [f"{count} of {need} {name}" for name, count in state["cases"].items() if count < need]
    if state["items"] < state["minimum"]["items"]:
        parts.append(f"{state['items']} of {state['minimum']['items']} items")
    return "growing: " + ", ".join(parts)


def split_items(records: pd.DataFrame, patients: pd.DataFrame, frozen: pd.DataFrame) -> pd.DataFrame:
    """Every item's split; test items keep the label they were frozen with."""
    items = records.merge(patients[["patient_id", "split"]], on="patient_id", how="left")
    in_frozen = items["record_id"].isin(set(frozen["record_id"]))
    items.loc[in_frozen, "split"] = TEST
    items.loc[(items["split"] == TEST) & ~in_frozen, "split"] = HELD_OUT
    frozen_labels = frozen.set_index("record_id")["label"]
    items.loc[in_frozen, "label"] = items.loc[in_frozen, "record_id"].map(frozen_labels)
    return items.sort_values("record_id").reset_index(drop=True)


def _as_text(frame: pd.DataFrame) -> pd.DataFrame:
    """Every column as pandas' string dtype, so the file's bytes do not depend on how it was made."""
    return frame.astype({column: "string" for column in frame.columns})


def _share(count: int, fraction: float) -> int:
    """How many of ``count`` make ``fraction``; at least one when the stratum has two or more."""
    if count < 2:
        return 0
    return min(count - 1, max(1, int(round(count * fraction))))


def _order_key(seed: int, patient_id: str) -> str:
    return hashlib.sha256(f"{seed}:{patient_id}".encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# images: resized, normalised, sharded
# ---------------------------------------------------------------------------------------------


def _write_image_shards(items: pd.DataFrame, layout: Layout, out: Path, params: Params) -> dict:
    import tensorflow as tf

    height, width = params.preprocess.image_size
    channels = params.clean.image.channels
    out_dir = out / "images"
    out_dir.mkdir()
    usable = items[items["split"].isin(SPLITS)].reset_index(drop=True)
    paths = usable["image_path"].tolist()  # each cleaned PNG's place in its pack (`pipelines.data.packs`)
    keys = usable["image_sha256"].tolist()  # each cleaned PNG's SHA-256, from clean's records
    labels, record_ids = usable["label_index"].tolist(), usable["record_id"].tolist()

    shard_size = params.preprocess.shard_size
    shards: dict[str, list[str]] = {}
    shard_of = np.empty(len(usable), dtype=object)
    cache = ItemCache.open(layout.state, "preprocess", [sys.modules[__name__]], {"image_size": [height, width]})
    previous = previous_shards(layout.processed, cache.version)
    files = KeptFiles(cache.folder / "kept-shards.json")
    members = shard_members(usable)
    kept, sizes = 0, {}
    with item_map(params.compute, "preprocess") as engine:
        for split in SPLITS:
            positions = np.flatnonzero(usable["split"].to_numpy() == split)
            count = max(1, -(-len(positions) // shard_size))
            shards[split] = []
            for shard in range(count):
                # Items sort by record id, which starts with the batch id: a night's new items
                # come last in their split, and the shards before theirs keep their members.
                name = f"images/{split}-{shard:05d}.tfrecord"
                shards[split].append(name)
                chosen = positions[shard * shard_size : (shard + 1) * shard_size]
                shard_of[chosen] = name
                if (name in previous and previous[name] == members_digest(members[chosen])
                        and files.keep(layout.processed / name, out / name, name)):
                    kept += 1
                else:
                    # One shard's pixels in memory at a time, however large the data set.
                    pixels = _reuse_or_prepare(layout, [paths[p] for p in chosen], [keys[p] for p in chosen],
                                               (height, width), engine, cache)
                    with tf.io.TFRecordWriter(str(out / name)) as writer:
                        for position, image in zip(chosen, pixels):
                            writer.write(_example(image, labels[position], record_ids[position]).SerializeToString())
                sizes[name] = os.path.getsize(out / name)
                files.note(name, out / name)
    files.save()
    log.info("preprocess: images %s; %d of %d shards kept from the last run (same items, labels and code)",
             cache.describe(), kept, sum(len(names) for names in shards.values()))
    usable["shard"] = shard_of
    index = items.merge(usable[["record_id", "shard"]], on="record_id", how="left")
    index.to_parquet(out / "index.parquet", index=False)
    return {
        "image": {"height": height, "width": width, "channels": channels, "dtype": "uint8",
                  "normalisation": "per-image contrast stretch of the 0.5-99.5 percentile range to 0-255"},
        "shards": shards,
        "shard_version": cache.version,
        "shard_bytes": sizes,
        "tfrecord_features": {"image": "bytes (raw uint8, row-major HxWxC)", "label": "int64",
                              "record_id": "bytes"},
    }


def shard_members(items: pd.DataFrame) -> np.ndarray:
    """What decides a shard's bytes, one string per item: record id, label index and the cleaned
    image's SHA-256 (the pixels, given the shard version: the code and the image size)."""
    return (items["record_id"].astype(str) + "\t" + items["label_index"].astype(str) + "\t"
            + items["image_sha256"].astype(str)).to_numpy()


def members_digest(members: np.ndarray) -> str:
    return hashlib.sha256("\n".join(members).encode()).hexdigest()


def previous_shards(processed: Path, version: str) -> dict[str, str]:
    """The shards of the last run's ``data/processed`` (a persistent DVC output) and the digest of
    their members, when written with the same code and image size; else nothing."""
    try:
        summary = json.loads((processed / "preprocess.json").read_text())
        if summary.get("shard_version") != version:
            return {}
        index = pd.read_parquet(processed / "index.parquet", columns=["record_id", "label_index", "image_sha256", "shard"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}
    index = index[index["shard"].notna()]
    members = shard_members(index)
    return {name: members_digest(members[positions]) for name, positions in index.groupby("shard", sort=False).indices.items()}


def _reuse_or_prepare(layout: Layout, paths: list[str], keys: list[str], size: tuple[int, int], engine: Any,
                      cache: ItemCache) -> list[bytes]:
    """`prepare_image` for every cleaned image (its ``image_path``), reusing earlier nights'
    pixels of the same cleaned file (keyed by its bytes' SHA-256, which clean recorded), the same
    size and the same code; the rest are read from their packs here and resized on the engine."""
    pixels: list[bytes | None] = []
    for key in keys:
        hit = cache.get(key)
        pixels.append(None if hit is None else hit[1])
    missing = [position for position, value in enumerate(pixels) if value is None]
    with packs.PackReader(layout.clean) as reader:
        jobs = [(reader.read(paths[position]), *size) for position in missing]
    for position, (png, *_) in zip(missing, jobs):
        if hashlib.sha256(png).hexdigest() != keys[position]:  # pixels cached under a wrong key stay wrong
            raise MedloopError(f"{layout.clean / paths[position]}: not the cleaned image clean recorded (its SHA-256 "
                               "differs from records.parquet's image_sha256); run clean again (`dvc repro clean`)")
    for position, value in zip(missing, engine.map(prepare_image, jobs, chunksize=16)):
        pixels[position] = value
        cache.put(keys[position], {}, value)
    return pixels  # type: ignore[return-value]


def prepare_image(job: tuple) -> bytes:
    """Resize and contrast-normalise one cleaned PNG (its bytes); returns raw uint8 bytes (H x W x C)."""
    from PIL import Image

    png, height, width = job
    with Image.open(io.BytesIO(png)) as image:
        resized = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))
    if resized.ndim == 2:
        resized = resized[:, :, None]
    return normalise_intensity(resized).tobytes()


def normalise_intensity(pixels: np.ndarray) -> np.ndarray:
    """Stretch the 0.5-99.5 percentile range to 0-255 (robust to burned-in labels and borders)."""
    low, high = np.percentile(pixels, [0.5, 99.5])
    if high <= low:
        return pixels.astype(np.uint8)
    stretched = (pixels.astype(np.float32) - low) * (255.0 / (high - low))
    return np.clip(np.rint(stretched), 0, 255).astype(np.uint8)


def _example(pixels: bytes, label: int, record_id: str):
    import tensorflow as tf

    return tf.train.Example(features=tf.train.Features(feature={
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[pixels])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
        "record_id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[str(record_id).encode()])),
    }))


# ---------------------------------------------------------------------------------------------
# tables: imputed and scaled with training statistics
# ---------------------------------------------------------------------------------------------


def _write_tables(items: pd.DataFrame, out: Path, params: Params) -> dict:
    features = list(params.tabular.features)
    train = items.loc[items["split"] == TRAIN, features]
    if train.empty:
        raise MedloopError("preprocess: the training split is empty; collect more data first")
    median = train.median()
    filled = train.fillna(median)
    mean, std = filled.mean(), filled.std(ddof=0).replace(0.0, 1.0)
    scaler = {
        "features": features,
        "impute_median": {k: float(v) for k, v in median.items()},
        "mean": {k: float(v) for k, v in mean.items()},
        "std": {k: float(v) for k, v in std.items()},
        "fitted_on": "train",
        "fitted_rows": int(len(train)),
    }
    (out / "scaler.json").write_text(json.dumps(scaler, indent=2) + "\n")
    out_dir = out / "tabular"
    out_dir.mkdir()
    scaled = ((items[features].fillna(median) - mean) / std).astype("float32")
    keep = ["record_id", "patient_id", "label", "label_index", *params.tabular.subgroups]
    table = pd.concat([items[[c for c in keep if c in items.columns]], scaled], axis=1)
    files = {}
    for split in SPLITS:
        name = f"tabular/{split}.parquet"
        table[items["split"] == split].to_parquet(out / name, index=False)
        files[split] = name
    items.drop(columns=features).to_parquet(out / "index.parquet", index=False)
    return {"tables": files, "scaler": "scaler.json", "features": features}


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        "preprocess", run,
        lambda r: f"preprocess: {r.counts}; frozen test set {r.frozen_test_set} items -> {r.output}", argv,
    )


if __name__ == "__main__":
    sys.exit(main())
