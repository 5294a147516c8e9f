"""Attribution drift between two audits: per class, did the maps, the statistics or the
predictions move? Pure numpy, so that a Beam combiner or a command can call it.

Given each run's per-class :class:`ClassSummary` (a mean map, a bounded sample of per-image
statistics or their moments, counts and optionally the mix of predicted classes),
:func:`attribution_drift` compares them class by class:

- **map_distance** ``= 1 - r``, with ``r`` Pearson's correlation of the two mean maps after both
  are area-averaged onto a coarse ``grid x grid`` grid (8 x 8 by default,
  :func:`fullgrad.audit.stats.coarse_map`).
  0 for maps of the same shape, 1 for unrelated maps, up to 2 for opposite ones; it ignores the
  maps' overall level and scale, which min-max normalised maps do not carry anyway. Coarse,
  because two runs rarely put a blob on the same pixel, and the question is "did the class's
  saliency move (from the object to a corner)", not "did it jitter". A constant map has no
  correlation: two constant maps are at distance 0, one constant and one not at 1.
- **shifts**: for each statistic, ``shift = mean(current) - mean(baseline)`` with a percentile
  bootstrap interval: ``resamples`` times, resample each run's sample with replacement
  (independently), take the difference of the means, and read the ``(1 - confidence) / 2`` and
  ``(1 + confidence) / 2`` quantiles. Seeded from ``(seed, class, statistic)`` so the same
  inputs give the same interval on every machine. When a run has only moments (an older
  ``audit.json``), the interval is the normal one,
  ``shift +- z * sqrt(s_b**2 / n_b + s_c**2 / n_c)``.
- **predicted_share** (in ``shifts``): the class's share of all predictions, ``n_k / sum(n)``,
  its shift with the normal interval of a difference of two proportions,
  ``z * sqrt(p_b (1 - p_b) / N_b + p_c (1 - p_c) / N_c)``.
- **mix_distance**: when both runs have, for the images *labelled* with the class, the counts of
  each predicted class, the total variation distance of the two mixes,
  ``0.5 * sum_j |p_b(j) - p_c(j)|`` (0: the same confusion row, 1: disjoint).

A class has **drifted** when (reasons, in this order) its map distance exceeds
``map_distance_max``; a statistic's interval excludes 0 and ``|shift| >= shift_min``; the
predicted share's interval excludes 0 and ``|shift| >= share_shift_min``; the mix distance
exceeds ``mix_distance_max``; or it is in one run only. Classes with fewer than
``min_class_count`` images in either run are reported but never drifted.

Example:
    >>> drift = attribution_drift(old_summaries, new_summaries, "runs/2026-11-30/audit.json")
    >>> drift["drifted_classes"]
    ['3']
"""

from __future__ import annotations

import dataclasses
import math
import statistics as pystatistics
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from fullgrad.audit.stats import coarse_map

__all__ = [
    "ClassSummary",
    "DriftOptions",
    "attribution_drift",
    "map_distance",
    "shift_interval",
    "total_variation",
]


