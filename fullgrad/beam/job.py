"""``fullgrad run``: the Beam job that writes a FullGrad map for every image of a dataset.

``read -> decode/preprocess -> RunInference(FullGrad) -> maps`` plus dead letters, overlays,
an optional TFRecord copy and the optional audit. Before any data is read the job checks the
model (it exists, loads in safe_mode, takes ``--image-size`` RGB images, is a classifier), that
the input glob matches files, and the output folder: a folder holding an earlier run's outputs
is refused unless ``--overwrite``, which deletes those outputs first, so two runs never mix.
``summary.json`` is written last, after the pipeline finished, with ``input == explained +
failed``.

Other entry points build the same pipeline: ``build_pipeline(pipeline, config)`` adds every
stage to a ``beam.Pipeline`` and returns the collections; ``run(config, extra)`` checks, runs
it with ``fullgrad.beam.options.pipeline_options(extra)`` and returns the summary.

Example:
    $ fullgrad run --input 'data/*.parquet' --model model.keras --output out \\
        --image-size 224 --preprocess torch --batch-size 32
    >>> summary = run(JobConfig(input="data/*.parquet", model="m.keras", output="out"))
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import glob
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from fullgrad.audit.settings import AuditSettings, add_settings_arguments, settings_from_args
from fullgrad.beam.config import JobConfig
from fullgrad.beam.config import add_arguments as add_job_arguments
from fullgrad.beam.config import config_from_args as job_config_from_args
from fullgrad.beam.dask import DaskSettings, add_dask_arguments
from fullgrad.beam.options import pipeline_options

__all__ = [
    "OWNED_OUTPUTS",
    "JobError",
    "JobOutputs",
    "add_arguments",
    "build_pipeline",
    "check_input",
    "check_model",
    "config_from_args",
    "config_with_flags",
    "job_metrics",
    "main",
    "prepare_output",
    "run",
]

_LOGGER = logging.getLogger(__name__)

#: Glob patterns of what a run writes in ``--output``: what ``--overwrite`` removes and what
#: makes a rerun refuse. The audit's files are included so a rerun never keeps a stale report.
OWNED_OUTPUTS = (
    "maps-*",
    "dead_letter-*",
    "summary.json",
    "counts.json",
    "overlays",
    "audit*",
    "report.html",
    "evaluation*",
    "beam-temp-*",
)


class JobError(RuntimeError):
    """A problem found before the pipeline ran (model, input, output); the message says what."""


@dataclasses.dataclass
class JobOutputs:
    """The collections ``build_pipeline`` adds, for callers that attach more stages.

    Attributes:
        rows: Every readable input row (before decoding).
        explained: Explained records (the shared contract; see ``ExplainRows``).
        dead_letters: ``{"id", "stage", "error"}`` from every stage.
        input_count: A singleton: rows read plus read dead letters.
        results: RunInference's ``PredictionResult``s (requests with their images), for
            ``--evaluate``.
        class_names: A singleton ``{"class_names", "source"}`` from the reader
            (``fullgrad.beam.io.ReadRows``).
    """

    rows: Any
    explained: Any
    dead_letters: Any
    input_count: Any
    results: Any = None
    class_names: Any = None


# -- command line ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``fullgrad run``: the job's settings, Dask's and the audit's.

    Any other flag must be a Beam pipeline option (``fullgrad.beam.options.parse_flags``).
    """
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.epilog = (
        "Any Beam pipeline option is accepted too, e.g. --runner DataflowRunner "
        "--project P --region R --temp_location gs://b/tmp, or --direct_num_workers 2 "
        "--direct_running_mode multi_processing locally, or --runner dask [--dask-workers N | "
        "--dask_client_address tcp://HOST:8786] on a dask.distributed cluster. Any other flag "
        "is an error."
    )
    add_job_arguments(parser)
    add_dask_arguments(parser)
    add_settings_arguments(
        parser.add_argument_group("audit settings (per-image statistics; flags with --audit)"),
        prefix="audit-",
    )


