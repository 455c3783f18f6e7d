"""Strip identifying metadata from JPEG and PNG files without re-encoding their pixels.

Photographs and screenshots carry EXIF (camera, dates, GPS, free-text descriptions), XMP,
IPTC, ICC profile names and comments, any of which can hold a patient's name or an accession
number. Both strippers walk the file's container structure and copy the pixel-bearing parts
byte for byte, so the decoded pixels are identical before and after, and they keep only what
decoders need to render the image. Anything after the end-of-image marker (JPEG EOI, PNG IEND)
is dropped too: trailers and appended images (MPO, vendor blobs) are not part of the image.
"""

from __future__ import annotations

import struct

from pipelines.errors import DeidentificationError

DICOM_PREAMBLE_LENGTH = 128
DICOM_PREFIX = b"DICM"
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# JPEG markers (the byte after 0xFF).
_SOI = 0xD8
_EOI = 0xD9
_SOS = 0xDA
_APP0 = 0xE0
_APP14 = 0xEE
_COM = 0xFE
# Markers that stand alone, without a length field: TEM and the restart markers RST0..RST7.
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})
_JFIF_IDENTIFIER = b"JFIF\x00"
_ADOBE_IDENTIFIER = b"Adobe"
# JFIF APP0 payload up to and including the thumbnail dimensions (identifier, version, units,
# densities, Xthumbnail, Ythumbnail); the thumbnail pixels, if any, follow it.
_JFIF_HEADER_LENGTH = 14

# PNG chunks that decoders need or that change how the pixels are rendered. Every other
# ancillary chunk is dropped: tEXt/zTXt/iTXt/eXIf/tIME carry metadata outright, and unknown or
# private chunks cannot be proven free of identifiers. iCCP is dropped as well (its profile name
# and the profile's description tags are free text), matching the JPEG side where ICC (APP2) goes.
_PNG_KEPT_CHUNKS = frozenset(
    {
        b"IHDR", b"PLTE", b"IDAT", b"IEND",
        b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"sBIT", b"bKGD", b"pHYs", b"cICP",
    }
)  # fmt: skip
_PNG_CRITICAL_CHUNKS = frozenset({b"IHDR", b"PLTE", b"IDAT", b"IEND"})


def sniff_format(data: bytes) -> str | None:
    """Tell a stored file's format from its leading bytes, never from its name.

    Args:
        data: the file's content.

    Returns:
        ``"dicom"`` (128-byte preamble followed by ``DICM``), ``"jpeg"`` (``FF D8 FF``),
        ``"png"`` (the 8-byte PNG signature), or ``None`` for anything else.
    """
    if data[DICOM_PREAMBLE_LENGTH : DICOM_PREAMBLE_LENGTH + len(DICOM_PREFIX)] == DICOM_PREFIX:
        return "dicom"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data.startswith(PNG_SIGNATURE):
        return "png"
    return None


def strip_jpeg_metadata(data: bytes) -> bytes:
    """Remove metadata segments from a JPEG, copying the compressed image data unchanged.

    Kept: APP0 JFIF (with any embedded thumbnail removed), APP14 Adobe (it says whether the
    decoder must colour-transform), and every table/frame/scan segment with its entropy-coded
    data. Dropped: APP1..APP15 other than Adobe APP14 (EXIF, XMP, ICC, IPTC, vendor blocks),
    APP0 segments that are not JFIF (JFXX thumbnails), COM comments, and anything after EOI.
    Segments between the scans of a progressive JPEG are filtered the same way.

    Args:
        data: the JPEG file's content.

    Returns:
        The JPEG without its metadata; it decodes to exactly the same pixels.

    Raises:
        DeidentificationError: the input is empty, is not a JPEG, has a segment whose declared
            length runs past the end of the file, or has no start-of-scan (SOS) marker.
    """
    if not data:
        raise DeidentificationError("zero-byte file")
    if not data.startswith(JPEG_MAGIC):
        raise DeidentificationError(f"not a JPEG file (starts with {_leading_hex(data)})")

    out = bytearray(data[:2])  # SOI
    seen_scan = False
    position = 2
    while position < len(data):
        marker, start, end = _next_jpeg_segment(data, position)
        position = end
        if marker == _EOI:
            if not seen_scan:
                break
            out += data[start:end]
            return bytes(out)
        if marker == _SOI:
            raise DeidentificationError(
                f"corrupt JPEG: second start-of-image marker at byte {start}"
            )
        if marker in _STANDALONE_MARKERS:
            out += data[start:end]
            continue
        out += _filtered_jpeg_segment(marker, data[start:end])
        if marker == _SOS:
            seen_scan = True
            # The entropy-coded data after a scan header has no length field: it runs until the
            # first marker that is neither a stuffed 0xFF00 nor a restart marker.
            position = _end_of_entropy_coded_data(data, end)
            out += data[end:position]

    if not seen_scan:
        raise DeidentificationError(
            "JPEG has no start-of-scan (SOS) marker, so it holds no image data"
        )
    # The file ends inside the compressed data, without EOI: a truncated image. It is passed on
    # as it is so that decoding reports the truncation; nothing follows that scan to filter.
    return bytes(out)


