"""The right images: DICOM header rules from params, and every transfer syntax a PACS export
carries decoded through medloop's own path (`pipelines.data.images.decode_image`).

The reference files ship inside pydicom (``get_testdata_file(..., download=False)``); a
compressed file is compared with its uncompressed (or lossless) twin where pydicom ships one.
"""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from conftest import ROOT, SALT, profile
from pipelines.config import DicomHeaderSpec, load_params, parse_params
from pipelines.deid.dicom import deidentify_dicom
from pipelines.errors import ConfigError
from pipelines.data.images import DecodedImage, ImageProblem, check_dicom_header, decode_image
from tests_support import chest_dicom, dicom_file_bytes
from tests_support import pydicom_test_file as shipped

CHEST_XRAY = load_params(ROOT / "params.yaml").clean.image.dicom
LIMITS = {"min_side": 1, "max_pixels": 50_000_000}


def dataset(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(shipped(name)))


def frontal(name: str, **tags: str | None) -> bytes:
    """A pydicom test file relabelled as a PA chest radiograph, with the given tags changed."""
    return chest_dicom(name, **{"ViewPosition": "PA", **tags})


def decode(data: bytes, channels: int = 1, rules: DicomHeaderSpec | None = None) -> DecodedImage:
    return decode_image(data, channels=channels, dicom_header=rules, **LIMITS)


def header_rules(**tags: dict) -> DicomHeaderSpec:
    return DicomHeaderSpec(tags=tags)


# --------------------------------------------------------------------------------------------
# header rules
# --------------------------------------------------------------------------------------------


