"""The audit as Beam combiners: one pass over explained records, bounded memory, mergeable.

``ComputeAudit(settings)`` turns a PCollection of explained records (see the data contract in
``fullgrad.beam``) into ONE audit dict. It

1. adds the per-image statistics of :mod:`fullgrad.audit.stats` to each record (unless the record
   already carries them, e.g. when re-auditing maps written by ``fullgrad run``), the per-part
   statistics of :mod:`fullgrad.audit.parts` when the record has ``part_maps``, and the image's
   flags (:func:`image_flags`);
2. folds the records into three kinds of accumulators, each a ``beam.CombineFn`` whose
   ``merge_accumulators`` is exact (sums, counts, fixed-bin histograms, bounded top-N lists):
   per class (the explained target) :class:`ClassStatisticsCombineFn`; the N most extreme images
   for the report :class:`ExtremesCombineFn`; the ids of flagged images, capped;
3. compares every class with the others (:func:`class_flags`) and returns the audit dict.

Memory is ``classes x (1 + P) x map size`` for the mean maps (the full map and its ``P`` parts)
plus ``N`` thumbnails per extreme list, whatever the dataset's size.

Flags are judged on the *lifts* over chance, ``lift = (e - c) / (1 - c)`` with ``e`` the mask
(border) energy and ``c`` the mask's (band's) area share, what a map with no preference scores
(see :mod:`fullgrad.audit.stats`). Every threshold is an :class:`AuditSettings` field; the audit
is never told where a shortcut is, only the maps, masks and targets:

- image ``off_object``: ``mask_lift < image_mask_lift_min`` (0.1); image ``on_border``:
  ``border_lift > image_border_lift_max`` (0.25) (:func:`stats.image_location_flags`);
- class ``off_object`` / ``on_border`` from its mean lifts
  (:func:`stats.class_location_flags`: mean mask lift below ``class_mask_lift_min``; mean
  border lift above ``class_border_lift_max``, or above chance and above the other classes'
  median by ``class_border_lift_margin``);
- class ``{part}:off_object`` / ``{part}:on_border``: one part of the map stands out from the
  other classes' same part (:func:`fullgrad.audit.parts.part_class_flags`);
- class ``flagged_images``: more than ``class_flagged_share`` (0.5) of its images are flagged.

Classes with fewer than ``min_class_count`` images are reported but never flagged. The raw
energies and their chance levels stay in the output beside the lifts.

Example:
    >>> with beam.Pipeline() as p:
    ...     audits = explained | ComputeAudit(AuditSettings(border_fraction=0.1))
    ...     audits | beam.Map(write_audit, "out/")
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping
from typing import Any

import apache_beam as beam
import numpy as np

from fullgrad.audit.comparison import with_drift
from fullgrad.audit.parts import part_class_flags, part_statistics, verdict_text
from fullgrad.audit.sampling import ClassSampleCombineFn, sample_sections
from fullgrad.audit.settings import AuditSettings
from fullgrad.audit.stats import (
    border_band,
    class_location_flags,
    image_location_flags,
    image_statistics,
    statistic_range,
)
from fullgrad.parts import PARTS
from fullgrad.record import PART_STATISTIC_COLUMNS, PART_STATISTICS, STATISTIC_COLUMNS, STATISTICS

__all__ = [
    "EXTREMES",
    "AuditCombineFn",
    "AuditSettings",
    "ClassStatisticsCombineFn",
    "ComputeAudit",
    "ExtremesCombineFn",
    "FlaggedIdsCombineFn",
    "class_flags",
    "finalise_audit",
    "image_flags",
    "with_statistics",
]


#: The example lists kept for the report: name -> (statistic, keep the largest?).
EXTREMES: dict[str, tuple[str, bool]] = {
    "least_on_object": ("mask_lift", False),
    "most_on_object": ("mask_lift", True),
    "most_on_border": ("border_lift", True),
}

#: Every column the class combiner summarises: the map's statistics, then each part's.
_COLUMNS = (*STATISTIC_COLUMNS, *PART_STATISTIC_COLUMNS)

_RESIDUAL_LOG10_RANGE = (-10.0, 1.0)


# -- per-record step -----------------------------------------------------------------------


def image_flags(statistics: Mapping[str, float], settings: AuditSettings) -> list[str]:
    """The reasons an image is flagged (empty when it is not), from its full map's lifts.

    Args:
        statistics: The image's statistics (NaN mask lift: no mask, never ``off_object``).
        settings: The thresholds (``image_mask_lift_min``, ``image_border_lift_max``).

    Returns:
        A subset of ``["off_object", "on_border"]``.

    Example:
        >>> image_flags({"mask_lift": -0.1, "border_lift": 0.1}, AuditSettings())
        ['off_object']
    """
    return image_location_flags(statistics, settings.location_flag_options)


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def with_statistics(record: Mapping[str, Any], settings: AuditSettings) -> dict[str, Any]:
    """Returns the record with its per-image statistics and flags added.

    Statistics already present (every name in :data:`STATISTICS`) are kept, so re-auditing the
    written maps gives the numbers the job wrote; missing ones are computed from ``map`` and
    ``mask``. Likewise the per-part columns: kept when present, else computed from
    ``part_maps`` when the record has them, else NaN.

    Args:
        record: An explained record.
        settings: Measuring options and thresholds.

    Returns:
        A new dict: the record plus the statistics, ``mask_area`` and ``flags``.

    Example:
        >>> with_statistics({"id": "a", "target": 0, "map": m, "mask": None}, AuditSettings())
    """
    out = dict(record)
    mask = record.get("mask")
    if not all(name in record and record[name] is not None for name in STATISTICS):
        out.update(image_statistics(record["map"], mask, settings.statistics_options))
    else:
        out.update({name: _float(record[name]) for name in STATISTICS})
    stored = [record.get(name) for name in PART_STATISTIC_COLUMNS]
    if record.get("part_maps") is not None and any(v is None for v in stored):
        out.update(part_statistics(record["part_maps"], mask, settings.statistics_options))
    else:
        out.update({n: _float(v) for n, v in zip(PART_STATISTIC_COLUMNS, stored, strict=True)})
    if "mask_area" not in record or record["mask_area"] is None:
        out["mask_area"] = float(np.mean(mask)) if mask is not None and np.any(mask) else math.nan
    out["flags"] = image_flags(out, settings)
    return out


# -- per-class statistics ------------------------------------------------------------------


def _empty_class(bins: int) -> dict[str, Any]:
    moments = {name: np.zeros(3) for name in _COLUMNS}  # count, sum, sum of squares
    return {
        "count": 0,
        "map_sum": None,
        "part_count": 0,
        "part_map_sum": None,  # [P, h, w], from the records that carry part maps
        "moments": moments,
        "histograms": {name: np.zeros(bins, np.int64) for name in _COLUMNS},
        "flags": {"off_object": 0, "on_border": 0, "any": 0},
        "labelled": 0,
        "correct": 0,
        "residual": np.array([0.0, 0.0, 0.0, -math.inf, 0.0]),  # n, sum, sumsq, max, violations
        "residual_histogram": np.zeros(bins, np.int64),
    }


def _bin(value: float, bins: int, low: float = 0.0, high: float = 1.0) -> int:
    position = (value - low) / (high - low)
    return int(min(bins - 1, max(0, math.floor(position * bins))))


class ClassStatisticsCombineFn(beam.CombineFn):
    """Per class (target): count, mean map, moments and histograms of every statistic,
    completeness residuals, flagged-image counts and label agreement.

    The accumulator is ``{target: partial sums}``; merging adds them, so any split of the data
    merges to the single-pass result (up to float64 rounding of the sums).

    Example:
        >>> records | beam.CombineGlobally(ClassStatisticsCombineFn(AuditSettings()))
    """

    def __init__(self, settings: AuditSettings):
        self._settings = settings

    def create_accumulator(self) -> dict[int, dict[str, Any]]:
        return {}

    def add_input(self, accumulator, record):
        bins = self._settings.bins
        target = int(record["target"])
        part = accumulator.setdefault(target, _empty_class(bins))
        saliency = np.asarray(record["map"], np.float64)
        if saliency.ndim == 3 and saliency.shape[-1] == 1:
            saliency = saliency[..., 0]
        if part["map_sum"] is None:
            part["map_sum"] = np.zeros(saliency.shape)
        if part["map_sum"].shape != saliency.shape:
            raise ValueError(
                f"record {record.get('id')!r}: map shape {saliency.shape} differs from "
                f"{part['map_sum'].shape}; the audit needs every map at one --map-size"
            )
        part["count"] += 1
        part["map_sum"] += np.nan_to_num(saliency)
        if record.get("part_maps") is not None:
            part_maps = np.nan_to_num(np.asarray(record["part_maps"], np.float64))
            if part["part_map_sum"] is None:
                part["part_map_sum"] = np.zeros(part_maps.shape)
            part["part_map_sum"] += part_maps
            part["part_count"] += 1
        for name in _COLUMNS:
            value = _float(record.get(name))
            if math.isfinite(value):
                part["moments"][name] += (1.0, value, value * value)
                part["histograms"][name][_bin(value, bins, *statistic_range(name))] += 1
        for reason in record.get("flags", ()):
            part["flags"][reason] += 1
        if record.get("flags"):
            part["flags"]["any"] += 1
        label = record.get("label")
        if label is not None and not (isinstance(label, float) and math.isnan(label)):
            part["labelled"] += 1
            part["correct"] += int(int(label) == target)
        residual = _float(record.get("residual"))
        if math.isfinite(residual):
            stats = part["residual"]
            stats[:3] += (1.0, residual, residual * residual)
            stats[3] = max(stats[3], residual)
            stats[4] += residual > self._settings.residual_tolerance
            log = math.log10(max(abs(residual), 1e-30))
            part["residual_histogram"][_bin(log, bins, *_RESIDUAL_LOG10_RANGE)] += 1
        return accumulator

    def merge_accumulators(self, accumulators):
        merged: dict[int, dict[str, Any]] = {}
        for accumulator in accumulators:
            for target, part in accumulator.items():
                if target not in merged:
                    merged[target] = _copy_part(part)
                    continue
                into = merged[target]
                into["count"] += part["count"]
                if part["map_sum"] is not None:
                    if into["map_sum"] is None:
                        into["map_sum"] = part["map_sum"].copy()
                    elif into["map_sum"].shape != part["map_sum"].shape:
                        raise ValueError(
                            f"class {target}: maps of shapes {into['map_sum'].shape} and "
                            f"{part['map_sum'].shape}; the audit needs one --map-size"
                        )
                    else:
                        into["map_sum"] += part["map_sum"]
                if part["part_map_sum"] is not None:
                    if into["part_map_sum"] is None:
                        into["part_map_sum"] = part["part_map_sum"].copy()
                    else:
                        into["part_map_sum"] += part["part_map_sum"]
                into["part_count"] += part["part_count"]
                for name in _COLUMNS:
                    into["moments"][name] += part["moments"][name]
                    into["histograms"][name] += part["histograms"][name]
                for reason, count in part["flags"].items():
                    into["flags"][reason] += count
                into["labelled"] += part["labelled"]
                into["correct"] += part["correct"]
                residual = into["residual"]
                residual[:3] += part["residual"][:3]
                residual[3] = max(residual[3], part["residual"][3])
                residual[4] += part["residual"][4]
                into["residual_histogram"] += part["residual_histogram"]
        return merged

    def extract_output(self, accumulator):
        return {target: _summarise(part) for target, part in sorted(accumulator.items())}


def _copy_part(part: dict[str, Any]) -> dict[str, Any]:
    return {
        key: (
            {k: v.copy() for k, v in value.items()}
            if key in ("moments", "histograms")
            else dict(value)
            if key == "flags"
            else value.copy()
            if isinstance(value, np.ndarray)
            else value
        )
        for key, value in part.items()
    }


def _moments(stats: np.ndarray) -> dict[str, float | int]:
    count, total, squares = stats
    if count == 0:
        return {"count": 0, "mean": math.nan, "std": math.nan}
    mean = total / count
    return {
        "count": int(count),
        "mean": mean,
        "std": math.sqrt(max(0.0, squares / count - mean**2)),
    }


def _summarise(part: dict[str, Any]) -> dict[str, Any]:
    count = part["count"]
    residual = part["residual"]
    return {
        "count": count,
        "mean_map": None if part["map_sum"] is None else part["map_sum"] / max(count, 1),
        "mean_part_maps": None
        if part["part_map_sum"] is None
        else part["part_map_sum"] / part["part_count"],
        "statistics": {
            name: {
                **_moments(part["moments"][name]),
                "histogram": part["histograms"][name].tolist(),
                "range": list(statistic_range(name)),
            }
            for name in _COLUMNS
        },
        "flagged_images": dict(part["flags"]),
        "accuracy": part["correct"] / part["labelled"] if part["labelled"] else None,
        "residual": {
            **_moments(residual[:3]),
            "max": float(residual[3]) if residual[0] else math.nan,
            "violations": int(residual[4]),
            "log10_histogram": part["residual_histogram"].tolist(),
        },
    }


# -- bounded example lists -----------------------------------------------------------------


class ExtremesCombineFn(beam.CombineFn):
    """The ``n`` records with the largest (or smallest) value of one statistic, kept whole.

    The accumulator is a list of at most ``n`` ``(key, id, record)``; ties break on the id, so
    the result does not depend on how the data was split. Records without a finite value are
    skipped.

    Example:
        >>> records | beam.CombineGlobally(ExtremesCombineFn("mask_energy", 8, largest=False))
    """

    def __init__(self, statistic: str, n: int, largest: bool = True, keep: Iterable[str] = ()):
        self._statistic = statistic
        self._n = n
        self._sign = 1.0 if largest else -1.0
        self._keep = tuple(keep)

    def _trim(self, items):
        # Largest key first, then smallest id: a total order, so merging is order-free.
        ordered = sorted(items, key=lambda item: item[1])
        return heapq.nlargest(self._n, ordered, key=lambda item: item[0])

    def create_accumulator(self):
        return []

    def add_input(self, accumulator, record):
        value = _float(record.get(self._statistic))
        if self._n == 0 or not math.isfinite(value):
            return accumulator
        kept = {k: record[k] for k in self._keep if k in record} if self._keep else dict(record)
        accumulator.append((self._sign * value, str(record.get("id")), kept))
        if len(accumulator) > 2 * self._n:
            accumulator[:] = self._trim(accumulator)
        return accumulator

    def merge_accumulators(self, accumulators):
        return self._trim([item for accumulator in accumulators for item in accumulator])

    def extract_output(self, accumulator):
        return [record for _, _, record in self._trim(accumulator)]


class FlaggedIdsCombineFn(beam.CombineFn):
    """The flagged images: a total count and, capped at ``n``, the most off-object ones.

    Severity is ``max(-mask_lift, border_lift)`` so that images far off the object and images
    far on the border both rank high; ties break on the id.

    Example:
        >>> records | beam.CombineGlobally(FlaggedIdsCombineFn(1000))
    """

    _FIELDS = ("id", "target", "label", "mask_energy", "border_energy", "mask_lift",
               "border_lift", "flags")

    def __init__(self, n: int):
        self._extremes = ExtremesCombineFn("severity", n, largest=True, keep=self._FIELDS)

    def create_accumulator(self):
        return [0, self._extremes.create_accumulator()]

    def add_input(self, accumulator, record):
        if not record.get("flags"):
            return accumulator
        accumulator[0] += 1
        self._extremes.add_input(accumulator[1], {**record, "severity": _severity(record)})
        return accumulator

    def merge_accumulators(self, accumulators):
        accumulators = list(accumulators)
        return [
            sum(a[0] for a in accumulators),
            self._extremes.merge_accumulators([a[1] for a in accumulators]),
        ]

    def extract_output(self, accumulator):
        return {"total": accumulator[0], "images": self._extremes.extract_output(accumulator[1])}


class AuditCombineFn(beam.CombineFn):
    """All the audit's combiners as one: ``{part: accumulator}``, merged part by part.

    Parts: ``classes`` (:class:`ClassStatisticsCombineFn`), one :class:`ExtremesCombineFn` per
    :data:`EXTREMES` entry plus ``flagged_examples`` (the most severe flagged images, with their
    pictures), and ``flagged`` (:class:`FlaggedIdsCombineFn`).

    Example:
        >>> with_stats | beam.CombineGlobally(AuditCombineFn(settings))
    """

    _PICTURES = ("id", "target", "label", "thumbnail", "map", "mask", *STATISTIC_COLUMNS, "flags")

    def __init__(self, settings: AuditSettings):
        n = settings.examples
        self._parts: dict[str, beam.CombineFn] = {
            "classes": ClassStatisticsCombineFn(settings),
            **{
                name: ExtremesCombineFn(statistic, n, largest, keep=self._PICTURES)
                for name, (statistic, largest) in EXTREMES.items()
            },
            "flagged_examples": ExtremesCombineFn(
                "severity", n, largest=True, keep=(*self._PICTURES, "severity")
            ),
            "flagged": FlaggedIdsCombineFn(settings.max_flagged_ids),
            "sample": ClassSampleCombineFn(settings),  # strategies and drift (sampling.py)
        }

    def create_accumulator(self):
        return {name: fn.create_accumulator() for name, fn in self._parts.items()}

    def add_input(self, accumulator, record):
        for name, fn in self._parts.items():
            if name == "flagged_examples":
                if record.get("flags"):
                    fn.add_input(accumulator[name], {**record, "severity": _severity(record)})
            else:
                accumulator[name] = fn.add_input(accumulator[name], record)
        return accumulator

    def merge_accumulators(self, accumulators):
        accumulators = list(accumulators)
        return {
            name: fn.merge_accumulators([a[name] for a in accumulators])
            for name, fn in self._parts.items()
        }

    def extract_output(self, accumulator):
        return {name: fn.extract_output(accumulator[name]) for name, fn in self._parts.items()}


def _severity(record: Mapping[str, Any]) -> float:
    mask_lift = _float(record.get("mask_lift"))
    border_lift = _float(record.get("border_lift"))
    off = -mask_lift if math.isfinite(mask_lift) else -math.inf
    return max(off, border_lift if math.isfinite(border_lift) else -math.inf)


# -- dataset-wide comparison and the audit dict ----------------------------------------------


def class_flags(classes: Mapping[int, Mapping[str, Any]], settings: AuditSettings) -> dict:
    """Compares every class with the others and says which are flagged, and why.

    The full map's mean lifts go through :func:`stats.class_location_flags`, each part's through
    :func:`fullgrad.audit.parts.part_class_flags`; a class with more than
    ``class_flagged_share`` of its images flagged is flagged too.

    Args:
        classes: ``{target: summary}`` from :class:`ClassStatisticsCombineFn`.
        settings: The thresholds.

    Returns:
        ``{target: [reason, ...]}`` for every class; an empty list means not flagged.
        Reasons: ``off_object``, ``on_border``, ``{part}:off_object``, ``{part}:on_border``,
        ``flagged_images``.

    Example:
        >>> class_flags(summary["classes"], AuditSettings())
        {0: [], 1: [], 2: [], 3: ['off_object', 'on_border', 'input:on_border']}
    """
    means = {
        target: {
            "count": summary["count"],
            "mask_lift": summary["statistics"]["mask_lift"]["mean"],
            "border_lift": summary["statistics"]["border_lift"]["mean"],
        }
        for target, summary in classes.items()
    }
    whole = class_location_flags(means, settings.location_flag_options)
    parts = part_class_flags(classes, settings)
    out: dict[int, list[str]] = {}
    for target, summary in classes.items():
        reasons = [*whole[target], *parts[target]]
        counted = summary["count"] >= settings.min_class_count
        if counted and (
            summary["flagged_images"]["any"] > settings.class_flagged_share * summary["count"]
        ):
            reasons.append("flagged_images")
        out[target] = reasons
    return out


def _dataset_summary(classes: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Pools the class summaries: image-weighted means and summed histograms."""
    count = sum(c["count"] for c in classes.values())
    pooled: dict[str, Any] = {"count": count, "statistics": {}}
    for name in _COLUMNS:
        parts = [c["statistics"][name] for c in classes.values() if c["statistics"][name]["count"]]
        n = sum(p["count"] for p in parts)
        pooled["statistics"][name] = {
            "count": n,
            "mean": sum(p["mean"] * p["count"] for p in parts) / n if n else math.nan,
            "histogram": np.sum([c["statistics"][name]["histogram"] for c in classes.values()], 0)
            .astype(int)
            .tolist()
            if classes
            else [],
        }
    residuals = [c["residual"] for c in classes.values() if c["residual"]["count"]]
    n = sum(r["count"] for r in residuals)
    pooled["residual"] = {
        "count": n,
        "mean": sum(r["mean"] * r["count"] for r in residuals) / n if n else math.nan,
        "max": max((r["max"] for r in residuals), default=math.nan),
        "violations": sum(r["violations"] for r in residuals),
        "log10_histogram": np.sum([r["log10_histogram"] for r in residuals], 0).astype(int).tolist()
        if residuals
        else [],
    }
    return pooled


