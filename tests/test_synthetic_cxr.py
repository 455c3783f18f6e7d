"""The synthetic chest radiograph source: seeded, night by night, with planted identifiers."""

from __future__ import annotations

import io
import re

import numpy as np
import pydicom
import pytest
from PIL import Image

from pipelines.config import SyntheticCxrSource
from pipelines.data.sources.base import SourceState
from pipelines.data.sources.synthetic_cxr import SyntheticCxrSourceReader, render_radiograph

EXIF_IMAGE_DESCRIPTION = 0x010E
SOURCE_REF = re.compile(r"^night-(\d{2})/(NORMAL|PNEUMONIA)/person(\d{5})_study(\d{3})\.(dcm|jpeg)$")


def _spec(**changes) -> SyntheticCxrSource:
    values = dict(
        kind="synthetic_cxr", seed=11, nights=3, images_per_night=12, patients=6,
        image_size=48, pneumonia_fraction=0.5, jpeg_fraction=0.25,
    )
    values.update(changes)
    return SyntheticCxrSource(**values)


def _snapshot(reader: SyntheticCxrSourceReader, night: int) -> list[tuple]:
    return [
        (item.source_ref, item.label, item.patient_hint, item.read())
        for item in reader.night_items(night)
    ]


def test_same_spec_gives_byte_identical_nights():
    first = _snapshot(SyntheticCxrSourceReader(_spec()), 1)
    second = _snapshot(SyntheticCxrSourceReader(_spec()), 1)
    assert first == second
    reader = SyntheticCxrSourceReader(_spec())
    item = reader.night_items(2)[0]
    assert item.read() == item.read()


def test_nights_differ_and_seeds_differ():
    reader = SyntheticCxrSourceReader(_spec())
    night_one, night_two = _snapshot(reader, 1), _snapshot(reader, 2)
    assert {ref for ref, *_ in night_one}.isdisjoint({ref for ref, *_ in night_two})
    assert {data for *_, data in night_one}.isdisjoint({data for *_, data in night_two})
    other_seed = _snapshot(SyntheticCxrSourceReader(_spec(seed=12)), 1)
    assert [data for *_, data in other_seed] != [data for *_, data in night_one]


def test_items_follow_the_released_nights():
    reader = SyntheticCxrSourceReader(_spec())
    refs = lambda items: [item.source_ref for item in items]  # noqa: E731
    assert refs(reader.items(SourceState())) == refs(reader.night_items(1))
    assert refs(reader.items(SourceState(nights_released=2))) == refs(reader.night_items(3))
    assert list(reader.items(SourceState(nights_released=3))) == []
    assert reader.night_items(4) == []
    assert reader.planted_identifiers(4) == set()


def test_items_are_named_labelled_and_mixed_as_specified():
    reader = SyntheticCxrSourceReader(_spec())
    items = reader.night_items(1)
    assert len(items) == 12
    for item in items:
        match = SOURCE_REF.match(item.source_ref)
        assert match, item.source_ref
        assert match.group(1) == "01" and match.group(2) == item.label
        if match.group(5) == "jpeg":
            assert re.fullmatch(r"MRN\d{8}", item.patient_hint)
        else:
            assert item.patient_hint is None
    assert sum(item.source_ref.endswith(".jpeg") for item in items) == 3  # 25% of 12
    assert len({item.source_ref for item in items}) == 12


def test_dicom_files_have_a_realistic_fake_header():
    reader = SyntheticCxrSourceReader(_spec())
    planted = reader.planted_identifiers(1)
    dicom_items = [item for item in reader.night_items(1) if item.source_ref.endswith(".dcm")]
    assert dicom_items
    for item in dicom_items:
        dataset = pydicom.dcmread(io.BytesIO(item.read()))
        assert dataset.Modality in ("DX", "CR")
        assert dataset.ViewPosition in ("PA", "AP")
        assert dataset.BodyPartExamined == "CHEST"
        assert dataset.PhotometricInterpretation == "MONOCHROME2"
        assert dataset.BitsAllocated == 8
        assert dataset.pixel_array.shape == (48, 48)
        assert re.fullmatch(r"MRN\d{8}", dataset.PatientID)
        assert re.fullmatch(r"\d{3}Y", dataset.PatientAge)
        assert dataset.PatientSex in ("F", "M")
        assert dataset.StudyDate == "20240304"  # night 1
        for keyword in (
            "PatientName", "PatientID", "PatientBirthDate", "PatientAddress",
            "PatientTelephoneNumbers", "AccessionNumber", "InstitutionName",
            "ReferringPhysicianName",
        ):
            assert str(dataset.data_element(keyword).value) in planted, keyword
        assert dataset.file_meta.MediaStorageSOPInstanceUID == dataset.SOPInstanceUID
        assert any(element.tag.is_private for element in dataset)


