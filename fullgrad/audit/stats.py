"""Per-image statistics of a saliency map: where its mass lies.

Every statistic reads the map as a distribution of *mass* over pixels. With ``s`` the map
``[h, w]`` (negative values and NaN count as 0) and ``M = sum(s)``:

- **concentration**: ``sum(top_k(s)) / M`` with ``k = ceil(top_fraction * h * w)``: the share of
  the mass in the brightest ``top_fraction`` of pixels (5% by default). A uniform map scores
  ``top_fraction``; a single bright pixel scores 1.
- **entropy**: ``-sum(p log p) / log(h * w)`` with ``p = s / M``: normalised Shannon entropy in
  [0, 1]; 1 for a uniform map, 0 for a single bright pixel.
The two *location* statistics (border and mask energy) read the map's salient part only:
``s' = max(s - q, 0)`` with ``q`` the map's ``floor_quantile`` quantile (0.8 by default: the
brightest 20% of pixels, each minus that level). Why: a FullGrad map is a min-max normalised sum
of many terms, and the coarse ones (bias terms of deep, low-resolution layers, upsampled) lay a
broad floor over the whole image that says little about *where* the model looks; the share of
raw mass would mostly measure the region's area. Thresholding is what a reader of an overlay
does by eye. ``floor_quantile=0`` measures the raw mass.

- **border_energy**: ``sum(s'[band]) / sum(s')`` where ``band`` is the outer frame of width
  ``max(1, round(border_fraction * min(h, w)))`` pixels. A uniform map scores the band's area
  share (see :func:`border_band`), a model reading a corner mark scores far above it.
- **mask_energy**: ``sum(s'[mask]) / sum(s')``: the share of the mass on the object, when the data has
  an object mask. Lower than the mask's area share means the map is *less* on the object than a
  uniform map would be.
- **pointing_hit**: 1.0 when the map's maximum (``argmax``, the first one in row-major order on
  ties) falls inside the mask dilated by ``pointing_tolerance`` pixels (a square structuring
  element), else 0.0. This is the pointing game of Zhang et al. (ECCV 2016), which allows a
  15-pixel tolerance at 224 px; the default of 1 pixel at 64 px is the same small slack for the
  resampling of a map that was computed at a coarser resolution than the mask.

A map with no mass (all zeros: FullGrad returns zeros for a constant map) is read as uniform, so
that it lands at the "no preference" point of every statistic instead of producing NaN.
``mask_energy`` and ``pointing_hit`` are NaN when there is no mask or the mask is empty.

Example:
    >>> from fullgrad.audit import stats
    >>> s = stats.image_statistics(saliency, mask=object_mask)
    >>> s["mask_energy"], s["border_energy"], s["pointing_hit"]
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from fullgrad.record import STATISTICS

__all__ = [
    "STATISTICS",
    "StatisticsOptions",
    "border_band",
    "concentration",
    "dilate",
    "image_statistics",
    "normalised_entropy",
    "pointing_hit",
    "salient_part",
    "share_inside",
]



@dataclasses.dataclass(frozen=True)
class StatisticsOptions:
    """How the per-image statistics are measured.

    Attributes:
        top_fraction: Share of the brightest pixels whose mass is the concentration.
        border_fraction: Width of the border band as a share of the map's shorter side.
        pointing_tolerance: Dilation of the mask, in map pixels, for the pointing game.
        floor_quantile: Quantile of the map subtracted before the location statistics
            (border and mask energy); 0 reads the raw mass.

    Example:
        >>> StatisticsOptions(border_fraction=0.1)
    """

    top_fraction: float = 0.05
    border_fraction: float = 0.1
    pointing_tolerance: int = 1
    floor_quantile: float = 0.8

    def __post_init__(self) -> None:
        if not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1], got {self.top_fraction}")
        if not 0.0 < self.border_fraction < 0.5:
            raise ValueError(f"border_fraction must be in (0, 0.5), got {self.border_fraction}")
        if not 0.0 <= self.floor_quantile < 1.0:
            raise ValueError(f"floor_quantile must be in [0, 1), got {self.floor_quantile}")
        if self.pointing_tolerance < 0:
            raise ValueError(f"pointing_tolerance must be >= 0, got {self.pointing_tolerance}")


def _mass(saliency: np.ndarray) -> np.ndarray:
    """The map as non-negative float64 mass; a map without mass becomes uniform."""
    array = np.asarray(saliency, np.float64)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"a saliency map must be [h, w], got shape {array.shape}")
    array = np.where(np.isfinite(array) & (array > 0.0), array, 0.0)
    return _uniform_if_empty(array)


def _uniform_if_empty(mass: np.ndarray) -> np.ndarray:
    return mass if mass.sum() > 0.0 else np.ones_like(mass)


def _quantile(values: np.ndarray, q: float) -> float:
    """``np.quantile(values, q)`` (its default, linear method) by partial sorting: O(n)."""
    flat = values.ravel()
    position = q * (flat.size - 1)
    below = math.floor(position)
    above = min(below + 1, flat.size - 1)
    parts = np.partition(flat, [below, above])
    low, high, t = float(parts[below]), float(parts[above]), position - below
    # numpy's own lerp, so that the result is the same to the last bit.
    return high - (high - low) * (1.0 - t) if t >= 0.5 else low + (high - low) * t


def _salient(mass: np.ndarray, floor_quantile: float) -> np.ndarray:
    """``salient_part`` of a map that is already mass (``_mass``)."""
    if floor_quantile <= 0.0:
        return mass
    return _uniform_if_empty(np.maximum(mass - _quantile(mass, floor_quantile), 0.0))


def salient_part(saliency: np.ndarray, floor_quantile: float = 0.8) -> np.ndarray:
    """The map above its ``floor_quantile`` quantile, minus that level (see the module doc)."""
    return _salient(_mass(saliency), floor_quantile)


def border_band(shape: tuple[int, int], border_fraction: float = 0.1) -> np.ndarray:
    """The outer frame of a map as a bool ``[h, w]`` array.

    Args:
        shape: ``(h, w)``.
        border_fraction: Band width as a share of ``min(h, w)``; at least one pixel.

    Returns:
        True on the band (a new array the caller may change).

    Example:
        >>> border_band((64, 64), 0.1).mean()   # 6-pixel band: 0.33 of the area
    """
    return _border_band(tuple(shape), border_fraction).copy()


@functools.lru_cache(maxsize=16)
def _border_band(shape: tuple[int, int], border_fraction: float) -> np.ndarray:
    """``border_band``, computed once per shape (every map of a job has the same): read-only."""
    height, width = shape
    band = max(1, round(border_fraction * min(height, width)))
    inside = np.zeros(shape, bool)
    inside[band : height - band, band : width - band] = True
    frame = ~inside
    frame.setflags(write=False)
    return frame


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Dilates a bool mask by ``pixels`` with a square structuring element (pure numpy)."""
    mask = np.asarray(mask, bool)
    if pixels <= 0:
        return mask.copy()
    height, width = mask.shape
    padded = np.pad(mask, pixels)
    out = np.zeros_like(mask)
    for dy in range(2 * pixels + 1):
        for dx in range(2 * pixels + 1):
            out |= padded[dy : dy + height, dx : dx + width]
    return out


