"""Collect and clean of image sources, with every kind of bad image we know of.

Each bad input has an exact outcome: a quarantine row with its reason, or an accepted image
with a note of the conversion. The previous data version always stays intact.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import image_params, load, make_workspace
from pipelines import clean, collect
from pipelines.data import manifest
from pipelines.errors import MedloopError
from pipelines.ops.versioning import dvc, git
from tests_support import chest_dicom, pydicom_test_file

MIN_SIDE = 64


def png(pixels: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def radiograph(seed: int, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(30, 220, size=(size, size), dtype=np.uint8)


def bomb_png(side: int = 30000) -> bytes:
    """A tiny PNG whose header declares side x side pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def write(folder, relative: str, data: bytes):
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def folder_source(tmp_path):
    """A pneumonia-style folder with good images and one of each bad kind."""
    root = tmp_path / "chest_xray"
    good = {f"train/NORMAL/IM-{i:04d}.png": png(radiograph(i)) for i in range(6)}
    good.update({f"train/PNEUMONIA/person{i}_bacteria_{i}.jpeg": jpeg(radiograph(100 + i)) for i in range(6)})
    # A PACS export often lacks ViewPosition: an absent optional tag passes.
    good["test/PNEUMONIA/person77_virus_1.dcm"] = chest_dicom("MR_small.dcm", ViewPosition=None)
    # 12-bit JPEG Extended, which Pillow alone cannot decode.
    good["test/PNEUMONIA/person78_virus_1.dcm"] = chest_dicom("JPGExtended.dcm", ViewPosition="PA")
    # Some modalities write THORAX; the test's params only warn about BodyPartExamined.
    good["train/NORMAL/thorax.dcm"] = chest_dicom("CT_small.dcm", BodyPartExamined="THORAX", ViewPosition="AP")
    for relative, data in good.items():
        write(root, relative, data)
    truncated = jpeg(radiograph(500))
    sixteen_bit = (radiograph(501).astype(np.uint16) * 200)
    rgba = np.dstack([radiograph(502)] * 3 + [np.full((96, 96), 200, np.uint8)])
    bad = {
        "train/NORMAL/empty.jpeg": b"",
        "train/NORMAL/truncated.jpeg": truncated[: len(truncated) // 2],
        "train/NORMAL/notes.png": b"this is a text file, not an image\n",
        "train/NORMAL/plan.dcm": pydicom_test_file("rtplan.dcm"),
        "train/NORMAL/ct.dcm": pydicom_test_file("CT_small.dcm"),
        "train/PNEUMONIA/mr.dcm": pydicom_test_file("MR_small.dcm"),
        "train/NORMAL/lateral.dcm": chest_dicom("MR_small.dcm", ViewPosition="LL"),
        "train/PNEUMONIA/damaged-12-bit.dcm": chest_dicom("JPEG-lossy.dcm", ViewPosition="AP"),
        "train/NORMAL/sixteen.png": png(sixteen_bit),
        "train/NORMAL/rgba.png": png(rgba, mode="RGBA"),
        "train/NORMAL/bomb.png": bomb_png(),
        "train/NORMAL/dot.png": png(np.zeros((1, 1), np.uint8)),
        "train/COVID/case1.png": png(radiograph(503)),
        "train/NORMAL/copy-of-IM-0000.png": good["train/NORMAL/IM-0000.png"],
        "loose-file.png": png(radiograph(504)),
    }
    for relative, data in bad.items():
        write(root, relative, data)
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(png(radiograph(505)))
    os.symlink(secret, root / "train" / "NORMAL" / "escape.png")
    return root


EXPECTED_QUARANTINE = {
    "train/NORMAL/empty.jpeg": "zero-byte file",
    "train/NORMAL/truncated.jpeg": "truncated or corrupt image",
    "train/NORMAL/notes.png": "not an image (unrecognised format, starts with b'this')",
    "train/NORMAL/plan.dcm": "DICOM file has no pixel data",
    "train/NORMAL/ct.dcm": "DICOM Modality is 'CT', not one of CR, DX (clean.image.dicom.tags.Modality)",
    "train/PNEUMONIA/mr.dcm": "DICOM Modality is 'MR', not one of CR, DX (clean.image.dicom.tags.Modality)",
    "train/NORMAL/lateral.dcm": "DICOM ViewPosition is 'LL', not one of PA, AP (clean.image.dicom.tags.ViewPosition)",
    "train/PNEUMONIA/damaged-12-bit.dcm": (
        "cannot decode DICOM pixel data (JPEG Extended (Process 2 and 4), 1.2.840.10008.1.2.4.51): pylibjpeg: "
    ),
    "train/NORMAL/bomb.png": "image of 30000x30000 = 900000000 pixels exceeds the limit of",
    "train/NORMAL/dot.png": f"image of 1x1 is smaller than the minimum side of {MIN_SIDE} pixels",
    "train/COVID/case1.png": "unknown label 'COVID' (expected one of NORMAL, PNEUMONIA",
    "train/NORMAL/escape.png": "path resolves outside the source folder",
    "loose-file.png": "file is not inside a class folder",
}


def test_folder_source_bad_inputs_have_exact_outcomes(tmp_path, folder_source):
    params = image_params(kind="image_folder", path=str(folder_source), patient_id_pattern=r"(person\d+)_")
    params["clean"]["image"]["min_side"] = MIN_SIDE
    params["clean"]["image"]["dicom"]["tags"]["BodyPartExamined"]["on_mismatch"] = "warn"
    layout = make_workspace(tmp_path, params)
    result = collect.run(load(layout), layout)
    assert result.rejected == 4  # zero-byte, text file, link out of the folder, loose file
    outcome = clean.run(load(layout), layout)
    quarantine = pd.read_csv(layout.quarantine_csv, keep_default_na=False).set_index("item")
    for item, reason in EXPECTED_QUARANTINE.items():
        assert quarantine.at[item, "reason"].startswith(reason), (item, quarantine.at[item, "reason"])
    # the copy arrived in the same batch as the original: recorded as a duplicate of it
    copy_reason = quarantine.at["train/NORMAL/copy-of-IM-0000.png", "reason"]
    assert copy_reason in (
        "same file content as train/NORMAL/IM-0000.png in this batch",
        "same file content as train/NORMAL/copy-of-IM-0000.png in this batch",
    ) or "IM-0000" in copy_reason
    assert len(quarantine) == len(EXPECTED_QUARANTINE) + 1
    records = pd.read_parquet(layout.clean_records).set_index("source_ref")
    assert outcome.accepted == len(records) == 15 + 2  # good ones plus the converted 16-bit and RGBA
    assert "16-bit" in records.at["train/NORMAL/sixteen.png", "conversion"]
    assert "alpha" in records.at["train/NORMAL/rgba.png", "conversion"]
    assert set(records["channels"]) == {3}
    assert records.at["test/PNEUMONIA/person77_virus_1.dcm", "label"] == "PNEUMONIA"
    assert records.at["test/PNEUMONIA/person78_virus_1.dcm", "conversion"] == "12-bit rescaled to 8-bit"
    # a rule set to warn keeps the image, and the intake says why
    intake = pd.read_parquet(layout.clean_intake).set_index("record_id")
    assert intake.at[records.at["train/NORMAL/thorax.dcm", "record_id"], "reason"] == (
        "accepted with a DICOM header warning: DICOM BodyPartExamined is 'THORAX', not one of CHEST "
        "(clean.image.dicom.tags.BodyPartExamined)"
    )
    # patients from file names are pseudonymised; the name's number is not kept
    assert records["patient_id"].str.fullmatch(r"pt-[0-9a-f]{16}").all()
    assert not records["patient_id"].str.contains("person").any()
    # every collected item is accounted for
    assert len(pd.read_parquet(layout.clean_intake)) == len(manifest.read(layout))
    # the symlink target was never read into data/
    secret = (tmp_path / "outside" / "secret.png").read_bytes()
    for stored in layout.raw.rglob("*.png"):
        assert stored.read_bytes() != secret


def test_collect_twice_with_nothing_new_changes_nothing(tmp_path, folder_source):
    params = image_params(kind="image_folder", path=str(folder_source))
    layout = make_workspace(tmp_path, params)
    first = collect.run(load(layout), layout)
    dvc_file = layout.raw_record
    before = dvc_file.read_text()
    second = collect.run(load(layout), layout)
    assert first.changed and not second.changed
    assert dvc_file.read_text() == before
    assert second.already_collected == first.stored + first.rejected + first.duplicates
    # new arrivals are appended as a new batch; old batches untouched
    write(folder_source, "train/PNEUMONIA/person900_virus_1.png", png(radiograph(900)))
    old = {p: p.read_bytes() for p in layout.batches.glob("*/**/*") if p.is_file()}  # the batches, not their records
    third = collect.run(load(layout), layout)
    assert third.stored == 1
    assert all(p.read_bytes() == data for p, data in old.items())
    assert dvc_file.read_text() != before


def test_synthetic_source_releases_nights_and_strips_identifiers(tmp_path):
    layout = make_workspace(tmp_path, image_params())
    params = load(layout)
    results = [collect.run(params, layout) for _ in range(4)]
    assert [r.stored for r in results[:3]] == [24, 24, 24]
    assert not results[3].changed
    raw = manifest.read(layout)
    assert set(raw["file_format"]) == {"dicom", "jpeg"}
    assert raw["patient_id"].nunique() < len(raw)  # patients recur across nights
    assert set(raw["label_provenance"]) == {"dataset"}
    outcome = clean.run(params, layout)
    assert outcome.quarantined == 0


def test_the_index_pins_data_raw_for_clean(tmp_path):
    """Clean depends on data/raw/index.json, not on every stored file (dvc.yaml): collect keeps it
    true, clean checks it against the batches and each image it decodes against the manifest."""
    layout = make_workspace(tmp_path, image_params())
    params = load(layout)
    first = collect.run(params, layout)
    index = json.loads(manifest.index_path(layout).read_text())["batches"]
    assert list(index) == [first.batch_id] and set(index[first.batch_id]) == {"manifest.parquet"}
    # DVC records each batch alone, and the index: a night's `dvc add` hashes that night's files.
    assert layout.batch_record(first.batch_id).is_file() and layout.raw_record.is_file()
    # A workspace collected before the index and per-batch records existed (data/raw recorded as
    # one folder): a night with nothing new writes the index and moves the records over.
    dvc(layout, "remove", "--quiet", layout.batch_record(first.batch_id).relative_to(layout.root).as_posix(),
        layout.raw_record.relative_to(layout.root).as_posix())
    manifest.index_path(layout).unlink()
    git(layout, "rm", "-r", "--cached", "--quiet", "data/raw")  # what DVC's autostage put there
    dvc(layout, "add", "--quiet", "data/raw")
    assert layout.raw_folder_record.is_file()
    second = collect.run(params, layout)
    assert second.changed and second.dvc_file == "data/raw/index.json.dvc"
    assert not layout.raw_folder_record.exists()
    assert sorted(path.stem for path in layout.batches.glob("*.dvc")) == [first.batch_id, second.batch_id]
    records = [path.relative_to(layout.root).as_posix() for path in layout.raw.rglob("*.dvc")]
    assert dvc(layout, "status", *records).stdout.strip() == "Data and pipelines are up to date."
    manifest.index_path(layout).unlink()
    again = collect.run(params, layout, night=1)
    assert not again.changed and again.dvc_file == "data/raw/index.json.dvc"
    index = json.loads(manifest.index_path(layout).read_text())["batches"]
    assert list(index) == [first.batch_id, second.batch_id]
    # A batch published but never recorded (collect killed before its `dvc add`) is recorded by
    # the next collect, with that night's batch.
    dvc(layout, "remove", "--quiet", layout.batch_record(second.batch_id).relative_to(layout.root).as_posix())
    third = collect.run(params, layout)
    assert {path.stem for path in layout.batches.glob("*.dvc")} == {first.batch_id, second.batch_id, third.batch_id}
    # A recorded batch that is not checked out (a clone before `dvc pull`): collect refuses, and
    # a refresh leaves the records alone.
    away = tmp_path / "away"
    (layout.batches / third.batch_id).rename(away)
    with pytest.raises(MedloopError, match=r"1 recorded batch\(es\) are not in the workspace .*dvc pull -R data/raw"):
        collect.run(params, layout)
    assert collect.index_batches(layout) is None and layout.batch_record(third.batch_id).is_file()
    away.rename(layout.batches / third.batch_id)
    # A batch changed by hand: a clear error that names it, before anything is written.
    batch_manifest = layout.batches / first.batch_id / "manifest.parquet"
    kept = batch_manifest.read_bytes()
    pd.read_parquet(batch_manifest).head(3).to_parquet(batch_manifest, index=False)
    with pytest.raises(MedloopError, match=rf"batch {first.batch_id} changed since collect indexed it \(manifest.parquet\)"):
        clean.run(params, layout)
    batch_manifest.write_bytes(kept)
    # A stored image changed by hand: quarantined, with the reason, when clean decodes it.
    stored = layout.raw / manifest.read(layout)["record_id"].iloc[0]
    stored.write_bytes(stored.read_bytes() + b"\0")
    outcome = clean.run(params, layout)
    assert outcome.quarantined == 1
    assert "stored file changed since collect" in Path(outcome.quarantine).read_text()


def test_explicit_night_is_collected_once(tmp_path):
    layout = make_workspace(tmp_path, image_params())
    params = load(layout)
    assert collect.run(params, layout, night=2).stored == 24
    assert not collect.run(params, layout, night=2).changed


def test_missing_source_folder_is_a_clear_error(tmp_path):
    from pipelines.errors import SourceError

    layout = make_workspace(tmp_path, image_params(kind="image_folder", path=str(tmp_path / "nowhere")))
    with pytest.raises(SourceError, match="nowhere: folder not found"):
        collect.run(load(layout), layout)


@pytest.mark.integration
def test_s3_prefix_with_vanishing_object_and_traversal_key(tmp_path, s3_bucket, s3_endpoint):
    import boto3

    client, bucket = s3_bucket
    for i in range(4):
        client.put_object(Bucket=bucket, Key=f"exports/cxr/NORMAL/n{i}.png", Body=png(radiograph(i)))
    client.put_object(Bucket=bucket, Key="exports/cxr/PNEUMONIA/p0.dcm", Body=pydicom_test_file("CT_small.dcm"))
    client.put_object(Bucket=bucket, Key="exports/cxr/PNEUMONIA/../../../etc/x.png", Body=png(radiograph(9)))
    client.put_object(Bucket=bucket, Key="exports/cxr/PNEUMONIA/vanishing.png", Body=png(radiograph(10)))
    params = image_params(kind="s3", bucket=bucket, prefix="exports/cxr", endpoint_url=s3_endpoint)
    layout = make_workspace(tmp_path, params)

    # Another actor deletes an object after the listing, while collect is reading the others.
    boto3.setup_default_session()
    deleted = []

    def delete_once(**_):
        if not deleted:
            deleted.append(True)
            client.delete_object(Bucket=bucket, Key="exports/cxr/PNEUMONIA/vanishing.png")

    boto3.DEFAULT_SESSION.events.register("after-call.s3.GetObject", delete_once)
    try:
        result = collect.run(load(layout), layout)
    finally:
        boto3.DEFAULT_SESSION.events.unregister("after-call.s3.GetObject", delete_once)
    assert (result.stored, result.rejected) == (5, 2)
    raw = manifest.read(layout).set_index("source_ref")
    assert raw.at["PNEUMONIA/vanishing.png", "reason"].startswith("object vanished between listing and reading")
    assert "contains '..'" in raw.at["PNEUMONIA/../../../etc/x.png", "reason"]
    assert raw.at["PNEUMONIA/p0.dcm", "status"] == "stored"
    # the vanished object is tried again when it comes back
    client.put_object(Bucket=bucket, Key="exports/cxr/PNEUMONIA/vanishing.png", Body=png(radiograph(10)))
    assert collect.run(load(layout), layout).stored == 1


@pytest.mark.integration
def test_s3_unreachable_endpoint_is_a_clear_error(tmp_path, s3_credentials):
    from conftest import free_port
    from pipelines.errors import SourceError

    params = image_params(kind="s3", bucket="b", prefix="x", endpoint_url=f"http://127.0.0.1:{free_port()}")
    layout = make_workspace(tmp_path, params)
    with pytest.raises(SourceError, match="cannot reach the S3 endpoint"):
        collect.run(load(layout), layout)