class TestHeaderRules:
    @pytest.mark.parametrize(
        "name, reason",
        [
            ("CT_small.dcm", "DICOM Modality is 'CT', not one of CR, DX (clean.image.dicom.tags.Modality)"),
            ("MR_small.dcm", "DICOM Modality is 'MR', not one of CR, DX (clean.image.dicom.tags.Modality)"),
        ],
    )
    def test_ct_and_mr_are_not_chest_radiographs(self, name: str, reason: str) -> None:
        with pytest.raises(ImageProblem) as caught:
            decode(shipped(name), rules=CHEST_XRAY)
        assert str(caught.value) == reason

    def test_a_chest_radiograph_passes(self) -> None:
        decoded = decode(frontal("MR_small.dcm"), rules=CHEST_XRAY)
        assert decoded.pixels.shape == (64, 64, 1) and decoded.header_warnings == ()

    @pytest.mark.parametrize("absent", ["ViewPosition", "BodyPartExamined"])
    def test_an_absent_optional_tag_passes(self, absent: str) -> None:
        # A PACS export often lacks ViewPosition (and BodyPartExamined, which is Type 3).
        decode(frontal("MR_small.dcm", **{absent: None}), rules=CHEST_XRAY)

    def test_an_empty_tag_counts_as_absent(self) -> None:
        decode(frontal("MR_small.dcm", ViewPosition=""), rules=CHEST_XRAY)

    def test_an_absent_required_tag_is_refused(self) -> None:
        with pytest.raises(ImageProblem) as caught:
            decode(frontal("MR_small.dcm", Modality=None), rules=CHEST_XRAY)
        assert str(caught.value) == (
            "DICOM Modality is absent but required (clean.image.dicom.tags.Modality.required)"
        )

    def test_every_broken_rule_is_named(self) -> None:
        data = frontal("MR_small.dcm", BodyPartExamined="KNEE", ViewPosition="LL")
        with pytest.raises(ImageProblem) as caught:
            decode(data, rules=CHEST_XRAY)
        assert str(caught.value) == (
            "DICOM BodyPartExamined is 'KNEE', not one of CHEST (clean.image.dicom.tags.BodyPartExamined); "
            "DICOM ViewPosition is 'LL', not one of PA, AP (clean.image.dicom.tags.ViewPosition)"
        )

    def test_colour_is_not_a_radiograph(self) -> None:
        data = frontal("SC_rgb_rle.dcm")
        with pytest.raises(ImageProblem) as caught:
            decode(data, rules=CHEST_XRAY)
        assert str(caught.value) == (
            "DICOM PhotometricInterpretation is 'RGB', not one of MONOCHROME1, MONOCHROME2 "
            "(clean.image.dicom.tags.PhotometricInterpretation)"
        )

    def test_values_are_compared_without_case_and_padding(self) -> None:
        decode(frontal("MR_small.dcm", BodyPartExamined="chest ", ViewPosition="pa"), rules=CHEST_XRAY)

    def test_a_warn_rule_keeps_the_image_and_says_why(self) -> None:
        lenient = header_rules(Modality={"allowed": ["CR", "DX"]},
                        ViewPosition={"allowed": ["PA", "AP"], "on_mismatch": "warn"})
        decoded = decode(frontal("MR_small.dcm", ViewPosition="LATERAL"), rules=lenient)
        assert decoded.header_warnings == (
            "DICOM ViewPosition is 'LATERAL', not one of PA, AP (clean.image.dicom.tags.ViewPosition)",
        )

    def test_multi_valued_tag_needs_every_value_allowed(self) -> None:
        image_type = header_rules(ImageType={"allowed": ["ORIGINAL", "PRIMARY", "AXIAL"]})
        ds = dataset("CT_small.dcm")
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert check_dicom_header(ds, image_type) == []
        ds.ImageType = ["DERIVED", "SECONDARY"]
        (mismatch,) = check_dicom_header(ds, image_type)
        assert mismatch.reason == (
            "DICOM ImageType is 'DERIVED\\SECONDARY', not one of ORIGINAL, PRIMARY, AXIAL "
            "(clean.image.dicom.tags.ImageType)"
        )

    def test_a_value_that_is_not_a_code_is_not_echoed(self) -> None:
        ds = dataset("MR_small.dcm")
        ds.Modality = "Jane Doe's scan"
        (mismatch,) = check_dicom_header(ds, CHEST_XRAY)
        assert mismatch.reason == (
            "DICOM Modality is a value of 15 characters that is not a code, not one of CR, DX "
            "(clean.image.dicom.tags.Modality)"
        )

    def test_without_rules_nothing_is_checked(self) -> None:
        assert decode(shipped("CT_small.dcm")).pixels.shape == (128, 128, 1)

    def test_the_synthetic_source_writes_acceptable_headers(self) -> None:
        from pipelines.config import SyntheticCxrSource
        from pipelines.data.sources.synthetic_cxr import SyntheticCxrSourceReader

        spec = SyntheticCxrSource(kind="synthetic_cxr", seed=5, nights=1, images_per_night=12, patients=6,
                                  image_size=32, pneumonia_fraction=0.5, jpeg_fraction=0.0)
        for item in SyntheticCxrSourceReader(spec).night_items(1):
            # Clean checks the stored, de-identified file: the rules' tags must survive Annex E.
            stored = deidentify_dicom(item.read(), SALT.encode()).data
            assert check_dicom_header(pydicom.dcmread(io.BytesIO(stored)), CHEST_XRAY) == []


