"""De-identification of one DICOM file (DICOM PS3.15 Annex E, Basic Application Level
Confidentiality Profile).

The profile's table of attributes is applied first (`PROFILE_ACTIONS`); generic safety nets then
catch what the table cannot name: private tags, overlays and curves, and every person name and
date anywhere in the data set, sequences included. UIDs are replaced by keyed (salted) UIDs so
that images of one study stay grouped together without revealing the original UIDs. The
characteristics training needs (study year, sex, age band, view, site) are read before anything
is removed and returned next to the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from io import BytesIO
from typing import Any

import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    PYDICOM_IMPLEMENTATION_UID,
)

from pipelines.deid import keys, safe_harbor
from pipelines.errors import DeidentificationError

# DeidentificationMethod is an LO (64 characters per value): the description is split into two
# values so that strict readers do not truncate it. The code sequence below is the
# machine-readable statement of the same thing.
DEIDENTIFICATION_METHOD = [
    "medloop: DICOM PS3.15 Annex E",
    "Basic Application Level Confidentiality Profile",
]
BASIC_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")

PATIENT_SEXES = frozenset({"F", "M", "O"})


@dataclass(frozen=True)
class DicomDeidResult:
    """A de-identified DICOM file and the characteristics kept from its header.

    Attributes:
        data: the de-identified DICOM Part-10 file; pixel data is kept unchanged.
        patient_id: pseudonym of the original PatientID, ``None`` when the header had none.
        study_year: year of the study (StudyDate, else SeriesDate, AcquisitionDate,
            ContentDate), ``None`` when no date could be read.
        sex: ``"F"``, ``"M"`` or ``"O"`` from PatientSex, ``None`` when absent or unknown.
        age_band: Safe Harbor age band at the study, from PatientAge or else from the birth
            date and the study date.
        view: ViewPosition such as ``"PA"`` or ``"AP"``, ``None`` when absent.
        site: pseudonym of InstitutionName, ``None`` when absent.
        has_pixel_data: whether the file carries pixel data.
    """

    data: bytes
    patient_id: str | None
    study_year: int | None
    sex: str | None
    age_band: str | None
    view: str | None
    site: str | None
    has_pixel_data: bool


def deidentify_dicom(data: bytes, salt: bytes) -> DicomDeidResult:
    """De-identify one DICOM file with the Basic Application Level Confidentiality Profile.

    Applies the actions of `PROFILE_ACTIONS`; removes private tags, overlay and curve groups;
    empties every person name and date left anywhere (sequences included); replaces instance
    UIDs by UIDs derived from the salt (the same original UID always maps to the same new one,
    so images of one study stay together); and records the de-identification in the header
    (PatientIdentityRemoved, DeidentificationMethod and its code sequence). PatientID and
    PatientName become the patient's pseudonym so that downstream tools can still group images
    by patient.

    Pixel data is kept bit for bit. Text burned into the pixels is therefore not removed: a
    file with BurnedInAnnotation ``"YES"`` keeps that flag and must be screened elsewhere.
    Likewise, metadata embedded inside compressed pixel data (JPEG markers) is not touched.

    Args:
        data: the bytes of a DICOM file (Part 10; a bare data set is accepted when it holds a
            SOP Class UID).
        salt: the secret salt of pseudonyms and UIDs (`keys.load_salt`).

    Returns:
        The de-identified file and the characteristics read from the original header. The same
        bytes and salt always give byte-identical output.

    Raises:
        DeidentificationError: the bytes are not a readable DICOM file (empty, not DICOM,
            truncated), or the header could not be de-identified.
    """
    dataset = _read_dataset(data)
    try:
        # Everything kept as a characteristic is read before the header is touched.
        study_date = _study_date(dataset)
        original_patient_id = _text(dataset.get("PatientID"))
        institution = _text(dataset.get("InstitutionName"))
        patient_id = keys.pseudonym(salt, original_patient_id) if original_patient_id else None
        sex = _sex(dataset)
        age_band = safe_harbor.age_band(_age_at_study(dataset, study_date))
        view = _text(dataset.get("ViewPosition"))
        site = keys.pseudonym(salt, institution, prefix="site") if institution else None
        has_pixel_data = any(keyword in dataset for keyword in PIXEL_DATA_KEYWORDS)

        dataset.remove_private_tags()
        dataset.walk(_apply_profile)
        dataset.walk(lambda parent, element: _replace_uids(element, salt))
        _record_deidentification(dataset, patient_id)
        _rebuild_file_meta(dataset, data, salt)
        # No identifying bytes may hide in the 128-byte preamble (some writers put a TIFF
        # header or a vendor string there).
        dataset.preamble = b"\x00" * 128
        buffer = BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
    except DeidentificationError:
        raise
    except Exception as error:  # pydicom raises many types on malformed values
        raise DeidentificationError(
            f"could not de-identify the DICOM header: {type(error).__name__}: {error}"
        ) from error
    return DicomDeidResult(
        data=buffer.getvalue(),
        patient_id=patient_id,
        study_year=study_date.year if study_date else None,
        sex=sex,
        age_band=age_band,
        view=view,
        site=site,
        has_pixel_data=has_pixel_data,
    )


# PS3.15 Table E.1-1 (Application Level Confidentiality Profile Attributes), column "Basic
# Profile". Actions: D replace with a non-empty dummy, Z replace with an empty value (or a
# dummy), X remove, K keep, C clean (replace with a value of similar meaning that identifies
# nobody), U replace UIDs with consistent keyed UIDs. Where the standard gives a choice (X/Z,
# X/D, Z/D, X/Z/D) we take X when the attribute is optional (Type 3) in the radiography, CT and
# MR IODs we ingest, and Z when it is Type 2 there, so that files stay valid without keeping
# anything. X/Z/U* sequences (Referenced/Source Image) are kept with their UIDs replaced.
PROFILE_ACTIONS: dict[str, str] = {
    # --- patient ---
    "PatientName": "Z",
    "PatientID": "Z",
    "IssuerOfPatientID": "X",
    "OtherPatientIDs": "X",
    "OtherPatientIDsSequence": "X",
    "OtherPatientNames": "X",
    "PatientBirthName": "X",
    "PatientBirthDate": "Z",
    "PatientBirthTime": "X",
    "PatientSex": "Z",
    "PatientAge": "X",
    "PatientSize": "X",
    "PatientWeight": "X",
    "PatientAddress": "X",
    "PatientTelephoneNumbers": "X",
    "PatientTelecomInformation": "X",
    "PatientMotherBirthName": "X",
    "MilitaryRank": "X",
    "BranchOfService": "X",
    "EthnicGroup": "X",
    "Occupation": "X",
    "AdditionalPatientHistory": "X",
    "PatientComments": "X",
    "PatientReligiousPreference": "X",
    "PatientSexNeutered": "X",
    "MedicalRecordLocator": "X",
    "CountryOfResidence": "X",
    "RegionOfResidence": "X",
    "ResponsiblePerson": "X",
    "ResponsibleOrganization": "X",
    "MedicalAlerts": "X",
    "Allergies": "X",
    "SmokingStatus": "X",
    "PregnancyStatus": "X",
    "LastMenstrualDate": "X",
    "PatientState": "X",
    "SpecialNeeds": "X",
    "InsurancePlanIdentification": "X",
    "PatientInsurancePlanCodeSequence": "X",
    "ReferencedPatientSequence": "X",
    "ReferencedPatientPhotoSequence": "X",
    "ReferencedPatientAliasSequence": "X",
    "PatientTransportArrangements": "X",
    "CurrentPatientLocation": "X",
    "PatientInstitutionResidence": "X",
    # --- visit and admission ---
    "AdmissionID": "X",
    "IssuerOfAdmissionID": "X",
    "AdmittingDate": "X",
    "AdmittingTime": "X",
    "AdmittingDiagnosesDescription": "X",
    "AdmittingDiagnosesCodeSequence": "X",
    "ServiceEpisodeID": "X",
    "ServiceEpisodeDescription": "X",
    "ReasonForVisit": "X",
    "VisitComments": "X",
    # --- institution and people ---
    "InstitutionName": "X",
    "InstitutionAddress": "X",
    "InstitutionCodeSequence": "X",
    "InstitutionalDepartmentName": "X",
    "InstitutionalDepartmentTypeCodeSequence": "X",
    "ReferringPhysicianName": "Z",
    "ReferringPhysicianAddress": "X",
    "ReferringPhysicianTelephoneNumbers": "X",
    "ReferringPhysicianIdentificationSequence": "X",
    "ConsultingPhysicianName": "Z",
    "ConsultingPhysicianIdentificationSequence": "X",
    "PerformingPhysicianName": "X",
    "PerformingPhysicianIdentificationSequence": "X",
    "OperatorsName": "X",
    "OperatorIdentificationSequence": "X",
    "PhysiciansOfRecord": "X",
    "PhysiciansOfRecordIdentificationSequence": "X",
    "NameOfPhysiciansReadingStudy": "X",
    "PhysiciansReadingStudyIdentificationSequence": "X",
    "RequestingPhysician": "X",
    "RequestingService": "X",
    "ScheduledPerformingPhysicianName": "X",
    "ContentCreatorName": "Z",
    "VerifyingObserverName": "D",
    "VerifyingObserverSequence": "D",
    "VerifyingOrganization": "D",
    "PersonName": "D",
    "PersonAddress": "X",
    "PersonTelephoneNumbers": "X",
    "HumanPerformerName": "X",
    "HumanPerformerOrganization": "X",
    "ActualHumanPerformersSequence": "X",
    "OrderEnteredBy": "X",
    "OrderEntererLocation": "X",
    "OrderCallbackPhoneNumber": "X",
    "NamesOfIntendedRecipientsOfResults": "X",
    "IntendedRecipientsOfResultsIdentificationSequence": "X",
    "ParticipantSequence": "X",
    "AuthorObserverSequence": "X",
    "CustodialOrganizationSequence": "X",
    # --- study, request and procedure ---
    "AccessionNumber": "Z",
    "StudyID": "Z",
    "StudyIDIssuer": "X",
    "StudyDescription": "X",
    "SeriesDescription": "X",
    "ProtocolName": "X",
    "StudyComments": "X",
    "ReasonForStudy": "X",
    "RequestAttributesSequence": "X",
    "RequestedProcedureID": "X",
    "RequestedProcedureDescription": "X",
    "RequestedProcedureComments": "X",
    "RequestedProcedureLocation": "X",
    "ReasonForTheRequestedProcedure": "X",
    "PlacerOrderNumberImagingServiceRequest": "Z",
    "FillerOrderNumberImagingServiceRequest": "Z",
    "ImagingServiceRequestComments": "X",
    "PerformedProcedureStepID": "X",
    "PerformedProcedureStepDescription": "X",
    "PerformedProcedureStepStartDate": "X",
    "PerformedProcedureStepStartTime": "X",
    "PerformedProcedureStepEndDate": "X",
    "PerformedProcedureStepEndTime": "X",
    "PerformedLocation": "X",
    "PerformedStationName": "X",
    "PerformedStationAETitle": "X",
    "CommentsOnThePerformedProcedureStep": "X",
    "ScheduledProcedureStepID": "X",
    "ScheduledProcedureStepDescription": "X",
    "ScheduledProcedureStepLocation": "X",
    "ScheduledProcedureStepStartDate": "X",
    "ScheduledProcedureStepStartTime": "X",
    "ScheduledStationName": "X",
    "ScheduledStationAETitle": "X",
    "ReferencedStudySequence": "X",
    "ReferencedPerformedProcedureStepSequence": "X",
    "ReferencedImageSequence": "U",
    "SourceImageSequence": "U",
    # --- free text and embedded content ---
    "AcquisitionComments": "X",
    "ContrastBolusAgent": "Z",
    "ImageComments": "X",
    "FrameComments": "X",
    "DerivationDescription": "X",
    "IdentifyingComments": "X",
    "TextComments": "X",
    "ContentSequence": "D",
    "AcquisitionContextSequence": "X",
    "GraphicAnnotationSequence": "D",
    "IconImageSequence": "X",
    "ModifiedAttributesSequence": "X",
    "OriginalAttributesSequence": "X",
    "DigitalSignaturesSequence": "X",
    "DataSetTrailingPadding": "X",
    # --- equipment ---
    "StationName": "X",
    "StationAETitle": "X",
    "RetrieveAETitle": "X",
    "DeviceSerialNumber": "X",
    "DeviceDescription": "X",
    "DetectorID": "X",
    "GantryID": "X",
    "GeneratorID": "X",
    "CassetteID": "X",
    "PlateID": "X",
    "NetworkID": "X",
    "UniqueDeviceIdentifier": "X",
    "UDISequence": "X",
    "DateOfLastCalibration": "X",
    "TimeOfLastCalibration": "X",
    "DateOfLastDetectorCalibration": "X",
    "TimeOfLastDetectorCalibration": "X",
    "DateOfSecondaryCapture": "X",
    "TimeOfSecondaryCapture": "X",
    # --- dates and times ---
    "StudyDate": "Z",
    "StudyTime": "Z",
    "SeriesDate": "X",
    "SeriesTime": "X",
    "AcquisitionDate": "X",
    "AcquisitionTime": "X",
    "AcquisitionDateTime": "X",
    "ContentDate": "Z",
    "ContentTime": "Z",
    "InstanceCreationDate": "X",
    "InstanceCreationTime": "X",
    "OverlayDate": "X",
    "OverlayTime": "X",
    "CurveDate": "X",
    "CurveTime": "X",
    "TimezoneOffsetFromUTC": "X",
    # --- UIDs (every other non-registry UID is replaced too, see _replace_uids) ---
    "StudyInstanceUID": "U",
    "SeriesInstanceUID": "U",
    "SOPInstanceUID": "U",
    "MediaStorageSOPInstanceUID": "U",
    "FrameOfReferenceUID": "U",
    "SynchronizationFrameOfReferenceUID": "U",
    "ReferencedSOPInstanceUID": "U",
    "ReferencedFrameOfReferenceUID": "U",
    "RelatedFrameOfReferenceUID": "U",
    "IrradiationEventUID": "U",
    "InstanceCreatorUID": "U",
    "ConcatenationUID": "U",
    "DimensionOrganizationUID": "U",
    "StorageMediaFileSetUID": "U",
    "TransactionUID": "U",
    "DeviceUID": "U",
    "ObservationUID": "U",
    "TrackingUID": "U",
    "SpecimenUID": "U",
    "UID": "U",
}

PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

# UI attributes that name a kind of thing (SOP class, transfer syntax, coding scheme), not an
# instance: they identify nobody and must keep their registered values to stay meaningful.
UID_KEYWORDS_KEPT = frozenset(
    {
        "TransferSyntaxUID",
        "ReferencedTransferSyntaxUIDInFile",
        "CodingSchemeUID",
        "ContextUID",
        "MappingResourceUID",
    }
)

# Groups 50xx (curves, retired) and 60xx (overlays) can carry drawn annotations and text.
CURVE_GROUP = 0x5000
OVERLAY_GROUP = 0x6000
REPEATING_GROUP_MASK = 0xFF00

UNDEFINED_LENGTH = 0xFFFFFFFF
SEQUENCE_DELIMITER = (0xFFFE, 0xE0DD)

DUMMY_TEXT = "ANONYMIZED"
DUMMY_BY_VR: dict[str, Any] = {
    "DA": "19000101",
    "DT": "19000101000000",
    "TM": "000000",
    "AS": "000Y",
    "IS": "0",
    "DS": "0",
}

AGE_PATTERN = re.compile(r"^(\d{1,3})([DWMY])$")
DAYS_PER_AGE_UNIT = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25}


def _read_dataset(data: bytes) -> Dataset:
    """Parse the bytes, refusing anything that is not a complete DICOM instance."""
    if not data:
        raise DeidentificationError("not a readable DICOM file: it is empty (0 bytes)")
    try:
        dataset = pydicom.dcmread(BytesIO(data), force=False)
    except InvalidDicomError:
        # A bare data set without preamble and "DICM" prefix is still DICOM, but force=True
        # parses almost any bytes into something: only a SOP Class UID shows it is real.
        try:
            dataset = pydicom.dcmread(BytesIO(data), force=True)
        except Exception as error:
            raise DeidentificationError(
                f"not a readable DICOM file: no DICM prefix and not a DICOM data set "
                f"({type(error).__name__}: {error})"
            ) from error
        if not _looks_like_uid(dataset.get("SOPClassUID")):
            raise DeidentificationError(
                "not a readable DICOM file: no DICM prefix, and the bytes do not parse into a "
                "data set with a SOP Class UID"
            )
    except Exception as error:
        raise DeidentificationError(
            f"not a readable DICOM file: {type(error).__name__}: {error}"
        ) from error

    try:
        _check_complete(dataset, data)
    except DeidentificationError:
        raise
    except Exception as error:
        raise DeidentificationError(
            f"not a readable DICOM file: {type(error).__name__}: {error}"
        ) from error
    return dataset


def _check_complete(dataset: Dataset, data: bytes) -> None:
    """Detect truncation, which pydicom tolerates silently.

    pydicom returns a short value when the file ends inside an element, and simply stops when
    it ends between elements; a truncated image would then pass as a valid one.
    """
    transfer_syntax = getattr(dataset, "file_meta", Dataset()).get("TransferSyntaxUID")
    # A deflated data set is read from an inflated copy: positions do not refer to ``data``.
    positions_known = not (transfer_syntax and UID(transfer_syntax).is_deflated)
    for tag in dataset.keys():
        element = dataset.get_item(tag)
        if not isinstance(element, RawDataElement):
            continue  # already decoded while reading (SpecificCharacterSet), so it was whole
        value_length = len(element.value) if element.value is not None else 0
        if element.length != UNDEFINED_LENGTH:
            if value_length < element.length:
                raise DeidentificationError(
                    f"not a readable DICOM file: truncated inside element {element.tag} "
                    f"({value_length} of {element.length} bytes)"
                )
            continue
        if not positions_known:
            continue
        delimiter_at = element.value_tell + value_length
        if _read_tag(data, delimiter_at, element.is_little_endian) != SEQUENCE_DELIMITER:
            raise DeidentificationError(
                f"not a readable DICOM file: truncated inside element {element.tag} (the file "
                f"ends before its sequence delimiter)"
            )
    if not _looks_like_uid(dataset.get("SOPClassUID")):
        raise DeidentificationError(
            "not a readable DICOM file: the header has no SOP Class UID (truncated header, or "
            "not a DICOM instance)"
        )
    if "Rows" in dataset and not any(keyword in dataset for keyword in PIXEL_DATA_KEYWORDS):
        raise DeidentificationError(
            "not a readable DICOM file: it describes an image (Rows) but has no pixel data; "
            "the file is probably truncated"
        )


def _read_tag(data: bytes, offset: int, little_endian: bool) -> tuple[int, int] | None:
    if offset + 4 > len(data):
        return None
    byteorder = "little" if little_endian else "big"
    group = int.from_bytes(data[offset : offset + 2], byteorder)
    element = int.from_bytes(data[offset + 2 : offset + 4], byteorder)
    return group, element


def _looks_like_uid(value: object) -> bool:
    text = str(value or "").strip()
    return bool(text) and all(part.isdigit() for part in text.split("."))


def _apply_profile(parent: Dataset, element: DataElement) -> None:
    """Walk callback: the safety nets, then the table action, for one element."""
    tag = element.tag
    if (tag.group & REPEATING_GROUP_MASK) in (CURVE_GROUP, OVERLAY_GROUP) or tag.element == 0:
        # Group lengths go too: they would be wrong once elements are removed.
        del parent[tag]
        return
    if element.VR in ("PN", "DA", "DT"):
        # Names and dates the table does not list (nested in sequences, retired or new
        # attributes) are still identifiers.
        element.value = _empty_value(element)
    action = PROFILE_ACTIONS.get(element.keyword)
    if action == "X":
        del parent[tag]
    elif action == "Z":
        element.value = _empty_value(element)
    elif action in ("D", "C"):
        # We cannot clean free text reliably, so "clean" is a dummy too.
        element.value = _dummy_value(element)
    # "K" keeps the element; "U" is done by _replace_uids for every instance UID.


def _empty_value(element: DataElement) -> Any:
    if element.VR == "SQ":
        return Sequence()
    return None


def _dummy_value(element: DataElement) -> Any:
    """A non-empty value of the element's VR that identifies nobody."""
    if element.VR == "SQ":
        # A dummy item would still need dummy content; an empty sequence says the same.
        return Sequence()
    if element.VR in DUMMY_BY_VR:
        return DUMMY_BY_VR[element.VR]
    if element.VR in ("AE", "CS", "SH", "LO", "LT", "ST", "UT", "UC", "PN"):
        return DUMMY_TEXT
    if element.VR in ("US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"):
        return 0
    return None  # binary values (OB, OW, UN, ...): nothing meaningful to put instead


