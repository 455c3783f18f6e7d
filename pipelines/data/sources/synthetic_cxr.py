"""Built-in source: seeded SYNTHETIC chest radiographs, released night by night.

Nothing here comes from a patient. The images are drawn with numpy (lung fields, heart,
ribs, spine, noise; pneumonia cases get consolidation opacities), and the headers carry fake
identifiers made up from small built-in lists. The identifiers are there on purpose: DICOM files
get a realistic header (name, MRN, birth date, address, phone, accession number, institution,
plus a private tag), and JPEG files get the name and MRN in a COM comment and in EXIF, so that
the demo and the tests exercise de-identification end to end (`planted_identifiers` lists them).

Night ``k`` depends only on the spec's seed, ``k`` and the spec: asking twice gives
byte-identical files, UIDs and dates included. A pool of fake patients is shared by all nights,
so patients come back for further studies.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import date, timedelta
from io import BytesIO
from typing import Iterator, TypeVar

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
)

from pipelines.config import SyntheticCxrSource
from pipelines.deid.safe_harbor import years_between
from pipelines.data.sources.base import ImageItem, SourceState

NORMAL = "NORMAL"
PNEUMONIA = "PNEUMONIA"

FIRST_NIGHT_DATE = date(2024, 3, 4)
# Share of a patient's studies that keep the patient's usual finding; the rest are drawn afresh
# at the overall prevalence, so that the prevalence stays spec.pneumonia_fraction.
LABEL_STABILITY = 0.85
HOME_SITE_SHARE = 0.9
JPEG_QUALITY = 90
EXIF_IMAGE_DESCRIPTION = 0x010E

# Independent random streams derived from the seed.
PATIENT_POOL_STREAM = 0
NIGHT_STREAM = 1

FAMILY_NAMES = (
    "DOE", "ROE", "SMITH", "JOHNSON", "WILLIAMS", "BROWN", "GARCIA", "MILLER", "DAVIS",
    "MARTINEZ", "LOPEZ", "WILSON", "ANDERSON", "TAYLOR", "THOMAS", "MOORE", "JACKSON", "WHITE",
    "HARRIS", "CLARK", "LEWIS", "WALKER", "HALL", "YOUNG",
)
FEMALE_GIVEN_NAMES = (
    "JANE", "MARY", "LINDA", "SUSAN", "KAREN", "NANCY", "LISA", "MARIA", "ANNA", "EMMA",
    "OLIVIA", "SOFIA", "GRACE", "CLARA", "ROSA", "ELLEN",
)
MALE_GIVEN_NAMES = (
    "JOHN", "JAMES", "ROBERT", "MICHAEL", "DAVID", "RICHARD", "JOSEPH", "CARLOS", "PAUL",
    "MARK", "GEORGE", "HENRY", "PETER", "SAMUEL", "OSCAR", "LEON",
)
STREETS = (
    "Maple Street", "Oak Avenue", "Pine Road", "Cedar Lane", "Elm Street", "Birch Drive",
    "Willow Way", "Lakeview Terrace",
)
TOWNS = (
    ("Springfield", "IL", "62701"),
    ("Riverton", "WY", "82501"),
    ("Fairview", "OR", "97024"),
    ("Greenville", "SC", "29601"),
)
INSTITUTIONS = (
    ("St. Example General Hospital", "100 Hospital Drive, Springfield, IL 62701"),
    ("Example Valley Medical Center", "2 Valley Road, Riverton, WY 82501"),
    ("Northside Example Clinic", "55 North Avenue, Fairview, OR 97024"),
)
REFERRING_PHYSICIANS = (
    "HOUSE^GREGORY^^DR", "QUINN^MICHAELA^^DR", "KILDARE^JAMES^^DR", "GREY^MEREDITH^^DR",
    "WELBY^MARCUS^^DR",
)
PRIVATE_CREATOR = "MEDLOOP SYNTHETIC"
Choice = TypeVar("Choice")
ANATOMY_VARIATIONS = 20  # scalar variations drawn per image (positions, sizes, densities)


class SyntheticCxrSourceReader:
    """Synthetic chest radiographs of fake patients, one batch per night (see module doc).

    Args:
        spec: the source's section of params (seed, nights, sizes, fractions).
    """

    name = "synthetic_cxr"

    def __init__(self, spec: SyntheticCxrSource):
        self.spec = spec

    def items(self, state: SourceState) -> Iterator[ImageItem]:
        """All items of night ``state.nights_released + 1`` (nothing once that exceeds
        ``spec.nights``)."""
        yield from self.night_items(state.nights_released + 1)

    def night_items(self, night: int) -> list[ImageItem]:
        """The items released on ``night`` (1-based); empty beyond ``spec.nights``.

        Bytes are rendered lazily, when an item's ``read`` is called.
        """
        return [
            ImageItem(
                source_ref=study.source_ref,
                label=study.label,
                read=functools.partial(self._file_bytes, study),
                # A JPEG has no header the collector can trust for the patient: the MRN comes
                # with the file, as a name in a folder listing would.
                patient_hint=study.patient.mrn if study.is_jpeg else None,
            )
            for study in self._night_plan(night)
        ]

    def planted_identifiers(self, night: int) -> set[str]:
        """Every fake identifier written into the files of ``night``.

        Names, MRNs, birth dates (YYYYMMDD), addresses, phone numbers, accession numbers,
        institution names and referring physicians: none of them may survive
        de-identification anywhere in the stored bytes.
        """
        planted: set[str] = set()
        for study in self._night_plan(night):
            patient = study.patient
            planted.update({patient.name, patient.mrn, _dicom_date(patient.birth_date)})
            if not study.is_jpeg:
                planted.update(
                    {
                        patient.address,
                        patient.phone,
                        study.accession_number,
                        study.institution,
                        study.institution_address,
                        study.referring_physician,
                    }
                )
        return planted

    @functools.cached_property
    def _patients(self) -> list[_FakePatient]:
        """The fake patient pool, shared by every night."""
        rng = np.random.default_rng([_seed_entropy(self.spec.seed), PATIENT_POOL_STREAM])
        count = self.spec.patients
        mrn_numbers = rng.choice(10**8, size=count, replace=False)
        patients = []
        for index in range(count):
            female = bool(rng.random() < 0.5)
            given = _pick(rng, FEMALE_GIVEN_NAMES if female else MALE_GIVEN_NAMES)
            street, (town, state, zip_code) = _pick(rng, STREETS), _pick(rng, TOWNS)
            # Ages 18 to 97 at the first night, so some fall in the Safe Harbor "90+" band.
            age_days = int(rng.integers(18 * 365, 98 * 365))
            patients.append(
                _FakePatient(
                    number=index + 1,
                    name=f"{_pick(rng, FAMILY_NAMES)}^{given}",
                    sex="F" if female else "M",
                    mrn=f"MRN{int(mrn_numbers[index]):08d}",
                    birth_date=FIRST_NIGHT_DATE - timedelta(days=age_days),
                    address=f"{int(rng.integers(1, 9999))} {street}, {town}, {state} {zip_code}",
                    phone=f"(555) {int(rng.integers(100, 1000))}-{int(rng.integers(0, 10000)):04d}",
                    home_site=int(rng.integers(len(INSTITUTIONS))),
                    usually_pneumonia=bool(rng.random() < self.spec.pneumonia_fraction),
                )
            )
        return patients

    def _night_plan(self, night: int) -> list[_PlannedStudy]:
        """What night ``night`` releases: every random draw except the pixels."""
        if night < 1:
            raise ValueError(f"nights are numbered from 1, got {night}")
        if night > self.spec.nights:
            return []
        spec = self.spec
        rng = np.random.default_rng([_seed_entropy(spec.seed), NIGHT_STREAM, night])
        count = spec.images_per_night
        jpeg_positions = set(rng.permutation(count)[: round(spec.jpeg_fraction * count)].tolist())
        study_date = FIRST_NIGHT_DATE + timedelta(days=night - 1)
        plan = []
        for position in range(count):
            patient = self._patients[int(rng.integers(len(self._patients)))]
            if rng.random() < LABEL_STABILITY:
                pneumonia = patient.usually_pneumonia
            else:
                pneumonia = bool(rng.random() < spec.pneumonia_fraction)
            site = patient.home_site
            if rng.random() >= HOME_SITE_SHARE:
                site = int(rng.integers(len(INSTITUTIONS)))
            is_jpeg = position in jpeg_positions
            label = PNEUMONIA if pneumonia else NORMAL
            extension = "jpeg" if is_jpeg else "dcm"
            seconds = int(rng.integers(0, 24 * 3600))
            plan.append(
                _PlannedStudy(
                    source_ref=(
                        f"night-{night:02d}/{label}/person{patient.number:05d}"
                        f"_study{position + 1:03d}.{extension}"
                    ),
                    label=label,
                    pneumonia=pneumonia,
                    is_jpeg=is_jpeg,
                    patient=patient,
                    study_date=study_date,
                    study_time=f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}",
                    accession_number=f"ACC{int(rng.integers(10**8)):08d}",
                    institution=INSTITUTIONS[site][0],
                    institution_address=INSTITUTIONS[site][1],
                    referring_physician=_pick(rng, REFERRING_PHYSICIANS),
                    modality="DX" if rng.random() < 0.6 else "CR",
                    view="PA" if rng.random() < 0.7 else "AP",
                    study_uid=_random_uid(rng),
                    series_uid=_random_uid(rng),
                    instance_uid=_random_uid(rng),
                    image_seed=int(rng.integers(2**63)),
                    size=spec.image_size,
                )
            )
        return plan

    def _file_bytes(self, study: _PlannedStudy) -> bytes:
        pixels = render_radiograph(
            np.random.default_rng(study.image_seed), study.size, study.pneumonia
        )
        return _jpeg_file(study, pixels) if study.is_jpeg else _dicom_file(study, pixels)


def render_radiograph(rng: np.random.Generator, size: int, pneumonia: bool) -> np.ndarray:
    """Draw one synthetic frontal chest radiograph.

    Dark background; a soft-tissue torso; two darker lung fields with soft edges; a brighter
    mediastinum, heart and spine; rib arcs; pneumonia adds one to three blotchy consolidation
    opacities inside a lung field. Gaussian noise and a slight blur finish it. Vectorised
    numpy throughout (a few milliseconds for 256x256).

    Args:
        rng: the generator all random choices come from (same state, same image).
        size: width and height in pixels.
        pneumonia: whether to draw consolidations.

    Returns:
        A ``uint8`` array of shape ``(size, size)``.
    """
    # Normalised coordinates: x from -1 (image left, patient's right) to 1, y from -1 (top).
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    y, x = axis[:, None], axis[None, :]
    # All small anatomical variations come from one draw (cheaper than many scalar draws).
    variations = iter(rng.uniform(-1.0, 1.0, size=ANATOMY_VARIATIONS).tolist())

    def varied(typical: float, spread: float) -> float:
        return typical + spread * next(variations)

    image = np.full((size, size), varied(0.06, 0.03), dtype=np.float32)
    torso = _soft_ellipse(x, y, varied(0.0, 0.03), 0.15, 0.9, 1.15, edge=0.15)
    image += varied(0.42, 0.05) * torso

    lung_width, lung_height = varied(0.27, 0.03), varied(0.56, 0.05)
    lung_centres = [
        (varied(-0.37, 0.03), varied(-0.08, 0.04)),
        (varied(0.37, 0.03), varied(-0.08, 0.04)),
    ]
    lungs = sum(
        _soft_ellipse(x, y, centre_x, centre_y, lung_width, lung_height, edge=0.5)
        for centre_x, centre_y in lung_centres
    )
    image -= varied(0.26, 0.04) * lungs

    # Posterior ribs: bright bands curving down towards the sides, seen over the lung fields.
    ribs_per_unit = np.float32(2.0 * np.pi * varied(9.0, 1.0) / 1.6)
    ribs = 0.5 + 0.5 * np.cos((y + 0.95 - varied(0.42, 0.05) * x * x) * ribs_per_unit)
    ribs *= ribs  # a high power narrows the bands; repeated squaring is much faster than **
    ribs *= ribs
    image += varied(0.10, 0.02) * ribs * np.minimum(lungs * 1.3, 1.0)

    # Mediastinum down the middle, heart bulging to the patient's left (image right).
    mediastinum = _soft_ellipse(x, y, varied(0.0, 0.02), -0.15, 0.12, 0.62, edge=0.6)
    image += 0.17 * mediastinum
    heart = _soft_ellipse(
        x, y, varied(0.12, 0.04), varied(0.28, 0.04), varied(0.26, 0.03), 0.22, edge=0.6
    )
    image += varied(0.2, 0.04) * heart
    # Spine: separable (a column profile times a vertebral modulation), so it costs one product.
    spine_column = np.exp(-(((x - varied(0.0, 0.01)) / 0.055) ** 2))
    vertebrae = 0.8 + 0.2 * np.cos(y * varied(38.0, 4.0))
    image += 0.12 * spine_column * vertebrae

    if pneumonia:
        image += _consolidations(rng, x, y, lung_centres, lung_width, lung_height) * lungs

    image += rng.standard_normal((size, size), dtype=np.float32) * np.float32(0.025)
    image = _slight_blur(image)
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


@dataclass(frozen=True)
class _FakePatient:
    number: int
    name: str
    sex: str
    mrn: str
    birth_date: date
    address: str
    phone: str
    home_site: int
    usually_pneumonia: bool


@dataclass(frozen=True)
class _PlannedStudy:
    source_ref: str
    label: str
    pneumonia: bool
    is_jpeg: bool
    patient: _FakePatient
    study_date: date
    study_time: str
    accession_number: str
    institution: str
    institution_address: str
    referring_physician: str
    modality: str
    view: str
    study_uid: str
    series_uid: str
    instance_uid: str
    image_seed: int
    size: int


def _consolidations(
    rng: np.random.Generator,
    x: np.ndarray,
    y: np.ndarray,
    lung_centres: list[tuple[float, float]],
    lung_width: float,
    lung_height: float,
) -> np.ndarray:
    """One to three brighter, blotchy patches with soft edges, centred in a lung field.

    The caller multiplies by the lung mask, which keeps the patches inside the lungs.
    """
    # Each patch is a Gaussian times (0.65 + 0.35 * sinusoidal blotches); both factors are
    # separable, so every patch is a sum of two outer products and all patches together are
    # one small matrix product instead of many passes over the image.
    column_x, column_y = x[0], y[:, 0]
    down_factors, across_factors = [], []
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = lung_centres[int(rng.integers(2))]
        # Lower zones more often, as in lobar pneumonia of the lower lobes.
        centre_x = cx + float(rng.uniform(-0.5, 0.5)) * lung_width
        centre_y = cy + float(rng.uniform(-0.4, 0.6)) * lung_height
        radius_x, radius_y = float(rng.uniform(0.09, 0.2)), float(rng.uniform(0.09, 0.22))
        frequency_x, frequency_y = rng.uniform(14.0, 30.0, size=2).tolist()
        phase_x, phase_y = rng.uniform(0.0, 2.0 * np.pi, size=2).tolist()
        strength = float(rng.uniform(0.22, 0.36))

        profile_x = np.exp(-(((column_x - centre_x) / radius_x) ** 2))
        profile_y = np.exp(-(((column_y - centre_y) / radius_y) ** 2)) * strength
        blotches_x = np.sin(frequency_x * column_x + phase_x)
        blotches_y = np.sin(frequency_y * column_y + phase_y)
        down_factors += [0.65 * profile_y, 0.35 * profile_y * blotches_y]
        across_factors += [profile_x, profile_x * blotches_x]
    return np.stack(down_factors, axis=1) @ np.stack(across_factors, axis=0)


def _soft_ellipse(
    x: np.ndarray,
    y: np.ndarray,
    centre_x: float,
    centre_y: float,
    radius_x: float,
    radius_y: float,
    edge: float,
) -> np.ndarray:
    """1 inside the ellipse, 0 outside, with a smooth edge ``edge`` wide (in radius units²).

    A smoothstep of the normalised squared distance. The linear part is separable, so only
    one addition, a clip and the smoothstep run over the whole image: no exp, few passes.
    """
    steepness = np.float32(1.0 / edge)
    across = 0.5 + steepness * (1.0 - ((x - centre_x) * np.float32(1.0 / radius_x)) ** 2)
    down = steepness * ((y - centre_y) * np.float32(1.0 / radius_y)) ** 2
    ramp = across - down
    np.clip(ramp, 0.0, 1.0, out=ramp)
    smooth = ramp * np.float32(-2.0)
    smooth += 3.0
    smooth *= ramp
    smooth *= ramp
    return smooth


def _slight_blur(image: np.ndarray) -> np.ndarray:
    """Separable 1-2-1 binomial blur, edges repeated."""
    padded = np.pad(image, 1, mode="edge")
    rows = padded[:-2, :] + 2.0 * padded[1:-1, :] + padded[2:, :]
    return (rows[:, :-2] + 2.0 * rows[:, 1:-1] + rows[:, 2:]) * np.float32(1.0 / 16.0)


def _dicom_file(study: _PlannedStudy, pixels: np.ndarray) -> bytes:
    """A DX or CR Part-10 file with a realistic, entirely fake header."""
    patient = study.patient
    sop_class = (
        DigitalXRayImageStorageForPresentation
        if study.modality == "DX"
        else ComputedRadiographyImageStorage
    )
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = study.instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SpecificCharacterSet = "ISO_IR 100"
    dataset.ImageType = ["ORIGINAL", "PRIMARY"]
    dataset.SOPClassUID = sop_class
    dataset.SOPInstanceUID = study.instance_uid
    dataset.StudyDate = dataset.SeriesDate = dataset.ContentDate = _dicom_date(study.study_date)
    dataset.StudyTime = dataset.SeriesTime = dataset.ContentTime = study.study_time
    dataset.AccessionNumber = study.accession_number
    dataset.Modality = study.modality
    dataset.Manufacturer = "medloop synthetic"
    dataset.InstitutionName = study.institution
    dataset.InstitutionAddress = study.institution_address
    dataset.ReferringPhysicianName = study.referring_physician
    dataset.StudyDescription = "XR CHEST 1 VIEW"
    dataset.SeriesDescription = f"CHEST {study.view}"
    dataset.PatientName = patient.name
    dataset.PatientID = patient.mrn
    dataset.PatientBirthDate = _dicom_date(patient.birth_date)
    dataset.PatientSex = patient.sex
    dataset.PatientAge = f"{years_between(patient.birth_date, study.study_date):03d}Y"
    dataset.PatientAddress = patient.address
    dataset.PatientTelephoneNumbers = patient.phone
    dataset.BodyPartExamined = "CHEST"
    dataset.ViewPosition = study.view
    dataset.StudyInstanceUID = study.study_uid
    dataset.SeriesInstanceUID = study.series_uid
    dataset.StudyID = study.accession_number[-6:]
    dataset.SeriesNumber = 1
    dataset.InstanceNumber = 1
    dataset.PatientOrientation = ["L", "F"]
    if study.modality == "DX":
        dataset.PresentationIntentType = "FOR PRESENTATION"
    dataset.BurnedInAnnotation = "NO"
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.BitsAllocated = 8
    dataset.BitsStored = 8
    dataset.HighBit = 7
    dataset.PixelRepresentation = 0
    dataset.PixelData = pixels.tobytes()
    # Real modalities copy identifiers into vendor-private tags too; so do we.
    private = dataset.private_block(0x0009, PRIVATE_CREATOR, create=True)
    private.add_new(0x01, "LO", f"{patient.name} {patient.mrn}")

    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _jpeg_file(study: _PlannedStudy, pixels: np.ndarray) -> bytes:
    """A JPEG that carries the patient's name, MRN and birth date in COM and EXIF."""
    patient = study.patient
    exif = Image.Exif()
    exif[EXIF_IMAGE_DESCRIPTION] = f"{patient.name} {patient.mrn}"
    comment = f"Patient {patient.name}, {patient.mrn}, DOB {_dicom_date(patient.birth_date)}"
    buffer = BytesIO()
    Image.fromarray(pixels).save(
        buffer, format="JPEG", quality=JPEG_QUALITY, exif=exif, comment=comment
    )
    return buffer.getvalue()


def _random_uid(rng: np.random.Generator) -> str:
    # 128 random bits under the 2.25 (UUID) root, as many modalities do.
    return f"2.25.{int.from_bytes(rng.bytes(16), 'big')}"


def _pick(rng: np.random.Generator, choices: tuple[Choice, ...]) -> Choice:
    return choices[int(rng.integers(len(choices)))]


def _dicom_date(value: date) -> str:
    return value.strftime("%Y%m%d")


def _seed_entropy(seed: int) -> int:
    # SeedSequence takes non-negative integers only; fold negative seeds onto 64 bits.
    return seed % 2**64
