"""``fullgrad audit``: re-runs the audit on maps already written by ``fullgrad run``.

A small Beam pipeline: ``<maps>/maps-*.parquet`` -> explained records (map, mask and thumbnail
decoded back) -> the same ``ComputeAudit`` as the job's ``--audit`` -> ``audit.json`` and
``report.html``. The per-image statistics are recomputed from the maps, so that new measuring
options (``--border-fraction``, ``--floor-quantile`` ...) apply; with the defaults they equal
the columns the job wrote. Every :class:`AuditSettings` field is a flag.

The per-part statistics (``input_border_lift`` ...) need the part maps: they are recomputed
from the stored ``part_maps`` when the job wrote them (``fullgrad run --part-maps``); without
them the stored per-part columns are kept as written (measured with the job's options, not
these flags) and the report has no per-part mean maps.

Example:
    $ fullgrad audit --maps out/ --output out/audit-strict --class-mask-lift-min 0.4
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import apache_beam as beam

from fullgrad import record
from fullgrad.audit.report import write_audit
from fullgrad.audit.settings import AuditSettings, add_settings_arguments, settings_from_args
from fullgrad.audit.transforms import ComputeAudit

__all__ = [
    "ReadMapRecords",
    "add_arguments",
    "main",
    "run_audit",
    "settings_from_flags",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``fullgrad audit``."""
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.epilog = (
        "Any other flag goes to Beam's PipelineOptions, e.g. --runner, or --s3_endpoint_url and "
        "credentials for an s3:// store."
    )
    parser.add_argument("--maps", required=True,
                        help="folder of maps-*.parquet (local, gs://, s3://)")
    parser.add_argument("--output", help="where audit.json and report.html go (default: --maps)")
    parser.add_argument("--baseline",
                        help="an earlier run (output folder or audit.json) to compare with: "
                        "the audit gets a drift section")
    parser.add_argument("--history",
                        help="a history folder for scheduled audits: the baseline is its latest "
                        "run (unless --baseline), and this audit is added to it")
    add_settings_arguments(parser.add_argument_group("audit settings"))


def _without_statistics(explained: dict[str, Any]) -> dict[str, Any]:
    """The record without its stored statistics, so the audit measures them anew; the
    per-part columns go only when the record has part maps to measure them from."""
    dropped = set(record.STATISTIC_COLUMNS)
    if explained.get("part_maps") is not None:
        dropped |= set(record.PART_STATISTIC_COLUMNS)
    return {k: v for k, v in explained.items() if k not in dropped}


class ReadMapRecords(beam.PTransform):
    """``maps-*.parquet`` under a folder -> explained records.

    Example:
        >>> pipeline | ReadMapRecords("out/") | ComputeAudit(settings)
    """

    def __init__(self, maps_dir: str):
        super().__init__()
        self._pattern = maps_dir.rstrip("/") + "/maps-*.parquet"

    def expand(self, pbegin):
        return (
            pbegin
            | "ReadMaps" >> beam.io.ReadFromParquetBatched(self._pattern)
            | "Records" >> beam.FlatMap(record.from_table)
            | "Unmeasured" >> beam.Map(_without_statistics)
        )


