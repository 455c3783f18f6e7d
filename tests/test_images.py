"""Safe decoding of stored images: each bad input gets its exact quarantine reason."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageFile

from pipelines.errors import MedloopError
from pipelines.data.images import DecodedImage, ImageProblem, decode_image, encode_png, intensity_stats
from tests_support import dicom_file_bytes, pydicom_test_file

LIMITS = {"min_side": 32, "max_pixels": 50_000_000}


def _decode(data: bytes, channels: int = 1, **limits: int) -> DecodedImage:
    return decode_image(data, channels=channels, **{**LIMITS, **limits})


def _encoded(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def _noise(mode: str = "RGB", size: tuple[int, int] = (64, 48)) -> Image.Image:
    rng = np.random.default_rng(3)
    channels = {"L": 1, "RGB": 3}[mode]
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(array[:, :, 0] if channels == 1 else array, mode=mode)


def _png_chunk(chunk_type: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(chunk_type + body)
    return struct.pack(">I", len(body)) + chunk_type + body + struct.pack(">I", crc)


def _png_declaring(width: int, height: int) -> bytes:
    """A few-dozen-byte PNG whose IHDR declares width x height 8-bit gray and holds no rows."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b""))
        + _png_chunk(b"IEND", b"")
    )


def _dicom_dataset(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(pydicom_test_file(name)))