def concentration(saliency: np.ndarray, top_fraction: float = 0.05) -> float:
    """Share of the map's mass in its brightest ``ceil(top_fraction * h * w)`` pixels."""
    return _concentration(_mass(saliency), top_fraction)


def _concentration(mass: np.ndarray, top_fraction: float) -> float:
    flat = mass.ravel()
    k = max(1, math.ceil(top_fraction * flat.size))
    top = np.partition(flat, flat.size - k)[flat.size - k :]
    return float(top.sum() / flat.sum())


def normalised_entropy(saliency: np.ndarray) -> float:
    """Shannon entropy of the map as a distribution, divided by ``log(h * w)``."""
    return _entropy(_mass(saliency))


def _entropy(mass: np.ndarray) -> float:
    flat = mass.ravel()
    if flat.size < 2:
        return 0.0
    p = flat / flat.sum()
    p = p[p > 0.0]
    return float(-(p * np.log(p)).sum() / math.log(flat.size))


def share_inside(saliency: np.ndarray, region: np.ndarray) -> float:
    """Share of the map's mass inside a bool region of the same shape."""
    return _share_inside(_mass(saliency), np.asarray(region, bool))


def _share_inside(mass: np.ndarray, region: np.ndarray) -> float:
    if region.shape != mass.shape:
        raise ValueError(f"region shape {region.shape} != map shape {mass.shape}")
    return float(mass[region].sum() / mass.sum())


def pointing_hit(saliency: np.ndarray, mask: np.ndarray, tolerance: int = 1) -> float:
    """1.0 if the map's (first) maximum lies in the mask dilated by ``tolerance``, else 0.0."""
    return _pointing_hit(_mass(saliency), np.asarray(mask, bool), tolerance)


def _pointing_hit(mass: np.ndarray, mask: np.ndarray, tolerance: int) -> float:
    if mask.shape != mass.shape:
        raise ValueError(f"mask shape {mask.shape} != map shape {mass.shape}")
    row, col = np.unravel_index(int(np.argmax(mass)), mass.shape)
    # The maximum is in the dilated mask iff the mask has a pixel in the square around it.
    tolerance = max(0, int(tolerance))
    window = mask[max(0, row - tolerance) : row + tolerance + 1,
                  max(0, col - tolerance) : col + tolerance + 1]
    return float(window.any())


def image_statistics(
    saliency: np.ndarray,
    mask: np.ndarray | None = None,
    options: StatisticsOptions | None = None,
) -> dict[str, float]:
    """Every per-image statistic of one map (see the module docstring for the formulas).

    Args:
        saliency: ``[h, w]`` (or ``[h, w, 1]``) map, any non-negative scale.
        mask: Optional bool ``[h, w]`` object mask at the map's size.
        options: How to measure; defaults to :class:`StatisticsOptions`.

    Returns:
        ``{name: value}`` for every name in :data:`STATISTICS`; ``mask_energy`` and
        ``pointing_hit`` are NaN without a (non-empty) mask.

    Example:
        >>> image_statistics(np.eye(8), mask=np.eye(8, dtype=bool))["mask_energy"]
        1.0
    """
    options = options or StatisticsOptions()
    mass = _mass(saliency)
    salient = _salient(mass, options.floor_quantile)
    band = _border_band(mass.shape, options.border_fraction)
    result = {
        "concentration": _concentration(mass, options.top_fraction),
        "entropy": _entropy(mass),
        "border_energy": _share_inside(salient, band),
        "mask_energy": math.nan,
        "pointing_hit": math.nan,
    }
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.ndim == 3 and mask.shape[-1] == 1:
            mask = mask[..., 0]
        if mask.any():
            result["mask_energy"] = _share_inside(salient, mask)
            result["pointing_hit"] = _pointing_hit(mass, mask, options.pointing_tolerance)
    return result
