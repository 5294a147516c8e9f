"""Decode and preprocess images for a classifier: bytes or pixel arrays in, float32 batches out.

Every function raises ``ImageError`` (a ``ValueError``) with a message a person can act on, so
the Beam job can turn a bad image into a dead letter instead of a crashed worker:

- encoded images must be PNG, JPEG, WebP, BMP or TIFF; anything else is "unsupported", empty
  bytes are "empty";
- the pixel count is checked from the header, before any pixel is decoded, against
  ``max_pixels``: a small file that inflates to gigabytes (a decompression bomb) is refused;
- grayscale, palette, 16-bit and RGBA images are converted to RGB (alpha is dropped);
- pixel arrays (``[H, W]``, ``[H, W, 1|3|4]``, values in 0..255) are checked for NaN/inf.

``preprocess`` applies the model's input convention: ``none`` (0..255), ``unit`` (0..1), or
keras.applications' ``tf`` (-1..1), ``caffe`` (BGR, ImageNet means subtracted) and ``torch``
(0..1, ImageNet mean/std).

Example:
    >>> rgb = decode_image(png_bytes, size=(224, 224))          # uint8 [224, 224, 3]
    >>> x = preprocess(rgb[None], "torch")                       # float32 [1, 224, 224, 3]
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "PREPROCESS_MODES",
    "THUMBNAIL_QUALITY",
    "ImageError",
    "decode_image",
    "decode_mask",
    "encode_jpeg",
    "encode_png",
    "pixels_to_array",
    "pixels_to_rgb",
    "preprocess",
    "resize_map",
    "thumbnail_rgb",
]

#: 64 megapixels: far above any classifier's input, far below what exhausts a worker's memory.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024

PREPROCESS_MODES = ("none", "unit", "tf", "caffe", "torch")

#: JPEG quality of the thumbnails stored beside each map.
THUMBNAIL_QUALITY = 90

_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")
#: Signatures of the formats read (WebP aside: ``RIFF....WEBP``); Pillow is only ever handed
#: data that starts with one.
_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8": "JPEG", b"BM": "BMP",
               b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}
# Signatures of formats we refuse, so the error names what was found rather than "corrupt".
_OTHER_SIGNATURES = {
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"RIFF": "RIFF (not WebP)",
    b"\x00\x00\x01\x00": "ICO",
    b"%PDF": "PDF",
}


class ImageError(ValueError):
    """An image could not be decoded or preprocessed; the message says why."""


def _open(data: bytes, max_pixels: int, what: str) -> Image.Image:
    if data is None or len(data) == 0:
        raise ImageError(f"empty {what} bytes")
    data = bytes(data)
    webp = data.startswith(b"RIFF") and data[8:12] == b"WEBP"
    if not (webp or data.startswith(tuple(_SIGNATURES))):
        found = next((name for sig, name in _OTHER_SIGNATURES.items() if data.startswith(sig)), None)
        if found:
            raise ImageError(
                f"unsupported {what} format {found}: only PNG, JPEG, WebP, BMP and TIFF are read"
            )
        raise ImageError(
            f"unsupported or corrupt {what}: not PNG, JPEG, WebP, BMP or TIFF "
            f"(first bytes {data[:8]!r})"
        )
    try:
        # Opening reads the header only; the pixel check below runs before decoding.
        image = Image.open(io.BytesIO(data), formats=_FORMATS)
    except Image.DecompressionBombError as error:
        raise ImageError(f"{what} refused as a decompression bomb: {error}") from error
    except Exception as error:  # UnidentifiedImageError names a BytesIO object: say more
        kind = next((name for sig, name in _SIGNATURES.items() if data.startswith(sig)), "WebP")
        raise ImageError(
            f"corrupt {what}: has a {kind} signature but its header cannot be parsed "
            f"({type(error).__name__})"
        ) from error
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"{what} of {width}x{height} = {width * height} pixels exceeds the limit of "
            f"{max_pixels} (--max-pixels): refused as a possible decompression bomb"
        )
    try:
        image.load()
    except Exception as error:  # truncated data, bad CRC, bad huffman tables...
        raise ImageError(f"corrupt {image.format} {what}: {error}") from error
    return image


def _resize(image: Image.Image, size: tuple[int, int] | None, resample: int) -> Image.Image:
    if size is None or image.size == (size[1], size[0]):
        return image
    return image.resize((size[1], size[0]), resample)


#: Pillow's modes for the channel counts an encoded image decodes to.
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
#: ITU-R 601-2 luma weights, as Pillow's ``convert("L")``: RGB pixel arrays for grey models.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def decode_image(
    data: bytes,
    size: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    channels: int = 3,
) -> np.ndarray:
    """Decodes PNG/JPEG/WebP/BMP/TIFF bytes to ``channels`` channels, resized to ``size``.

    Args:
        data: The encoded image.
        size: ``(height, width)`` to resize to (bilinear); the decoded size when None.
        max_pixels: Largest ``width * height`` accepted, checked before decoding.
        channels: 3 (RGB; alpha is dropped), 1 (luminance, for grey models) or 4 (RGBA).

    Returns:
        ``uint8 [H, W, 3]``, or ``[H, W, channels]``.

    Raises:
        ImageError: Empty, unsupported, corrupt or over-sized data, or a channel count an
            encoded image cannot have.

    Example:
        >>> decode_image(open("cat.png", "rb").read(), size=(224, 224)).shape
        (224, 224, 3)
        >>> decode_image(open("cat.png", "rb").read(), channels=1).shape[-1]
        1
    """
    if channels not in _MODES:
        raise ImageError(
            f"the model takes {channels} channels; PNG/JPEG images decode to 1, 3 or 4: store "
            f"{channels}-channel images as pixel arrays"
        )
    image = _open(data, max_pixels, "image")
    with image:
        # Palette/LA/I;16/CMYK all reach RGB/L through Pillow's own conversions.
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(image, dtype=np.float64)
            top = 65535.0 if array.max(initial=0) > 255 else 255.0
            image = Image.fromarray((array / top * 255).round().astype(np.uint8), mode="L")
        mode = _MODES[channels]
        converted = image if image.mode == mode else image.convert(mode)
        array = np.asarray(_resize(converted, size, Image.BILINEAR), dtype=np.uint8)
        return array[..., None] if channels == 1 else array


def decode_mask(
    data: bytes, size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decodes an object mask (PNG/JPEG, nonzero = object) to bool at ``size``.

    Args:
        data: The encoded mask.
        size: ``(height, width)`` of the result (nearest-neighbour, so edges stay crisp).
        max_pixels: As for ``decode_image``.

    Returns:
        ``bool [h, w]``.

    Raises:
        ImageError: As for ``decode_image``.

    Example:
        >>> decode_mask(mask_png, size=(56, 56)).mean()   # the object's share of the image
    """
    image = _open(data, max_pixels, "mask")
    gray = image.convert("L")
    return np.asarray(_resize(gray, size, Image.NEAREST)) > 127


