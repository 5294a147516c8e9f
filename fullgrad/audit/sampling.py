"""The audit's bounded per-class sample: what strategy discovery and a later run's drift need.

:class:`ClassSampleCombineFn` is one more part of the audit's combine step. Per class (the
explained target) it keeps

- a :class:`fullgrad.audit.strategies.MapReservoir` of downsampled maps with each image's
  statistics (``strategy_capacity`` maps at ``strategy_grid``): the sample that
  :func:`fullgrad.audit.strategies.discover_strategies` clusters; the statistics of its first
  ``drift_samples`` images (a uniform sample too) go into ``audit.json`` for a later run's
  bootstrap intervals;
- a smaller gallery (``strategy_exemplars * 8`` images) of thumbnails and maps at
  :data:`GALLERY_SIDE` pixels, chosen by the same hash key, so the gallery is the first part of
  the reservoir's sample and every gallery image has a cluster: the exemplar overlays;
- for every *label*, the counts of the predicted classes (``topk_classes[0]``): the predicted
  mix the drift compares.

Every part merges exactly (bottom-k samples keyed by a hash of the id, and counts), so the
sample, the clusters and the pictures are the same at 1 or N workers. Memory per class is
``capacity x grid^2`` floats (2 MB at the defaults) plus the gallery (about 0.15 MB), whatever
the dataset's size.

:func:`sample_sections` turns the merged accumulator into the audit's ``strategies`` and
``comparison`` sections (and the exemplar pictures, as example lists for the report).

Example:
    >>> combine = ClassSampleCombineFn(AuditSettings())
    >>> sections = sample_sections(combine.extract_output(accumulator), mean_maps, settings)
    >>> sections["strategies"]["verdicts"]
    ['cluster 2 of class 3 (48% of images): saliency in the top-right corner']
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import apache_beam as beam
import numpy as np

from fullgrad.audit.settings import AuditSettings
from fullgrad.audit.stats import coarse_map
from fullgrad.audit.strategies import MapReservoir, discover_strategies, sample_key
from fullgrad.record import STATISTIC_COLUMNS

__all__ = ["GALLERY_SIDE", "ClassSampleCombineFn", "sample_sections", "strategy_example_name"]

#: Side of the gallery's thumbnails and maps (pixels).
GALLERY_SIDE = 32
_GALLERY_PER_EXEMPLAR = 8


def strategy_example_name(target: Any, cluster: int) -> str:
    """The ``examples`` key of a cluster's exemplar overlays.

    Example:
        >>> strategy_example_name(3, 2)
        'strategy:3:2'
    """
    return f"strategy:{target}:{cluster}"


def _small(array: Any, side: int) -> np.ndarray:
    values = np.asarray(array, np.float64)
    if values.ndim == 3 and values.shape[-1] == 1:
        values = values[..., 0]
    if values.ndim == 2:
        return coarse_map(values, side).astype(np.float32)
    return np.stack([coarse_map(values[..., c], side) for c in range(values.shape[-1])], -1)


class ClassSampleCombineFn(beam.CombineFn):
    """Per class: the map reservoir, the exemplar gallery; per label: the predicted mix.

    The accumulator is ``{"classes": {target: [reservoir, gallery]}, "predicted": {label:
    {predicted: count}}}``; a gallery is a list of ``(key, id, thumbnail, map, mask)``.

    Example:
        >>> records | beam.CombineGlobally(ClassSampleCombineFn(AuditSettings()))
    """

    def __init__(self, settings: AuditSettings):
        # Drift samples are the first part of the strategy sample (the same hash order).
        self._capacity = settings.strategy_capacity or max(settings.drift_samples, 1)
        self._grid = settings.strategy_grid
        self._gallery = settings.strategy_exemplars * _GALLERY_PER_EXEMPLAR

    def create_accumulator(self) -> dict[str, Any]:
        return {"classes": {}, "predicted": {}}

    def _part(self, accumulator: dict[str, Any], target: int) -> list[Any]:
        part = accumulator["classes"].get(target)
        if part is None:
            part = accumulator["classes"][target] = [MapReservoir(self._capacity, self._grid), []]
        return part

    def _trim(self, gallery: list[Any]) -> list[Any]:
        gallery.sort(key=lambda item: (item[0], item[1]))
        return gallery[: self._gallery]

    def add_input(self, accumulator, record):
        target = int(record["target"])
        reservoir, gallery = self._part(accumulator, target)
        statistics = {}
        for name in STATISTIC_COLUMNS:
            value = record.get(name)
            if value is not None and math.isfinite(float(value)):
                statistics[name] = float(value)
        reservoir.add(record["id"], record["map"], statistics)
        if self._gallery:
            key = sample_key(record["id"])
            if len(gallery) < self._gallery or (key, str(record["id"])) < gallery[-1][:2]:
                thumbnail = record.get("thumbnail")
                mask = record.get("mask")
                gallery.append((
                    key, str(record["id"]),
                    None if thumbnail is None else
                    np.clip(_small(thumbnail, GALLERY_SIDE), 0, 255).astype(np.uint8),
                    # uint8: the map is only drawn, and the gallery stays small.
                    np.round(255 * np.clip(_small(record["map"], GALLERY_SIDE), 0, 1))
                    .astype(np.uint8),
                    None if mask is None else _small(np.asarray(mask, bool), GALLERY_SIDE) > 0.5,
                ))
                gallery[:] = self._trim(gallery)
        label, topk = record.get("label"), record.get("topk_classes")
        if label is not None and not (isinstance(label, float) and math.isnan(label)) and topk:
            mix = accumulator["predicted"].setdefault(int(label), {})
            mix[int(topk[0])] = mix.get(int(topk[0]), 0) + 1
        return accumulator

    def merge_accumulators(self, accumulators):
        merged = self.create_accumulator()
        parts: dict[int, list[list[Any]]] = {}
        for accumulator in accumulators:
            for target, part in accumulator["classes"].items():
                parts.setdefault(target, []).append(part)
            for label, mix in accumulator["predicted"].items():
                into = merged["predicted"].setdefault(label, {})
                for predicted, count in mix.items():
                    into[predicted] = into.get(predicted, 0) + count
        for target, group in parts.items():
            merged["classes"][target] = [
                MapReservoir.merged([reservoir for reservoir, _ in group]),
                self._trim([item for _, gallery in group for item in gallery]),
            ]
        return merged

    def extract_output(self, accumulator):
        return accumulator


def _rounded(values: np.ndarray) -> list[float | None]:
    return [round(float(v), 5) if math.isfinite(v) else None for v in values]


def sample_sections(
    sample: Mapping[str, Any],
    classes: Mapping[int, Mapping[str, Any]],
    settings: AuditSettings,
) -> dict[str, Any]:
    """The audit's ``strategies`` and ``comparison`` sections, and the exemplar pictures.

    Args:
        sample: :class:`ClassSampleCombineFn`'s output.
        classes: ``{target: summary}`` of ``ClassStatisticsCombineFn`` (counts, mean maps,
            statistic moments).
        settings: The audit's settings.

    Returns:
        ``{"strategies": discover_strategies(...) (or None when strategy_capacity is 0),
        "comparison": {"grid", "classes": {"3": {"count", "coarse_map", "moments",
        "samples", "predicted"}}}, "examples": {"strategy:3:2": [record, ...]}}``; the
        comparison holds what a later run's drift reads from this run's ``audit.json``.

    Example:
        >>> sample_sections(sample, summary["classes"], settings)["strategies"]["flagged_classes"]
        ['3']
    """
    parts = sample["classes"]
    examples: dict[str, list[dict[str, Any]]] = {}
    strategies = None
    if settings.strategy_capacity > 0:
        reservoirs = {t: parts[t][0] for t in sorted(parts)}
        strategies = discover_strategies(reservoirs, settings.strategy_options)
        for target in sorted(parts):
            entry = strategies["classes"][str(target)]
            labels = entry.pop("labels", None)  # per sampled map: too long for audit.json
            _exemplars(target, entry, labels, reservoirs[target].ids, parts[target][1], settings,
                       examples)
    comparison: dict[str, Any] = {"grid": settings.drift_grid, "classes": {}}
    for target, summary in classes.items():
        mean_map = summary.get("mean_map")
        reservoir = parts[target][0] if target in parts else None
        samples = {}
        if reservoir is not None and settings.drift_samples:
            statistics = reservoir.statistics
            samples = {name: _rounded(values[: settings.drift_samples])
                       for name, values in statistics.items()}
        comparison["classes"][str(target)] = {
            "count": summary["count"],
            "coarse_map": None if mean_map is None else
            np.round(coarse_map(mean_map, settings.drift_grid), 6).tolist(),
            # The full map's statistics, as the samples: the parts' per-class means are much
            # noisier on small classes and would make drift verdicts on noise.
            "moments": {
                name: [s["count"], s["mean"], s["std"]]
                for name, s in summary["statistics"].items()
                if s["count"] and name in STATISTIC_COLUMNS
            },
            "samples": samples,
            "predicted": {str(k): v for k, v in
                          sorted(sample["predicted"].get(int(target), {}).items())},
        }
    return {"strategies": strategies, "comparison": comparison, "examples": examples}


def _exemplars(
    target: int,
    entry: dict[str, Any],
    labels: Any,
    ids: list[str],
    gallery: list[Any],
    settings: AuditSettings,
    examples: dict[str, list[dict[str, Any]]],
) -> None:
    """Each cluster's exemplar overlays: its gallery images nearest the cluster's mean map."""
    if not entry["clusters"]:
        return
    labels = {} if labels is None else {
        image_id: int(label) + 1 for image_id, label in zip(ids, labels, strict=True)
    }
    for cluster in entry["clusters"]:
        members = [item for item in gallery if labels.get(item[1]) == cluster["cluster"]]
        centre = np.asarray(cluster["mean_map"], np.float64).ravel()

        def distance(item: Any, centre: np.ndarray = centre) -> float:
            small = coarse_map(item[3] / 255.0, settings.strategy_grid).ravel()
            return float(np.linalg.norm(small / max(small.sum(), 1e-12)
                                        - centre / max(centre.sum(), 1e-12)))

        chosen = sorted(members, key=lambda item: (distance(item), item[1]))
        examples[strategy_example_name(target, cluster["cluster"])] = [
            {"id": item[1], "target": target, "thumbnail": item[2],
             "map": item[3].astype(np.float32) / 255.0,
             "mask": item[4]}
            for item in chosen[: settings.strategy_exemplars]
        ]
