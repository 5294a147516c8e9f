"""The audit of the map's parts: per-part statistics, per-part class flags, verdict wording.

FullGrad's map is the min-max normalised sum of its parts (:mod:`fullgrad.parts`: the input
term and the bias terms grouped by resolution). A shortcut can live in one part and be washed
out of the sum by the others (broad, large bias terms of the first layers), so the audit
measures every part with the full map's location statistics (:func:`part_statistics`, the
formulas of :func:`fullgrad.audit.stats.location_statistics`) and flags a class when one of its
parts stands out from the other classes' same part (:func:`part_class_flags`).

The rule is relative only: with ``m_k^p`` and ``b_k^p`` class ``k``'s mean mask and border lift
of part ``p``, and ``M^p``, ``B^p`` the medians of the other classes' (those with at least
``min_class_count`` images),

- ``p:on_border`` when ``b_k^p > 0`` and ``b_k^p - B^p > part_lift_margin``;
- ``p:off_object`` when ``m_k^p < class_mask_lift_min`` and ``M^p - m_k^p > part_lift_margin``.

Why relative: a part's absolute lifts depend on the part, for every class alike (coarse bias
terms are upsampled from a few pixels and spread over the whole image; zero padding lights the
border of early bias terms), so the full map's absolute thresholds would flag every class.

A reason is a short code in ``audit.json`` (``off_object``, ``on_border``, ``flagged_images``
for the full map, ``{part}:{reason}`` for a part) and a phrase in the verdict
(:func:`reason_text`: ``"input term on the border"``).

Example:
    >>> columns = part_statistics(record["part_maps"], record["mask"], settings.statistics_options)
    >>> part_class_flags(summary["classes"], settings)
    {0: [], 1: [], 2: [], 3: ['input:on_border']}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fullgrad.audit.settings import AuditSettings
from fullgrad.audit.stats import StatisticsOptions, location_statistics
from fullgrad.parts import PART_LABELS, PARTS
from fullgrad.record import PART_STATISTIC_COLUMNS, PART_STATISTICS, part_column

__all__ = ["part_class_flags", "part_statistics", "reason_text", "verdict_text"]

_PLACES = {"off_object": "off the object", "on_border": "on the border"}
_WHOLE = {
    "off_object": "map off the object",
    "on_border": "map on the border",
    "flagged_images": "most of its images flagged",
}


def part_statistics(
    part_maps: np.ndarray | None,
    mask: np.ndarray | None = None,
    options: StatisticsOptions | None = None,
) -> dict[str, float]:
    """Every per-part statistic column of one image (:data:`fullgrad.record.PART_STATISTIC_COLUMNS`).

    Args:
        part_maps: ``[P, h, w]`` the map's parts in :data:`fullgrad.parts.PARTS` order, or None.
        mask: Optional bool ``[h, w]`` object mask at the maps' size.
        options: How to measure; defaults to :class:`StatisticsOptions`.

    Returns:
        ``{column: value}``; all NaN without part maps, and a part's values NaN when its map has
        no mass (no layer in that group).

    Example:
        >>> part_statistics(parts, mask)["input_border_lift"]
    """
    if part_maps is None:
        return dict.fromkeys(PART_STATISTIC_COLUMNS, math.nan)
    part_maps = np.asarray(part_maps)
    if part_maps.shape[0] != len(PARTS):
        raise ValueError(f"expected {len(PARTS)} part maps {PARTS}, got {part_maps.shape[0]}")
    out = {}
    for part, saliency in zip(PARTS, part_maps, strict=True):
        values = location_statistics(saliency, mask, options)
        out.update({part_column(part, name): values[name] for name in PART_STATISTICS})
    return out


def _mean(summary: Mapping[str, Any], column: str) -> float:
    value = summary["statistics"].get(column, {}).get("mean")
    return math.nan if value is None else float(value)


def part_class_flags(
    classes: Mapping[int, Mapping[str, Any]], settings: AuditSettings
) -> dict[int, list[str]]:
    """Which classes have a part of the map off the object or on the border, relative to the
    other classes' same part (see the module docstring for the rule).

    Args:
        classes: ``{target: summary}`` from ``ClassStatisticsCombineFn`` (its ``statistics``
            hold the per-part columns' means).
        settings: ``part_lift_margin``, ``class_mask_lift_min`` and ``min_class_count``.

    Returns:
        ``{target: ["input:on_border", ...]}`` for every class, empty when no part stands out.

    Example:
        >>> part_class_flags(summary["classes"], AuditSettings())[3]
        ['input:on_border']
    """
    counted = [t for t, c in classes.items() if c["count"] >= settings.min_class_count]
    margin = settings.part_lift_margin
    out: dict[int, list[str]] = {target: [] for target in classes}
    for part in PARTS:
        for reason, column in (("off_object", "mask_lift"), ("on_border", "border_lift")):
            name = part_column(part, column)
            means = {t: _mean(classes[t], name) for t in counted}
            for target in counted:
                value = means[target]
                peers = [v for t, v in means.items() if t != target and math.isfinite(v)]
                if not peers or not math.isfinite(value):
                    continue
                median = float(np.median(peers))
                if reason == "on_border":
                    stands_out = value > 0.0 and value - median > margin
                else:
                    stands_out = value < settings.class_mask_lift_min and median - value > margin
                if stands_out:
                    out[target].append(f"{part}:{reason}")
    return out


def reason_text(reason: str) -> str:
    """A reason code as a reader's phrase.

    Example:
        >>> reason_text("input:on_border"), reason_text("off_object")
        ('input term on the border', 'map off the object')
    """
    if ":" in reason:
        part, where = reason.split(":", 1)
        return f"{PART_LABELS.get(part, part)} {_PLACES.get(where, where)}"
    return _WHOLE.get(reason, reason)


def verdict_text(reasons: list[str]) -> str:
    """A class's reasons as one sentence; ``"ok"`` without any.

    Example:
        >>> verdict_text(["on_border", "input:on_border"])
        'map on the border; input term on the border'
    """
    return "; ".join(reason_text(r) for r in reasons) if reasons else "ok"
