"""What the Kubeflow tasks do, as plain Python over the library.

A component body is one call into this module, so the work done in a pod is ``fullgrad``'s own
code (the Beam job, the audit), and this logic is tested without a cluster. Artifacts are
duck-typed: anything with ``.path``, ``.uri`` and ``.metadata`` (and ``log_metric`` for
metrics), which is what kfp hands a component at run time.

Where the data lives: with the local runner the job runs inside the pod and reads the
artifacts' local paths (``/gcs/...`` on Vertex AI, the launcher's copies on Kubeflow, plain
files under ``kfp.local``). Any other runner (Dataflow, Flink, ...) has workers that cannot see
the pod's disk, so it gets the artifacts' URIs (``gs://``, ``s3://``), which Beam's file systems
read.

Example:
    >>> RunnerSettings("DataflowRunner", project="p", region="europe-west4",
    ...                temp_location="gs://b/tmp").pipeline_options()["runner"]
    'DataflowRunner'
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from fullgrad.beam.config import (
    FORMATS,
    JobConfig,
    KfpParameter,
    config_values,
    format_glob,
    format_of,
    kfp_parameters,
)

__all__ = [
    "LOCAL_RUNNERS",
    "RunnerSettings",
    "artifact_location",
    "audit_markdown",
    "audit_metrics",
    "dataset_input",
    "explain_parameters",
    "model_file",
    "run_audit",
    "run_explain",
]

_LOG = logging.getLogger(__name__)

#: Runner values that run the job inside the pod, on its local paths.
LOCAL_RUNNERS = frozenset({"", "local", "DirectRunner", "PrismRunner"})
_MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")


class _Artifact(Protocol):
    path: str
    uri: str
    metadata: dict


def _help(default: Any, text: str) -> Any:
    """A dataclass field with its default and its parameter description."""
    return dataclasses.field(default=default, metadata={"help": text})


def artifact_location(artifact: _Artifact, local: bool) -> str:
    """Where the job should read or write ``artifact``: its local path or its URI.

    Args:
        artifact: A kfp artifact.
        local: True for the local runner (in the pod), False for a distributed runner.

    Returns:
        ``artifact.path`` when local, else ``artifact.uri``.

    Raises:
        ValueError: A distributed runner but the URI is a local path, which remote workers
            cannot read (e.g. ``kfp.local`` with ``runner=DataflowRunner``).

    Example:
        >>> artifact_location(model, local=False)
        'gs://bucket/models/model.keras'
    """
    if local:
        return artifact.path
    if "://" not in artifact.uri:
        raise ValueError(
            f"a distributed runner needs artifacts in a bucket (gs://, s3://), "
            f"but this one is the local path {artifact.uri!r}"
        )
    return artifact.uri


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def dataset_input(images: _Artifact, local: bool, input_format: str = "") -> tuple[str, str]:
    """The ``--input`` glob and ``--format`` for a dataset artifact.

    The artifact is a dataset file, or a folder (what an importer of ``gs://bucket/data/``
    gives) holding dataset files (Parquet, TFRecord, WebDataset ``.tar`` shards, image files)
    or, when it holds none, class folders of image files (``cat/001.jpg``), read as
    ``<folder>/*/*.jpg`` so each image is labelled by its class folder. The folder is inspected
    through its local path, which exists in the pod; the glob is then built on the URI for a
    distributed runner. Formats are told by ``fullgrad.beam.config.format_of``, as for
    ``fullgrad run --input``.

    Args:
        images: The dataset artifact.
        local: True for the local runner.
        input_format: One of ``fullgrad.beam.config.FORMATS``, or empty to tell from the files.

    Returns:
        ``(glob, format)``; several globs are comma-separated.

    Raises:
        FileNotFoundError: The artifact's path does not exist.
        ValueError: A folder with no dataset file (an empty folder), or an unknown
            ``input_format``.

    Example:
        >>> dataset_input(images, local=True)
        ('/data/images/*.parquet', 'parquet')
        >>> dataset_input(class_folders, local=True)
        ('/data/train/*/*.jpg,/data/train/*/*.png', 'images')
    """
    if input_format not in ("", *FORMATS):
        raise ValueError(f"input_format must be one of {FORMATS} or empty, got {input_format!r}")
    path = images.path
    base = artifact_location(images, local)
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset artifact not found at {path!r} (URI {images.uri!r})")
    if not os.path.isdir(path):
        fmt = input_format or format_of(path)
        if fmt is None:
            raise ValueError(
                f"cannot tell the format of {path!r}; set input_format to one of {FORMATS}"
            )
        return base, fmt
    names = sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
    prefix = ""
    if not any(map(format_of, names)) and input_format in ("", "images"):
        # No dataset file on top: class folders, each holding that class's images.
        names = sorted(
            name
            for folder in os.listdir(path)
            if os.path.isdir(os.path.join(path, folder))
            for name in os.listdir(os.path.join(path, folder))
            if format_of(name) == "images"
        )
        prefix = "*/"
    found = {fmt for fmt in map(format_of, names) if fmt}
    if input_format:
        fmt = input_format
    elif len(found) == 1:
        fmt = found.pop()
    elif not found:
        raise ValueError(
            f"no dataset files ({', '.join(FORMATS)}) and no class folders of images in the "
            f"folder {path!r}"
        )
    else:
        raise ValueError(
            f"the dataset folder {path!r} holds several formats {sorted(found)}; "
            "set input_format"
        )
    globs = sorted({format_glob(n) for n in names if format_of(n) == fmt})
    if not globs:
        raise ValueError(f"no {fmt} files in the dataset folder {path!r}")
    return ",".join(_join(base, prefix + pattern) for pattern in globs), fmt


