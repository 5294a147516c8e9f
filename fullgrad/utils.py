"""Pictures of saliency maps: overlays for reports and a grid figure for notebooks.

Example:
    >>> import fullgrad as ke
    >>> figure = ke.utils.visualize(images=[*images, *maps], overlays=[None] * len(images) + [*maps])
    >>> rgb = ke.utils.overlay(images[0], maps[0])      # uint8 [H, W, 3]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["overlay", "to_display", "visualize"]


def to_display(image: Any) -> np.ndarray:
    """Scales an image or map of any range to float [0, 1] for display; squeezes ``[H, W, 1]``.

    Args:
        image: ``[H, W]``, ``[H, W, 1]`` or ``[H, W, 3]`` array (a tensor works too).

    Returns:
        A float32 array in [0, 1], ``[H, W]`` or ``[H, W, 3]``.
    """
    array = np.asarray(image, np.float32)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    low, high = float(np.nanmin(array)), float(np.nanmax(array))
    if high - low < 1e-12:
        return np.zeros_like(array)
    return (array - low) / (high - low)


def overlay(image: Any, saliency: Any, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blends a colour-mapped saliency map over an image.

    Args:
        image: ``[H, W, 3]`` or ``[H, W]`` image, any range.
        saliency: ``[h, w]`` map; resized to the image if needed.
        alpha: Weight of the map in the blend.
        cmap: A matplotlib colour map name.

    Returns:
        A uint8 ``[H, W, 3]`` RGB picture.

    Example:
        >>> PIL.Image.fromarray(overlay(image, saliency)).save("overlay.png")
    """
    from matplotlib import colormaps
    from PIL import Image

    picture = to_display(image)
    if picture.ndim == 2:
        picture = np.repeat(picture[..., None], 3, axis=-1)
    heat = to_display(saliency)
    if heat.shape != picture.shape[:2]:
        resized = Image.fromarray(heat.astype(np.float32), mode="F").resize(
            (picture.shape[1], picture.shape[0]), Image.BILINEAR
        )
        heat = np.clip(np.asarray(resized), 0.0, 1.0)
    colored = colormaps[cmap](heat)[..., :3]
    blended = (1.0 - alpha) * picture + alpha * colored
    return (np.clip(blended, 0.0, 1.0) * 255).round().astype(np.uint8)


def visualize(
    images: Sequence[Any],
    overlays: Sequence[Any | None] | None = None,
    cols: int | None = None,
    titles: Sequence[str] | None = None,
    cmap: str = "jet",
    alpha: float = 0.5,
    path: str | None = None,
):
    """Draws images (and maps over them) in a grid, as keras-explainable's ``visualize``.

    Args:
        images: Images or maps, ``[H, W]``, ``[H, W, 1]`` or ``[H, W, 3]``, any range.
        overlays: A map to blend over each image, or None for the image alone.
        cols: Pictures per row; ``min(len(images), 8)`` when None.
        titles: One title per picture.
        cmap: Colour map for single-channel pictures and overlays.
        alpha: Weight of the overlays.
        path: When given, the figure is also saved there as PNG.

    Returns:
        The matplotlib ``Figure``.

    Example:
        >>> ke.utils.visualize(
        ...     images=[*images, *maps, *images],
        ...     overlays=[None] * (2 * len(images)) + [*maps],
        ... )
    """
    from matplotlib.figure import Figure

    if overlays is None:
        overlays = [None] * len(images)
    if len(overlays) != len(images):
        raise ValueError(f"{len(images)} images but {len(overlays)} overlays")
    cols = cols or min(len(images), 8) or 1
    rows = (len(images) + cols - 1) // cols
    figure = Figure(figsize=(2.2 * cols, 2.2 * rows))
    for index, (image, heat) in enumerate(zip(images, overlays, strict=True)):
        axis = figure.add_subplot(rows, cols, index + 1)
        if heat is not None:
            axis.imshow(overlay(image, heat, alpha=alpha, cmap=cmap))
        else:
            picture = to_display(image)
            axis.imshow(picture, cmap=cmap if picture.ndim == 2 else None)
        if titles is not None:
            axis.set_title(titles[index], fontsize=8)
        axis.axis("off")
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, format="png", dpi=100)
    return figure
