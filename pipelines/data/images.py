"""Decode stored images (JPEG, PNG, DICOM) safely into uint8 arrays for the clean stage.

Every way an image can be unusable (unknown format, truncation, a decompression bomb, too
small, no pixel data) raises `ImageProblem`, whose message is the quarantine reason. Sizes are
checked from the file's header before any pixel data is decoded, so a small file that declares
a huge image never allocates it.

A DICOM file is also checked against the header rules it is given (``clean.image.dicom``:
modality, body part, view, photometric interpretation) before its pixels are decoded, and every
transfer syntax a PACS export carries is decoded through pydicom's pixel data plugins (pylibjpeg
with its libjpeg, openjpeg and rle plugins; pinned in constraints.txt). A syntax no installed
plugin decodes is an `ImageProblem` naming the syntax.

Conversions that change pixel values (bit-depth rescaling, alpha flattening, palette expansion,
MONOCHROME1 inversion, colour to grayscale) are recorded in `DecodedImage.conversion` so that
the data card can say what was done to which item.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pydicom
from PIL import Image, ImageFile, UnidentifiedImageError
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.uid import UID

from pipelines.config import DicomHeaderSpec
from pipelines.deid.image_metadata import sniff_format
from pipelines.errors import MedloopError

PNG_COMPRESS_LEVEL = 1  # intermediate files: speed matters more than size
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_COLOUR_PHOTOMETRICS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420")
# JPEG start-of-frame markers: SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xDA)})
_JPEG_SOS = 0xDA
_UNDEFINED_LENGTH = 0xFFFFFFFF  # DICOM length of sequences and encapsulated data with delimiters
# What a DICOM code string (CS) may hold: upper-case letters, digits, space and underscore; a
# few more are tolerated, since writers are lax about case and punctuation.
_CODE_CHARACTERS = re.compile(r"[A-Za-z0-9 _.\-\\]*")
# PNG IHDR colour types.
_PNG_PALETTE = 3


@dataclass(frozen=True)
class DecodedImage:
    """An image decoded for training, with what was done to get there.

    Attributes:
        pixels: uint8 array of shape (height, width, channels), channels being 1 or 3 as asked.
        source_bit_depth: bits per sample in the source (PNG IHDR bit depth, JPEG sample
            precision, DICOM Bits Stored); 8 for palette images, whose palette entries are 8-bit.
        source_mode: the source's pixel layout: Pillow's mode (``"L"``, ``"RGB"``, ``"RGBA"``,
            ``"I;16"``, ``"P"``, ``"CMYK"``) or the DICOM Photometric Interpretation.
        conversion: ``""`` when nothing changed beyond replicating a gray channel, else short
            notes joined by ``"; "``, e.g. ``"16-bit rescaled to 8-bit; alpha flattened onto
            black"``.
        header_warnings: DICOM header mismatches that the rules say to keep the image with
            (``on_mismatch: warn``), one sentence each.
    """

    pixels: np.ndarray
    source_bit_depth: int
    source_mode: str
    conversion: str
    header_warnings: tuple[str, ...] = ()


class ImageProblem(MedloopError):
    """Why an image cannot be used; ``str(exc)`` is the quarantine reason."""


def decode_image(
    data: bytes,
    *,
    channels: int,
    min_side: int,
    max_pixels: int,
    dicom_header: DicomHeaderSpec | None = None,
) -> DecodedImage:
    """Decode a JPEG, PNG or DICOM file into a uint8 array with the requested channels.

    The format is judged by magic bytes. Width and height are checked against ``max_pixels``
    and ``min_side`` from the header, and a DICOM header against ``dicom_header``, before
    pixel data is decoded.

    Args:
        data: the file's content.
        channels: 1 for grayscale (ITU-R 601 luma, as Pillow's ``"L"``) or 3 for RGB
            (grayscale is replicated).
        min_side: smallest acceptable width or height, in pixels.
        max_pixels: largest acceptable width * height (for DICOM, of one frame). Pillow's own
            ``Image.MAX_IMAGE_PIXELS`` applies as well when it is lower.
        dicom_header: rules a DICOM file's header must meet (see `check_dicom_header`);
            ``None`` checks nothing.

    Returns:
        The decoded pixels with their provenance.

    Raises:
        ImageProblem: the data is empty, not a recognised image, truncated or corrupt, declares
            more pixels than allowed, is smaller than ``min_side``, is a DICOM file whose header
            breaks a ``quarantine`` rule, or is a DICOM file without decodable pixel data (the
            message then names the transfer syntax).
        ValueError: ``channels``, ``min_side`` or ``max_pixels`` is out of range (a caller's
            mistake, not the image's).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    if min_side < 1 or max_pixels < 1:
        raise ValueError(f"min_side and max_pixels must be positive, not {min_side}, {max_pixels}")
    if not data:
        raise ImageProblem("zero-byte file")
    image_format = sniff_format(data)
    if image_format == "dicom":
        return _decode_dicom(
            data, channels=channels, min_side=min_side, max_pixels=max_pixels, rules=dicom_header
        )
    if image_format in ("jpeg", "png"):
        return _decode_with_pillow(
            data, image_format, channels=channels, min_side=min_side, max_pixels=max_pixels
        )
    raise ImageProblem("not an image (unrecognised format)")


def intensity_stats(pixels: np.ndarray) -> dict[str, float]:
    """Mean, standard deviation, minimum and maximum of uint8 pixels, on the 0..255 scale.

    Args:
        pixels: a uint8 array of any shape (all channels are pooled).

    Returns:
        ``{"mean_intensity", "std_intensity", "min_intensity", "max_intensity"}`` as floats.

    Raises:
        ValueError: the array is empty or not uint8.
    """
    if pixels.dtype != np.uint8:
        raise ValueError(f"intensity_stats expects uint8 pixels, got {pixels.dtype}")
    if pixels.size == 0:
        raise ValueError("intensity_stats got an empty array")
    return {
        "mean_intensity": float(pixels.mean(dtype=np.float64)),
        "std_intensity": float(pixels.std(dtype=np.float64)),
        "min_intensity": float(pixels.min()),
        "max_intensity": float(pixels.max()),
    }


def encode_png(pixels: np.ndarray) -> bytes:
    """Encode an (H, W, 1) or (H, W, 3) uint8 array as a lossless PNG without metadata.

    Args:
        pixels: the array, as in `DecodedImage.pixels`.

    Returns:
        The PNG file's bytes.

    Raises:
        ValueError: the array is not uint8 or not of shape (H, W, 1) / (H, W, 3).
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in (1, 3):
        raise ValueError(
            f"encode_png expects a uint8 array of shape (H, W, 1) or (H, W, 3), got "
            f"{pixels.dtype} {pixels.shape}"
        )
    if pixels.shape[2] == 1:
        image = Image.fromarray(np.ascontiguousarray(pixels[:, :, 0]), mode="L")
    else:
        image = Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


# --- JPEG and PNG -------------------------------------------------------------------------------


def _decode_with_pillow(
    data: bytes, image_format: str, *, channels: int, min_side: int, max_pixels: int
) -> DecodedImage:
    """Decode a JPEG or PNG with Pillow, after checking the size its header declares."""
    # Pillow's global guard still applies; take the stricter of the two so that our message,
    # not Pillow's warning, reports an oversized image.
    pillow_limit = Image.MAX_IMAGE_PIXELS
    limit = max_pixels if pillow_limit is None else min(max_pixels, pillow_limit)
    header = _png_header(data) if image_format == "png" else _jpeg_header(data)
    if header is not None:
        _check_size(header.width, header.height, min_side=min_side, limit=limit)

    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # With it set, Pillow pads a truncated image with gray instead of failing in load().
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True somewhere in this process; truncated "
            "images would pass as valid. Leave it at its default (False)."
        )
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[image_format.upper()]) as image:
                _check_size(*image.size, min_side=min_side, limit=limit)
                image.load()
                pixels, notes = _pillow_to_array(image, header)
                mode = image.mode
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        if header is None:
            raise ImageProblem(f"{exc} (decompression bomb guard)") from exc
        raise ImageProblem(_too_many_pixels(header.width, header.height, limit)) from exc
    except UnidentifiedImageError as exc:
        # Pillow's message names the BytesIO object's address, which means nothing to a reader.
        raise ImageProblem(
            f"truncated or corrupt image: Pillow cannot read the {image_format.upper()} header"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as exc:
        raise ImageProblem(f"truncated or corrupt image: {exc}") from exc

    if header is not None and header.palette:
        bit_depth = 8
    elif header is not None:
        bit_depth = header.bit_depth
    else:
        bit_depth = 16 if mode.startswith("I") else 8
    pixels = _to_channels(pixels, channels, notes)
    return DecodedImage(pixels, bit_depth, mode, "; ".join(notes))


def _pillow_to_array(image: Image.Image, header: _Header | None) -> tuple[np.ndarray, list[str]]:
    """A loaded Pillow image as (H, W) gray or (H, W, 3) RGB uint8, and the notes on changes."""
    notes: list[str] = []
    mode = image.mode
    if mode == "P" or mode == "PA":
        notes.append("palette expanded to RGB")
        has_alpha = mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    elif mode in ("L", "RGB") and "transparency" in image.info:
        # A tRNS colour key is transparency too; flatten it like an alpha channel.
        image = image.convert("LA" if mode == "L" else "RGBA")
    elif mode == "1":
        image = image.convert("L")
        notes.append("1-bit expanded to 8-bit")
    elif mode == "CMYK":
        image = image.convert("RGB")
        notes.append("CMYK converted to RGB")
    elif mode not in ("L", "LA", "RGB", "RGBA") and not mode.startswith("I"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        notes.append(f"{mode} converted to {image.mode}")

    if image.mode.startswith("I"):
        return _to_uint8(np.asarray(image), 16, notes), notes
    array = np.asarray(image)
    if image.mode in ("LA", "RGBA"):
        array = _flatten_alpha(array)
        notes.append("alpha flattened onto black")
    if header is not None and header.bit_depth < 8 and not header.palette and mode == "L":
        notes.append(f"{header.bit_depth}-bit expanded to 8-bit")  # Pillow scales L;2 and L;4
    if header is not None and header.bit_depth == 16 and not mode.startswith("I"):
        # Pillow reads 16-bit colour PNGs as 8-bit by keeping the high byte of each sample.
        notes.append("16-bit reduced to 8-bit (high byte)")
    return array, notes


@dataclass(frozen=True)
class _Header:
    """What a JPEG or PNG header declares, read without decoding anything."""

    width: int
    height: int
    bit_depth: int
    palette: bool = False


def _png_header(data: bytes) -> _Header | None:
    """Size and bit depth from the IHDR chunk, which the PNG format puts first."""
    if len(data) < 29 or data[12:16] != b"IHDR":
        return None
    width, height, bit_depth, colour_type = struct.unpack(">IIBB", data[16:26])
    return _Header(width, height, bit_depth, palette=colour_type == _PNG_PALETTE)


def _jpeg_header(data: bytes) -> _Header | None:
    """Size and sample precision from the first start-of-frame segment, or None if not found."""
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _JPEG_STANDALONE_MARKERS:
            position += 2
            continue
        if marker == _JPEG_SOS:
            return None  # a scan before any frame header: leave it to Pillow to reject
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        if marker in _JPEG_SOF_MARKERS:
            if position + 9 > len(data):
                return None
            precision, height, width = struct.unpack(">BHH", data[position + 4 : position + 9])
            return _Header(width, height, precision)
        position += 2 + length
    return None


# --- DICOM --------------------------------------------------------------------------------------


def _decode_dicom(
    data: bytes, *, channels: int, min_side: int, max_pixels: int, rules: DicomHeaderSpec | None
) -> DecodedImage:
    """Decode the first frame of a DICOM file with pydicom, applying its display LUTs."""
    dataset = _read_dicom(data)
    if not any(tag in dataset for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageProblem("DICOM file has no pixel data")
    warnings_kept: list[str] = []
    if rules is not None:
        mismatches = check_dicom_header(dataset, rules)
        refused = [m.reason for m in mismatches if m.action == "quarantine"]
        if refused:
            raise ImageProblem("; ".join(refused))
        warnings_kept = [m.reason for m in mismatches]
    rows, columns = dataset.get("Rows"), dataset.get("Columns")
    if not rows or not columns:
        raise ImageProblem("DICOM file has pixel data but no Rows/Columns")
    _check_size(int(columns), int(rows), min_side=min_side, limit=max_pixels)

    photometric = str(dataset.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in (*_MONOCHROME, "PALETTE COLOR", *_COLOUR_PHOTOMETRICS):
        raise ImageProblem(f"unsupported DICOM Photometric Interpretation {photometric!r}")
    bit_depth = int(dataset.get("BitsStored") or dataset.get("BitsAllocated") or 8)
    frames = int(dataset.get("NumberOfFrames") or 1)
    notes: list[str] = []
    if frames > 1:
        notes.append(f"first of {frames} frames used")

    try:
        # index=0 decodes only the first frame; YBR colour is converted to RGB by default.
        array = pixel_array(dataset, index=0)
    except (NotImplementedError, RuntimeError) as exc:
        # No installed plugin supports the syntax, or every one that does failed on the data.
        raise ImageProblem(
            f"cannot decode DICOM pixel data ({_transfer_syntax(dataset)}): {_plugin_reasons(exc)}. "
            "If another tool opens the file, convert it to an uncompressed transfer syntax "
            "(e.g. gdcmconv --raw) and collect it again"
        ) from exc
    except Exception as exc:  # truncated pixel data, inconsistent group 0028 values, ...
        raise ImageProblem(f"truncated or corrupt image: {_one_line(exc)}") from exc

    try:
        if photometric in _MONOCHROME:
            if "ModalityLUTSequence" in dataset or _has_rescale(dataset):
                array = apply_modality_lut(array, dataset)
                notes.append("modality LUT applied")
            if "VOILUTSequence" in dataset or "WindowCenter" in dataset:
                array = apply_voi_lut(array, dataset, index=0)
                notes.append("VOI LUT applied")
        elif photometric == "PALETTE COLOR":
            lut_bits = int(dataset.RedPaletteColorLookupTableDescriptor[2])
            array = apply_color_lut(array, dataset)
            if lut_bits == 16:
                array = (array >> 8).astype(np.uint8)  # 16-bit palette entries to 8-bit
            bit_depth = 8
            notes.append("palette expanded to RGB")
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise ImageProblem(f"invalid DICOM display LUT: {_one_line(exc)}") from exc

    pixels = _to_uint8(array, bit_depth, notes)
    if photometric == "MONOCHROME1":
        # MONOCHROME1 shows the lowest value as white; invert so that all gray images agree.
        pixels = 255 - pixels
        notes.append("MONOCHROME1 inverted")
    pixels = _to_channels(pixels, channels, notes)
    return DecodedImage(pixels, bit_depth, photometric, "; ".join(notes), tuple(warnings_kept))


@dataclass(frozen=True)
class HeaderMismatch:
    """A DICOM attribute that breaks its rule.

    Attributes:
        keyword: the DICOM keyword, e.g. ``"Modality"``.
        action: what the rule says to do: ``"quarantine"`` or ``"warn"``.
        reason: one sentence naming the attribute, the value found and the values allowed.
    """

    keyword: str
    action: Literal["quarantine", "warn"]
    reason: str


def dicom_header_refusal(data: bytes, rules: DicomHeaderSpec) -> str | None:
    """Why a DICOM file is not what the model was built for: the reasons of every rule of
    ``clean.image.dicom`` whose mismatch quarantines, joined; None when the header passes (the
    service refuses such a file as clean quarantines it)."""
    refused = [m.reason for m in check_dicom_header(_read_dicom(data), rules) if m.action == "quarantine"]
    return "; ".join(refused) or None


def check_dicom_header(dataset: Dataset, rules: DicomHeaderSpec) -> list[HeaderMismatch]:
    """Compare a DICOM header with the rules of ``clean.image.dicom``.

    Values are compared case-insensitively after trimming spaces; every value of a
    multi-valued attribute must be allowed. An absent or empty attribute breaks its rule only
    when the rule is ``required``.

    Args:
        dataset: the parsed header (a de-identified one: the checked attributes are coded
            strings, which de-identification keeps).
        rules: the attributes to check and what each must hold.

    Returns:
        One mismatch per attribute that breaks its rule, in the order of the rules; empty when
        the header meets them all.
    """
    mismatches = []
    for keyword, rule in rules.tags.items():
        where = f"clean.image.dicom.tags.{keyword}"
        try:
            values = _coded_values(dataset.get(keyword))
        except Exception:  # a malformed value pydicom cannot convert
            mismatches.append(HeaderMismatch(
                keyword, rule.on_mismatch, f"DICOM {keyword} cannot be read ({where})"
            ))
            continue
        if not values:
            if rule.required:
                mismatches.append(HeaderMismatch(
                    keyword, rule.on_mismatch, f"DICOM {keyword} is absent but required ({where}.required)"
                ))
            continue
        allowed = {code.strip().upper() for code in rule.allowed}
        if all(code.upper() in allowed for code in values):
            continue
        shown = _show_code("\\".join(values))
        mismatches.append(HeaderMismatch(
            keyword, rule.on_mismatch,
            f"DICOM {keyword} is {shown}, not one of {', '.join(rule.allowed)} ({where})",
        ))
    return mismatches


def _coded_values(value: object) -> list[str]:
    """The non-empty values of a coded-string element, trimmed."""
    if value is None:
        return []
    items = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    return [text for text in (str(item).strip() for item in items) if text]


def _show_code(text: str) -> str:
    """A header value fit for a report: codes are shown, anything else only by its length."""
    if len(text) <= 64 and _CODE_CHARACTERS.fullmatch(text):
        return f"'{text}'"  # not repr(): it would double the backslash between values
    return f"a value of {len(text)} characters that is not a code"


def _transfer_syntax(dataset: Dataset) -> str:
    """The transfer syntax's name and UID, e.g. ``JPEG-LS Lossless Image Compression, 1.2...``."""
    syntax = getattr(dataset, "file_meta", Dataset()).get("TransferSyntaxUID")
    if not syntax:
        return "unknown transfer syntax"
    syntax = UID(str(syntax))
    return str(syntax) if syntax.name == str(syntax) else f"{syntax.name}, {syntax}"


def _plugin_reasons(exc: BaseException) -> str:
    """pydicom's decoder failure, one clause per plugin that tried, on one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return "; ".join(lines[1:])  # "Unable to decode as exceptions were raised by all ...:"
    return _one_line(exc)


def _read_dicom(data: bytes) -> Dataset:
    """Parse a DICOM file, refusing one that ends early.

    pydicom stops quietly at the end of the data: an element cut short keeps a short value and
    a cut inside undefined-length data only warns, so a truncated file would otherwise look like
    a complete one without pixel data.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            dataset = pydicom.dcmread(io.BytesIO(data))
        except Exception as exc:  # pydicom raises many unrelated types for malformed input
            raise ImageProblem(f"truncated or corrupt DICOM file: {_one_line(exc)}") from exc
    for warning in caught:
        if "end of file" in str(warning.message).lower():
            raise ImageProblem(
                "truncated or corrupt DICOM file: it ends inside a sequence or inside "
                "encapsulated pixel data"
            )
        warnings.warn(warning.message, warning.category, stacklevel=3)

    if len(dataset) == 0:
        raise ImageProblem(
            "truncated or corrupt DICOM file: no data elements after the file meta information"
        )
    if _is_deflated(dataset):
        # Positions refer to the inflated copy pydicom read, not to ``data``; a cut inside the
        # deflated stream already failed in zlib.
        return dataset
    last = dataset.get_item(max(dataset.keys()))
    length = getattr(last, "length", _UNDEFINED_LENGTH)
    value_tell = getattr(last, "value_tell", None)
    # A complete file ends exactly where its last element's value ends.
    if value_tell is not None and length != _UNDEFINED_LENGTH and value_tell + length != len(data):
        raise ImageProblem(
            f"truncated or corrupt DICOM file: the last element {last.tag} ends at byte "
            f"{value_tell + length} but the file has {len(data)} bytes"
        )
    return dataset


def _is_deflated(dataset: Dataset) -> bool:
    syntax = getattr(dataset, "file_meta", Dataset()).get("TransferSyntaxUID")
    if not syntax:
        return False
    syntax = UID(str(syntax))
    return syntax.is_transfer_syntax and syntax.is_deflated  # is_deflated raises for other UIDs


def _has_rescale(dataset: Dataset) -> bool:
    """Whether Rescale Slope and Intercept are both present (pydicom needs both), not identity."""
    slope = dataset.get("RescaleSlope")
    intercept = dataset.get("RescaleIntercept")
    if slope is None or intercept is None:
        return False
    return float(slope) != 1 or float(intercept) != 0


# --- shared -------------------------------------------------------------------------------------


def _check_size(width: int, height: int, *, min_side: int, limit: int) -> None:
    """Refuse images larger than ``limit`` pixels or with a side below ``min_side``."""
    if width * height > limit:
        raise ImageProblem(_too_many_pixels(width, height, limit))
    if width < min_side or height < min_side:
        raise ImageProblem(
            f"image of {width}x{height} is smaller than the minimum side of {min_side} pixels"
        )


def _too_many_pixels(width: int, height: int, limit: int) -> str:
    return (
        f"image of {width}x{height} = {width * height} pixels exceeds the limit of {limit} "
        f"(decompression bomb guard)"
    )


def _to_uint8(array: np.ndarray, bit_depth: int, notes: list[str]) -> np.ndarray:
    """Bring gray or RGB sample values to uint8, noting any change of scale.

    8-bit data already within 0..255 is kept as it is; fewer bits are stretched to 0..255;
    anything wider (16-bit, 12-bit, rescaled or windowed floats) is min-max scaled by the
    image's own range. A constant image becomes all zeros.
    """
    if array.dtype == np.uint8 and bit_depth >= 8:
        return array
    low, high = float(array.min()), float(array.max())
    integral = np.issubdtype(array.dtype, np.integer)
    if bit_depth < 8 and integral and low >= 0 and high <= 2**bit_depth - 1:
        notes.append(f"{bit_depth}-bit expanded to 8-bit")
        scale = 255 / (2**bit_depth - 1)
        return np.rint(array.astype(np.float32) * scale).astype(np.uint8)
    if bit_depth <= 8 and low >= 0 and high <= 255:
        return np.rint(array).astype(np.uint8)
    notes.append(f"{bit_depth}-bit rescaled to 8-bit" if bit_depth > 8 else "rescaled to 8-bit")
    if high == low:
        return np.zeros(array.shape, dtype=np.uint8)
    # float32 halves the memory of float64 and is exact enough for 16-bit input.
    scaled = (array.astype(np.float32) - np.float32(low)) * np.float32(255 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _flatten_alpha(array: np.ndarray) -> np.ndarray:
    """Composite an (H, W, 2) LA or (H, W, 4) RGBA array onto black, dropping alpha."""
    colour = array[..., :-1].astype(np.uint16)
    alpha = array[..., -1:].astype(np.uint16)
    flattened = ((colour * alpha + 127) // 255).astype(np.uint8)
    return flattened[..., 0] if flattened.shape[-1] == 1 else flattened


def _to_channels(array: np.ndarray, channels: int, notes: list[str]) -> np.ndarray:
    """(H, W) gray or (H, W, 3) RGB uint8 to (H, W, channels)."""
    if array.ndim == 2:
        if channels == 1:
            return np.ascontiguousarray(array[:, :, np.newaxis])
        return np.ascontiguousarray(np.repeat(array[:, :, np.newaxis], 3, axis=2))
    if channels == 3:
        return np.ascontiguousarray(array)
    # Colour images whose channels are all equal (common for X-rays saved as RGB) lose nothing.
    red, green, blue = array[..., 0], array[..., 1], array[..., 2]
    if not (np.array_equal(red, green) and np.array_equal(red, blue)):
        notes.append("RGB converted to grayscale")
    gray = Image.fromarray(np.ascontiguousarray(array), mode="RGB").convert("L")
    return np.asarray(gray)[:, :, np.newaxis].copy()


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (pydicom's run over several, listing plugins)."""
    return " ".join(str(exc).split()) or type(exc).__name__
