"""Metadata stripping of JPEG and PNG files: identifiers go, pixels stay identical."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from pipelines.deid.image_metadata import sniff_format, strip_jpeg_metadata, strip_png_metadata
from pipelines.errors import DeidentificationError

CANARY = "CANARY-PATIENT-X"
CANARY_BYTES = CANARY.encode()
EXIF_IMAGE_DESCRIPTION = 0x010E
EXIF_ARTIST = 0x013B


def _picture(mode: str = "RGB", size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A small image with structure, so that pixel comparisons mean something."""
    rng = np.random.default_rng(7)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(array[:, :, 0] if channels == 1 else array, mode=mode)


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB") if image.mode == "CMYK" else image).copy()


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def _markers(jpeg: bytes) -> list[int]:
    """Markers of the header segments, up to and including the first SOS."""
    found, position = [], 2
    while True:
        marker = jpeg[position + 1]
        found.append(marker)
        if marker == 0xDA:
            return found
        (length,) = struct.unpack(">H", jpeg[position + 2 : position + 4])
        position += 2 + length


def _jpeg_with_metadata(**save_options: object) -> bytes:
    exif = Image.Exif()
    exif[EXIF_IMAGE_DESCRIPTION] = f"Chest PA {CANARY}"
    exif[EXIF_ARTIST] = CANARY
    xmp = f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><dc:creator>{CANARY}</dc:creator></x:xmpmeta>'
    buffer = io.BytesIO()
    _picture().save(
        buffer,
        format="JPEG",
        quality=90,
        exif=exif.tobytes(),
        comment=f"patient {CANARY}".encode(),
        xmp=xmp.encode(),
        icc_profile=b"fake-icc " + CANARY_BYTES,
        **save_options,
    )
    data = buffer.getvalue()
    # Pillow does not write IPTC; plant an APP13 Photoshop block after SOI by hand.
    iptc = _segment(0xED, b"Photoshop 3.0\x00" + b"8BIM\x04\x04" + CANARY_BYTES)
    return data[:2] + iptc + data[2:]


