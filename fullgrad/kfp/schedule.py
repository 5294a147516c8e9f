"""``fullgrad schedule``: recurring runs of the compiled pipeline on a Kubeflow Pipelines endpoint.

Three actions, one flag each::

    fullgrad schedule --host URL --experiment NAME --cron '0 0 2 * * *' --param k=v ...
    fullgrad schedule --host URL --experiment NAME --interval 86400 --param k=v ...
    fullgrad schedule --host URL [--experiment NAME] --list
    fullgrad schedule --host URL --delete RECURRING_RUN_ID

Creating one uploads the pipeline (``fullgrad-explain-audit``) if the endpoint lacks it, and a
pipeline version named after this package's version and the YAML's hash if that exact YAML is
not there yet, then calls ``kfp.Client.create_recurring_run`` on that version. Re-running with
an unchanged pipeline reuses the version. ``--list`` and ``--delete`` only touch recurring runs
of that pipeline: "its own schedules", so a typo'd id cannot delete someone else's.

KFP's cron has six fields, seconds first (``robfig/cron``): ``0 0 2 * * *`` is 02:00 daily. A
five-field Unix expression is refused with the six-field spelling suggested, since KFP would
otherwise read its minutes as seconds.

Example:
    $ fullgrad schedule --host http://localhost:8080 --experiment nightly-audit \\
        --cron '0 0 2 * * *' --param dataset_uri=gs://bucket/data/ \\
        --param model_uri=gs://bucket/models/prod.keras --param image_size=224
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import yaml

from fullgrad import __version__

__all__ = [
    "CronError",
    "add_arguments",
    "create_schedule",
    "delete_schedule",
    "list_schedules",
    "main",
    "parse_params",
    "validate_cron",
]


class CronError(ValueError):
    """A cron expression KFP would reject or misread."""


_MONTH_NAMES = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_MONTHS = {name: number for number, name in enumerate(_MONTH_NAMES, start=1)}
_DAYS = {
    name: number for number, name in enumerate(("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"))
}
#: (name, lowest, highest, names, ``?`` allowed) per field, in robfig/cron's order.
_FIELDS = (
    ("second", 0, 59, {}, False),
    ("minute", 0, 59, {}, False),
    ("hour", 0, 23, {}, False),
    ("day of month", 1, 31, {}, True),
    ("month", 1, 12, _MONTHS, False),
    ("day of week", 0, 6, _DAYS, True),
)
_PART = re.compile(r"^(?P<range>\*|\?|[A-Za-z0-9]+(?:-[A-Za-z0-9]+)?)(?:/(?P<step>\d+))?$")


def validate_cron(expression: str) -> str:
    """Checks a six-field KFP cron expression and returns it normalised (single spaces).

    Fields: second, minute, hour, day of month, month, day of week. Each is ``*``, a value,
    a range ``a-b``, any of those with ``/step``, or a comma list; months and days may be
    names (``JAN``, ``MON-FRI``); ``?`` means "any" in the two day fields.

    Args:
        expression: The cron expression.

    Returns:
        The expression with its fields joined by single spaces.

    Raises:
        CronError: Not six fields (a five-field Unix cron gets the six-field spelling in the
            message), or a field out of range.

    Example:
        >>> validate_cron("0 0 2 * * *")
        '0 0 2 * * *'
        >>> validate_cron("0 2 * * *")
        Traceback (most recent call last):
        ...
        fullgrad.kfp.schedule.CronError: ... use '0 0 2 * * *' ...
    """
    fields = expression.split()
    if len(fields) == 5:
        raise CronError(
            f"cron {expression!r} has 5 fields, but Kubeflow Pipelines' cron has 6, seconds "
            f"first (second minute hour day-of-month month day-of-week); for the same schedule "
            f"use '0 {' '.join(fields)}'"
        )
    if len(fields) != 6:
        raise CronError(
            f"cron {expression!r} has {len(fields)} fields; Kubeflow Pipelines needs 6: "
            "second minute hour day-of-month month day-of-week, e.g. '0 0 2 * * *' "
            "(use --interval for a fixed period)"
        )
    for field, (name, low, high, names, any_ok) in zip(fields, _FIELDS):
        for part in field.split(","):
            _check_part(part, name, low, high, names, any_ok, expression)
    return " ".join(fields)


def _check_part(
    part: str, name: str, low: int, high: int, names: dict, any_ok: bool, expression: str
) -> None:
    def fail(why: str) -> CronError:
        return CronError(f"cron {expression!r}: {name} field {part!r}: {why}")

    match = _PART.match(part)
    if not match:
        raise fail("expected *, a value, a range a-b, or any of them with /step")
    spec, step = match["range"], match["step"]
    if spec == "?" and not any_ok:
        raise fail("'?' is only allowed in the day-of-month and day-of-week fields")
    if step is not None and int(step) < 1:
        raise fail("step must be >= 1")
    if spec in ("*", "?"):
        return
    bounds = [_value(v, names, fail) for v in spec.split("-")]
    for value in bounds:
        if not low <= value <= high:
            raise fail(f"{value} is outside {low}-{high}")
    if len(bounds) == 2 and bounds[0] > bounds[1]:
        raise fail("range start is after its end")


def _value(text: str, names: dict, fail: Any) -> int:
    if text.isdigit():
        return int(text)
    if text.upper() in names:
        return names[text.upper()]
    raise fail(f"{text!r} is not a number" + (" or a name" if names else ""))


def _pipeline_parameters(pipeline_file: str) -> dict[str, dict]:
    with open(pipeline_file, encoding="utf-8") as handle:
        spec = next(d for d in yaml.safe_load_all(handle) if d and "root" in d)
    return spec["root"].get("inputDefinitions", {}).get("parameters", {})


def _pipeline_name(pipeline_file: str) -> str:
    with open(pipeline_file, encoding="utf-8") as handle:
        spec = next(d for d in yaml.safe_load_all(handle) if d and "pipelineInfo" in d)
    return spec["pipelineInfo"]["name"]


def parse_params(pairs: Sequence[str], pipeline_file: str) -> dict[str, Any]:
    """Turns ``k=v`` strings into run parameters typed by the pipeline's own definitions.

    Args:
        pairs: ``name=value`` items; lists and structs are JSON (``explain_args=["--top-k","3"]``).
        pipeline_file: The compiled pipeline, whose root input definitions give each
            parameter's type and whether it is required.

    Returns:
        ``{name: value}`` with ints, floats, booleans, lists as the pipeline declares them.

    Raises:
        ValueError: Malformed pair, unknown name (the message lists the known ones), a value
            of the wrong type, or a required parameter missing.

    Example:
        >>> parse_params(["image_size=64", "dataset_uri=gs://b/d/", "model_uri=gs://b/m.keras"],
        ...              "pipelines/fullgrad_explain_audit.yaml")
        {'image_size': 64, 'dataset_uri': 'gs://b/d/', 'model_uri': 'gs://b/m.keras'}
    """
    definitions = _pipeline_parameters(pipeline_file)
    params: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--param expects name=value, got {pair!r}")
        if name not in definitions:
            raise ValueError(f"unknown pipeline parameter {name!r}; known: {sorted(definitions)}")
        params[name] = _typed(name, text, definitions[name].get("parameterType", "STRING"))
    missing = sorted(
        name
        for name, spec in definitions.items()
        if not spec.get("isOptional") and "defaultValue" not in spec and name not in params
    )
    if missing:
        raise ValueError(f"required pipeline parameters missing: {missing} (pass --param k=v)")
    return params


def _typed(name: str, text: str, kind: str) -> Any:
    try:
        if kind == "STRING":
            return text
        if kind == "NUMBER_INTEGER":
            return int(text)
        if kind == "NUMBER_DOUBLE":
            return float(text)
        if kind == "BOOLEAN":
            if text.lower() not in ("true", "false"):
                raise ValueError("expected true or false")
            return text.lower() == "true"
        value = json.loads(text)
        if kind == "LIST" and not isinstance(value, list):
            raise ValueError("expected a JSON list")
        if kind == "STRUCT" and not isinstance(value, dict):
            raise ValueError("expected a JSON object")
        return value
    except ValueError as error:
        raise ValueError(f"--param {name}={text!r}: not a valid {kind}: {error}") from None


def _version_name(pipeline_file: str) -> str:
    with open(pipeline_file, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()[:12]
    return f"{__version__}-{digest}"


def _by_name(name: str) -> str:
    return json.dumps(
        {"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]}
    )


def _ensure_pipeline_version(client: Any, pipeline_file: str, namespace: str | None) -> tuple:
    """Returns ``(pipeline_id, version_id)`` for this exact YAML, uploading what is missing."""
    name = _pipeline_name(pipeline_file)
    pipeline_id = client.get_pipeline_id(name)
    if pipeline_id is None:
        pipeline_id = client.upload_pipeline(
            pipeline_file, pipeline_name=name, namespace=namespace
        ).pipeline_id
    version_name = _version_name(pipeline_file)
    found = client.list_pipeline_versions(pipeline_id, filter=_by_name(version_name))
    versions = found.pipeline_versions or []
    if versions:
        return pipeline_id, versions[0].pipeline_version_id
    version = client.upload_pipeline_version(pipeline_file, version_name, pipeline_id=pipeline_id)
    return pipeline_id, version.pipeline_version_id


def create_schedule(
    client: Any,
    pipeline_file: str,
    *,
    experiment: str,
    job_name: str,
    params: dict[str, Any],
    cron: str | None = None,
    interval_seconds: int | None = None,
    max_concurrency: int = 1,
    no_catchup: bool = True,
    namespace: str | None = None,
    service_account: str | None = None,
) -> Any:
    """Creates a recurring run of ``pipeline_file`` (uploaded as needed) in ``experiment``.

    Args:
        client: A ``kfp.Client``.
        pipeline_file: The compiled pipeline YAML.
        experiment: Experiment name; created if missing.
        job_name: The recurring run's display name.
        params: Pipeline parameters (see :func:`parse_params`).
        cron: Six-field cron expression; exclusive with ``interval_seconds``.
        interval_seconds: Period in seconds.
        max_concurrency: Runs of this schedule allowed at once.
        no_catchup: Skip missed runs after a pause instead of backfilling them.
        namespace: Kubernetes namespace (multi-user deployments).
        service_account: The runs' Kubernetes service account.

    Returns:
        The created ``V2beta1RecurringRun``.

    Example:
        >>> run = create_schedule(kfp.Client(host), "pipelines/fullgrad_explain_audit.yaml",
        ...                       experiment="nightly", job_name="audit-prod", params=params,
        ...                       cron="0 0 2 * * *")
    """
    if (cron is None) == (interval_seconds is None):
        raise ValueError("give exactly one of cron and interval_seconds")
    if cron is not None:
        cron = validate_cron(cron)
    if interval_seconds is not None and interval_seconds < 1:
        raise ValueError(f"interval must be a positive number of seconds, got {interval_seconds}")
    pipeline_id, version_id = _ensure_pipeline_version(client, pipeline_file, namespace)
    experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
    return client.create_recurring_run(
        experiment_id=experiment_id,
        job_name=job_name,
        description=f"fullgrad {__version__}: {_pipeline_name(pipeline_file)}",
        cron_expression=cron,
        interval_second=interval_seconds,
        max_concurrency=max_concurrency,
        no_catchup=no_catchup,
        params=params,
        pipeline_id=pipeline_id,
        version_id=version_id,
        service_account=service_account,
    )


def _all_recurring_runs(client: Any, experiment_id: str | None, namespace: str | None) -> Iterator:
    token = ""
    while True:
        page = client.list_recurring_runs(
            page_token=token, page_size=100, experiment_id=experiment_id, namespace=namespace
        )
        yield from page.recurring_runs or []
        token = page.next_page_token or ""
        if not token:
            return


def _is_ours(run: Any, pipeline_id: str) -> bool:
    reference = run.pipeline_version_reference
    return reference is not None and reference.pipeline_id == pipeline_id


def list_schedules(
    client: Any,
    pipeline_name: str,
    experiment: str | None = None,
    namespace: str | None = None,
) -> list[Any]:
    """The recurring runs of ``pipeline_name`` (optionally within one experiment).

    Example:
        >>> [r.display_name for r in list_schedules(client, "fullgrad-explain-audit")]
        ['audit-prod']
    """
    pipeline_id = client.get_pipeline_id(pipeline_name)
    if pipeline_id is None:
        return []
    experiment_id = None
    if experiment:
        experiment_id = client.get_experiment(
            experiment_name=experiment, namespace=namespace
        ).experiment_id
    return [
        run
        for run in _all_recurring_runs(client, experiment_id, namespace)
        if _is_ours(run, pipeline_id)
    ]


def delete_schedule(client: Any, recurring_run_id: str, pipeline_name: str) -> None:
    """Deletes a recurring run, only if it runs ``pipeline_name``.

    Raises:
        PermissionError: The recurring run belongs to another pipeline.

    Example:
        >>> delete_schedule(client, "5e1d...", "fullgrad-explain-audit")
    """
    run = client.get_recurring_run(recurring_run_id)
    pipeline_id = client.get_pipeline_id(pipeline_name)
    if pipeline_id is None or not _is_ours(run, pipeline_id):
        raise PermissionError(
            f"recurring run {recurring_run_id} ({run.display_name!r}) is not a schedule of "
            f"{pipeline_name!r}; not deleting it"
        )
    client.delete_recurring_run(recurring_run_id)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``fullgrad schedule``'s flags to ``parser``."""
    parser.add_argument(
        "--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080"
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument(
        "--cron", help="create: six-field cron, seconds first, e.g. '0 0 2 * * *' (02:00 daily)"
    )
    action.add_argument("--interval", type=int, metavar="SECONDS", help="create: fixed period")
    action.add_argument("--list", action="store_true", help="list this pipeline's schedules")
    action.add_argument("--delete", metavar="ID", help="delete one of this pipeline's schedules")
    parser.add_argument("--experiment", help="experiment name (required to create; created if new)")
    parser.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE", help="pipeline parameter"
    )
    parser.add_argument("--name", default=None, help="recurring run name (default: the experiment)")
    parser.add_argument(
        "--pipeline",
        help="compiled pipeline YAML (default: compile fullgrad_explain_audit.yaml now)",
    )
    parser.add_argument("--image", help="base image when compiling (default: $FULLGRAD_IMAGE)")
    parser.add_argument(
        "--accelerator-limit",
        type=int,
        default=None,
        help="GPUs on the explain task when compiling; 0 compiles the CPU pipeline (default: 1)",
    )
    parser.add_argument("--max-concurrency", type=int, default=1)
    parser.add_argument(
        "--catchup", action="store_true", help="backfill runs missed while paused (default: skip)"
    )
    parser.add_argument("--namespace", help="Kubernetes namespace (multi-user deployments)")
    parser.add_argument("--service-account", help="Kubernetes service account for the runs")