def _replace_uids(element: DataElement, salt: bytes) -> None:
    """Replace every instance UID by the keyed UID of its original value."""
    if element.VR != "UI" or element.value in (None, "") or element.keyword in UID_KEYWORDS_KEPT:
        return
    if element.keyword.endswith("ClassUID"):
        return  # SOP classes say what kind of object this is, not whose
    if isinstance(element.value, MultiValue):
        element.value = [_keyed_uid(salt, str(value)) for value in element.value]
    else:
        element.value = _keyed_uid(salt, str(element.value))


def _keyed_uid(salt: bytes, original: str) -> str:
    """The UID that replaces ``original``: the same under one salt, unrelated across salts."""
    uid = UID(original.strip())
    if not uid.is_private or uid.name != str(uid):
        return str(uid)  # a registered, well-known UID (DICOM root or in the registry)
    return _uid_from_digest(keys.keyed_hash(salt, str(uid).encode(), purpose="dicom-uid"))


def _uid_from_digest(digest: str) -> str:
    # 120 bits under the 2.25 root (UUID-derived UIDs, PS3.5 B.2) fit the 64-character limit.
    return f"2.25.{int(digest[:30], 16)}"


def _record_deidentification(dataset: Dataset, patient_id: str | None) -> None:
    """Mark the header as de-identified and put the pseudonym where the identifiers were."""
    dataset.PatientID = patient_id or ""
    dataset.PatientName = patient_id or ""
    dataset.PatientIdentityRemoved = "YES"
    dataset.DeidentificationMethod = DEIDENTIFICATION_METHOD
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = BASIC_PROFILE_CODE
    dataset.DeidentificationMethodCodeSequence = Sequence([code])
    # PS3.15 E.3.6: dates were removed, so longitudinal comparisons are no longer possible.
    dataset.LongitudinalTemporalInformationModified = "REMOVED"