class TestRejections:
    def test_zero_byte_file(self) -> None:
        with pytest.raises(ImageProblem, match="^zero-byte file$"):
            _decode(b"")

    def test_text_file_named_png(self, tmp_path: Path) -> None:
        fake = tmp_path / "scan.png"
        fake.write_text("Patient: CANARY-PATIENT-X\nthis is not an image\n")
        with pytest.raises(ImageProblem, match=r"^not an image \(unrecognised format\)$"):
            _decode(fake.read_bytes())

    def test_truncated_jpeg(self) -> None:
        data = _encoded(_noise(size=(128, 128)), "JPEG")
        with pytest.raises(ImageProblem, match="^truncated or corrupt image: image file is trunc"):
            _decode(data[: len(data) // 2])

    def test_truncated_png(self) -> None:
        data = _encoded(_noise(size=(128, 128)), "PNG")
        with pytest.raises(ImageProblem, match="^truncated or corrupt image: "):
            _decode(data[: len(data) // 2])

    def test_png_cut_inside_its_header(self) -> None:
        data = _encoded(_noise(), "PNG")
        with pytest.raises(ImageProblem, match="^truncated or corrupt image: "):
            _decode(data[:20])

    def test_pillow_stays_strict_about_truncation(self) -> None:
        data = _encoded(_noise(size=(128, 128)), "JPEG")
        with pytest.raises(ImageProblem):
            _decode(data[: len(data) // 2])
        assert ImageFile.LOAD_TRUNCATED_IMAGES is False

    def test_refuses_to_run_when_pillow_accepts_truncated_images(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
        with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
            _decode(_encoded(_noise(), "PNG"))

    def test_png_decompression_bomb_is_refused_from_the_header(self) -> None:
        bomb = _png_declaring(40_000, 40_000)
        assert len(bomb) < 100
        with pytest.raises(ImageProblem) as caught:
            _decode(bomb)
        assert str(caught.value) == (
            "image of 40000x40000 = 1600000000 pixels exceeds the limit of 50000000 "
            "(decompression bomb guard)"
        )

    def test_pillow_limit_applies_when_lower_than_ours(self) -> None:
        with pytest.raises(ImageProblem) as caught:
            _decode(_png_declaring(30_000, 30_000), max_pixels=10**12)
        assert str(caught.value) == (
            f"image of 30000x30000 = 900000000 pixels exceeds the limit of "
            f"{Image.MAX_IMAGE_PIXELS} (decompression bomb guard)"
        )

    def test_jpeg_decompression_bomb_is_refused_from_the_frame_header(self) -> None:
        data = bytearray(_encoded(_noise(), "JPEG"))
        sof = data.index(b"\xff\xc0")
        data[sof + 5 : sof + 9] = struct.pack(">HH", 30_000, 20_000)  # height, width
        with pytest.raises(ImageProblem) as caught:
            _decode(bytes(data))
        assert str(caught.value) == (
            "image of 20000x30000 = 600000000 pixels exceeds the limit of 50000000 "
            "(decompression bomb guard)"
        )

    def test_limit_is_width_times_height(self) -> None:
        data = _encoded(_noise(size=(64, 48)), "PNG")
        assert _decode(data, max_pixels=64 * 48).pixels.shape == (48, 64, 1)
        too_many = "^image of 64x48 = 3072 pixels exceeds the limit of 3071 "
        with pytest.raises(ImageProblem, match=too_many):
            _decode(data, max_pixels=64 * 48 - 1)

    def test_one_pixel_image(self) -> None:
        with pytest.raises(ImageProblem) as caught:
            _decode(_encoded(Image.new("L", (1, 1), 128), "PNG"))
        assert str(caught.value) == "image of 1x1 is smaller than the minimum side of 32 pixels"

    def test_one_short_side_is_enough_to_refuse(self) -> None:
        too_small = "^image of 400x31 is smaller than the minimum side of 32 pixels$"
        with pytest.raises(ImageProblem, match=too_small):
            _decode(_encoded(Image.new("RGB", (400, 31)), "JPEG"))

    def test_problems_are_medloop_errors(self) -> None:
        assert issubclass(ImageProblem, MedloopError)

    @pytest.mark.parametrize("channels", [0, 2, 4])
    def test_bad_channels_is_a_caller_error(self, channels: int) -> None:
        with pytest.raises(ValueError, match="channels must be 1 or 3"):
            _decode(_encoded(_noise(), "PNG"), channels=channels)


class TestJpegAndPng:
    def test_gray_png_unchanged(self) -> None:
        image = _noise("L")
        decoded = _decode(_encoded(image, "PNG"))
        assert decoded.pixels.dtype == np.uint8 and decoded.pixels.shape == (48, 64, 1)
        np.testing.assert_array_equal(decoded.pixels[:, :, 0], np.asarray(image))
        assert (decoded.source_bit_depth, decoded.source_mode, decoded.conversion) == (8, "L", "")

    def test_gray_replicated_to_three_channels_is_not_a_conversion(self) -> None:
        image = _noise("L")
        decoded = _decode(_encoded(image, "PNG"), channels=3)
        assert decoded.pixels.shape == (48, 64, 3)
        for channel in range(3):
            np.testing.assert_array_equal(decoded.pixels[:, :, channel], np.asarray(image))
        assert decoded.conversion == ""

    def test_rgb_to_one_channel_uses_pillow_luma(self) -> None:
        image = _noise("RGB")
        decoded = _decode(_encoded(image, "PNG"), channels=1)
        np.testing.assert_array_equal(decoded.pixels[:, :, 0], np.asarray(image.convert("L")))
        assert decoded.conversion == "RGB converted to grayscale"

    def test_rgb_with_equal_channels_to_gray_is_lossless(self) -> None:
        gray = np.asarray(_noise("L"))
        rgb = Image.fromarray(np.stack([gray] * 3, axis=2), mode="RGB")
        decoded = _decode(_encoded(rgb, "PNG"), channels=1)
        np.testing.assert_array_equal(decoded.pixels[:, :, 0], gray)
        assert decoded.conversion == ""

    def test_sixteen_bit_png_is_rescaled_by_its_own_range(self) -> None:
        values = np.linspace(1000, 4000, 64 * 48).reshape(48, 64).astype(np.uint16)
        decoded = _decode(_encoded(Image.fromarray(values), "PNG"))
        assert decoded.source_bit_depth == 16
        assert decoded.source_mode.startswith("I")
        assert "16-bit" in decoded.conversion
        assert decoded.pixels.min() == 0 and decoded.pixels.max() == 255
        expected = np.rint((values.astype(np.float64) - 1000) * 255 / 3000).astype(np.uint8)
        assert np.abs(decoded.pixels[:, :, 0].astype(int) - expected).max() <= 1

    def test_rgba_png_is_flattened_onto_black(self) -> None:
        rgba = Image.new("RGBA", (40, 40), (200, 100, 50, 255))
        rgba.paste((200, 100, 50, 0), (0, 0, 20, 40))  # left half fully transparent
        decoded = _decode(_encoded(rgba, "PNG"), channels=3)
        assert decoded.source_mode == "RGBA"
        assert decoded.conversion == "alpha flattened onto black"
        assert decoded.pixels.shape == (40, 40, 3)
        assert decoded.pixels[0, 0].tolist() == [0, 0, 0]
        assert decoded.pixels[0, 39].tolist() == [200, 100, 50]

    def test_half_transparent_gray_is_halved(self) -> None:
        decoded = _decode(_encoded(Image.new("LA", (40, 40), (200, 128)), "PNG"))
        assert decoded.pixels[0, 0, 0] == 100
        assert decoded.conversion == "alpha flattened onto black"

    def test_palette_png_is_expanded(self) -> None:
        palette = Image.new("P", (40, 40), 0)
        palette.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255])
        palette.paste(1, (0, 0, 20, 40))
        decoded = _decode(_encoded(palette, "PNG"), channels=3)
        assert (decoded.source_mode, decoded.source_bit_depth) == ("P", 8)
        assert decoded.conversion == "palette expanded to RGB"
        assert decoded.pixels[0, 0].tolist() == [255, 0, 0]
        assert decoded.pixels[0, 39].tolist() == [0, 0, 0]

    def test_cmyk_jpeg_is_converted_to_rgb(self) -> None:
        cmyk = Image.new("CMYK", (40, 40), (0, 255, 255, 0))  # red
        decoded = _decode(_encoded(cmyk, "JPEG", quality=95), channels=3)
        assert decoded.source_mode == "CMYK"
        assert decoded.conversion == "CMYK converted to RGB"
        red, green, blue = decoded.pixels[20, 20].tolist()
        assert red > 240 and green < 15 and blue < 15

    def test_one_bit_png_is_expanded(self) -> None:
        decoded = _decode(_encoded(Image.new("1", (40, 40), 1), "PNG"))
        assert decoded.source_bit_depth == 1
        assert decoded.conversion == "1-bit expanded to 8-bit"
        assert decoded.pixels.min() == 255

    def test_constant_image_is_not_a_problem(self) -> None:
        decoded = _decode(_encoded(Image.new("L", (40, 40), 0), "PNG"))
        assert decoded.pixels.max() == 0 and decoded.conversion == ""

    def test_format_is_judged_by_content_not_name(self, tmp_path: Path) -> None:
        misnamed = tmp_path / "scan.png"
        misnamed.write_bytes(_encoded(_noise(), "JPEG"))
        decoded = _decode(misnamed.read_bytes(), channels=3)
        assert decoded.source_mode == "RGB" and decoded.pixels.shape == (48, 64, 3)


class TestDicom:
    def test_ct_with_rescale_slope_and_intercept(self) -> None:
        decoded = _decode(pydicom_test_file("CT_small.dcm"))
        assert decoded.pixels.shape == (128, 128, 1) and decoded.pixels.dtype == np.uint8
        assert (decoded.source_bit_depth, decoded.source_mode) == (16, "MONOCHROME2")
        assert decoded.conversion == "modality LUT applied; 16-bit rescaled to 8-bit"
        assert decoded.pixels.min() == 0 and decoded.pixels.max() == 255

    def test_mr_with_window(self) -> None:
        decoded = _decode(pydicom_test_file("MR_small.dcm"), channels=3)
        assert decoded.pixels.shape == (64, 64, 3)
        assert decoded.conversion == "VOI LUT applied; 16-bit rescaled to 8-bit"

    def test_twelve_bit_depth_is_reported(self) -> None:
        decoded = _decode(pydicom_test_file("examples_overlay.dcm"))
        assert decoded.source_bit_depth == 12
        assert "12-bit rescaled to 8-bit" in decoded.conversion

    def test_monochrome1_is_inverted(self) -> None:
        dataset = _dicom_dataset("MR_small.dcm")
        monochrome2 = _decode(dicom_file_bytes(dataset))
        dataset.PhotometricInterpretation = "MONOCHROME1"
        monochrome1 = _decode(dicom_file_bytes(dataset))
        assert monochrome1.source_mode == "MONOCHROME1"
        assert monochrome1.conversion.endswith("; MONOCHROME1 inverted")
        np.testing.assert_array_equal(monochrome1.pixels, 255 - monochrome2.pixels)

    def test_multi_frame_uses_the_first_frame(self) -> None:
        decoded = _decode(pydicom_test_file("SC_rgb_rle_2frame.dcm"), channels=3)
        assert decoded.source_mode == "RGB" and decoded.pixels.shape == (100, 100, 3)
        assert decoded.conversion == "first of 2 frames used"

    def test_rgb_dicom_to_gray(self) -> None:
        decoded = _decode(pydicom_test_file("SC_rgb_rle_2frame.dcm"), channels=1)
        assert decoded.pixels.shape == (100, 100, 1)
        assert decoded.conversion == "first of 2 frames used; RGB converted to grayscale"

    def test_no_pixel_data(self) -> None:
        with pytest.raises(ImageProblem, match="^DICOM file has no pixel data$"):
            _decode(pydicom_test_file("rtplan.dcm"))

    def test_size_is_checked_from_rows_and_columns(self) -> None:
        too_small = "^image of 64x64 is smaller than the minimum side of 100 pixels$"
        with pytest.raises(ImageProblem, match=too_small):
            _decode(pydicom_test_file("MR_small.dcm"), min_side=100)
        too_many = "^image of 64x64 = 4096 pixels exceeds the limit of 4000 "
        with pytest.raises(ImageProblem, match=too_many):
            _decode(pydicom_test_file("MR_small.dcm"), max_pixels=4000)

    def test_truncated_pixel_data(self) -> None:
        reason = r"^truncated or corrupt DICOM file: the last element \(7FE0,0010\) ends at"
        with pytest.raises(ImageProblem, match=reason):
            _decode(pydicom_test_file("MR_truncated.dcm"))

    def test_pixel_data_shorter_than_rows_and_columns_declare(self) -> None:
        dataset = _dicom_dataset("MR_small.dcm")
        dataset.Rows = 128
        reason = "^truncated or corrupt image: The number of bytes of pixel data is less"
        with pytest.raises(ImageProblem, match=reason):
            _decode(dicom_file_bytes(dataset))

    @pytest.mark.parametrize("cut", [1000, 2000, 10_000, -10, -1])
    def test_truncated_file_is_not_mistaken_for_one_without_pixels(self, cut: int) -> None:
        data = pydicom_test_file("CT_small.dcm")
        reason = "^truncated or corrupt DICOM file: the last element"
        with pytest.raises(ImageProblem, match=reason):
            _decode(data[:cut])

    def test_truncated_encapsulated_pixel_data(self) -> None:
        data = pydicom_test_file("SC_rgb_jpeg_dcmtk.dcm")
        with pytest.raises(ImageProblem, match="^truncated or corrupt DICOM file: it ends inside"):
            _decode(data[: len(data) - 500])


class TestHelpers:
    def test_intensity_stats(self) -> None:
        pixels = np.array([[[0], [255]], [[0], [255]]], dtype=np.uint8)
        assert intensity_stats(pixels) == {
            "mean_intensity": 127.5,
            "std_intensity": 127.5,
            "min_intensity": 0.0,
            "max_intensity": 255.0,
        }

    def test_intensity_stats_wants_uint8(self) -> None:
        with pytest.raises(ValueError, match="uint8"):
            intensity_stats(np.zeros((2, 2), dtype=np.float32))

    @pytest.mark.parametrize("channels", [1, 3])
    def test_encode_png_round_trips(self, channels: int) -> None:
        decoded = _decode(_encoded(_noise(), "PNG"), channels=channels)
        encoded = encode_png(decoded.pixels)
        again = _decode(encoded, channels=channels)
        np.testing.assert_array_equal(again.pixels, decoded.pixels)

    def test_encode_png_rejects_other_shapes(self) -> None:
        with pytest.raises(ValueError, match=r"\(H, W, 1\) or \(H, W, 3\)"):
            encode_png(np.zeros((4, 4), dtype=np.uint8))