def config_from_args(args: argparse.Namespace) -> JobConfig:
    """The ``JobConfig`` of parsed ``fullgrad run`` flags, ``--audit-*`` included.

    Example:
        >>> parser = argparse.ArgumentParser(); add_arguments(parser)
        >>> config_from_args(parser.parse_args(["--input", "a.parquet", "--model", "m.keras",
        ...                                      "--output", "o"])).image_size
        224
    """
    audit_options = settings_from_args(args, prefix="audit-").as_dict()
    return job_config_from_args(args, audit_options=audit_options)


def config_with_flags(
    base: JobConfig, argv: Sequence[str]
) -> tuple[JobConfig, DaskSettings, list[str]]:
    """``base`` with ``fullgrad run`` flags applied over it, and the Beam flags among them.

    For callers that build the config themselves (the Kubeflow task) and still take flags
    from a user (its ``extra_args``). Unknown flags are refused as on the command line.

    Returns:
        ``(config, dask settings, beam_args)``.

    Raises:
        SystemExit: An unknown flag (exit status 2).

    Example:
        >>> config, _, beam = config_with_flags(config, ["--top-k", "3", "--runner", "dask"])
    """
    from fullgrad.beam.options import parse_flags

    parser = argparse.ArgumentParser(prog="fullgrad run", allow_abbrev=False)
    add_job_arguments(parser, defaults=base)
    add_dask_arguments(parser)
    add_settings_arguments(parser.add_argument_group("audit settings"), prefix="audit-")
    args, beam_args = parse_flags(parser, argv)
    audit_options = {**base.audit_options}
    if any(arg.startswith("--audit-") for arg in argv):
        audit_options = settings_from_args(args, prefix="audit-").as_dict()
    config = job_config_from_args(args, audit_options=audit_options, num_classes=base.num_classes)
    return config, DaskSettings.from_args(args), beam_args