def _compiled_pipeline(args: argparse.Namespace, workdir: str) -> str:
    if args.pipeline:
        if args.image or args.accelerator_limit is not None:
            raise ValueError(
                "--image and --accelerator-limit compile a pipeline; not with --pipeline"
            )
        return args.pipeline
    from kfp import compiler

    from fullgrad.kfp.pipeline import DEFAULT_ACCELERATOR_LIMIT, build_pipeline

    limit = DEFAULT_ACCELERATOR_LIMIT if args.accelerator_limit is None else args.accelerator_limit
    path = os.path.join(workdir, "pipeline.yaml")
    compiler.Compiler().compile(build_pipeline(args.image, accelerator_limit=limit), path)
    return path


def main(args: argparse.Namespace, extra: list[str]) -> int:
    """Runs ``fullgrad schedule``; errors in the request are reported without a traceback."""
    from kfp_server_api import ApiException

    try:
        if args.cron is not None:
            validate_cron(args.cron)  # before any network call
        with tempfile.TemporaryDirectory(prefix="fullgrad-schedule-") as workdir:
            pipeline_file = _compiled_pipeline(args, workdir)
            name = _pipeline_name(pipeline_file)
            if args.list or args.delete:
                client = _client(args)
                if args.delete:
                    delete_schedule(client, args.delete, name)
                    print(f"deleted recurring run {args.delete}")
                    return 0
                for run in list_schedules(client, name, args.experiment, args.namespace):
                    trigger = run.trigger
                    when = (
                        f"cron {trigger.cron_schedule.cron!r}"
                        if trigger and trigger.cron_schedule
                        else f"every {trigger.periodic_schedule.interval_second}s"
                        if trigger and trigger.periodic_schedule
                        else "?"
                    )
                    print(f"{run.recurring_run_id}\t{run.display_name}\t{when}\t{run.status}")
                return 0
            if not args.experiment:
                raise ValueError("--experiment is required to create a schedule")
            params = parse_params(args.param, pipeline_file)
            client = _client(args)
            run = create_schedule(
                client,
                pipeline_file,
                experiment=args.experiment,
                job_name=args.name or args.experiment,
                params=params,
                cron=args.cron,
                interval_seconds=args.interval,
                max_concurrency=args.max_concurrency,
                no_catchup=not args.catchup,
                namespace=args.namespace,
                service_account=args.service_account,
            )
            print(f"created recurring run {run.recurring_run_id} ({run.display_name})")
            return 0
    except (ValueError, PermissionError, FileNotFoundError) as error:
        print(f"fullgrad schedule: error: {error}", file=sys.stderr)
        return 2
    except ApiException as error:
        print(
            f"fullgrad schedule: error: {args.host} answered {error.status} {error.reason}: "
            f"{(error.body or '').strip()}",
            file=sys.stderr,
        )
        return 2
    except TimeoutError as error:  # kfp.Client's health check gave up
        print(f"fullgrad schedule: error: cannot reach {args.host}: {error}", file=sys.stderr)
        return 2


def _client(args: argparse.Namespace) -> Any:
    import kfp

    kwargs = {"host": args.host}
    if args.namespace:
        kwargs["namespace"] = args.namespace
    return kfp.Client(**kwargs)