def model_file(model: _Artifact, local: bool) -> str:
    """The ``--model`` path for a model artifact: the file, or the one model file in a folder.

    Raises:
        FileNotFoundError: The artifact's path does not exist, or the folder holds no model.
        ValueError: The folder holds several ``.keras``/``.h5`` files.

    Example:
        >>> model_file(model, local=True)
        '/models/classifier.keras'
    """
    path = model.path
    base = artifact_location(model, local)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model artifact not found at {path!r} (URI {model.uri!r})")
    if not os.path.isdir(path):
        return base
    candidates = sorted(n for n in os.listdir(path) if n.lower().endswith(_MODEL_SUFFIXES))
    if not candidates:
        raise FileNotFoundError(f"no .keras or .h5 file in the model folder {path!r}")
    if len(candidates) > 1:
        raise ValueError(f"several model files in {path!r}: {candidates}; import one file")
    return _join(base, candidates[0])


@dataclasses.dataclass(frozen=True)
class RunnerSettings:
    """Where the explain task runs the Beam job: the pod itself, or a Beam runner's workers.

    Each field is a parameter of the ``explain`` component and of the pipeline (see
    :func:`explain_parameters`); the ``help`` metadata is its description.

    Example:
        >>> RunnerSettings("DataflowRunner", project="p", region="europe-west4",
        ...                temp_location="gs://b/tmp").is_local
        False
    """

    runner: str = _help(
        "local",
        "'local' runs the job's pinned local runner inside this pod (the task's GPU); any other "
        "value is a Beam runner name, e.g. DataflowRunner, whose workers read the artifacts' URIs",
    )
    project: str = _help("", "Dataflow: the Google Cloud project")
    region: str = _help("", "Dataflow: the region")
    temp_location: str = _help("", "Dataflow: a gs:// folder for temporary files")
    worker_accelerator: str = _help(
        "", "Dataflow: GPU type on the workers, e.g. nvidia-tesla-t4 (empty: CPU workers)"
    )
    worker_accelerator_count: int = _help(1, "Dataflow: GPUs per worker")
    machine_type: str = _help("", "Dataflow: worker machine type, e.g. n1-standard-8")
    sdk_container_image: str = _help(
        "", "Dataflow: the workers' image (the pipeline's default: the image it was compiled with)"
    )

    @property
    def is_local(self) -> bool:
        """Whether the job runs in the pod (so it reads the artifacts' local paths)."""
        return self.runner in LOCAL_RUNNERS

    def pipeline_options(self) -> dict[str, Any]:
        """Beam ``PipelineOptions`` keywords for these settings.

        Returns:
            Keywords in Beam's names (``runner``, ``project``, ...); empty for the local runner.

        Raises:
            ValueError: Dataflow without project/region/temp_location, or Dataflow-only settings
                given to another runner (they would be silently ignored otherwise).

        Example:
            >>> RunnerSettings("FlinkRunner").pipeline_options()
            {'runner': 'FlinkRunner'}
        """
        dataflow_only = {
            "project": self.project,
            "region": self.region,
            "temp_location": self.temp_location,
            "worker_accelerator": self.worker_accelerator,
            "machine_type": self.machine_type,
        }
        if self.runner != "DataflowRunner":
            given = sorted(name for name, value in dataflow_only.items() if value)
            if given:
                raise ValueError(f"{given} only apply to runner=DataflowRunner, not {self.runner!r}")
            # Portable runners (Flink, Spark) choose their workers' environment with
            # --environment_type/--environment_config, which go in extra_args.
            return {} if self.runner in ("", "local") else {"runner": self.runner}
        missing = [n for n in ("project", "region", "temp_location") if not dataflow_only[n]]
        if missing:
            raise ValueError(f"runner=DataflowRunner needs {missing}")
        options: dict[str, Any] = {
            "runner": self.runner,
            "project": self.project,
            "region": self.region,
            "temp_location": self.temp_location,
        }
        if self.machine_type:
            options["machine_type"] = self.machine_type
        if self.sdk_container_image:
            # The image already holds this Beam SDK; staging another copy would only slow startup.
            options["sdk_container_image"] = self.sdk_container_image
            options["sdk_location"] = "container"
        if self.worker_accelerator:
            if self.worker_accelerator_count < 1:
                raise ValueError("worker_accelerator_count must be >= 1")
            # Dataflow's GPU syntax; the driver install is what a stock worker VM lacks.
            accelerator = f"type:{self.worker_accelerator};count:{self.worker_accelerator_count}"
            options["dataflow_service_options"] = [
                f"worker_accelerator={accelerator};install-nvidia-driver"
            ]
        return options


