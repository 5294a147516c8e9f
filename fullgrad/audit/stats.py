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

**Chance levels and lifts.** A location statistic means little without what a map with no
preference scores: a uniform map puts the region's *area share* on it. So each location
statistic has a chance level, measured at the map's resolution (:func:`chance_levels`):

- mask energy's chance is ``c = mean(mask)``, the mask's area share;
- border energy's chance is ``c = mean(band)``, the band's area share.

The salient part keeps this exact: under a uniform map ``s - q`` is zero everywhere, and the
salient part is then defined as the pixels at the map's maximum level (below), i.e. the whole map,
so a uniform map scores exactly ``c``. A map of i.i.d. noise scores ``c`` in expectation, since its
salient pixels are a uniformly random subset.

The **lift** over chance (:func:`lift`) is ``(e - c) / (1 - c)``: 0 at chance, 1 when all the
salient mass is in the region, negative below chance (down to ``-c / (1 - c)`` when none is). It
is Cohen's kappa's correction (observed minus chance, over its room above chance). Chosen over the
ratio ``e / c`` because the ratio's ceiling ``1 / c`` depends on the region's size (a 5% mask can
reach 20, a 50% mask only 2), so ratios of classes with different object sizes do not compare; the
lift's ceiling is 1 for every region, and its zero is the same "no preference" for every region.
``mask_lift`` and ``border_lift`` are per-image statistics (NaN where the chance level is NaN or 1).

**Plateaus.** When the brightest ``1 - floor_quantile`` of the pixels all sit at the maximum
(a uniform map, or a saturated one), ``s - q`` has no mass; the salient part is then the indicator
of the pixels at the maximum. For a uniform map that is every pixel (the chance level above); for
a saturated map it is the saturated region, not the whole image.

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
    "LocationFlagOptions",
    "StatisticsOptions",
    "border_band",
    "chance_levels",
    "class_location_flags",
    "coarse_map",
    "concentration",
    "dilate",
    "image_location_flags",
    "image_statistics",
    "lift",
    "location_statistics",
    "normalised_entropy",
    "pointing_hit",
    "salient_part",
    "share_inside",
    "statistic_range",
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
    salient = np.maximum(mass - _quantile(mass, floor_quantile), 0.0)
    if salient.sum() > 0.0:
        return salient
    # A plateau at the top: the quantile is the maximum. Its pixels are the salient part.
    return (mass >= mass.max()).astype(np.float64)


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
        ``{name: value}`` for every name in :data:`STATISTICS`; ``mask_energy``,
        ``pointing_hit`` and ``mask_lift`` are NaN without a (non-empty) mask.

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
    chance = _chance_levels(mass.shape, mask, options.border_fraction)
    result["border_lift"] = lift(result["border_energy"], chance["border_energy"])
    result["mask_lift"] = lift(result["mask_energy"], chance["mask_energy"])
    return result


def location_statistics(
    saliency: np.ndarray,
    mask: np.ndarray | None = None,
    options: StatisticsOptions | None = None,
) -> dict[str, float]:
    """Border and mask energy of one map and their lifts (the audit's per-part statistics).

    The same formulas as :func:`image_statistics`, without the statistics of the map's shape;
    a map with no mass at all (a part of the map that no layer contributes to) gives NaN, not
    the uniform map's chance-level values: there is nothing to measure.

    Args:
        saliency: ``[h, w]`` map, any non-negative scale.
        mask: Optional bool ``[h, w]`` object mask at the map's size.
        options: How to measure; defaults to :class:`StatisticsOptions`.

    Returns:
        ``{"border_energy", "border_lift", "mask_energy", "mask_lift"}``.

    Example:
        >>> location_statistics(np.eye(8), mask=np.eye(8, dtype=bool))["mask_lift"]
        1.0
    """
    options = options or StatisticsOptions()
    names = ("border_energy", "border_lift", "mask_energy", "mask_lift")
    array = np.asarray(saliency, np.float64)
    if not np.any(np.isfinite(array) & (array > 0.0)):
        return dict.fromkeys(names, math.nan)
    salient = _salient(_mass(array), options.floor_quantile)
    band = _border_band(salient.shape, options.border_fraction)
    if mask is not None:
        mask = np.asarray(mask, bool)
        mask = mask[..., 0] if mask.ndim == 3 and mask.shape[-1] == 1 else mask
    chance = _chance_levels(salient.shape, mask, options.border_fraction)
    border = _share_inside(salient, band)
    inside = _share_inside(salient, mask) if mask is not None and mask.any() else math.nan
    return {
        "border_energy": border,
        "border_lift": lift(border, chance["border_energy"]),
        "mask_energy": inside,
        "mask_lift": lift(inside, chance["mask_energy"]),
    }


