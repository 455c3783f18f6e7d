"""Planted identifiers never survive: not under data/, reports/, the logs, DVC's cache or output.

Canary identifiers are planted in every kind of source (DICOM headers, JPEG and PNG metadata, CSV
columns, an SQL table, S3 objects, the synthetic generator's fake patients). The whole data half
then runs through DVC, and every byte it wrote is searched for every canary.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from conftest import image_params, load, make_workspace, tabular_params
from tests_support import breast_cancer_frame

CANARIES = {
    "name": "ZZCANARY^PETUNIA",
    "mrn": "MRNCANARY991177",
    "other_id": "OTHERIDCANARY42",
    "birth_date": "19310704",
    "address": "17 Canaryfield Crescent",
    "phone": "555-0199-CANARY",
    "email": "petunia.canary@example.invalid",
    "institution": "Canary Memorial Infirmary",
    "physician": "DRCANARY^ROSALIND",
    "accession": "ACCCANARY5521",
    "private": "PRIVATECANARYTEXT",
}


def needles() -> list[bytes]:
    values = set(CANARIES.values())
    values |= {"PETUNIA", "Canaryfield", "1931-07-04", "CANARY"}
    return sorted({v.encode() for v in values} | {v.lower().encode() for v in values})


def canary_dicom(seed: int) -> bytes:
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = dcmread(get_testdata_file("CT_small.dcm", download=False))
    ds.Modality, ds.BodyPartExamined = "CR", "CHEST"  # clean.image.dicom takes chest radiographs only
    ds.PatientName = CANARIES["name"]
    ds.PatientID = CANARIES["mrn"]
    ds.OtherPatientIDs = CANARIES["other_id"]
    ds.PatientBirthDate = CANARIES["birth_date"]
    ds.PatientAddress = CANARIES["address"]
    ds.PatientTelephoneNumbers = CANARIES["phone"]
    ds.InstitutionName = CANARIES["institution"]
    ds.ReferringPhysicianName = CANARIES["physician"]
    ds.AccessionNumber = CANARIES["accession"]
    ds.StudyDescription = f"follow-up of {CANARIES['name']}"
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.{seed}"
    nested = Dataset()
    nested.ReferencedSOPInstanceUID = "1.2.3.4"
    nested.PerformingPhysicianName = CANARIES["physician"]
    ds.ReferencedStudySequence = Sequence([nested])
    block = ds.private_block(0x0011, "CANARY VENDOR", create=True)
    block.add_new(0x01, "LO", CANARIES["private"])
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def canary_jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(30, 220, (96, 96), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x010E] = f"{CANARIES['name']} {CANARIES['mrn']}"  # ImageDescription
    exif[0x013B] = CANARIES["physician"]  # Artist
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", exif=exif, comment=CANARIES["email"].encode())
    return buffer.getvalue()


def canary_png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(30, 220, (96, 96), dtype=np.uint8)
    info = PngInfo()
    info.add_text("Patient", CANARIES["name"])
    info.add_itxt("Address", CANARIES["address"], zip=True)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def canary_table(n: int = 60):
    rows = breast_cancer_frame(n)
    rows.loc[::3, "patient_name"] = CANARIES["name"]
    rows.loc[::3, "mrn"] = CANARIES["mrn"]
    rows.loc[::3, "birth_date"] = "1931-07-04"
    rows.loc[::3, "phone"] = CANARIES["phone"]
    rows.loc[::3, "email"] = CANARIES["email"]
    rows.loc[::3, "address"] = CANARIES["address"]
    return rows


def image_folder(root: Path) -> Path:
    for i in range(8):
        label = "PNEUMONIA" if i % 2 else "NORMAL"
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / f"study{i}.dcm").write_bytes(canary_dicom(i))
        (root / label / f"photo{i}.jpeg").write_bytes(canary_jpeg(i))
        (root / label / f"scan{i}.png").write_bytes(canary_png(i))
    return root


def run_data_half(layout) -> str:
    """collect, then the DVC stages, as a user would; returns everything they printed."""
    from pipelines.ops.versioning import tool_env

    env = tool_env()  # as a user with the virtual environment activated
    collected = subprocess.run(
        [sys.executable, "-m", "pipelines.collect"], cwd=layout.root, capture_output=True, text=True, env=env
    )
    assert collected.returncode == 0, collected.stderr
    repro = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "preprocess"], cwd=layout.root, capture_output=True, text=True,
        env=env,
    )
    assert repro.returncode == 0, repro.stdout + repro.stderr
    return collected.stdout + collected.stderr + repro.stdout + repro.stderr


def assert_no_canary_anywhere(layout, output: str, at_least: dict[str, int],
                              extra: set[bytes] = frozenset()) -> dict[str, int]:
    """Every file under data/, reports/, the logs and DVC's cache, and the output, searched for
    every needle; each folder must hold at least ``at_least[its name]`` files (a search of
    nothing would pass).

    Returns:
        How many files were searched in each folder (by its name).
    """
    searched: dict[str, int] = {}
    roots = [layout.root / "data", layout.root / "reports", layout.logs, layout.root / ".dvc" / "cache"]
    for root in roots:
        assert root.exists(), root
        searched[root.name] = 0
        for path in root.rglob("*"):
            if path.is_file():
                content = path.read_bytes()
                searched[root.name] += 1
                for needle in [*needles(), *extra]:
                    assert needle not in content, f"{needle!r} survived in {path}"
        assert searched[root.name] >= at_least[root.name], (
            f"{searched[root.name]} files under {root}, expected at least {at_least[root.name]}")
    lowered = output.lower()
    assert len(lowered) > 0, "the stages printed nothing: nothing to search"
    for needle in [*needles(), *extra]:
        assert needle.decode().lower() not in lowered, f"{needle!r} in the output"
    return searched


def lenient(params: dict) -> dict:
    params["validate"].update(min_new_items=1, min_total_items=1, max_quarantined_fraction=1.0)
    params["validate"]["class_fraction"] = {"min": 0.0, "max": 1.0}
    if params["validate"].get("image"):
        params["validate"]["image"]["mean_intensity"] = {"min": 0, "max": 255}
        params["validate"]["image"]["std_intensity"] = {"min": 0}
    params["preprocess"]["test_fraction"] = 0.25
    return params


@pytest.mark.slow
def test_canaries_from_an_image_folder(tmp_path):
    source = image_folder(tmp_path / "export")
    params = lenient(image_params(kind="image_folder", path=str(source)))
    layout = make_workspace(tmp_path, params)
    output = run_data_half(layout)
    assert_no_canary_anywhere(layout, output, at_least={"data": 35, "reports": 20, "logs": 1, "cache": 35})
    import pandas as pd

    records = pd.read_parquet(layout.clean_records)
    quarantine = pd.read_csv(layout.quarantine_csv)
    # the eight DICOMs share CT_small's pixels: one is kept, seven are quarantined as duplicates
    assert len(records) == 17 and len(quarantine) == 7
    assert quarantine["reason"].str.startswith("duplicate image: same pixels as").all()


# a table's data half: the raw and clean tables, the processed splits and scaler, their cache copies
TABLE_FILES = {"data": 12, "reports": 20, "logs": 1, "cache": 15}


@pytest.mark.slow
def test_canaries_from_csv_and_sql(tmp_path):
    import sqlalchemy as sa

    rows = canary_table()
    csv = tmp_path / "export.csv"
    rows.to_csv(csv, index=False)
    layout = make_workspace(tmp_path, lenient(tabular_params(kind="csv", path=str(csv))), name="csv")
    assert_no_canary_anywhere(layout, run_data_half(layout), TABLE_FILES)

    url = f"sqlite:///{tmp_path / 'clinic.db'}"
    engine = sa.create_engine(url)
    rows.to_sql("exams", engine, index=False)
    engine.dispose()
    layout = make_workspace(tmp_path, lenient(tabular_params(kind="sql", url=url, table="exams")), name="sql")
    assert_no_canary_anywhere(layout, run_data_half(layout), TABLE_FILES)


@pytest.mark.slow
@pytest.mark.integration
def test_canaries_from_s3(tmp_path, s3_bucket, s3_endpoint, monkeypatch):
    client, bucket = s3_bucket
    for i in range(6):
        label = "PNEUMONIA" if i % 2 else "NORMAL"
        client.put_object(Bucket=bucket, Key=f"pacs/{label}/s{i}.dcm", Body=canary_dicom(100 + i))
        client.put_object(Bucket=bucket, Key=f"pacs/{label}/p{i}.jpeg", Body=canary_jpeg(100 + i))
    params = lenient(image_params(kind="s3", bucket=bucket, prefix="pacs", endpoint_url=s3_endpoint))
    layout = make_workspace(tmp_path, params)
    assert_no_canary_anywhere(layout, run_data_half(layout),
                              at_least={"data": 30, "reports": 20, "logs": 1, "cache": 30})


@pytest.mark.slow
def test_synthetic_source_fake_identifiers_never_survive(tmp_path):
    from pipelines.data.sources.synthetic_cxr import SyntheticCxrSourceReader

    params = lenient(image_params())
    layout = make_workspace(tmp_path, params)
    planted = SyntheticCxrSourceReader(load(layout).source).planted_identifiers(1)
    assert len(planted) > 20
    output = run_data_half(layout)
    assert_no_canary_anywhere(layout, output, at_least={"data": 35, "reports": 20, "logs": 1, "cache": 35},
                              extra={p.encode() for p in planted if len(p) >= 6})


def assert_secrets_nowhere(root: Path, secrets: list[str]) -> int:
    """No secret value in any file under ``root`` (SQLite stores, MLflow artifacts, reports, logs,
    DVC's cache) nor in any git revision of it; returns how many files were searched."""
    searched = 0
    for path in root.rglob("*"):
        if path.is_file() and ".git" not in path.relative_to(root).parts:
            content = path.read_bytes()
            searched += 1
            for secret in secrets:
                assert secret.encode() not in content, f"a secret is written in {path}"
    revisions = subprocess.run(["git", "rev-list", "--all"], cwd=root, capture_output=True, text=True).stdout.split()
    assert revisions
    for secret in secrets:
        found = subprocess.run(["git", "grep", "-F", "-l", "-e", secret, *revisions], cwd=root, capture_output=True, text=True)
        assert found.returncode == 1 and not found.stdout, f"a secret is committed: {found.stdout[:200]}"
    return searched


def test_secrets_never_reach_a_file_mlflow_or_git(served_workspace):
    """The trained and served workspace (the session's): its de-identification salt and the
    service's bearer tokens are in no file it wrote (MLflow's store and artifacts, reports, logs,
    the feedback store, the token table holds hashes) and in no commit."""
    from conftest import SALT

    root = served_workspace["layout"].root
    assert assert_secrets_nowhere(root, [SALT, *served_workspace["tokens"].values()]) > 20