def explain_parameters() -> list[KfpParameter]:
    """Every parameter of the ``explain`` component, typed: the job's, then the runner's.

    Generated from ``JobConfig`` (``fullgrad.beam.config.kfp_parameters``) and
    :class:`RunnerSettings`; the component, the pipeline and :func:`run_explain` all use it.

    Example:
        >>> [p.name for p in explain_parameters()][-2:]
        ['machine_type', 'sdk_container_image']
    """
    runner = [
        KfpParameter(f.name, f.name, type(f.default), f.default, f.metadata["help"])
        for f in dataclasses.fields(RunnerSettings)
    ]
    return [*kfp_parameters(), *runner]


def _move_matching(source_dir: str, prefix: str, target_dir: str) -> list[str]:
    """Moves ``source_dir/prefix*`` into ``target_dir`` (local or remote); returns new paths."""
    from apache_beam.io.filesystems import FileSystems

    matches = FileSystems.match([_join(source_dir, prefix + "*")])[0].metadata_list
    sources = sorted(m.path for m in matches)
    if not sources:
        return []
    if "://" not in target_dir:
        os.makedirs(target_dir, exist_ok=True)
    targets = [_join(target_dir, s.rstrip("/").rsplit("/", 1)[-1]) for s in sources]
    FileSystems.rename(sources, targets)
    return targets