def finalise_audit(combined: Mapping[str, Any], settings: AuditSettings) -> dict[str, Any]:
    """Turns the combined accumulators into the audit dict that ``write_audit`` writes.

    Args:
        combined: :class:`AuditCombineFn`'s output.
        settings: The settings used.

    Returns:
        ``{"settings", "images", "classes", "dataset", "flagged_classes", "flagged_images",
        "flagged_images_total", "mean_maps", "mean_part_maps", "examples"}``. ``classes`` maps
        the class (as a string, JSON's key type) to its count; each location statistic's mean
        raw value, mean chance level and mean lift (``mask_energy``, ``mask_chance``,
        ``mask_lift``, ``border_energy``, ``border_chance``, ``border_lift``; ``mask_area`` is
        ``mask_chance``); ``concentration``, ``entropy``, ``pointing_game``; ``parts``
        (``{part: {border_energy, border_lift, mask_energy, mask_lift}}`` means); ``flagged``,
        ``reasons`` (codes) and ``verdict`` (a sentence naming the part), and details.
        ``mean_maps``, ``mean_part_maps`` and ``examples`` hold arrays for the report and are
        not written to JSON.

    Example:
        >>> audit = finalise_audit(AuditCombineFn(s).extract_output(accumulator), s)
    """
    classes = combined["classes"]
    flags = class_flags(classes, settings)
    shapes = [c["mean_map"].shape for c in classes.values() if c.get("mean_map") is not None]
    band_share = (
        float(border_band(shapes[0], settings.border_fraction).mean()) if shapes else math.nan
    )
    table: dict[str, Any] = {}
    for target, summary in classes.items():
        stats = summary["statistics"]
        table[str(target)] = {
            "name": settings.class_name(target),
            "count": summary["count"],
            "mask_energy": stats["mask_energy"]["mean"],
            "mask_chance": stats["mask_area"]["mean"],
            "mask_lift": stats["mask_lift"]["mean"],
            "border_energy": stats["border_energy"]["mean"],
            "border_chance": band_share,
            "border_lift": stats["border_lift"]["mean"],
            "concentration": stats["concentration"]["mean"],
            "entropy": stats["entropy"]["mean"],
            "pointing_game": stats["pointing_hit"]["mean"],
            "mask_area": stats["mask_area"]["mean"],
            "parts": {
                part: {name: stats[f"{part}_{name}"]["mean"] for name in PART_STATISTICS}
                for part in PARTS
            },
            "flagged": bool(flags[target]),
            "reasons": flags[target],
            "verdict": verdict_text(flags[target]),
            "flagged_images": summary["flagged_images"],
            "accuracy": summary["accuracy"],
            "statistics": stats,
            "residual": summary["residual"],
        }
    flagged = combined["flagged"]
    sampled = sample_sections(combined["sample"], classes, settings)
    return {
        "settings": settings.as_dict(),
        "images": sum(c["count"] for c in classes.values()),
        "classes": table,
        "dataset": _dataset_summary(classes),
        "flagged_classes": [str(t) for t, reasons in flags.items() if reasons],
        "flagged_images": [
            {
                "id": str(r.get("id")),
                "target": int(r["target"]),
                "label": None if r.get("label") is None else int(r["label"]),
                "mask_energy": _float(r.get("mask_energy")),
                "border_energy": _float(r.get("border_energy")),
                "mask_lift": _float(r.get("mask_lift")),
                "border_lift": _float(r.get("border_lift")),
                "reasons": list(r.get("flags", [])),
            }
            for r in flagged["images"]
        ],
        "flagged_images_total": flagged["total"],
        "mean_maps": {str(t): c["mean_map"] for t, c in classes.items()},
        "mean_part_maps": {str(t): c["mean_part_maps"] for t, c in classes.items()},
        "examples": {name: combined[name] for name in (*EXTREMES, "flagged_examples")}
        | sampled["examples"],
        "strategies": sampled["strategies"],
        "comparison": sampled["comparison"],
    }


