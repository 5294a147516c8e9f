"""The audit's settings: one frozen dataclass, and its command-line flags.

Kept apart from the Beam transforms so that a command line (``fullgrad run``, ``fullgrad
audit``) can offer the audit's options without importing Beam.

Example:
    >>> settings = AuditSettings(class_mask_lift_min=0.3)
    >>> add_settings_arguments(parser, prefix="audit-")   # --audit-class-mask-lift-min ...
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from fullgrad.audit.stats import LocationFlagOptions, StatisticsOptions

__all__ = ["AuditSettings", "add_settings_arguments", "settings_from_args"]


@dataclasses.dataclass(frozen=True)
class AuditSettings:
    """Every option of the audit, with its default; written into ``audit.json``.

    Attributes:
        top_fraction: Share of brightest pixels whose mass is the concentration.
        border_fraction: Width of the border band as a share of the map's shorter side.
        pointing_tolerance: Mask dilation (map pixels) for the pointing game.
        floor_quantile: Map quantile subtracted before border and mask energy (see ``stats``).
        image_mask_lift_min: An image is ``off_object`` below this mask lift (every lift is
            ``(share - chance) / (1 - chance)``: 0 at chance, 1 all in the region).
        image_border_lift_max: An image is ``on_border`` above this border lift.
        class_mask_lift_min: A class is ``off_object`` when its mean mask lift is below this.
        class_border_lift_max: A class is ``on_border`` when its mean border lift is above this.
        class_border_lift_margin: A class is also ``on_border`` when its mean border lift is
            above chance and above the median of the other classes' by more than this.
        part_lift_margin: A part of the map (input term, bias groups) flags a class when its
            mean border lift is above chance and above the other classes' median for that part
            by more than this, or its mean mask lift is below ``class_mask_lift_min`` and below
            that median by more than this. Relative only: a part's absolute lifts depend on
            the part (coarse bias terms are blurred over the whole image for every class).
        class_flagged_share: A class is flagged when more than this share of its images are.
        min_class_count: Classes with fewer images are reported but never flagged.
        bins: Histogram bins for every statistic: over [0, 1], lifts over [-1, 1].
        examples: Images kept (with thumbnail and map) per example list, for the report.
        max_flagged_ids: Flagged images listed by id in ``audit.json`` (the worst first).
        residual_tolerance: Completeness residuals above this are counted as violations.
        strategy_capacity: Maps sampled per class for strategy discovery (0: no clustering).
        strategy_grid: Side of the sampled, downsampled maps.
        strategy_max_clusters: Largest number of clusters tried per class.
        strategy_min_share: A cluster must hold this share of its class to be flagged.
        strategy_excess_min: ...and this share of its saliency where nothing else looks.
        strategy_exemplars: Exemplar overlays (kept as small thumbnails) per cluster.
        drift_grid: Side of the coarse mean maps kept in ``audit.json`` and compared.
        drift_samples: Per-image statistic values kept per class in ``audit.json`` for a later
            run's bootstrap (a uniform sample of the class).
        drift_map_distance_max: A class drifts when ``1 - r`` of its coarse mean maps exceeds this.
        drift_shift_min: Smallest shift of a statistic's mean that counts as drift.
        drift_share_shift_min: Smallest shift of a class's share of predictions that counts.
        drift_mix_distance_max: A class drifts when its predicted mix moves more than this
            (total variation).
        drift_confidence: Level of the bootstrap intervals of the shifts.
        drift_resamples: Bootstrap resamples per statistic.
        class_names: Optional display names, indexed by class.

    Example:
        >>> AuditSettings(class_mask_lift_min=0.3, examples=4)
    """

    top_fraction: float = 0.05
    border_fraction: float = 0.1
    pointing_tolerance: int = 1
    floor_quantile: float = 0.8
    image_mask_lift_min: float = 0.1
    image_border_lift_max: float = 0.25
    class_mask_lift_min: float = 0.25
    class_border_lift_max: float = 0.25
    class_border_lift_margin: float = 0.3
    part_lift_margin: float = 0.3
    class_flagged_share: float = 0.5
    min_class_count: int = 5
    bins: int = 20
    examples: int = 8
    max_flagged_ids: int = 1000
    residual_tolerance: float = 1e-3
    strategy_capacity: int = 2000
    strategy_grid: int = 16
    strategy_max_clusters: int = 6
    strategy_min_share: float = 0.15
    strategy_excess_min: float = 0.25
    strategy_exemplars: int = 4
    drift_grid: int = 8
    drift_samples: int = 500
    drift_map_distance_max: float = 0.3
    drift_shift_min: float = 0.1
    drift_share_shift_min: float = 0.05
    drift_mix_distance_max: float = 0.2
    drift_confidence: float = 0.95
    drift_resamples: int = 1000
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _ = self.statistics_options  # validates the measuring options early
        _ = self.location_flag_options  # and the lift thresholds
        if not 0.0 <= self.class_flagged_share <= 1.0:
            raise ValueError(f"class_flagged_share must be in [0, 1], got {self.class_flagged_share}")
        if self.part_lift_margin < 0.0:
            raise ValueError(f"part_lift_margin must be >= 0, got {self.part_lift_margin}")
        if self.bins < 1 or self.examples < 0 or self.max_flagged_ids < 0:
            raise ValueError("bins must be >= 1, examples and max_flagged_ids >= 0")
        if self.strategy_capacity < 0 or self.strategy_grid < 2 or self.drift_samples < 0:
            raise ValueError("strategy_capacity, drift_samples must be >= 0, strategy_grid >= 2")
        _ = self.strategy_options, self.drift_options  # validates their ranges early

    @classmethod
    def from_config(cls, config: Any) -> AuditSettings:
        """The settings of a Beam job: its ``JobConfig.audit_options``, else the defaults.

        Example:
            >>> AuditSettings.from_config(JobConfig(..., audit_options={"examples": 4}))
        """
        options = dict(getattr(config, "audit_options", None) or {})
        if options.get("class_names") is not None:
            options["class_names"] = tuple(options["class_names"])
        return cls(**options)

    @property
    def statistics_options(self) -> StatisticsOptions:
        """The per-image measuring options."""
        return StatisticsOptions(
            self.top_fraction, self.border_fraction, self.pointing_tolerance, self.floor_quantile
        )

    @property
    def strategy_options(self) -> Any:
        """The clustering options (:class:`fullgrad.audit.strategies.StrategyOptions`)."""
        from fullgrad.audit.strategies import StrategyOptions

        return StrategyOptions(
            max_clusters=self.strategy_max_clusters, min_share=self.strategy_min_share,
            excess_min=self.strategy_excess_min, floor_quantile=self.floor_quantile,
            exemplars=self.strategy_exemplars,
        )

    @property
    def drift_options(self) -> Any:
        """The drift thresholds (:class:`fullgrad.audit.drift.DriftOptions`)."""
        from fullgrad.audit.drift import DriftOptions

        return DriftOptions(
            grid=self.drift_grid, map_distance_max=self.drift_map_distance_max,
            shift_min=self.drift_shift_min, share_shift_min=self.drift_share_shift_min,
            mix_distance_max=self.drift_mix_distance_max, confidence=self.drift_confidence,
            resamples=self.drift_resamples, min_class_count=self.min_class_count,
        )

    @property
    def location_flag_options(self) -> LocationFlagOptions:
        """The lift thresholds of the image and class flags (``stats.LocationFlagOptions``)."""
        return LocationFlagOptions(
            image_mask_lift_min=self.image_mask_lift_min,
            image_border_lift_max=self.image_border_lift_max,
            class_mask_lift_min=self.class_mask_lift_min,
            class_border_lift_max=self.class_border_lift_max,
            class_border_lift_margin=self.class_border_lift_margin,
            min_class_count=self.min_class_count,
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready settings."""
        out = dataclasses.asdict(self)
        out["class_names"] = list(self.class_names) if self.class_names else None
        return out

    def class_name(self, target: int) -> str:
        """Display name of a class."""
        if self.class_names and 0 <= target < len(self.class_names):
            return f"{target} ({self.class_names[target]})"
        return str(target)