def run_explain(
    *,
    images: _Artifact,
    model: _Artifact,
    maps: _Artifact,
    dead_letters: _Artifact,
    counts: Any,
    extra_args: Sequence[str] = (),
    **parameters: Any,
) -> dict[str, float]:
    """The explain task: runs the ``fullgrad run`` job and files its outputs into the artifacts.

    The task builds the job's ``JobConfig`` from the artifacts and ``parameters`` (any of
    :func:`explain_parameters`), lets ``extra_args`` (``fullgrad run`` flags or Beam pipeline
    options; unknown flags are refused) override it, and calls ``fullgrad.beam.job.run``. The
    maps folder gets the job's whole output (maps Parquet, ``summary.json``, overlays); the dead
    letters are moved from it into ``dead_letters``; ``counts`` gets the summary's numbers. The
    task fails when the job does, or when ``input != explained + failed``.

    Returns:
        The metrics logged.

    Raises:
        TypeError: A parameter that is not one of :func:`explain_parameters`.

    Example:
        >>> run_explain(images=images, model=model, maps=maps, dead_letters=dead,
        ...             counts=counts, image_size=32, preprocess="unit")
        {'input': 6.0, 'explained': 5.0, 'failed': 1.0, ...}
    """
    from fullgrad.beam import job

    runner_names = {f.name for f in dataclasses.fields(RunnerSettings)}
    runner = RunnerSettings(**{k: v for k, v in parameters.items() if k in runner_names})
    local = runner.is_local
    job_parameters = {k: v for k, v in parameters.items() if k not in runner_names}
    unknown = sorted(set(job_parameters) - {p.name for p in kfp_parameters()})
    if unknown:
        raise TypeError(f"unknown explain parameter(s) {unknown}")
    glob, fmt = dataset_input(images, local, job_parameters.get("input_format", ""))
    output = artifact_location(maps, local)
    dead_output = artifact_location(dead_letters, local)
    options = runner.pipeline_options()
    base = JobConfig(
        input=glob,
        model=model_file(model, local),
        output=output,
        # The folder is this task's own artifact: a retried task replaces its partial output.
        overwrite=True,
        **config_values({**job_parameters, "input_format": fmt}),
    )
    config, dask, beam_args = job.config_with_flags(base, extra_args)
    _LOG.info("fullgrad run %s %s", config, " ".join(beam_args))
    summary = job.run(config, beam_args, dask=dask, **options)

    moved = _move_matching(output, "dead_letter", dead_output)
    if local and not moved:
        os.makedirs(dead_output, exist_ok=True)
    values = {"input": float(summary["input"]), "explained": float(summary["explained"])}
    values["failed"] = float(summary["failed"])
    if values["input"] != values["explained"] + values["failed"]:
        raise RuntimeError(f"records lost: input != explained + failed in {summary}")
    for stage, count in sorted((summary.get("failed_by_stage") or {}).items()):
        values[f"failed_{stage}"] = float(count)
    for key, name in (("wall_time_s", "wall_time_s"), ("images_per_s", "images_per_s")):
        if isinstance(summary.get(key), (int, float)):
            values[name] = float(summary[key])
    for key, value in values.items():
        counts.log_metric(key, value)
    maps.metadata.update({"format": "parquet", "images": int(values["explained"])})
    dead_letters.metadata.update({"format": "parquet", "records": int(values["failed"])})
    return values


def _by_class(audit: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """``audit["classes"]`` items in class order (numeric ids numerically: 2 before 10)."""
    items = [(str(k), v) for k, v in audit.get("classes", {}).items()]
    return sorted(items, key=lambda kv: (not kv[0].isdigit(), kv[0].zfill(12)))


def audit_metrics(audit: Mapping[str, Any]) -> dict[str, float]:
    """The audit's headline numbers as flat metric names (KFP shows one number per name).

    ``mask_energy_class_<class>`` and ``border_energy_class_<class>`` where known,
    ``flagged_classes`` and ``flagged_images`` (how many).

    Example:
        >>> audit_metrics({"classes": {"3": {"mask_energy": 0.2}}, "flagged_classes": ["3"],
        ...                "flagged_images": []})
        {'mask_energy_class_3': 0.2, 'flagged_classes': 1.0, 'flagged_images': 0.0}
    """
    values: dict[str, float] = {}
    for label, stats in _by_class(audit):
        for key in ("mask_energy", "border_energy"):
            value = _scalar(stats.get(key))
            if value is not None:
                values[f"{key}_class_{label}"] = value
    values["flagged_classes"] = float(len(audit.get("flagged_classes", [])))
    if audit.get("drift"):
        values["drifted_classes"] = float(len(audit["drift"].get("drifted_classes", [])))
    # audit.json lists a capped number of flagged images; the total is kept beside the list.
    total = audit.get("flagged_images_total")
    values["flagged_images"] = float(
        total if isinstance(total, int) else len(audit.get("flagged_images", []))
    )
    if isinstance(audit.get("images"), int):
        values["images"] = float(audit["images"])
    return values


def _scalar(value: Any) -> float | None:
    """A statistic as one number: itself, or its ``mean`` when it is a summary dict."""
    if isinstance(value, Mapping):
        value = value.get("mean")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value):
        return float(value)
    return None