class ComputeAudit(beam.PTransform):
    """Explained records -> one audit dict (statistics, combiners, class comparison).

    Args:
        settings: Thresholds and measuring options; :class:`AuditSettings` defaults when None.
        baseline: An earlier run's parsed ``audit.json``: the audit then gets a ``drift``
            section comparing with it (``fullgrad.audit.comparison.with_drift``).
        baseline_name: Where the baseline came from, recorded in the section.

    Example:
        >>> audit = explained | ComputeAudit(AuditSettings())
        >>> audit | beam.Map(write_audit, output_dir)
    """

    def __init__(
        self,
        settings: AuditSettings | None = None,
        baseline: Mapping[str, Any] | None = None,
        baseline_name: str = "",
    ):
        super().__init__()
        self._settings = settings or AuditSettings()
        self._baseline, self._baseline_name = baseline, baseline_name

    def expand(self, records):
        settings = self._settings
        audit = (
            records
            | "Statistics" >> beam.Map(with_statistics, settings)
            | "Combine" >> beam.CombineGlobally(AuditCombineFn(settings))
            | "Finalise" >> beam.Map(finalise_audit, settings)
        )
        if self._baseline is None:
            return audit
        return audit | "Drift" >> beam.Map(
            with_drift, self._baseline, self._baseline_name, settings
        )
