"""Decoding and preprocessing: real PNG/JPEG bytes through Pillow, Keras' preprocess_input."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from beamdata import encode, random_image
from keras.applications import imagenet_utils
from PIL import Image

from fullgrad.beam.io import safe_file_name
from fullgrad.images import (
    ImageError,
    decode_image,
    decode_mask,
    pixels_to_rgb,
    preprocess,
    resize_map,
)


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width x height`` with almost no data: a bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * (width + 1) * 2)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(
        b"IEND", b""
    )


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "LA", "I;16"])
def test_every_mode_decodes_to_rgb_at_the_requested_size(mode):
    image = random_image(3, size=40)
    rgb_reference = np.asarray(image)
    converted = image.convert(mode) if mode != "I;16" else image.convert("L")
    if mode == "I;16":
        wide = (np.asarray(converted).astype(np.uint16) * 257).astype(np.uint16)
        converted = Image.fromarray(wide, mode="I;16")
    decoded = decode_image(encode(converted), size=(32, 32))
    assert decoded.shape == (32, 32, 3) and decoded.dtype == np.uint8
    full = decode_image(encode(converted))
    assert full.shape == (40, 44, 3)
    if mode == "RGB":
        np.testing.assert_array_equal(full, rgb_reference)
    if mode in ("L", "LA", "I;16"):  # gray stays gray, and 16-bit is rescaled, not clipped
        gray = np.asarray(image.convert("L"))
        assert np.all(full[..., 0] == full[..., 1])
        assert np.abs(full[..., 0].astype(int) - gray).max() <= 1


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "WEBP"])
def test_bmp_tiff_and_lossless_webp_decode_exactly(fmt):
    image = random_image(4, size=40)
    options = {"lossless": True} if fmt == "WEBP" else {}
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    np.testing.assert_array_equal(decode_image(buffer.getvalue()), np.asarray(image))


def test_jpeg_decodes_close_to_the_original():
    image = random_image(5, size=40).resize((40, 44))
    smooth = image.resize((8, 8)).resize((40, 44), Image.BILINEAR)
    decoded = decode_image(encode(smooth, "JPEG"))
    assert np.abs(decoded.astype(int) - np.asarray(smooth).astype(int)).mean() < 6


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty image bytes"),
        (b"hello world, not an image", "not PNG, JPEG, WebP, BMP or TIFF"),
        (encode(random_image(1), "GIF"), "unsupported image format GIF"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", r"unsupported image format RIFF \(not WebP\)"),
        (encode(random_image(1))[:60], "corrupt"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt image"),
        (png_header_only(9000, 9000), "exceeds the limit of"),
        (png_header_only(30000, 30000), "decompression bomb"),
    ],
    ids=["empty", "text", "gif", "wav", "truncated", "bad-header", "over-limit", "pillow-bomb"],
)
def test_bad_bytes_raise_a_clear_image_error(data, message):
    with pytest.raises(ImageError, match=message):
        decode_image(data, size=(32, 32))


def test_the_pixel_limit_is_checked_before_decoding():
    # 9000 x 9000 would take 81 MB decoded; the header alone is refused in well under a second.
    data = png_header_only(9000, 9000)
    assert len(data) < 1000
    with pytest.raises(ImageError, match="81000000 pixels"):
        decode_image(data)
    assert decode_image(encode(random_image(0)), max_pixels=40 * 44).shape == (40, 44, 3)
    with pytest.raises(ImageError, match="--max-pixels"):
        decode_image(encode(random_image(0)), max_pixels=40 * 44 - 1)


def test_masks_decode_to_bool_with_nearest_resizing():
    mask = np.zeros([40, 40], np.uint8)
    mask[10:30, 0:20] = 255
    decoded = decode_mask(encode(Image.fromarray(mask)), size=(20, 20))
    assert decoded.dtype == bool and decoded.shape == (20, 20)
    assert decoded.sum() == 100 and decoded[5:15, 0:10].all()


def test_pixel_arrays_are_checked_for_nan_and_shape():
    good = np.arange(16 * 16 * 3, dtype=np.float32).reshape(16, 16, 3) % 255
    np.testing.assert_array_equal(pixels_to_rgb(good), good)
    assert pixels_to_rgb(good[..., 0]).shape == (16, 16, 3)
    assert pixels_to_rgb(good, size=(8, 8)).shape == (8, 8, 3)
    nan = good.copy()
    nan[3, 4, 1] = np.nan
    nan[5, 5, 0] = np.inf
    with pytest.raises(ImageError, match="2 NaN/inf"):
        pixels_to_rgb(nan)
    with pytest.raises(ImageError, match="has 2 channels; the model takes 3"):
        pixels_to_rgb(np.zeros([4, 4, 2]))
    with pytest.raises(ImageError, match="shape"):
        pixels_to_rgb(np.zeros([4, 4, 2, 1]))
    with pytest.raises(ImageError, match="not numeric"):
        pixels_to_rgb([[1, 2], [3]])


@pytest.mark.parametrize("mode", ["tf", "caffe", "torch"])
def test_keras_modes_match_keras_applications(mode):
    rgb = np.random.default_rng(0).integers(0, 256, [2, 8, 8, 3]).astype(np.float32)
    expected = imagenet_utils.preprocess_input(rgb.copy(), mode=mode)
    np.testing.assert_allclose(preprocess(rgb, mode), expected, rtol=1e-6)
    np.testing.assert_array_equal(rgb[0, 0, 0], rgb.copy()[0, 0, 0])  # input not modified
    decoded = rgb.astype(np.uint8)  # what decode_image hands over
    np.testing.assert_array_equal(preprocess(decoded, mode), preprocess(rgb, mode))
    assert preprocess(decoded, mode).dtype == np.float32


def test_none_and_unit_modes():
    rgb = np.array([[[0, 127.5, 255]]], np.float32)
    np.testing.assert_array_equal(preprocess(rgb, "none"), rgb)
    np.testing.assert_allclose(preprocess(rgb, "unit"), [[[0, 0.5, 1]]])
    with pytest.raises(ValueError, match="unknown preprocess"):
        preprocess(rgb, "imagenet")
    with pytest.raises(ImageError, match="NaN"):
        preprocess(np.full([1, 1, 3], np.nan), "unit")


def test_map_resizing_keeps_the_range_and_the_mean():
    saliency = np.random.default_rng(1).random([32, 32]).astype(np.float32)
    small = resize_map(saliency, (8, 8))
    assert small.shape == (8, 8) and 0 <= small.min() and small.max() <= 1
    assert abs(small.mean() - saliency.mean()) < 1e-3  # box filter: block means


def test_safe_file_names_never_leave_the_folder():
    for record_id in ["../../x", "/etc/passwd", "a/b", "a_b", "..", "", "é\u202e.png", "x" * 500]:
        name = safe_file_name(record_id)
        assert "/" not in name and "\\" not in name and name.count(".") == 1
        assert name.endswith(".png") and len(name) < 90
        assert all(c.isascii() and (c.isalnum() or c in "_-.") for c in name)
    assert safe_file_name("a/b") != safe_file_name("a_b")
    assert safe_file_name("../../x").startswith("______x-")