def run_audit(
    maps_dir: str,
    output_dir: str,
    settings: AuditSettings,
    extra: Sequence[str] = (),
    baseline: str | None = None,
    history: str | None = None,
) -> dict[str, str]:
    """Audits the maps under ``maps_dir`` and writes the report into ``output_dir``.

    Args:
        maps_dir: Folder of ``maps-*.parquet``.
        output_dir: Where ``audit.json`` and ``report.html`` go.
        settings: The audit's settings.
        extra: Beam pipeline flags.
        baseline: An earlier run's folder or ``audit.json``: adds the drift section.
        history: A history folder (``fullgrad.beam.history``): its latest run is the baseline
            unless ``baseline`` is given, and this audit is recorded in it at the end.

    Without ``settings.class_names``, the class names the job found in its data (its
    ``summary.json`` in ``maps_dir``: ``--class-names``, Hugging Face metadata, class folders)
    name the classes.

    Returns:
        ``{"json": path, "html": path}`` (and ``"history"``: the new pointer, with ``history``).

    Raises:
        FileNotFoundError: No ``maps-*.parquet`` under ``maps_dir``.

    Example:
        >>> run_audit("out/", "out/", AuditSettings())["html"]
        'out/report.html'
    """
    from apache_beam.io.filesystems import FileSystems

    from fullgrad.beam.options import pipeline_options

    options = pipeline_options(extra)
    FileSystems.set_options(options)  # s3:// and gs:// take their settings from the flags
    pattern = maps_dir.rstrip("/") + "/maps-*.parquet"
    if not FileSystems.match([pattern])[0].metadata_list:
        raise FileNotFoundError(f"no maps-*.parquet under {maps_dir}")
    from fullgrad.beam.history import record_run, resolve_baseline

    old, name = resolve_baseline(baseline, history)
    if not settings.class_names:
        settings = _with_run_class_names(maps_dir, settings)
    with beam.Pipeline(options=options) as pipeline:
        _ = (
            pipeline
            | "Maps" >> ReadMapRecords(maps_dir)
            | "Audit" >> ComputeAudit(settings, old, name)
            | "Write" >> beam.Map(write_audit, output_dir)
        )
    base = output_dir.rstrip("/")
    paths: dict[str, Any] = {"json": f"{base}/audit.json", "html": f"{base}/report.html"}
    if history:
        paths["history"] = record_run(history, output_dir)
    return paths


def _with_run_class_names(maps_dir: str, settings: AuditSettings) -> AuditSettings:
    """``settings`` with the class names the job found in its data (its ``summary.json``)."""
    import dataclasses
    import json

    from apache_beam.io.filesystems import FileSystems

    path = maps_dir.rstrip("/") + "/summary.json"
    try:
        with FileSystems.open(path) as handle:
            names = json.loads(handle.read()).get("class_names")
    except Exception:  # noqa: BLE001 -- maps without a summary (copied, older): no names
        return settings
    return dataclasses.replace(settings, class_names=tuple(names)) if names else settings


def settings_from_flags(argv: Sequence[str]) -> tuple[AuditSettings, list[str]]:
    """The audit's settings from ``fullgrad audit`` threshold flags, and the Beam flags.

    For callers that know the maps and output folders themselves (the Kubeflow task) and take
    the thresholds from a user. Unknown flags are refused as on the command line.

    Example:
        >>> settings_from_flags(["--min-class-count", "1"])[0].min_class_count
        1
    """
    from fullgrad.beam.options import parse_flags

    parser = argparse.ArgumentParser(prog="fullgrad audit", allow_abbrev=False)
    add_settings_arguments(parser)
    args, beam_args = parse_flags(parser, argv)
    return settings_from_args(args), beam_args


def main(args: argparse.Namespace, extra: Sequence[str]) -> int:
    """Runs ``fullgrad audit``; prints the flagged classes and where the report is."""
    import json

    from apache_beam.io.filesystems import FileSystems

    try:
        paths = run_audit(args.maps, args.output or args.maps, settings_from_args(args), extra,
                          baseline=args.baseline, history=args.history)
    except (FileNotFoundError, ValueError) as error:
        print(f"fullgrad audit: {error}")
        return 2
    with FileSystems.open(paths["json"]) as handle:
        audit = json.loads(handle.read())
    print(f"{audit['images']} images; flagged classes: {audit['flagged_classes'] or 'none'}")
    if "drift" in audit:
        print(f"drift against {audit['drift']['baseline']}: drifted classes: "
              f"{audit['drift']['drifted_classes'] or 'none'}")
    print(f"report: {paths['html']}")
    return 0