def test_jpeg_files_carry_planted_metadata():
    reader = SyntheticCxrSourceReader(_spec())
    planted = reader.planted_identifiers(1)
    jpeg_items = [item for item in reader.night_items(1) if item.source_ref.endswith(".jpeg")]
    assert len(jpeg_items) == 3
    for item in jpeg_items:
        data = item.read()
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "JPEG" and image.size == (48, 48) and image.mode == "L"
            comment = image.info["comment"].decode()
            description = image.getexif()[EXIF_IMAGE_DESCRIPTION]
        assert item.patient_hint in comment and item.patient_hint in description
        name = description.split(" ")[0]
        assert name in planted and name in comment
        assert data.count(item.patient_hint.encode()) >= 2


def test_patients_recur_across_nights_with_the_same_identity():
    reader = SyntheticCxrSourceReader(_spec())
    identity_of: dict[str, set[str]] = {}
    people_by_night = []
    for night in (1, 2, 3):
        people = set()
        for item in reader.night_items(night):
            person = SOURCE_REF.match(item.source_ref).group(3)
            people.add(person)
            if item.patient_hint is None:
                patient_id = pydicom.dcmread(io.BytesIO(item.read())).PatientID
            else:
                patient_id = item.patient_hint
            identity_of.setdefault(person, set()).add(patient_id)
        people_by_night.append(people)
    assert people_by_night[0] & people_by_night[1]
    assert all(len(ids) == 1 for ids in identity_of.values())
    assert len(set().union(*identity_of.values())) == len(identity_of)


def test_labels_follow_the_pneumonia_fraction():
    for fraction in (0.2, 0.7):
        reader = SyntheticCxrSourceReader(
            _spec(images_per_night=600, patients=200, pneumonia_fraction=fraction)
        )
        labels = [item.label for item in reader.night_items(1)]
        share = labels.count("PNEUMONIA") / len(labels)
        assert abs(share - fraction) < 0.1


def test_pneumonia_brightens_the_lung_fields():
    size = 96
    lung_rows = slice(int(0.3 * size), int(0.65 * size))
    lung_columns = np.r_[int(0.15 * size) : int(0.3 * size), int(0.7 * size) : int(0.85 * size)]

    def lung_mean(seed: int, pneumonia: bool) -> float:
        image = render_radiograph(np.random.default_rng(seed), size, pneumonia)
        return float(image[lung_rows][:, lung_columns].mean())

    normal = np.array([lung_mean(seed, False) for seed in range(24)])
    pneumonia = np.array([lung_mean(seed, True) for seed in range(24)])
    # Same seeds, so the anatomy is the same: the consolidations alone make the difference
    # (the noise differs, hence a paired test rather than an exact comparison).
    difference = pneumonia - normal
    assert (difference > -1.0).all()
    assert difference.mean() > 3 * difference.std() / np.sqrt(len(difference))
    assert difference.mean() > 2.0  # grey levels, over the whole lung window


def test_render_radiograph_is_a_deterministic_grayscale_image():
    image = render_radiograph(np.random.default_rng(3), 64, False)
    assert image.dtype == np.uint8 and image.shape == (64, 64)
    assert np.array_equal(image, render_radiograph(np.random.default_rng(3), 64, False))
    assert not np.array_equal(image, render_radiograph(np.random.default_rng(4), 64, False))
    # Lungs darker than the mediastinum, background darkest.
    assert image[5, 5] < image[28, 20] < image[28, 32]


@pytest.mark.parametrize("seed", [-5, 2**70])
def test_any_integer_seed_works(seed):
    reader = SyntheticCxrSourceReader(_spec(seed=seed, images_per_night=2))
    assert len(reader.night_items(1)) == 2