@dataclasses.dataclass(frozen=True)
class DriftOptions:
    """Thresholds and settings of the drift comparison (defaults stated in the module doc).

    Attributes:
        grid: Side of the coarse grid the mean maps are compared on.
        map_distance_max: A class drifts when ``1 - r`` of its mean maps exceeds this
            (0.3: correlation below 0.7).
        shift_min: Smallest shift of a statistic that counts (on the statistic's own scale:
            shares and lifts; 0.1 = ten points of the share).
        share_shift_min: Smallest shift of the class's share of predictions that counts.
        mix_distance_max: A class drifts when the total variation distance of its predicted
            mix exceeds this.
        confidence: Level of the shift intervals.
        resamples: Bootstrap resamples per statistic.
        seed: Seed of the bootstrap.
        min_class_count: Classes with fewer images in either run never drift.

    Example:
        >>> DriftOptions(map_distance_max=0.2, resamples=2000)
    """

    grid: int = 8
    map_distance_max: float = 0.3
    shift_min: float = 0.1
    share_shift_min: float = 0.05
    mix_distance_max: float = 0.2
    confidence: float = 0.95
    resamples: int = 1000
    seed: int = 0
    min_class_count: int = 5

    def __post_init__(self) -> None:
        if self.grid < 2:
            raise ValueError(f"grid must be >= 2, got {self.grid}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.resamples < 10 or self.min_class_count < 1:
            raise ValueError("resamples must be >= 10 and min_class_count >= 1")


@dataclasses.dataclass(frozen=True)
class ClassSummary:
    """What one run knows about one class (the explained target), for the comparison.

    Attributes:
        count: Images of the class.
        mean_map: The class's mean map, any ``[h, w]`` (it is coarsened to the grid), or None.
        samples: Per-image values of each statistic, a bounded sample (e.g. the strategy
            reservoir's); NaNs are dropped.
        moments: ``{statistic: (count, mean, std)}``, used for statistics without samples.
        predicted: For the images *labelled* with this class, ``{predicted class: count}``.

    Example:
        >>> ClassSummary(count=120, mean_map=m, samples={"border_energy": values})
    """

    count: int
    mean_map: np.ndarray | None = None
    samples: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    moments: Mapping[str, tuple[float, float, float]] = dataclasses.field(default_factory=dict)
    predicted: Mapping[int, int] | None = None


def map_distance(baseline: np.ndarray, current: np.ndarray, grid: int = 8) -> float:
    """``1 - pearson(coarse_map(baseline), coarse_map(current))``, in [0, 2].

    Two constant maps are at 0; a constant and a non-constant map at 1.

    Example:
        >>> map_distance(m, m)
        0.0
    """
    a = coarse_map(baseline, grid).ravel()
    b = coarse_map(current, grid).ravel()
    flat_a, flat_b = (np.ptp(v) <= 1e-12 * max(1.0, float(np.abs(v).max())) for v in (a, b))
    if flat_a or flat_b:
        return 0.0 if flat_a and flat_b else 1.0
    return float(np.clip(1.0 - np.corrcoef(a, b)[0, 1], 0.0, 2.0))


def total_variation(baseline: Mapping[Any, float], current: Mapping[Any, float]) -> float:
    """Total variation distance ``0.5 * sum_j |p(j) - q(j)|`` of two count mixes (normalised
    here), in [0, 1]; NaN when either has no counts.

    Example:
        >>> round(total_variation({0: 8, 1: 2}, {0: 5, 1: 5}), 6)
        0.3
    """
    p_total, q_total = float(sum(baseline.values())), float(sum(current.values()))
    if p_total <= 0.0 or q_total <= 0.0:
        return math.nan
    keys = set(baseline) | set(current)
    return 0.5 * sum(
        abs(baseline.get(k, 0.0) / p_total - current.get(k, 0.0) / q_total) for k in keys
    )


def _z(confidence: float) -> float:
    return pystatistics.NormalDist().inv_cdf(0.5 + confidence / 2.0)


def _seed(seed: int, *names: str) -> list[int]:
    # crc32, not hash(): Python salts str hashes per process, and the interval must not move.
    return [seed, *(zlib.crc32(name.encode()) for name in names)]


def shift_interval(
    baseline: np.ndarray,
    current: np.ndarray,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int | list[int] = 0,
) -> dict[str, float]:
    """The shift of a mean between two samples, with a percentile bootstrap interval.

    ``shift = mean(current) - mean(baseline)``; the interval is the ``(1 -+ confidence) / 2``
    quantiles of ``mean(current*) - mean(baseline*)`` over ``resamples`` pairs of resamples with
    replacement, each sample resampled on its own. NaNs are dropped; fewer than 2 values on
    either side give a NaN interval.

    Returns:
        ``{"baseline", "current", "shift", "low", "high"}``.

    Example:
        >>> round(shift_interval(np.r_[0.1, 0.2, 0.3], np.r_[0.5, 0.6, 0.7])["shift"], 6)
        0.4
    """
    old = np.asarray(baseline, np.float64)
    new = np.asarray(current, np.float64)
    old, new = old[np.isfinite(old)], new[np.isfinite(new)]
    out = {
        "baseline": float(old.mean()) if old.size else math.nan,
        "current": float(new.mean()) if new.size else math.nan,
    }
    out["shift"] = out["current"] - out["baseline"]
    if old.size < 2 or new.size < 2:
        return {**out, "low": math.nan, "high": math.nan}
    rng = np.random.default_rng(seed)
    means_old = old[rng.integers(0, old.size, (resamples, old.size))].mean(axis=1)
    means_new = new[rng.integers(0, new.size, (resamples, new.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means_new - means_old, [tail, 1.0 - tail])
    return {**out, "low": float(low), "high": float(high)}


def _normal_shift(
    old: tuple[float, float, float], new: tuple[float, float, float], confidence: float
) -> dict[str, float]:
    (n_old, mean_old, std_old), (n_new, mean_new, std_new) = old, new
    shift = mean_new - mean_old
    if n_old < 2 or n_new < 2:
        width = math.nan
    else:
        width = _z(confidence) * math.sqrt(std_old**2 / n_old + std_new**2 / n_new)
    return {"baseline": mean_old, "current": mean_new, "shift": shift,
            "low": shift - width, "high": shift + width}


def _excludes_zero(shift: Mapping[str, float]) -> bool:
    return shift["low"] > 0.0 or shift["high"] < 0.0  # NaN compares False: no verdict


def _statistic_shifts(
    key: str, old: ClassSummary, new: ClassSummary, options: DriftOptions
) -> dict[str, dict[str, float]]:
    shifts = {}
    known = [set(s.samples) | set(s.moments) for s in (old, new)]
    for name in sorted(known[0] & known[1]):
        if name in old.samples and name in new.samples:
            shifts[name] = shift_interval(
                old.samples[name], new.samples[name], options.confidence, options.resamples,
                _seed(options.seed, key, name),
            )
            continue
        moments = []
        for summary in (old, new):
            if name in summary.moments:
                moments.append(tuple(float(v) for v in summary.moments[name]))
            else:
                values = np.asarray(summary.samples[name], np.float64)
                values = values[np.isfinite(values)]
                std = float(values.std()) if values.size else math.nan
                moments.append((values.size, float(np.mean(values)) if values.size else math.nan,
                                std))
        shifts[name] = _normal_shift(moments[0], moments[1], options.confidence)
    return shifts


def _share_shift(
    old_count: int, old_total: int, new_count: int, new_total: int, confidence: float
) -> dict[str, float]:
    p = old_count / old_total if old_total else math.nan
    q = new_count / new_total if new_total else math.nan
    variance = p * (1 - p) / max(old_total, 1) + q * (1 - q) / max(new_total, 1)
    width = _z(confidence) * math.sqrt(variance)
    return {"baseline": p, "current": q, "shift": q - p, "low": q - p - width,
            "high": q - p + width}


def attribution_drift(
    baseline: Mapping[int, ClassSummary],
    current: Mapping[int, ClassSummary],
    baseline_name: str = "",
    options: DriftOptions | None = None,
) -> dict[str, Any]:
    """Compares two runs' per-class summaries (formulas in the module docstring).

    Args:
        baseline: ``{class: ClassSummary}`` of the earlier run.
        current: ``{class: ClassSummary}`` of this run.
        baseline_name: Where the baseline came from (its folder or ``audit.json``), recorded.
        options: Thresholds; :class:`DriftOptions` defaults when None.

    Returns:
        ``{"baseline": name, "classes": {"3": {"count": {"baseline", "current"},
        "map_distance", "shifts": {statistic: {"baseline", "current", "shift", "low", "high"},
        "predicted_share": {...}}, "mix_distance", "drifted", "reasons": [...]}, ...},
        "drifted_classes": ["3"]}``; class keys are strings (JSON's), sorted by class.

    Example:
        >>> attribution_drift({3: ClassSummary(50, m)}, {3: ClassSummary(50, m)})["drifted_classes"]
        []
    """
    options = options or DriftOptions()
    old_total = sum(s.count for s in baseline.values())
    new_total = sum(s.count for s in current.values())
    classes: dict[str, dict[str, Any]] = {}
    for target in sorted(set(baseline) | set(current)):
        key = str(target)
        old, new = baseline.get(target), current.get(target)
        entry: dict[str, Any] = {
            "count": {"baseline": old.count if old else 0, "current": new.count if new else 0},
            "map_distance": None,
            "shifts": {},
            "mix_distance": None,
            "drifted": False,
            "reasons": [],
        }
        classes[key] = entry
        if old is None or new is None:
            present = new if old is None else old
            if present.count >= options.min_class_count:
                entry["reasons"].append(
                    "only in this run" if old is None else "only in the baseline"
                )
            entry["drifted"] = bool(entry["reasons"])
            continue
        if old.mean_map is not None and new.mean_map is not None:
            entry["map_distance"] = map_distance(old.mean_map, new.mean_map, options.grid)
        entry["shifts"] = _statistic_shifts(key, old, new, options)
        entry["shifts"]["predicted_share"] = _share_shift(
            old.count, old_total, new.count, new_total, options.confidence
        )
        if old.predicted is not None and new.predicted is not None:
            entry["mix_distance"] = total_variation(old.predicted, new.predicted)
        if min(old.count, new.count) < options.min_class_count:
            continue
        entry["reasons"] = _reasons(entry, options)
        entry["drifted"] = bool(entry["reasons"])
    return {
        "baseline": baseline_name,
        "classes": classes,
        "drifted_classes": [k for k, v in classes.items() if v["drifted"]],
    }


def _reasons(entry: Mapping[str, Any], options: DriftOptions) -> list[str]:
    reasons = []
    distance = entry["map_distance"]
    if distance is not None and distance > options.map_distance_max:
        reasons.append(f"mean map moved: 1 - r = {distance:.2f} > {options.map_distance_max}")
    level = f"{options.confidence:.0%}"
    for name, shift in entry["shifts"].items():
        minimum = options.share_shift_min if name == "predicted_share" else options.shift_min
        if _excludes_zero(shift) and abs(shift["shift"]) >= minimum:
            reasons.append(
                f"{name} {shift['baseline']:.3f} -> {shift['current']:.3f} "
                f"({shift['shift']:+.3f}, {level} interval {shift['low']:+.3f} to "
                f"{shift['high']:+.3f})"
            )
    mix = entry["mix_distance"]
    if mix is not None and mix > options.mix_distance_max:
        reasons.append(f"predicted mix moved: total variation {mix:.2f} > "
                       f"{options.mix_distance_max}")
    return reasons