class TestHeaderRuleConfig:
    @pytest.mark.parametrize(
        "tags, expected",
        [
            ({"Modallity": {"allowed": ["CR"]}},
             "clean.image.dicom.tags: Value error, 'Modallity' is not a DICOM keyword"),
            ({"PatientName": {"allowed": ["X"]}},
             "clean.image.dicom.tags: Value error, 'PatientName' has VR PN; only coded-string (CS)"),
            ({"Modality": {"allowed": []}},
             "clean.image.dicom.tags.Modality.allowed: List should have at least 1 item"),
            ({"Modality": {"allowed": ["CR"], "on_mismatch": "ignore"}},
             "clean.image.dicom.tags.Modality.on_mismatch: Input should be 'quarantine' or 'warn'"),
            ({"Modality": {"allowed": ["CR"], "requird": True}},
             "clean.image.dicom.tags.Modality.requird: unknown key"),
        ],
    )
    def test_mistakes_name_the_key(self, tags: dict, expected: str) -> None:
        params = profile()
        params["clean"]["image"]["dicom"]["tags"] = tags
        with pytest.raises(ConfigError) as error:
            parse_params(params)
        assert expected in str(error.value)

    def test_the_section_is_required_for_image_models(self) -> None:
        params = profile()
        del params["clean"]["image"]["dicom"]
        with pytest.raises(ConfigError, match="clean.image.dicom: missing key"):
            parse_params(params)

    def test_the_tabular_profile_needs_no_image_section(self) -> None:
        tabular = load_params(ROOT / "profiles" / "breast_cancer.yaml")
        assert tabular.clean.image is None

    def test_the_shipped_chest_profile(self) -> None:
        assert {k: (r.allowed, r.required, r.on_mismatch) for k, r in CHEST_XRAY.tags.items()} == {
            "Modality": (["CR", "DX"], True, "quarantine"),
            "BodyPartExamined": (["CHEST"], False, "quarantine"),
            "ViewPosition": (["PA", "AP"], False, "quarantine"),
            "PhotometricInterpretation": (["MONOCHROME1", "MONOCHROME2"], True, "quarantine"),
        }


# --------------------------------------------------------------------------------------------
# transfer syntaxes
# --------------------------------------------------------------------------------------------

LOSSLESS, LOSSY, NONE = "lossless", "lossy", "none"
# name, its transfer syntax, channels, reference (its uncompressed or lossless twin), comparison.
SYNTAXES = [
    ("MR_small_implicit.dcm", ImplicitVRLittleEndian, 1, "MR_small.dcm", LOSSLESS),
    ("MR_small_bigendian.dcm", ExplicitVRBigEndian, 1, "MR_small.dcm", LOSSLESS),
    ("MR_small_RLE.dcm", RLELossless, 1, "MR_small.dcm", LOSSLESS),
    ("MR_small_jpeg_ls_lossless.dcm", JPEGLSLossless, 1, "MR_small.dcm", LOSSLESS),
    ("MR_small_jp2klossless.dcm", JPEG2000Lossless, 1, "MR_small.dcm", LOSSLESS),
    ("SC_rgb_jpeg_gdcm.dcm", JPEGLosslessSV1, 3, "SC_rgb_rle.dcm", LOSSLESS),
    ("SC_rgb_gdcm_KY.dcm", JPEG2000, 3, "SC_rgb_rle.dcm", LOSSY),
    ("SC_rgb_dcmtk_+eb+cr.dcm", JPEGBaseline8Bit, 3, "SC_rgb_rle.dcm", LOSSY),
    ("SC_rgb_jpeg_dcmtk.dcm", JPEGBaseline8Bit, 3, "SC_rgb_rle.dcm", LOSSY),  # YBR_FULL
    ("SC_rgb_dcmtk_+eb+cy+np.dcm", JPEGBaseline8Bit, 3, "SC_rgb_rle.dcm", LOSSY),  # YBR_FULL_422
    ("SC_rgb_jls_lossy_line.dcm", JPEGLSNearLossless, 3, "SC_rgb_rle.dcm", LOSSY),
    ("JPEGLSNearLossless_16.dcm", JPEGLSNearLossless, 1, None, NONE),
    ("693_J2KI.dcm", JPEG2000, 1, None, NONE),
    ("image_dfl.dcm", DeflatedExplicitVRLittleEndian, 1, None, NONE),
]
# Lossy codecs move a few values by a few levels (colour subsampling more at edges): on 0..255,
# the mean absolute difference from the lossless twin stays within this.
LOSSY_MEAN_TOLERANCE = 3.0