def coarse_map(saliency: np.ndarray, grid: int = 8) -> np.ndarray:
    """Area-average of a ``[h, w]`` map onto a ``grid x grid`` grid.

    Output cell ``(i, j)`` is the mean of the map over the cell's area, pixels cut by a cell
    boundary counted by the part inside: ``R_h @ s @ R_w.T`` with ``R[i, p]`` the overlap of
    cell ``i`` with pixel ``p`` divided by the cell's width. For ``h`` and ``w`` multiples of
    ``grid`` this is the plain block mean. NaN counts as 0.

    Example:
        >>> coarse_map(np.arange(16.0).reshape(4, 4), 2)
        array([[ 2.5,  4.5],
               [10.5, 12.5]])
    """
    array = np.nan_to_num(np.asarray(saliency, np.float64))
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"a map must be [h, w], got shape {array.shape}")
    return _resampling(array.shape[0], grid) @ array @ _resampling(array.shape[1], grid).T


def _resampling(size: int, cells: int) -> np.ndarray:
    """``[cells, size]`` area-averaging weights (each row sums to 1)."""
    edges = np.linspace(0.0, size, cells + 1)
    pixels = np.arange(size + 1, dtype=np.float64)
    low = np.maximum(edges[:-1, None], pixels[None, :-1])
    high = np.minimum(edges[1:, None], pixels[None, 1:])
    overlap = np.clip(high - low, 0.0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


# -- chance levels, lifts and the location flags ---------------------------------------------


def statistic_range(name: str) -> tuple[float, float]:
    """The range a statistic's histograms cover: [-1, 1] for a lift, [0, 1] for the others.

    A lift can fall below -1 (to ``-c / (1 - c)`` for a region covering more than half the
    map); such values land in the first bin.

    Example:
        >>> statistic_range("input_border_lift"), statistic_range("mask_energy")
        ((-1.0, 1.0), (0.0, 1.0))
    """
    return (-1.0, 1.0) if name.endswith("_lift") else (0.0, 1.0)


def lift(value: float, chance: float) -> float:
    """Lift of a share over its chance level: ``(value - chance) / (1 - chance)``.

    0 at chance, 1 when the whole salient mass is in the region, negative below chance (its
    minimum is ``-chance / (1 - chance)``). See the module docstring for why this form.

    Args:
        value: A share in [0, 1] (``mask_energy``, ``border_energy``).
        chance: Its chance level, the region's area share (:func:`chance_levels`).

    Returns:
        The lift; NaN when either is NaN or ``chance >= 1`` (a region covering the whole map
        leaves no room above chance).

    Example:
        >>> lift(0.5, 0.25)
        0.3333333333333333
    """
    value, chance = float(value), float(chance)
    if not (math.isfinite(value) and math.isfinite(chance)) or chance >= 1.0:
        return math.nan
    return (value - chance) / (1.0 - chance)


def chance_levels(
    shape: tuple[int, int], mask: np.ndarray | None = None, border_fraction: float = 0.1
) -> dict[str, float]:
    """What a map with no preference (a uniform map) scores on each location statistic.

    ``border_energy``: the band's area share ``mean(border_band(shape))``; ``mask_energy``: the
    mask's area share ``mean(mask)``, both at the map's resolution (resize the mask to the map
    first), NaN without a (non-empty) mask, as ``mask_energy`` itself.

    Args:
        shape: The map's ``(h, w)``.
        mask: Optional bool ``[h, w]`` (or ``[h, w, 1]``) object mask at the map's size.
        border_fraction: As in :class:`StatisticsOptions`.

    Returns:
        ``{"border_energy": c_band, "mask_energy": c_mask}``.

    Example:
        >>> chance_levels((64, 64), border_fraction=0.1)["border_energy"]   # 1 - (52/64)**2
        0.33984375
    """
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.ndim == 3 and mask.shape[-1] == 1:
            mask = mask[..., 0]
        if mask.shape != tuple(shape):
            raise ValueError(f"mask shape {mask.shape} != map shape {tuple(shape)}")
    return _chance_levels(tuple(shape), mask, border_fraction)


def _chance_levels(
    shape: tuple[int, int], mask: np.ndarray | None, border_fraction: float
) -> dict[str, float]:
    has_mask = mask is not None and bool(mask.any())
    return {
        "border_energy": float(_border_band(shape, border_fraction).mean()),
        "mask_energy": float(mask.mean()) if has_mask else math.nan,
    }


@dataclasses.dataclass(frozen=True)
class LocationFlagOptions:
    """Thresholds of the location flags, on the lifts (0 = chance, 1 = all in the region).

    Attributes:
        image_mask_lift_min: An image is ``off_object`` when its mask lift is below this.
        image_border_lift_max: An image is ``on_border`` when its border lift is above this.
        class_mask_lift_min: A class is ``off_object`` when its mean mask lift is below this.
        class_border_lift_max: A class is ``on_border`` when its mean border lift is above this.
        class_border_lift_margin: A class is also ``on_border`` when its mean border lift is
            above chance (> 0) and above the median of the other classes' by more than this.
        min_class_count: Classes with fewer images are never flagged.

    Example:
        >>> LocationFlagOptions(class_mask_lift_min=0.3)
    """

    image_mask_lift_min: float = 0.1
    image_border_lift_max: float = 0.25
    class_mask_lift_min: float = 0.25
    class_border_lift_max: float = 0.25
    class_border_lift_margin: float = 0.3
    min_class_count: int = 5

    def __post_init__(self) -> None:
        for name in ("image_mask_lift_min", "image_border_lift_max", "class_mask_lift_min",
                     "class_border_lift_max"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [-1, 1], got {getattr(self, name)}")
        if self.class_border_lift_margin < 0.0 or self.min_class_count < 1:
            raise ValueError("class_border_lift_margin must be >= 0, min_class_count >= 1")


def image_location_flags(
    statistics: dict[str, float], options: LocationFlagOptions | None = None
) -> list[str]:
    """The location reasons an image is flagged, from its lifts (empty when it is not).

    ``off_object``: ``mask_lift < image_mask_lift_min``; ``on_border``:
    ``border_lift > image_border_lift_max``. A NaN lift (no mask) gives no verdict.

    Example:
        >>> image_location_flags({"mask_lift": -0.2, "border_lift": 0.6})
        ['off_object', 'on_border']
    """
    options = options or LocationFlagOptions()
    reasons = []
    if _finite(statistics.get("mask_lift")) < options.image_mask_lift_min:
        reasons.append("off_object")  # NaN compares False
    if _finite(statistics.get("border_lift")) > options.image_border_lift_max:
        reasons.append("on_border")
    return reasons


def _finite(value: float | None) -> float:
    return math.nan if value is None else float(value)


def class_location_flags(
    per_class_means: dict[int, dict[str, float]], options: LocationFlagOptions | None = None
) -> dict[int, list[str]]:
    """Which classes put their maps off the object or on the border, judged on the lifts.

    With ``m_k`` and ``b_k`` class ``k``'s mean ``mask_lift`` and ``border_lift`` (means of
    the per-image lifts, each image against its own mask's area share):

    - ``off_object``: ``m_k < class_mask_lift_min``. Absolute, not relative to the other
      classes: how close to chance a map lands does not depend on the object's size, but how
      far above chance a blurred map can climb does (a thin object's ceiling is lower), so a
      comparison with other classes' lifts would flag thin objects again;
    - ``on_border``: ``b_k > class_border_lift_max``, or ``b_k > 0`` and
      ``b_k - median(b_j, j != k) > class_border_lift_margin``. The band's chance level is the
      same for every class (one map size), so here the other classes are a fair reference.

    Classes with fewer than ``min_class_count`` images (or a NaN mean) get no verdict; the
    other classes in the median are those with enough images.

    Args:
        per_class_means: ``{class: {"count": n, "mask_lift": m, "border_lift": b}}``; a
            missing or NaN ``mask_lift`` (no masks) gives no ``off_object`` verdict.
        options: Thresholds; :class:`LocationFlagOptions` defaults when None.

    Returns:
        ``{class: [reason, ...]}`` for every class, an empty list when not flagged.

    Example:
        >>> class_location_flags({0: {"count": 9, "mask_lift": 0.8, "border_lift": -0.5},
        ...                       1: {"count": 9, "mask_lift": 0.7, "border_lift": -0.4},
        ...                       2: {"count": 9, "mask_lift": 0.1, "border_lift": 0.3}})
        {0: [], 1: [], 2: ['off_object', 'on_border']}
    """
    options = options or LocationFlagOptions()
    counted = {
        k: v for k, v in per_class_means.items() if v.get("count", 0) >= options.min_class_count
    }
    out: dict[int, list[str]] = {}
    for target in per_class_means:
        reasons: list[str] = []
        out[target] = reasons
        if target not in counted:
            continue
        if _finite(counted[target].get("mask_lift")) < options.class_mask_lift_min:
            reasons.append("off_object")
        border = _finite(counted[target].get("border_lift"))
        peers = [_finite(v.get("border_lift")) for k, v in counted.items() if k != target]
        peers = [p for p in peers if math.isfinite(p)]
        relative = (
            bool(peers)
            and border > 0.0
            and border - float(np.median(peers)) > options.class_border_lift_margin
        )
        if border > options.class_border_lift_max or relative:
            reasons.append("on_border")
    return out
