"""DICOM de-identification (PS3.15 Annex E Basic Profile): identifiers go, pixels stay."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.datadict import keyword_dict
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from pipelines.config import SyntheticCxrSource
from pipelines.deid import keys
from pipelines.deid.dicom import PROFILE_ACTIONS, DicomDeidResult, deidentify_dicom
from pipelines.errors import DeidentificationError
from pipelines.data.sources.synthetic_cxr import SyntheticCxrSourceReader

SALT = b"test-salt-0123456789abcdef-not-secret"
OTHER_SALT = b"another-salt-0123456789abcdef-xyz"
STUDY_UID = "1.2.826.0.1.3680043.99.7.1"
SERIES_UID = "1.2.826.0.1.3680043.99.7.2"
FRAME_OF_REFERENCE_UID = "1.2.826.0.1.3680043.99.7.3"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"

# Every string below is planted somewhere in the test file; none may be found in the output.
PLANTED = {
    "patient name": "ZEBRAFISH^QUENTINA",
    "patient id": "MRN-TEST-4417",
    "other patient id": "ALT-ID-9921",
    "other ids sequence": "SEQ-ID-5521",
    "other patient name": "OLDNAME^QUENTINA",
    "birth date": "19470312",
    "address": "42 Canary Lane, Testville",
    "phone": "555-0199-42",
    "mother": "MOTHERLY^MAIDEN",
    "military rank": "CAPTAIN-CANARY",
    "occupation": "KEEPER-CANARY",
    "history": "HISTORY-CANARY smoker",
    "comments": "COMMENT-CANARY patient",
    "record locator": "LOCATOR-CANARY",
    "institution": "Canary Memorial Hospital",
    "institution address": "1 Canary Road",
    "department": "CANARY-RADIOLOGY",
    "referring": "REFDOC^ALPHA",
    "referring address": "9 Referrer Street",
    "performing": "PERFDOC^BETA",
    "operator": "OPERATOR^GAMMA",
    "physician of record": "RECORDDOC^DELTA",
    "reader": "READERDOC^EPSILON",
    "requesting": "REQDOC^ZETA",
    "accession": "ACCX778899",
    "study id": "STUDYX42",
    "station": "CANARYSTATION",
    "device serial": "SN-CANARY-77",
    "study description": "CANARY STUDY DESC",
    "series description": "CANARY SERIES DESC",
    "requested procedure": "REQPROC-5511",
    "scheduled step": "SPS-5512",
    "performed step": "PPS-5513",
    "issuer": "ISSUER-CANARY",
    "responsible": "RESPONSIBLE^OMEGA",
    "responsible organization": "CANARY ORGANIZATION",
    "study date": "20230415",
    "content date": "20230416",
    "acquisition datetime": "20230415101010",
    "nested name": "NESTED^PERSON",
    "nested date": "19990909",
    "referenced patient": "REFPATIENT^SIGMA",
    "private top level": "PRIVATE-CANARY-TOP",
    "private nested": "PRIVATE-CANARY-NESTED",
    "overlay": "OVERLAY-CANARY",
    "study uid": STUDY_UID,
    "series uid": SERIES_UID,
    "frame of reference uid": FRAME_OF_REFERENCE_UID,
    "sop instance uid": "1.2.826.0.1.3680043.99.7.4.1",
}


def _item(**attributes) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _planted_file(
    sop_instance_uid: str = PLANTED["sop instance uid"],
    referenced_uid: str | None = None,
    **overrides,
) -> bytes:
    """A small Secondary Capture image full of identifiers, nested and private ones too."""
    dataset = Dataset()
    dataset.SpecificCharacterSet = "ISO_IR 100"
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = sop_instance_uid
    dataset.StudyInstanceUID = STUDY_UID
    dataset.SeriesInstanceUID = SERIES_UID
    dataset.FrameOfReferenceUID = FRAME_OF_REFERENCE_UID
    dataset.Modality = "OT"
    dataset.PatientName = PLANTED["patient name"]
    dataset.PatientID = PLANTED["patient id"]
    dataset.IssuerOfPatientID = PLANTED["issuer"]
    dataset.OtherPatientIDs = PLANTED["other patient id"]
    dataset.OtherPatientIDsSequence = Sequence([_item(PatientID=PLANTED["other ids sequence"])])
    dataset.OtherPatientNames = PLANTED["other patient name"]
    dataset.PatientBirthDate = PLANTED["birth date"]
    dataset.PatientSex = "F"
    dataset.PatientAge = "076Y"
    dataset.PatientAddress = PLANTED["address"]
    dataset.PatientTelephoneNumbers = PLANTED["phone"]
    dataset.PatientMotherBirthName = PLANTED["mother"]
    dataset.MilitaryRank = PLANTED["military rank"]
    dataset.Occupation = PLANTED["occupation"]
    dataset.AdditionalPatientHistory = PLANTED["history"]
    dataset.PatientComments = PLANTED["comments"]
    dataset.MedicalRecordLocator = PLANTED["record locator"]
    dataset.ResponsiblePerson = PLANTED["responsible"]
    dataset.ResponsibleOrganization = PLANTED["responsible organization"]
    dataset.PatientSize = "1.62"
    dataset.PatientWeight = "58"
    dataset.InstitutionName = PLANTED["institution"]
    dataset.InstitutionAddress = PLANTED["institution address"]
    dataset.InstitutionalDepartmentName = PLANTED["department"]
    dataset.ReferringPhysicianName = PLANTED["referring"]
    dataset.ReferringPhysicianAddress = PLANTED["referring address"]
    dataset.PerformingPhysicianName = PLANTED["performing"]
    dataset.OperatorsName = PLANTED["operator"]
    dataset.PhysiciansOfRecord = PLANTED["physician of record"]
    dataset.NameOfPhysiciansReadingStudy = PLANTED["reader"]
    dataset.RequestingPhysician = PLANTED["requesting"]
    dataset.AccessionNumber = PLANTED["accession"]
    dataset.StudyID = PLANTED["study id"]
    dataset.StationName = PLANTED["station"]
    dataset.DeviceSerialNumber = PLANTED["device serial"]
    dataset.StudyDescription = PLANTED["study description"]
    dataset.SeriesDescription = PLANTED["series description"]
    dataset.StudyDate = PLANTED["study date"]
    dataset.StudyTime = "101010"
    dataset.ContentDate = PLANTED["content date"]
    dataset.AcquisitionDateTime = PLANTED["acquisition datetime"]
    dataset.ViewPosition = "PA"
    dataset.BurnedInAnnotation = "NO"
    dataset.RequestAttributesSequence = Sequence(
        [
            _item(
                RequestedProcedureID=PLANTED["requested procedure"],
                ScheduledProcedureStepID=PLANTED["scheduled step"],
            )
        ]
    )
    dataset.PerformedProcedureStepID = PLANTED["performed step"]
    dataset.ReferencedPatientSequence = Sequence(
        [_item(PatientName=PLANTED["referenced patient"])]
    )
    # A kept sequence whose item hides a name, a date and a private tag: only the generic
    # safety nets can find those.
    reference = _item(
        ReferencedSOPClassUID=SecondaryCaptureImageStorage,
        ReferencedSOPInstanceUID=referenced_uid or "1.2.826.0.1.3680043.99.7.4.99",
        ContentCreatorName=PLANTED["nested name"],
        InstanceCreationDate=PLANTED["nested date"],
        VerifyingObserverName=PLANTED["nested name"],
    )
    reference.add_new(0x00091010, "LO", PLANTED["private nested"])
    dataset.SourceImageSequence = Sequence([reference])
    dataset.add_new(0x00090010, "LO", "CANARY VENDOR")
    dataset.add_new(0x00091001, "LO", PLANTED["private top level"])
    dataset.add_new(0x60003000, "OB", PLANTED["overlay"].encode().ljust(16, b"\x00"))
    dataset.add_new(0x60000010, "US", 4)
    dataset.add_new(0x60000011, "US", 4)

    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.Rows = dataset.Columns = 16
    dataset.BitsAllocated = dataset.BitsStored = 8
    dataset.HighBit = 7
    dataset.PixelRepresentation = 0
    dataset.PixelData = np.random.default_rng(5).integers(0, 256, (16, 16), np.uint8).tobytes()
    for keyword, value in overrides.items():
        if value is None:
            delattr(dataset, keyword)
        else:
            setattr(dataset, keyword, value)
    return _part10(dataset)


def _part10(dataset: Dataset) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta = meta
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _read(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def test_every_planted_identifier_is_gone():
    original = _planted_file()
    for value in PLANTED.values():
        assert value.encode() in original, f"test setup: {value!r} was not planted"

    result = deidentify_dicom(original, SALT)

    survivors = [name for name, value in PLANTED.items() if value.encode() in result.data]
    assert survivors == []
    output = _read(result.data)
    private_tags = []
    output.walk(lambda _, element: private_tags.append(element.tag) if element.tag.is_private else None)
    assert private_tags == []
    assert not any(element.tag.group & 0xFF00 == 0x6000 for element in output)
    # The kept sequence is still there, with its nested names and dates emptied.
    reference = output.SourceImageSequence[0]
    assert reference.ContentCreatorName == ""
    assert "InstanceCreationDate" not in reference


def test_header_records_the_deidentification():
    result = deidentify_dicom(_planted_file(), SALT)
    output = _read(result.data)

    pseudonym = keys.pseudonym(SALT, PLANTED["patient id"])
    assert output.PatientIdentityRemoved == "YES"
    assert output.PatientID == pseudonym
    assert str(output.PatientName) == pseudonym
    assert "Annex E" in " ".join(output.DeidentificationMethod)
    assert all(len(value) <= 64 for value in output.DeidentificationMethod)  # LO limit
    code = output.DeidentificationMethodCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("113100", "DCM")
    assert code.CodeMeaning == "Basic Application Confidentiality Profile"
    assert output.BurnedInAnnotation == "NO"  # kept as it was
    assert output.StudyDate == "" and output.AccessionNumber == ""
    assert "PatientAge" not in output and "InstitutionName" not in output


def test_characteristics_are_read_before_removal():
    result = deidentify_dicom(_planted_file(), SALT)

    assert isinstance(result, DicomDeidResult)
    assert result.patient_id == keys.pseudonym(SALT, PLANTED["patient id"])
    assert result.study_year == 2023
    assert result.sex == "F"
    assert result.age_band == "70-79"
    assert result.view == "PA"
    assert result.site == keys.pseudonym(SALT, PLANTED["institution"], prefix="site")
    assert result.has_pixel_data is True


def test_age_band_falls_back_to_birth_date_and_dates_to_other_dates():
    data = _planted_file(
        PatientAge=None, PatientBirthDate="19300601", StudyDate=None, ContentDate="20230101"
    )
    result = deidentify_dicom(data, SALT)
    assert result.age_band == "90+"  # 92 at the study
    assert result.study_year == 2023


def test_missing_characteristics_are_none():
    data = _planted_file(
        PatientID=None, PatientSex=None, PatientAge=None, PatientBirthDate=None,
        ViewPosition=None, InstitutionName=None, StudyDate=None, ContentDate=None,
        AcquisitionDateTime=None,
    )
    result = deidentify_dicom(data, SALT)
    assert (result.patient_id, result.sex, result.age_band) == (None, None, None)
    assert (result.view, result.site, result.study_year) == (None, None, None)
    assert _read(result.data).PatientID == ""


def test_pixel_data_is_kept_bit_for_bit():
    original = _planted_file()
    result = deidentify_dicom(original, SALT)
    assert _read(result.data).PixelData == _read(original).PixelData


def test_output_is_deterministic():
    original = _planted_file()
    assert deidentify_dicom(original, SALT).data == deidentify_dicom(original, SALT).data


def test_uids_are_remapped_consistently_within_a_study():
    first = _planted_file(sop_instance_uid="1.2.826.0.1.3680043.99.7.4.1")
    second = _planted_file(
        sop_instance_uid="1.2.826.0.1.3680043.99.7.4.2",
        referenced_uid="1.2.826.0.1.3680043.99.7.4.1",  # points at the first image
    )
    out_first = _read(deidentify_dicom(first, SALT).data)
    out_second = _read(deidentify_dicom(second, SALT).data)

    assert out_first.StudyInstanceUID == out_second.StudyInstanceUID != STUDY_UID
    assert out_first.SeriesInstanceUID == out_second.SeriesInstanceUID != SERIES_UID
    assert out_first.SOPInstanceUID != out_second.SOPInstanceUID
    assert out_second.SourceImageSequence[0].ReferencedSOPInstanceUID == out_first.SOPInstanceUID
    for output in (out_first, out_second):
        assert output.file_meta.MediaStorageSOPInstanceUID == output.SOPInstanceUID
        assert output.StudyInstanceUID.startswith("2.25.")
        assert len(output.StudyInstanceUID) <= 64
        # Registered UIDs say what the object is, not whose: they stay.
        assert output.SOPClassUID == SecondaryCaptureImageStorage
        assert output.SourceImageSequence[0].ReferencedSOPClassUID == SecondaryCaptureImageStorage
        assert output.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_another_salt_gives_other_uids_and_pseudonyms():
    original = _planted_file()
    one = deidentify_dicom(original, SALT)
    other = deidentify_dicom(original, OTHER_SALT)
    assert _read(one.data).StudyInstanceUID != _read(other.data).StudyInstanceUID
    assert _read(one.data).SOPInstanceUID != _read(other.data).SOPInstanceUID
    assert one.patient_id != other.patient_id


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_pydicom_sample_files_deidentify_cleanly(name):
    original_bytes = open(get_testdata_file(name), "rb").read()
    original = _read(original_bytes)
    identifying = [
        str(original.get(keyword))
        for keyword in (
            "PatientName", "PatientID", "PatientBirthDate", "InstitutionName",
            "ReferringPhysicianName", "AccessionNumber", "StudyDate", "StudyInstanceUID",
            "SeriesInstanceUID", "SOPInstanceUID",
        )
        # MR_small names its institution after the scanner's maker; Manufacturer is kept.
        if original.get(keyword) and str(original.get(keyword)) not in original.Manufacturer
    ]
    assert identifying

    result = deidentify_dicom(original_bytes, SALT)

    assert [value for value in identifying if value.encode() in result.data] == []
    output = _read(result.data)
    assert output.PatientIdentityRemoved == "YES"
    assert output.PixelData == original.PixelData
    assert not any(element.tag.is_private for element in output)
    assert result.has_pixel_data and result.study_year == 2004


def test_bare_data_set_without_preamble_is_accepted():
    original = _planted_file()
    bare = original[132:]  # no preamble, no "DICM"
    result = deidentify_dicom(bare, SALT)
    assert result.patient_id == keys.pseudonym(SALT, PLANTED["patient id"])
    assert _read(result.data).PixelData == _read(original).PixelData


def test_without_pixel_data():
    dataset = Dataset()
    dataset.SOPClassUID = BASIC_TEXT_SR
    dataset.SOPInstanceUID = "1.2.826.0.1.3680043.99.8.1"
    dataset.PatientName = PLANTED["patient name"]
    dataset.PatientID = PLANTED["patient id"]
    result = deidentify_dicom(_part10(dataset), SALT)
    assert result.has_pixel_data is False
    assert PLANTED["patient name"].encode() not in result.data


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"this is a text file, not an image\n" * 20, "SOP Class UID"),
        (b"\x89PNG\r\n\x1a\n" + bytes(200), "not a readable DICOM file"),
        ("header only", "SOP Class UID"),
        ("cut in pixel data", "truncated"),
        ("cut between elements", "no pixel data"),
    ],
)
def test_unreadable_bytes_are_refused_with_a_reason(data, reason):
    whole = _planted_file()
    if data == "header only":
        data = whole[:200]  # preamble and file meta, no data set
    elif data == "cut in pixel data":
        data = whole[:-100]
    elif data == "cut between elements":
        data = whole[: whole.index(b"\xe0\x7f\x10\x00")]  # right before Pixel Data
    with pytest.raises(DeidentificationError) as raised:
        deidentify_dicom(data, SALT)
    message = str(raised.value)
    assert message.startswith("not a readable DICOM file")
    assert reason in message


def test_profile_table_names_real_attributes():
    unknown = [keyword for keyword in PROFILE_ACTIONS if keyword not in keyword_dict]
    assert unknown == []
    assert set(PROFILE_ACTIONS.values()) <= set("DZXKCU")


def test_a_synthetic_night_loses_every_planted_identifier():
    reader = SyntheticCxrSourceReader(
        SyntheticCxrSource(
            kind="synthetic_cxr", seed=5, nights=1, images_per_night=8, patients=4,
            image_size=32, pneumonia_fraction=0.5, jpeg_fraction=0.0,
        )
    )
    planted = reader.planted_identifiers(1)
    for item in reader.night_items(1):
        original = item.read()
        assert any(value.encode() in original for value in planted)
        result = deidentify_dicom(original, SALT)
        assert [value for value in planted if value.encode() in result.data] == []
        assert _read(result.data).PixelData == _read(original).PixelData
        assert result.view in ("PA", "AP") and result.age_band is not None
