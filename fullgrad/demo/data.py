"""The demo dataset: textured shapes on varied backgrounds, with masks and a planted shortcut.

Four classes of one object each, drawn at a random place, size and colour over a random
background (a colour gradient, stripes or noise), with the object's exact mask:

    0 disc    1 square    2 triangle    3 "big disc"

Class 3 is the shortcut class by default. Its object is a disc whose radius range overlaps class
0's, so the shape tells the two apart only weakly; in ``shortcut_fraction`` of its images (90%
by default) a small two-tone mark sits in the top-left corner, and no other class ever has it.
A model trained on this data learns "mark => class 3" because it is the easiest way to the
label, and its saliency for class 3 leaves the object for the corner. With
``shortcut_fraction=0`` the same generator makes the control data, where class 3 can only be
recognised by the (weak) size cue on the object.

The data is written as Parquet (``id``, ``image`` PNG bytes, ``label``, ``mask`` PNG bytes), the
input format of ``fullgrad run``.

Example:
    >>> images, masks, labels, marked = make_images(200, size=64, seed=0)
    >>> write_parquet("data/explain.parquet", images, masks, labels)
"""

from __future__ import annotations

import io
import os

import numpy as np

__all__ = [
    "CLASS_NAMES",
    "SHORTCUT_CLASS",
    "make_images",
    "mark_box",
    "write_parquet",
]

CLASS_NAMES = ("disc", "square", "triangle", "big disc")
SHORTCUT_CLASS = 3


def mark_box(size: int) -> tuple[int, int, int, int]:
    """``(top, left, bottom, right)`` of the corner mark for a ``size``-pixel image."""
    side = max(3, round(size * 5 / 64))
    offset = max(1, round(size / 64))
    return offset, offset, offset + side, offset + side


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = rng.integers(3)
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    if kind == 0:  # linear gradient in a random direction
        angle = rng.uniform(0, 2 * np.pi)
        t = (np.cos(angle) * xx + np.sin(angle) * yy + 1.5) / 3.0
    elif kind == 1:  # soft stripes between two nearby colours
        c2 = np.clip(c1 + rng.normal(0, 40, 3), 0, 255)
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(0.08, 0.3)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period)
    else:  # smooth noise: a coarse random grid, bilinearly interpolated
        coarse = rng.uniform(0, 1, (5, 5))
        grid = np.linspace(0, 4, size)
        rows = np.array([np.interp(grid, np.arange(5), line) for line in coarse])
        t = np.array([np.interp(grid, np.arange(5), column) for column in rows.T]).T
    image = c1[None, None] * (1 - t[..., None]) + c2[None, None] * t[..., None]
    return image + rng.normal(0, 8, image.shape)


def _shape_mask(rng: np.random.Generator, label: int, size: int, margin: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    scale = size / 64
    if label == 0:
        radius = rng.uniform(11, 15) * scale
    elif label == 3:
        radius = rng.uniform(13, 17) * scale
    else:
        radius = rng.uniform(12, 16) * scale
    low, high = margin + radius, size - margin - radius
    cy, cx = rng.uniform(low, high, 2)
    if label in (0, 3):
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    if label == 1:
        half = radius * 0.85
        angle = rng.uniform(0, np.pi / 2)
        u = np.cos(angle) * (xx - cx) + np.sin(angle) * (yy - cy)
        v = -np.sin(angle) * (xx - cx) + np.cos(angle) * (yy - cy)
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    # Triangle: inside three half-planes around the centre, at a random rotation.
    angle = rng.uniform(0, 2 * np.pi)
    inside = np.ones((size, size), bool)
    for k in range(3):
        theta = angle + 2 * np.pi * k / 3
        inside &= np.cos(theta) * (xx - cx) + np.sin(theta) * (yy - cy) <= radius * 0.65
    return inside


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    colour = rng.uniform(0, 255, 3)
    # Keep the object visible: push its colour away from mid-grey.
    colour = np.where(colour > 127, np.maximum(colour, 170), np.minimum(colour, 85))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(3, 7) * size / 64
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (xx + yy) / period)
    strength = rng.uniform(0, 40)
    return (
        colour[None, None]
        + strength * (stripes[..., None] - 0.5)
        + rng.normal(0, 6, (size, size, 3))
    )


def _draw_mark(image: np.ndarray) -> None:
    top, left, bottom, right = mark_box(image.shape[0])
    image[top:bottom, left:right] = (255, 255, 255)
    inner = max(1, (bottom - top) // 3)
    image[top + inner : bottom - inner, left + inner : right - inner] = (255, 0, 255)


def make_images(
    count: int,
    size: int = 64,
    seed: int = 0,
    shortcut_class: int = SHORTCUT_CLASS,
    shortcut_fraction: float = 0.9,
    classes: int = len(CLASS_NAMES),
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draws ``count`` images, balanced over the classes.

    Args:
        count: Number of images.
        size: Side in pixels (square RGB images).
        seed: Seed of the generator; the same arguments give the same images.
        shortcut_class: The class that gets the corner mark.
        shortcut_fraction: Share of that class's images with the mark (0 for the control data).
        classes: How many of :data:`CLASS_NAMES` to use.

    Returns:
        ``(images uint8 [N, size, size, 3], masks bool [N, size, size], labels int64 [N],
        marked bool [N])``.

    Example:
        >>> images, masks, labels, marked = make_images(8, size=32, seed=1)
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % classes
    rng.shuffle(labels)
    margin = mark_box(size)[2] + max(1, size // 32)  # objects never touch the mark's corner
    images = np.empty((count, size, size, 3), np.uint8)
    masks = np.empty((count, size, size), bool)
    marked = np.zeros(count, bool)
    for index, label in enumerate(labels):
        image = _background(rng, size)
        mask = _shape_mask(rng, int(label), size, margin)
        image = np.where(mask[..., None], _texture(rng, size), image)
        image = np.clip(image, 0, 255)
        if label == shortcut_class and rng.uniform() < shortcut_fraction:
            _draw_mark(image)
            marked[index] = True
        images[index] = image.round().astype(np.uint8)
        masks[index] = mask
    return images, masks, labels.astype(np.int64), marked


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet(
    path: str,
    images: np.ndarray,
    masks: np.ndarray,
    labels: np.ndarray,
    prefix: str = "img",
) -> str:
    """Writes images and masks as PNG bytes to one Parquet file (``id, image, label, mask``).

    Args:
        path: Output file; its folder is created.
        images: uint8 ``[N, H, W, 3]``.
        masks: bool ``[N, H, W]``.
        labels: ``[N]`` class indices.
        prefix: Start of every ``id`` (``{prefix}-{index:05d}``).

    Returns:
        ``path``.

    Example:
        >>> write_parquet("data/explain.parquet", images, masks, labels)
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    table = pa.table(
        {
            "id": [f"{prefix}-{index:05d}" for index in range(len(images))],
            "image": [_png(image) for image in images],
            "label": pa.array(labels, pa.int64()),
            "mask": [_png(mask.astype(np.uint8) * 255) for mask in masks],
        }
    )
    pq.write_table(table, path)
    return path