def _rebuild_file_meta(dataset: Dataset, data: bytes, salt: bytes) -> None:
    """A fresh file meta group: the old one may name the sending station (AE titles)."""
    old_meta = getattr(dataset, "file_meta", None) or FileMetaDataset()
    transfer_syntax = old_meta.get("TransferSyntaxUID") or _transfer_syntax_read(dataset)
    if "SOPInstanceUID" not in dataset or not dataset.SOPInstanceUID:
        # Type 1 but missing: derive one from the content so the output stays deterministic.
        dataset.SOPInstanceUID = _uid_from_digest(keys.keyed_hash(salt, data, purpose="dicom-uid"))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    dataset.file_meta = meta


def _transfer_syntax_read(dataset: Dataset) -> UID:
    implicit_vr, little_endian = dataset.original_encoding
    if implicit_vr:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little_endian else ExplicitVRBigEndian


def _study_date(dataset: Dataset) -> date | None:
    for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        parsed = _parse_date(dataset.get(keyword))
        if parsed is not None:
            return parsed
    return None


def _parse_date(value: object) -> date | None:
    # Old ACR-NEMA files write "YYYY.MM.DD": keep only the digits.
    digits = "".join(character for character in str(value or "") if character.isdigit())
    if len(digits) != 8:
        return None
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:8]))
    except ValueError:
        return None


def _age_at_study(dataset: Dataset, study_date: date | None) -> float | None:
    """Age in years from PatientAge ("045Y", "006M", ...), else from the birth date."""
    match = AGE_PATTERN.match(_text(dataset.get("PatientAge")) or "")
    if match:
        return int(match.group(1)) * DAYS_PER_AGE_UNIT[match.group(2)] / 365.25
    born = _parse_date(dataset.get("PatientBirthDate"))
    if born is None or study_date is None or born > study_date:
        return None
    return safe_harbor.years_between(born, study_date)


def _sex(dataset: Dataset) -> str | None:
    sex = (_text(dataset.get("PatientSex")) or "").upper()
    return sex if sex in PATIENT_SEXES else None


def _text(value: object) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None