class TestTransferSyntaxes:
    @pytest.mark.parametrize("name, syntax, channels, reference, comparison", SYNTAXES,
                             ids=[row[0] for row in SYNTAXES])
    def test_decodes_like_its_reference(self, name, syntax, channels, reference, comparison) -> None:
        data = shipped(name)
        assert pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
        decoded = decode(data, channels).pixels
        assert decoded.dtype == np.uint8 and decoded.shape[2] == channels
        assert decoded.std() > 0  # an image, not a blank
        if comparison == NONE:
            return
        expected = decode(shipped(reference), channels).pixels
        difference = np.abs(decoded.astype(int) - expected.astype(int))
        if comparison == LOSSLESS:
            np.testing.assert_array_equal(decoded, expected)
        else:
            assert difference.mean() <= LOSSY_MEAN_TOLERANCE, (name, difference.mean())

    def test_twelve_bit_jpeg_extended(self) -> None:
        # The file: Pillow alone says "does not support 'JPEG Extended'". pydicom ships no
        # uncompressed twin; the same NM scan ships as JPEG 2000, and the two must agree.
        decoded = decode(shipped("JPGExtended.dcm"))
        assert decoded.source_bit_depth == 12 and decoded.conversion == "12-bit rescaled to 8-bit"
        raw = pydicom.dcmread(io.BytesIO(shipped("JPGExtended.dcm"))).pixel_array
        assert raw.max() < 2**12
        sibling = decode(shipped("JPEG2000.dcm")).pixels
        correlation = np.corrcoef(decoded.pixels.ravel().astype(float), sibling.ravel().astype(float))[0, 1]
        assert correlation > 0.9

    def test_deflated_made_here_is_lossless(self) -> None:
        ds = dataset("MR_small.dcm")
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        deflated = dicom_file_bytes(ds)
        assert len(deflated) < len(shipped("MR_small.dcm"))
        np.testing.assert_array_equal(decode(deflated).pixels, decode(shipped("MR_small.dcm")).pixels)

    @pytest.mark.parametrize("cut", [1000, 2000, -500, -10])
    def test_truncated_deflated_file(self, cut: int) -> None:
        with pytest.raises(ImageProblem, match="^truncated or corrupt DICOM file: Error -5 while decompressing"):
            decode(shipped("image_dfl.dcm")[:cut])

    @pytest.mark.parametrize("name", [row[0] for row in SYNTAXES] + ["JPGExtended.dcm"])
    def test_de_identification_keeps_every_syntax_decodable(self, name: str) -> None:
        # What clean decodes is the file collect stored, after Annex E.
        original = shipped(name)
        stored = deidentify_dicom(original, SALT.encode()).data
        np.testing.assert_array_equal(decode(stored).pixels, decode(original).pixels)

    def test_an_undecodable_file_names_its_transfer_syntax(self) -> None:
        # JPEG-lossy.dcm is a damaged 12-bit JPEG (pydicom ships JPGExtended.dcm as its repair).
        with pytest.raises(ImageProblem) as caught:
            decode(shipped("JPEG-lossy.dcm"))
        assert str(caught.value).startswith(
            "cannot decode DICOM pixel data (JPEG Extended (Process 2 and 4), 1.2.840.10008.1.2.4.51): "
            "pylibjpeg: libjpeg error code '-1038'"
        )
        assert str(caught.value).endswith(
            "If another tool opens the file, convert it to an uncompressed transfer syntax (e.g. gdcmconv --raw) "
            "and collect it again"
        )
        assert "\n" not in str(caught.value)

    def test_an_unknown_transfer_syntax_is_named(self) -> None:
        ds = dataset("JPGExtended.dcm")
        ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.9.9999.1"  # a private syntax
        with pytest.raises(ImageProblem) as caught:
            decode(dicom_file_bytes(ds))
        assert str(caught.value).startswith(
            "cannot decode DICOM pixel data (1.2.826.0.1.3680043.9.9999.1): Unable to decode the pixel data"
        )
