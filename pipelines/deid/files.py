"""Image files de-identified by their kind (told by their bytes, not their names): DICOM by
PS3.15 Annex E, JPEG and PNG by stripping their metadata. Collect and the prediction service
store every image through `deidentify_image`."""

from __future__ import annotations

from pipelines.errors import DeidentificationError

EXTENSIONS = {"dicom": "dcm", "jpeg": "jpg", "png": "png"}  # the stored file's extension by format


def deidentify_image(data: bytes, salt: bytes) -> tuple[str, bytes, dict]:
    """One image file de-identified exactly as collect stores it, and as the prediction service
    stores every upload.

    Returns:
        ``(format, de-identified bytes, metadata)``; for DICOM the metadata holds the pseudonymous
        patient id, study year, sex, age band, view and site.

    Raises:
        DeidentificationError: empty, not PNG/JPEG/DICOM, or not provably free of identifiers.
    """
    from pipelines.deid.dicom import deidentify_dicom
    from pipelines.deid.image_metadata import sniff_format, strip_jpeg_metadata, strip_png_metadata

    file_format = sniff_format(data)
    if not data:
        raise DeidentificationError("zero-byte file")
    if file_format == "dicom":
        deid = deidentify_dicom(data, salt)
        return file_format, deid.data, {
            "patient_id": deid.patient_id, "study_year": deid.study_year, "sex": deid.sex,
            "age_band": deid.age_band, "view": deid.view, "site": deid.site,
        }
    if file_format == "jpeg":
        return file_format, strip_jpeg_metadata(data), {}
    if file_format == "png":
        return file_format, strip_png_metadata(data), {}
    raise DeidentificationError(f"not an image (unrecognised format, starts with {data[:4]!r})")