def audit_markdown(audit: Mapping[str, Any]) -> str:
    """A short Markdown summary of the audit for the KFP UI: a table per class, the flags.

    Example:
        >>> print(audit_markdown({"classes": {"0": {"count": 4, "mask_energy": 0.8}},
        ...                       "flagged_classes": []}))
        # FullGrad audit
        ...
    """
    flagged = {str(c) for c in audit.get("flagged_classes", [])}
    lines = [
        "# FullGrad audit",
        "",
        "| class | images | mask energy | border energy | concentration | flagged |",
        "|---|---|---|---|---|---|",
    ]
    for label, stats in _by_class(audit):
        cells = [_cell(stats.get(key)) for key in ("mask_energy", "border_energy", "concentration")]
        name = str(stats.get("name") or label).replace("|", "\\|")
        reasons = ", ".join(stats.get("reasons") or []) or "yes"
        lines.append(
            f"| {name} | {stats.get('count', '')} | {' | '.join(cells)} | "
            f"{f'**{reasons}**' if label in flagged else 'no'} |"
        )
    lines += [
        "",
        f"Flagged classes: {', '.join(sorted(flagged)) or 'none'}.",
        f"Flagged images: {audit.get('flagged_images_total', len(audit.get('flagged_images', [])))}.",
        "",
        "The full report with pictures is the task's `report` (HTML) output.",
    ]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    number = _scalar(value)
    return "n/a" if number is None else f"{number:.3f}"


def run_audit(
    *,
    maps: _Artifact,
    report: _Artifact,
    summary: _Artifact,
    metrics: Any,
    extra_args: Sequence[str] = (),
    baseline_uri: str = "",
    history_uri: str = "",
) -> dict[str, float]:
    """The audit task: runs the ``fullgrad audit`` pipeline over the maps and files its outputs.

    The flags are parsed by the command's own parser (``extra_args`` takes any ``fullgrad
    audit`` setting, e.g. ``--class-mask-lift-min 0.4``; unknown ones go to Beam), the audit
    writes ``audit.json`` and ``report.html`` to a scratch folder, then ``report.html`` becomes
    the ``report`` artifact, a Markdown digest of ``audit.json`` the ``summary``, and
    :func:`audit_metrics` goes to ``metrics``.

    When the explain job already audited in its own pass (``explain_args=["--audit"]``, e.g.
    on Dataflow's workers for a large dataset) and no ``extra_args`` ask for other settings, its
    ``audit.json`` / ``report.html`` are filed as they are, instead of reading every map again
    in this pod.

    ``baseline_uri`` / ``history_uri`` add the drift section (``fullgrad audit --baseline`` /
    ``--history``; see ``fullgrad.beam.history``): the maps are then audited here, and with a
    history this audit is recorded in it once written. The metrics then include
    ``drifted_classes`` (how many).

    Returns:
        The metrics logged.

    Example:
        >>> run_audit(maps=maps, report=report, summary=summary, metrics=metrics)
        {'mask_energy_class_0': 0.71, ..., 'flagged_classes': 1.0, 'flagged_images': 3.0}
    """
    workdir = tempfile.mkdtemp(prefix="fullgrad-audit-")
    try:
        paths = {"json": os.path.join(maps.path, "audit.json")}
        paths["html"] = os.path.join(maps.path, "report.html")
        comparing = bool(baseline_uri or history_uri)
        if extra_args or comparing or not all(os.path.isfile(p) for p in paths.values()):
            from fullgrad.beam import audit_job

            settings, beam_args = audit_job.settings_from_flags(extra_args)
            _LOG.info("fullgrad audit of %s with %s %s", maps.path, settings, beam_args)
            paths = audit_job.run_audit(maps.path, workdir, settings, beam_args,
                                        baseline=baseline_uri or None,
                                        history=history_uri or None)
        else:
            _LOG.info("filing the audit the explain job wrote in its pass: %s", paths["json"])
        with open(paths["json"], encoding="utf-8") as handle:
            audit = json.load(handle)
        os.makedirs(os.path.dirname(report.path) or ".", exist_ok=True)
        shutil.copyfile(paths["html"], report.path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(os.path.dirname(summary.path) or ".", exist_ok=True)
    with open(summary.path, "w", encoding="utf-8") as handle:
        handle.write(audit_markdown(audit))
    values = audit_metrics(audit)
    for key, value in values.items():
        metrics.log_metric(key, value)
    report.metadata.update({"flagged_classes": list(audit.get("flagged_classes", []))})
    return values
