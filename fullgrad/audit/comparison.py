"""Drift between two audits: reads what each ``audit.json`` keeps for a later run, compares.

Every audit carries a ``comparison`` section (written by
:func:`fullgrad.audit.sampling.sample_sections`): per class its image count, the mean map on
the ``drift_grid`` coarse grid, each statistic's moments and a bounded uniform sample of its
per-image values, and, for the images labelled with the class, the counts of the predicted
classes. :func:`class_summaries` turns that section (of this run or of a baseline's
``audit.json``) into :class:`fullgrad.audit.drift.ClassSummary` objects; :func:`with_drift`
adds the ``drift`` section (:func:`fullgrad.audit.drift.attribution_drift`, thresholds from the
``drift_*`` fields of :class:`AuditSettings`) to an audit. An older ``audit.json`` without a
``comparison`` section still gives the statistics' moments (normal intervals) and the counts;
its maps and predicted mix are then not compared.

Example:
    >>> audit = with_drift(audit, json.load(open("runs/old/audit.json")), "runs/old", settings)
    >>> audit["drift"]["drifted_classes"]
    ['3']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fullgrad.audit.drift import ClassSummary, attribution_drift
from fullgrad.audit.settings import AuditSettings

__all__ = ["class_summaries", "with_drift"]

#: The key of the report-only maps (old and new coarse mean maps per class), not in JSON.
DRIFT_MAPS = "drift_maps"


def _array(values: Any) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], np.float64)


def class_summaries(audit: Mapping[str, Any]) -> dict[int, ClassSummary]:
    """Each class's :class:`ClassSummary` from an audit (the dict or its parsed JSON).

    Example:
        >>> class_summaries(json.load(open("out/audit.json")))[3].count
        50
    """
    comparison = audit.get("comparison") or {}
    out: dict[int, ClassSummary] = {}
    if comparison.get("classes"):
        for key, part in comparison["classes"].items():
            coarse = part.get("coarse_map")
            out[int(key)] = ClassSummary(
                count=int(part["count"]),
                mean_map=None if coarse is None else np.asarray(coarse, np.float64),
                samples={name: _array(v) for name, v in (part.get("samples") or {}).items()},
                moments={name: tuple(float(np.nan if x is None else x) for x in v)
                         for name, v in (part.get("moments") or {}).items()},
                predicted={int(k): int(v) for k, v in (part.get("predicted") or {}).items()}
                or None,
            )
        return out
    for key, part in (audit.get("classes") or {}).items():
        moments = {
            name: (float(s["count"]), float(np.nan if s["mean"] is None else s["mean"]),
                   float(np.nan if s["std"] is None else s["std"]))
            for name, s in (part.get("statistics") or {}).items() if s.get("count")
        }
        out[int(key)] = ClassSummary(count=int(part["count"]), moments=moments)
    return out


def with_drift(
    audit: Mapping[str, Any],
    baseline: Mapping[str, Any] | None,
    baseline_name: str,
    settings: AuditSettings,
) -> dict[str, Any]:
    """The audit with its ``drift`` section against ``baseline`` (unchanged when None).

    Args:
        audit: This run's audit dict (``finalise_audit``'s output).
        baseline: The earlier run's parsed ``audit.json``, or None.
        baseline_name: Where it came from, recorded in the section.
        settings: The ``drift_*`` thresholds.

    Returns:
        A new dict: the audit plus ``drift`` (``{"baseline", "classes": {"3": {"map_distance",
        "shifts", "mix_distance", "drifted", "reasons", ...}}, "drifted_classes"}``) and the
        report-only ``drift_maps`` (``{"3": {"baseline": [g, g], "current": [g, g]}}``).

    Example:
        >>> with_drift(audit, audit_json(audit), "itself", settings)["drift"]["drifted_classes"]
        []
    """
    if baseline is None:
        return dict(audit)
    old, new = class_summaries(baseline), class_summaries(audit)
    drift = attribution_drift(old, new, baseline_name, settings.drift_options)
    maps = {}
    for key in drift["classes"]:
        pair = {name: (summary.get(int(key)).mean_map if int(key) in summary else None)
                for name, summary in (("baseline", old), ("current", new))}
        maps[key] = pair
    return {**audit, "drift": drift, DRIFT_MAPS: maps}