_TYPES = {"float": float, "int": int}


def add_settings_arguments(parser: argparse.ArgumentParser | Any, prefix: str = "") -> None:
    """Adds one ``--{prefix}{field}`` flag per :class:`AuditSettings` field, with its default.

    Example:
        >>> add_settings_arguments(parser.add_argument_group("audit"), prefix="audit-")
    """
    defaults = AuditSettings()
    for field in dataclasses.fields(AuditSettings):
        flag = f"--{prefix}{field.name.replace('_', '-')}"
        dest = f"{prefix.replace('-', '_')}{field.name}"
        if field.name == "class_names":
            parser.add_argument(flag, dest=dest, help="comma-separated names, by class index")
            continue
        parser.add_argument(
            flag, dest=dest, type=_TYPES[str(field.type)], default=getattr(defaults, field.name)
        )


def settings_from_args(args: argparse.Namespace, prefix: str = "") -> AuditSettings:
    """The :class:`AuditSettings` of flags added by :func:`add_settings_arguments`.

    Example:
        >>> settings_from_args(parser.parse_args(["--examples", "4"])).examples
        4
    """
    dest = prefix.replace("-", "_")
    values = {f.name: getattr(args, dest + f.name) for f in dataclasses.fields(AuditSettings)}
    names = values.pop("class_names")
    return AuditSettings(**values, class_names=tuple(names.split(",")) if names else None)