def main(args: argparse.Namespace, extra: Sequence[str]) -> int:
    """Runs ``fullgrad run``; returns 0, or 2 with a one-line error for a bad setup."""
    # force: checking the flags imported Beam modules whose import-time warnings already gave
    # the root logger a WARNING-level handler, which would hide the job's progress lines.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True
    )
    for noisy in ("apache_beam", "absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        config = config_from_args(args)
        summary = run(config, extra, dask=DaskSettings.from_args(args))
    except (JobError, ValueError, FileNotFoundError) as error:
        print(f"fullgrad run: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1))
    return 0


# -- checks before reading -------------------------------------------------------------------


def check_model(config: JobConfig) -> tuple[int, int]:
    """Loads the model once and checks it fits the job.

    Returns:
        ``(classes, channels)``: the model's class count and input channels (3 when the model
        leaves them open); the job decodes images to that many channels.

    Raises:
        JobError: Missing, unloadable or unsafe file; not a single-output classifier; an input
            that is not ``[batch, --image-size, --image-size, channels]`` (the message says
            whether the size or the rank is wrong, and which flag fixes it); a preprocess mode
            for RGB on a model that is not; a ``--target`` class out of range.

    Example:
        >>> check_model(JobConfig(input="x.parquet", model="model.keras", output="out"))
        (1000, 3)
    """
    import fullgrad
    from fullgrad.models import ModelLoadError

    try:
        model = fullgrad.load_model(config.model, safe_mode=config.safe_mode)
    except FileNotFoundError as error:
        raise JobError(f"--model: {error}") from error
    except ModelLoadError as error:
        message = str(error)
        if error.unsafe_argument:  # name the flag, not the Python argument
            message = message.replace(error.unsafe_argument, "--unsafe-model")
        raise JobError(f"--model: {message}") from error
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise JobError(f"--model {config.model}: expected one input and one output")
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4:
        raise JobError(
            f"--model {config.model} takes inputs of shape {shape[1:]}; the job feeds images, "
            "[height, width, channels]"
        )
    height, width, channels = shape[1:]
    if any(side is not None and side != config.image_size for side in (height, width)):
        raise JobError(
            f"--model {config.model} takes {height}x{width} images, but the job resizes to "
            f"{config.image_size}x{config.image_size}: set --image-size {height or width}"
        )
    channels = int(channels or 3)
    if channels != 3 and config.preprocess in ("caffe", "torch"):
        raise JobError(
            f"--preprocess {config.preprocess} is for RGB images, but --model {config.model} "
            f"takes {channels} channels: use --preprocess none, unit or tf"
        )
    output = tuple(model.outputs[0].shape)
    if len(output) != 2 or not output[1]:
        raise JobError(f"--model {config.model}: expected a classifier [batch, classes], got {output}")
    classes = int(output[1])
    index = config.target_index()
    if index is not None and index >= classes:
        raise JobError(f"--target {index} is out of range for a model with {classes} classes")
    return classes, channels


def check_input(config: JobConfig) -> int:
    """Counts the files the input globs match.

    Raises:
        JobError: A glob matches no file, or is a folder.

    Example:
        >>> check_input(JobConfig(input="data/*.parquet", model="m.keras", output="out"))
        12
    """
    from apache_beam.io.filesystems import FileSystems

    from fullgrad.beam.io import input_patterns

    total = 0
    for pattern in input_patterns(config.input):
        if os.path.isdir(pattern):
            raise JobError(f"--input {pattern} is a folder; pass a glob such as {pattern}/*")
        try:
            found = len(FileSystems.match([pattern])[0].metadata_list)
        except Exception as error:
            raise JobError(f"--input {pattern}: {error}") from error
        if not found:
            raise JobError(f"--input {pattern} matches no file")
        total += found
    return total


def _matching_paths(pattern: str) -> list[str]:
    from apache_beam.io.filesystems import FileSystems

    try:
        matched = FileSystems.match([pattern])[0]
    except Exception:  # noqa: BLE001 -- Beam raises when the folder does not exist yet
        return []
    return [m.path.rstrip("/") for m in matched.metadata_list]


def prepare_output(config: JobConfig) -> None:
    """Refuses an output folder holding an earlier run's outputs, or clears them (--overwrite).

    Only the job's own outputs (``OWNED_OUTPUTS``) are looked at and removed; other files in the
    folder are left alone.

    Raises:
        JobError: Earlier outputs exist and ``overwrite`` is off.

    Example:
        >>> prepare_output(dataclasses.replace(config, overwrite=True))  # clears an earlier run
    """
    from apache_beam.io.filesystems import FileSystems

    existing = set()
    for pattern in OWNED_OUTPUTS:
        # Local globs match folders too; on object stores a "folder" is every object under it.
        for candidate in (pattern, f"{pattern}/**"):
            existing.update(_matching_paths(FileSystems.join(config.output, candidate)))
    if os.path.isdir(config.output):
        existing.update(
            os.path.join(config.output, name)
            for pattern in OWNED_OUTPUTS
            for name in fnmatch.filter(os.listdir(config.output), pattern)
        )
    existing = sorted(existing)
    if not existing:
        if not FileSystems.exists(config.output):
            FileSystems.mkdirs(config.output)
        return
    if not config.overwrite:
        raise JobError(
            f"--output {config.output} already holds a run's outputs "
            f"({', '.join(sorted(os.path.basename(p.rstrip('/')) for p in existing)[:5])}...); "
            "pass --overwrite to replace them, or choose another folder"
        )
    _LOGGER.info("fullgrad: --overwrite: removing %d earlier outputs", len(existing))
    # Folders first (their files go with them), then files that were not under one.
    removed: list[str] = []
    for path in existing:
        if any(path.startswith(folder + "/") for folder in removed):
            continue
        FileSystems.delete([path])
        removed.append(path)


# -- the pipeline ----------------------------------------------------------------------------


def build_pipeline(
    pipeline: Any,
    config: JobConfig,
    *,
    write: bool = True,
    baseline: tuple[dict | None, str] | None = None,
) -> JobOutputs:
    """Adds the job's stages to ``pipeline``: read, explain, and (``write``) every output.

    ``config.num_classes`` and ``config.channels`` should be set (``check_model``) so labels
    are range-checked early and images decoded to the model's channels;
    the outputs written are maps and dead-letter Parquet, ``counts.json`` (used for
    ``summary.json``), and, as configured, TFRecords, overlays and the audit.

    Args:
        pipeline: A ``beam.Pipeline``.
        config: The job's settings.
        write: Add the writers; False gives the collections only (for tests and other jobs).
        baseline: ``(audit.json dict or None, its name)`` for the audit's drift section;
            None: read from ``config.baseline`` / ``config.history`` now.

    Returns:
        A ``JobOutputs`` with the rows, explained records, dead letters and the input count.

    Example:
        >>> with beam.Pipeline(options=pipeline_options()) as p:
        ...     outputs = build_pipeline(p, config)
    """
    import apache_beam as beam

    from fullgrad.beam import io
    from fullgrad.beam.transforms import ExplainRows, count_failure

    rows, read_dead, class_names = pipeline | "Read" >> io.ReadRows(config)
    explain = ExplainRows(config)
    explained, explain_dead = rows | "Explain" >> explain
    dead = (
        (read_dead, explain_dead)
        | "DeadLetters" >> beam.Flatten()
        | "CountFailures" >> beam.Map(count_failure)
    )
    count = beam.combiners.Count.Globally
    input_count = (
        (rows | "CountRows" >> count(), read_dead | "CountReadDead" >> count())
        | "Inputs" >> beam.Flatten()
        | "SumInputs" >> beam.CombineGlobally(sum)
    )
    outputs = JobOutputs(
        rows, explained, dead, input_count, explain.inference_results, class_names
    )
    if write:
        _add_writers(pipeline, config, outputs, baseline)
    return outputs


def _add_writers(
    pipeline: Any, config: JobConfig, outputs: JobOutputs, baseline: tuple | None = None
) -> None:
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems

    from fullgrad.audit.transforms import with_statistics
    from fullgrad.beam import io

    # Per-image audit statistics become columns of the maps (and are reused by the audit).
    explained = outputs.explained | "Statistics" >> beam.Map(
        with_statistics, AuditSettings.from_config(config)
    )
    dead = outputs.dead_letters
    _ = explained | "WriteMaps" >> io.WriteMaps(config)
    _ = dead | "WriteDeadLetters" >> io.WriteDeadLetters(config.output)
    if config.write_tfrecord:
        stored = explained
        if not config.part_maps:  # explained for the audit only: not stored
            stored = explained | "NoPartMaps" >> beam.Map(lambda r: {**r, "part_maps": None})
        _ = stored | "WriteTFRecord" >> io.WriteMapsTFRecord(config)
    if config.overlays:
        _ = explained | "WriteOverlays" >> io.WriteOverlays(config.output, config.overlays)
    if config.audit:
        _add_audit(config, explained, outputs.class_names, baseline)
    if config.evaluate:
        from fullgrad.beam.evaluate import EvaluateFaithfulness

        _ = outputs.results | "Evaluate" >> EvaluateFaithfulness(config)

    count = beam.combiners.Count.Globally
    explained_count = explained | "CountExplained" >> count()
    failed_count = dead | "CountFailed" >> count()
    by_stage = (
        dead
        | "Stages" >> beam.Map(lambda d: d["stage"])
        | "CountStages" >> beam.combiners.Count.PerElement()
        | "StageDict" >> beam.combiners.ToDict()
    )
    path = FileSystems.join(config.output, "counts.json")

    def write_counts(
        _: Any, inputs: int, explained_n: int, failed_n: int, stages: dict, names: dict
    ) -> None:
        counts = {"input": inputs, "explained": explained_n, "failed": failed_n,
                  "failed_by_stage": dict(sorted(stages.items())),
                  "class_names": names["class_names"], "class_names_from": names["source"]}
        with FileSystems.create(path) as handle:
            handle.write(json.dumps(counts).encode())

    side = beam.pvalue.AsSingleton
    _ = (
        pipeline
        | "CountsTrigger" >> beam.Create([None])
        | "WriteCounts"
        >> beam.Map(
            write_counts,
            side(outputs.input_count),
            side(explained_count),
            side(failed_count),
            side(by_stage),
            side(outputs.class_names),
        )
    )


def _add_audit(
    config: JobConfig, explained: Any, class_names: Any, baseline: tuple | None = None
) -> None:
    """The ``--audit`` branch: ``ComputeAudit`` over the explained records, then ``write_audit``.

    Imported here so that a job without ``--audit`` does not load the report's matplotlib.
    """
    import apache_beam as beam

    from fullgrad.audit.report import write_audit
    from fullgrad.audit.transforms import ComputeAudit
    from fullgrad.beam.history import resolve_baseline

    settings = AuditSettings.from_config(config)
    output, map_kind = config.output, config.map
    old, name = baseline or resolve_baseline(config.baseline, config.history)
    _ = (
        explained
        | "Audit" >> ComputeAudit(settings, old, name)
        | "NameClasses" >> beam.Map(_with_class_names, settings,
                                    beam.pvalue.AsSingleton(class_names))
        | "WriteAudit" >> beam.Map(lambda audit: write_audit({**audit, "map": map_kind}, output))
    )


def _with_class_names(audit: dict, settings: AuditSettings, found: dict) -> dict:
    """The audit with the data's class names, unless ``--audit-class-names`` gave some.

    Precedence of class names in the audit and the report: ``--audit-class-names``, then what
    the reader found (``--class-names``, Hugging Face ``ClassLabel`` names, class folders).
    """
    if settings.class_names or not found or not found.get("class_names"):
        return audit
    named = dataclasses.replace(settings, class_names=tuple(found["class_names"]))
    classes = {
        key: {**entry, "name": named.class_name(int(key))}
        for key, entry in audit["classes"].items()
    }
    # A new dict: Beam elements are not modified in place.
    return {**audit, "settings": named.as_dict(), "classes": classes}


def job_metrics(result: Any) -> dict[str, Any]:
    """The ``fullgrad`` namespace's metrics of a finished run, where the runner reports them.

    Counters as numbers; distributions (batch latency, model load time) as count/sum/min/max.
    Committed values where the runner has them, else attempted ones; ``{}`` if the runner
    reports nothing. The counts of ``summary.json`` never rely on metrics. ``model_loads``
    counts loads in worker processes; ``load_model_latency_milli_secs`` (RunInference's own)
    counts every load, including a model shared from another process.

    Example:
        >>> job_metrics(pipeline.run())["images_explained"]
        12
    """
    from apache_beam.metrics.metric import MetricsFilter

    from fullgrad.beam.handler import METRICS_NAMESPACE

    try:
        queried = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
    except Exception:  # noqa: BLE001 -- some runners do not implement metrics
        return {}
    metrics: dict[str, Any] = {}
    for counter in queried.get("counters", []):
        value = counter.committed if counter.committed is not None else counter.attempted
        name = counter.key.metric.name
        metrics[name] = metrics.get(name, 0) + int(value or 0)
    for dist in queried.get("distributions", []):
        value = dist.committed if dist.committed is not None else dist.attempted
        if value is not None and value.count:
            metrics[dist.key.metric.name] = {
                "count": value.count, "sum": value.sum, "min": value.min, "max": value.max
            }
    return dict(sorted(metrics.items()))


def _remove_orphaned_temp(output: str) -> None:
    """Removes Beam temporary folders that a finished run left in ``output``.

    Beam's file sinks delete their own temporary folder when they finalise. A task that
    lost its worker (a killed Dask worker, a preempted VM) and was re-run had started
    another one, which nobody finalises; its files are not outputs.
    """
    import shutil

    from apache_beam.io.filesystems import FileSystems

    pattern = FileSystems.join(output, "beam-temp-*")
    files = FileSystems.match([FileSystems.join(pattern, "*")])[0].metadata_list
    if files:
        FileSystems.delete([m.path for m in files])
    if "://" not in output:  # local folders outlive their files
        for folder in glob.glob(pattern):
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _engine_args(extra: Sequence[str], dask: DaskSettings | None) -> Iterator[list[str]]:
    """``extra`` as Beam takes it; for ``--runner dask``, with a cluster up meanwhile."""
    from fullgrad.beam.dask import dask_pipeline_args, is_dask_runner, runner_flag

    if not is_dask_runner(runner_flag(extra)):
        yield list(extra)
        return
    try:
        with dask_pipeline_args(extra, dask or DaskSettings()) as args:
            yield args
    except ConnectionError as error:
        raise JobError(str(error)) from error


def run(
    config: JobConfig,
    extra: Sequence[str] = (),
    *,
    dask: DaskSettings | None = None,
    **option_overrides: Any,
) -> dict:
    """Checks, runs the pipeline to completion, writes and returns ``summary.json``.

    Args:
        config: The job's settings.
        extra: Beam pipeline flags (``--runner``, ``--direct_num_workers`` ...). With
            ``--runner dask`` the job runs on dask.distributed: on the scheduler at
            ``--dask_client_address``, else on a local cluster started (after the checks
            below) and closed here.
        dask: The local Dask cluster's size (``--dask-workers`` ...); default 2 x 1.
        option_overrides: ``PipelineOptions`` keywords that win over ``extra``.

    Returns:
        The summary: ``input``, ``explained``, ``failed``, ``failed_by_stage``,
        ``wall_time_s``, ``images_per_s`` and the settings used.

    Raises:
        JobError: A bad model, input or output folder, found before any data is read.

    Example:
        >>> run(JobConfig(input="data/*.parquet", model="m.keras", output="out"))["explained"]
    """
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems

    # s3:// (endpoint, credentials) and gs:// (project) read their settings from the pipeline
    # options: the checks below open the model, list the input and the output with them.
    options = pipeline_options(extra, **option_overrides)
    FileSystems.set_options(options)
    config.num_classes, config.channels = check_model(config)
    files = check_input(config)
    # Read before prepare_output: with --overwrite, the baseline may be this folder's last run.
    baseline = _baseline(config)
    prepare_output(config)
    with _engine_args(extra, dask) as beam_args:
        if beam_args != list(extra):  # --runner dask: its runner and cluster address
            options = pipeline_options(beam_args, **option_overrides)
        start = time.perf_counter()
        _LOGGER.info("fullgrad: explaining %s (%d files) -> %s", config.input, files,
                     config.output)
        pipeline = beam.Pipeline(options=options)
        build_pipeline(pipeline, config, baseline=baseline)
        try:
            result = pipeline.run()
            result.wait_until_finish()
        except Exception:
            # Sinks that finished have written files; summary.json, written only below,
            # is what marks a run complete.
            _LOGGER.error("fullgrad: the pipeline failed; %s holds an incomplete run (no "
                          "summary.json). Rerun with --overwrite.", config.output)
            raise
        wall = time.perf_counter() - start
    _remove_orphaned_temp(config.output)
    counts_path = FileSystems.join(config.output, "counts.json")
    with FileSystems.open(counts_path) as handle:
        counts = json.loads(handle.read())
    FileSystems.delete([counts_path])
    summary = {
        **counts,
        "wall_time_s": round(wall, 3),
        "images_per_s": round(counts["explained"] / wall, 3) if wall > 0 else None,
        "files": files,
        "metrics": job_metrics(result),
        "config": {k: v for k, v in dataclasses.asdict(config).items()},
    }
    if counts["input"] != counts["explained"] + counts["failed"]:
        _LOGGER.error("fullgrad: counts do not add up: %s", counts)
    with FileSystems.create(FileSystems.join(config.output, "summary.json")) as handle:
        handle.write(json.dumps(summary, indent=1).encode())
    if config.audit and config.history:
        from fullgrad.beam.history import record_run

        summary["history"] = record_run(config.history, config.output)
    return summary


def _baseline(config: JobConfig) -> tuple[dict | None, str]:
    """The audit's baseline (``--baseline`` / ``--history``); a missing one is a JobError."""
    if not config.audit:
        return None, ""
    from fullgrad.beam.history import resolve_baseline

    try:
        return resolve_baseline(config.baseline, config.history)
    except FileNotFoundError as error:
        raise JobError(str(error)) from error