def strip_png_metadata(data: bytes) -> bytes:
    """Remove metadata chunks from a PNG, copying the image chunks unchanged.

    Kept: IHDR, PLTE, IDAT, IEND and the ancillary chunks that affect rendering (tRNS, gAMA,
    cHRM, sRGB, sBIT, bKGD, pHYs, cICP). Dropped: every other ancillary chunk, including tEXt,
    zTXt, iTXt, eXIf, tIME, iCCP, APNG animation chunks and private chunks, and anything after
    IEND. Chunk CRCs are copied, not checked; decoding checks them.

    Args:
        data: the PNG file's content.

    Returns:
        The PNG without its metadata; it decodes to exactly the same pixels.

    Raises:
        DeidentificationError: the input is empty, is not a PNG, is truncated (a chunk runs past
            the end, or the file ends before IEND), does not start with IHDR, or has a critical
            chunk this module does not know (which could hold anything).
    """
    if not data:
        raise DeidentificationError("zero-byte file")
    if not data.startswith(PNG_SIGNATURE):
        raise DeidentificationError(f"not a PNG file (starts with {_leading_hex(data)})")

    out = bytearray(PNG_SIGNATURE)
    position = len(PNG_SIGNATURE)
    first = True
    while position < len(data):
        if position + 8 > len(data):
            raise DeidentificationError(
                f"truncated PNG: chunk header at byte {position} runs past the end of the "
                f"file ({len(data)} bytes)"
            )
        (length,) = struct.unpack(">I", data[position : position + 4])
        chunk_type = data[position + 4 : position + 8]
        end = position + 12 + length  # length field, type, data, CRC
        name = chunk_type.decode("latin-1")
        if end > len(data):
            raise DeidentificationError(
                f"truncated PNG: chunk {name!r} at byte {position} declares {length} data bytes "
                f"but only {max(len(data) - position - 12, 0)} remain"
            )
        if first and chunk_type != b"IHDR":
            raise DeidentificationError(f"corrupt PNG: first chunk is {name!r}, not 'IHDR'")
        first = False
        # Bit 5 of the first type byte is set (lower case) for ancillary chunks.
        is_critical = not chunk_type[0] & 0x20
        if is_critical and chunk_type not in _PNG_CRITICAL_CHUNKS:
            raise DeidentificationError(
                f"PNG has an unknown critical chunk {name!r} at byte {position}; it cannot be "
                f"checked for identifiers"
            )
        if chunk_type in _PNG_KEPT_CHUNKS:
            out += data[position:end]
        if chunk_type == b"IEND":
            return bytes(out)
        position = end

    raise DeidentificationError(
        f"truncated PNG: the file ends after {len(data)} bytes without an IEND chunk"
    )


def _next_jpeg_segment(data: bytes, position: int) -> tuple[int, int, int]:
    """The marker at ``position`` and the byte range of its segment (marker included).

    Fill bytes (extra 0xFF before a marker) are skipped and not part of the range.
    """
    if data[position] != 0xFF:
        raise DeidentificationError(
            f"corrupt JPEG header: expected a marker at byte {position}, "
            f"found 0x{data[position]:02X}"
        )
    while position + 1 < len(data) and data[position + 1] == 0xFF:
        position += 1
    if position + 1 >= len(data):
        raise DeidentificationError(
            f"truncated JPEG header: the file ends inside a marker at byte {position}"
        )
    marker = data[position + 1]
    if marker in _STANDALONE_MARKERS or marker in (_SOI, _EOI):
        return marker, position, position + 2
    if position + 4 > len(data):
        raise DeidentificationError(
            f"truncated JPEG header: segment 0xFF{marker:02X} at byte {position} has no "
            f"length field"
        )
    (length,) = struct.unpack(">H", data[position + 2 : position + 4])
    if length < 2:
        raise DeidentificationError(
            f"corrupt JPEG header: segment 0xFF{marker:02X} at byte {position} declares "
            f"length {length}"
        )
    end = position + 2 + length
    if end > len(data):
        raise DeidentificationError(
            f"truncated JPEG header: segment 0xFF{marker:02X} at byte {position} declares {length} "
            f"bytes but only {len(data) - position - 2} remain"
        )
    return marker, position, end


def _filtered_jpeg_segment(marker: int, segment: bytes) -> bytes:
    """What to write for one length-carrying segment: itself, a reduced copy, or nothing."""
    payload = segment[4:]
    if marker == _APP0:
        if not payload.startswith(_JFIF_IDENTIFIER) or len(payload) < _JFIF_HEADER_LENGTH:
            return b""  # JFXX extension (a thumbnail) or a non-JFIF APP0
        # Keep the JFIF header (density/aspect matter) but drop the optional thumbnail, which is
        # a second copy of the picture that pixel-level redaction would not reach.
        header = payload[: _JFIF_HEADER_LENGTH - 2] + b"\x00\x00"
        return bytes([0xFF, _APP0]) + struct.pack(">H", len(header) + 2) + header
    if marker == _APP14:
        return segment if payload.startswith(_ADOBE_IDENTIFIER) else b""
    if _APP0 < marker <= 0xEF or marker == _COM:
        return b""
    return segment


def _end_of_entropy_coded_data(data: bytes, position: int) -> int:
    """Index of the first real marker at or after ``position``, or ``len(data)`` if none."""
    while True:
        position = data.find(b"\xff", position)
        if position == -1 or position + 1 >= len(data):
            return len(data)
        following = data[position + 1]
        if following == 0x00 or 0xD0 <= following <= 0xD7:
            position += 2  # stuffed 0xFF data byte, or a restart marker inside the scan
        else:
            return position  # a marker, possibly preceded by fill bytes the segment walk skips


def _leading_hex(data: bytes) -> str:
    """The first bytes of a file in hex, for messages about unrecognised content."""
    return data[:8].hex(" ")