def pixels_to_array(
    pixels: Any, size: tuple[int, int] | None = None, channels: int = 3
) -> np.ndarray:
    """Checks a pixel array (values in 0..255) and returns float32 ``channels`` at ``size``.

    An array with the model's channel count passes through (multispectral included); grey
    becomes RGB by repetition, RGB(A) becomes grey by luminance (ITU-R 601-2, as for decoded
    images), RGBA becomes RGB by dropping alpha. Any other count is refused.

    Args:
        pixels: ``[H, W]`` or ``[H, W, C]``, any numeric type.
        size: ``(height, width)`` to resize to (bilinear, per channel); unchanged when None.
        channels: The model's input channels.

    Returns:
        ``float32 [H, W, channels]``.

    Raises:
        ImageError: A wrong shape or channel count, a non-numeric array, or NaN/inf values.

    Example:
        >>> pixels_to_array(np.zeros([32, 32, 6]), channels=6).shape
        (32, 32, 6)
    """
    try:
        array = np.asarray(pixels, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise ImageError(f"pixel array is not numeric or not rectangular: {error}") from error
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or min(array.shape) < 1:
        raise ImageError(f"pixel array has shape {array.shape}; expected [H, W] or [H, W, C]")
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise ImageError(f"pixel array contains {bad} NaN/inf values")
    found = array.shape[-1]
    if found != channels:
        if found == 1 and channels == 3:
            array = np.repeat(array, 3, axis=-1)
        elif found in (3, 4) and channels == 1:
            array = array[..., :3] @ _LUMA[:, None]
        elif found == 4 and channels == 3:
            array = array[..., :3]
        else:
            raise ImageError(
                f"pixel array has {found} channels; the model takes {channels} "
                "(only grey <-> RGB and RGBA -> RGB are converted)"
            )
    if size is not None and array.shape[:2] != tuple(size):
        planes = [
            np.asarray(
                Image.fromarray(np.ascontiguousarray(array[..., c]), mode="F").resize(
                    (size[1], size[0]), Image.BILINEAR
                )
            )
            for c in range(array.shape[-1])
        ]
        array = np.stack(planes, axis=-1)
    return array.astype(np.float32)


def pixels_to_rgb(pixels: Any, size: tuple[int, int] | None = None) -> np.ndarray:
    """:func:`pixels_to_array` for RGB models: ``float32 [H, W, 3]``.

    Example:
        >>> pixels_to_rgb(np.zeros([32, 32])).shape
        (32, 32, 3)
    """
    return pixels_to_array(pixels, size, channels=3)


def thumbnail_rgb(image: np.ndarray) -> np.ndarray:
    """A ``uint8`` RGB picture of a decoded image of any channel count, for thumbnails.

    Grey is repeated to RGB; four or more channels show their first three (RGB of RGBA, the
    first three bands of a multispectral image).

    Example:
        >>> thumbnail_rgb(np.zeros([8, 8, 1], np.uint8)).shape
        (8, 8, 3)
    """
    image = np.asarray(image)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    image = image[..., :3]
    if image.dtype != np.uint8:
        image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return image


def preprocess(images: Any, mode: str) -> np.ndarray:
    """Applies a model's input convention to RGB images in 0..255.

    Args:
        images: ``[..., H, W, 3]`` RGB in 0..255 (uint8 or float).
        mode: ``none`` (unchanged), ``unit`` (divide by 255), or keras.applications'
            ``tf`` / ``caffe`` / ``torch`` (``imagenet_utils.preprocess_input``).

    Returns:
        ``float32`` of the same shape.

    Raises:
        ValueError: An unknown mode.
        ImageError: The result has NaN/inf values.

    Example:
        >>> preprocess(np.full([1, 2, 2, 3], 255, np.uint8), "tf").max()
        1.0
    """
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"unknown preprocess mode {mode!r}; choose from {PREPROCESS_MODES}")
    images = np.asarray(images)
    whole_numbers = np.issubdtype(images.dtype, np.integer)  # e.g. decoded uint8: no NaN
    array = np.array(images, dtype=np.float32)  # a copy: preprocess_input works in place
    if mode == "unit":
        array /= 255.0
    elif mode != "none":
        from keras.applications import imagenet_utils

        array = np.asarray(
            imagenet_utils.preprocess_input(array, data_format="channels_last", mode=mode),
            dtype=np.float32,
        )
    if not whole_numbers and not np.all(np.isfinite(array)):  # integers are always finite
        raise ImageError("preprocessed image contains NaN/inf values")
    return array


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a ``uint8`` ``[H, W]`` / ``[H, W, 3]`` or ``bool`` ``[H, W]`` array.

    Example:
        >>> encode_png(np.zeros([4, 4, 3], np.uint8))[:4]
        b'\\x89PNG'
    """
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_jpeg(array: np.ndarray, quality: int = THUMBNAIL_QUALITY) -> bytes:
    """JPEG bytes of a ``uint8`` ``[H, W, 3]`` picture: the format of stored thumbnails.

    Thumbnails are for people looking at overlays, so a lossy format is right: at quality 90 a
    56x56 thumbnail is 2-3x smaller than its PNG and encodes 3-4x faster, which matters when a
    job writes one per image (``benchmarks/bench_pipeline.py``). Colour is kept at full
    resolution (4:4:4): halving it blurs a picture this small visibly.

    Example:
        >>> encode_jpeg(np.zeros([4, 4, 3], np.uint8))[:2]
        b'\\xff\\xd8'
    """
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(
        buffer, format="JPEG", quality=quality, subsampling=0
    )
    return buffer.getvalue()


def resize_map(saliency: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resizes a ``[H, W]`` map in [0, 1] to ``size`` (bilinear; box-filtered when shrinking).

    Example:
        >>> resize_map(np.ones([224, 224], np.float32), (56, 56)).shape
        (56, 56)
    """
    saliency = np.asarray(saliency, np.float32)
    if saliency.shape == tuple(size):
        return saliency
    image = Image.fromarray(np.ascontiguousarray(saliency), mode="F")
    resample = Image.BOX if size[0] < saliency.shape[0] else Image.BILINEAR
    resized = np.asarray(image.resize((size[1], size[0]), resample), np.float32)
    return np.clip(resized, 0.0, 1.0)