def _png_chunk(chunk_type: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(chunk_type + body)
    return struct.pack(">I", len(body)) + chunk_type + body + struct.pack(">I", crc)


def _png_with_metadata(image: Image.Image | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", CANARY)
    info.add_text("Comment", CANARY * 4, zip=True)  # zTXt
    info.add_itxt("Description", CANARY, lang="en", tkey="Description")
    info.add(b"tIME", struct.pack(">HBBBBB", 2024, 5, 1, 12, 0, 0))
    info.add(b"prVt", CANARY_BYTES)  # a private ancillary chunk
    exif = Image.Exif()
    exif[EXIF_IMAGE_DESCRIPTION] = CANARY
    buffer = io.BytesIO()
    (image or _picture()).save(
        buffer, format="PNG", pnginfo=info, exif=exif.tobytes(), icc_profile=b"icc " + CANARY_BYTES
    )
    return buffer.getvalue()


class TestSniffFormat:
    def test_recognises_by_magic_bytes(self) -> None:
        buffer = io.BytesIO()
        _picture().save(buffer, format="JPEG")
        assert sniff_format(buffer.getvalue()) == "jpeg"
        buffer = io.BytesIO()
        _picture().save(buffer, format="PNG")
        assert sniff_format(buffer.getvalue()) == "png"
        assert sniff_format(b"\x00" * 128 + b"DICM" + b"\x02\x00") == "dicom"

    @pytest.mark.parametrize(
        "data", [b"", b"just some text, saved as scan.png", b"\x00" * 128 + b"DIC", b"GIF89a...."]
    )
    def test_anything_else_is_none(self, data: bytes) -> None:
        assert sniff_format(data) is None


class TestStripJpeg:
    def test_planted_identifiers_are_gone_and_pixels_identical(self) -> None:
        original = _jpeg_with_metadata()
        assert original.count(CANARY_BYTES) >= 5  # EXIF x2, COM, XMP, ICC, IPTC

        stripped = strip_jpeg_metadata(original)

        assert CANARY_BYTES not in stripped
        np.testing.assert_array_equal(_pixels(stripped), _pixels(original))
        with Image.open(io.BytesIO(stripped)) as image:
            assert "exif" not in image.info and "icc_profile" not in image.info
            assert "comment" not in image.info and "xmp" not in image.info

    def test_keeps_app0_jfif_and_drops_app1_to_app15_and_com(self) -> None:
        original = _jpeg_with_metadata()
        assert {0xE1, 0xE2, 0xED, 0xFE} <= set(_markers(original))

        markers = _markers(strip_jpeg_metadata(original))

        assert markers[0] == 0xE0
        assert not set(markers) & ({*range(0xE1, 0xF0)} | {0xFE})

    def test_entropy_coded_data_is_copied_byte_for_byte(self) -> None:
        original = _jpeg_with_metadata()
        stripped = strip_jpeg_metadata(original)
        scan = original.index(b"\xff\xda")
        assert stripped.endswith(original[scan:])

    def test_keeps_adobe_app14_so_cmyk_decodes_the_same(self) -> None:
        buffer = io.BytesIO()
        cmyk = Image.new("CMYK", (32, 32), (0, 200, 100, 30))
        cmyk.save(buffer, format="JPEG", comment=CANARY_BYTES)
        original = buffer.getvalue()
        assert 0xEE in _markers(original)

        stripped = strip_jpeg_metadata(original)

        assert 0xEE in _markers(stripped)
        assert CANARY_BYTES not in stripped
        np.testing.assert_array_equal(_pixels(stripped), _pixels(original))

    def test_progressive_jpeg_loses_comments_between_scans(self) -> None:
        original = _jpeg_with_metadata(progressive=True)
        # Plant a comment before the second scan, where a header-only walk would miss it.
        second_scan = original.index(b"\xff\xda", original.index(b"\xff\xda") + 2)
        planted = original[:second_scan] + _segment(0xFE, CANARY_BYTES) + original[second_scan:]

        stripped = strip_jpeg_metadata(planted)

        assert CANARY_BYTES not in stripped
        np.testing.assert_array_equal(_pixels(stripped), _pixels(original))

    def test_drops_jfif_thumbnail_and_data_after_eoi(self) -> None:
        original = _jpeg_with_metadata()
        jfif_end = 4 + struct.unpack(">H", original[4:6])[0]
        thumbnail = original[6:18] + b"\x02\x01" + CANARY_BYTES[:6]  # a 2x1 RGB thumbnail
        trailer = b"TRAILER " + CANARY_BYTES
        planted = original[:2] + _segment(0xE0, thumbnail) + original[jfif_end:] + trailer

        stripped = strip_jpeg_metadata(planted)

        assert CANARY_BYTES[:6] not in stripped and CANARY_BYTES not in stripped
        assert stripped.endswith(b"\xff\xd9")
        assert stripped[2:6] == b"\xff\xe0\x00\x10"  # APP0 of 16 bytes: JFIF header only
        assert stripped[6:11] == b"JFIF\x00" and stripped[18:20] == b"\x00\x00"
        np.testing.assert_array_equal(_pixels(stripped), _pixels(original))

    def test_zero_byte_file(self) -> None:
        with pytest.raises(DeidentificationError, match="^zero-byte file$"):
            strip_jpeg_metadata(b"")

    def test_not_a_jpeg(self) -> None:
        reason = r"^not a JPEG file \(starts with 89 50 4e 47 0d 0a 1a 0a\)$"
        with pytest.raises(DeidentificationError, match=reason):
            strip_jpeg_metadata(_png_with_metadata())

    def test_segment_running_past_the_end_is_a_truncated_header(self) -> None:
        original = _jpeg_with_metadata()
        exif_start = original.index(b"\xff\xe1")
        with pytest.raises(DeidentificationError, match="truncated JPEG header"):
            strip_jpeg_metadata(original[: exif_start + 40])

    def test_no_start_of_scan(self) -> None:
        original = _jpeg_with_metadata()
        headers_only = original[: original.index(b"\xff\xda")] + b"\xff\xd9"
        with pytest.raises(DeidentificationError, match="no start-of-scan"):
            strip_jpeg_metadata(headers_only)
        with pytest.raises(DeidentificationError, match="no start-of-scan"):
            strip_jpeg_metadata(original[: original.index(b"\xff\xda")])


class TestStripPng:
    @pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
    def test_planted_identifiers_are_gone_and_pixels_identical(self, mode: str) -> None:
        original = _png_with_metadata(_picture(mode))
        assert original.count(CANARY_BYTES) >= 4  # tEXt, iTXt, prVt, eXIf, iCCP (zTXt is deflated)
        for chunk_type in (b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME", b"iCCP", b"prVt"):
            assert chunk_type in original

        stripped = strip_png_metadata(original)

        assert CANARY_BYTES not in stripped
        for chunk_type in (b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME", b"iCCP", b"prVt"):
            assert chunk_type not in stripped
        np.testing.assert_array_equal(_pixels(stripped), _pixels(original))

    def test_keeps_rendering_chunks_byte_for_byte(self) -> None:
        palette = Image.new("P", (40, 40))
        palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
        palette.paste(1, (0, 0, 20, 20))
        buffer = io.BytesIO()
        palette.save(buffer, format="PNG", transparency=0, dpi=(300, 300))
        data = buffer.getvalue()
        ihdr_end = 8 + 25
        text = _png_chunk(b"tEXt", b"Author\x00" + CANARY_BYTES)
        planted = data[:ihdr_end] + text + data[ihdr_end:]

        stripped = strip_png_metadata(planted)

        assert stripped == data
        for chunk_type in (b"PLTE", b"tRNS", b"pHYs", b"IDAT", b"IEND"):
            assert chunk_type in stripped

    def test_drops_data_after_iend(self) -> None:
        buffer = io.BytesIO()
        _picture().save(buffer, format="PNG")
        clean = buffer.getvalue()
        assert strip_png_metadata(clean + b"appended " + CANARY_BYTES) == clean

    def test_zero_byte_file(self) -> None:
        with pytest.raises(DeidentificationError, match="^zero-byte file$"):
            strip_png_metadata(b"")

    def test_not_a_png(self) -> None:
        with pytest.raises(DeidentificationError, match=r"not a PNG file \(starts with 6e 6f 74"):
            strip_png_metadata(b"not an image at all")

    def test_chunk_running_past_the_end(self) -> None:
        original = _png_with_metadata()
        with pytest.raises(DeidentificationError, match="truncated PNG: chunk 'IDAT' at byte"):
            strip_png_metadata(original[: original.index(b"IDAT") + 20])

    def test_missing_iend(self) -> None:
        original = _png_with_metadata()
        with pytest.raises(DeidentificationError, match="truncated PNG: .* without an IEND chunk"):
            strip_png_metadata(original[: original.index(b"IEND") - 4])

    def test_unknown_critical_chunk_is_refused(self) -> None:
        original = _png_with_metadata()
        planted = original[:33] + _png_chunk(b"XXXX", CANARY_BYTES) + original[33:]
        with pytest.raises(DeidentificationError, match="unknown critical chunk 'XXXX'"):
            strip_png_metadata(planted)
