"""Baselines for the audit's drift, and the run history a scheduled audit compares along.

``--baseline OLD`` names an earlier run: its output folder or its ``audit.json`` (local,
``gs://``, ``s3://``, through Beam's file systems). :func:`load_baseline` reads it.

``--history HISTORY`` is for schedules, where nobody edits parameters between runs:

- at the start, when no ``--baseline`` is given, the run reads ``HISTORY/latest.json`` (a
  pointer: ``{"audit": "HISTORY/run-<timestamp>/audit.json", ...}``) and uses the audit it
  points to as its baseline; a first run (no pointer yet) has no drift section;
- at the end, after its audit is written, :func:`record_run` copies ``audit.json`` and
  ``report.html`` to ``HISTORY/run-<UTC timestamp>/`` and then rewrites the pointer, so a run that
  fails half-way never becomes the next run's baseline.

Two scheduled runs must not overlap on one history folder (the pointer is last-writer-wins);
KFP's recurring runs default to ``max_concurrency=1``.

Example:
    >>> baseline, name = resolve_baseline(None, "gs://b/audit-history")
    >>> record_run("gs://b/audit-history", "gs://b/out/run-17")["audit"]
    'gs://b/audit-history/run-20261201T224500Z/audit.json'
"""

from __future__ import annotations

import datetime
import json
from typing import Any

__all__ = ["LATEST", "baseline_path", "load_baseline", "record_run", "resolve_baseline"]

#: The pointer file in a history folder.
LATEST = "latest.json"


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def _exists(path: str) -> bool:
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.exists(path)


def _read_json(path: str) -> Any:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as handle:
        return json.loads(handle.read().decode("utf-8"))


def _write(path: str, data: bytes) -> None:
    import os

    from apache_beam.io.filesystems import FileSystems

    if "://" not in path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with FileSystems.create(path) as handle:
        handle.write(data)


def baseline_path(baseline: str) -> str:
    """The ``audit.json`` an earlier run's folder or file names.

    Example:
        >>> baseline_path("gs://b/runs/old/")
        'gs://b/runs/old/audit.json'
    """
    return baseline if baseline.rstrip("/").endswith(".json") else _join(baseline, "audit.json")


def load_baseline(baseline: str) -> tuple[dict[str, Any], str]:
    """Reads an earlier run's ``audit.json``: ``(audit, its path)``.

    Raises:
        FileNotFoundError: No ``audit.json`` there.

    Example:
        >>> load_baseline("runs/2026-11-30")[1]
        'runs/2026-11-30/audit.json'
    """
    path = baseline_path(baseline)
    if not _exists(path):
        raise FileNotFoundError(f"--baseline {baseline!r}: no audit.json at {path}")
    return _read_json(path), path


def resolve_baseline(
    baseline: str | None, history: str | None
) -> tuple[dict[str, Any] | None, str]:
    """The baseline audit of a run: ``--baseline`` when given, else the history's latest run.

    Returns:
        ``(audit or None, where it came from)``; None when neither gives one (a first run).

    Example:
        >>> resolve_baseline(None, "empty-history/")
        (None, '')
    """
    if baseline:
        return load_baseline(baseline)
    if history:
        pointer = _join(history, LATEST)
        if _exists(pointer):
            return load_baseline(_read_json(pointer)["audit"])
    return None, ""


def record_run(
    history: str, output_dir: str, now: datetime.datetime | None = None
) -> dict[str, Any]:
    """Copies a finished run's ``audit.json`` / ``report.html`` into the history, moves the pointer.

    Args:
        history: The history folder.
        output_dir: Where the run wrote its audit.
        now: The run's time (UTC now when None); names the folder ``run-YYYYMMDDTHHMMSSZ``.

    Returns:
        The new pointer: ``{"audit", "report", "run", "source", "created"}``.

    Raises:
        FileNotFoundError: The run wrote no ``audit.json``.

    Example:
        >>> record_run("gs://b/history", "gs://b/out")["run"]
        'gs://b/history/run-20261201T224500Z'
    """
    now = now or datetime.datetime.now(datetime.UTC)
    source = _join(output_dir, "audit.json")
    if not _exists(source):
        raise FileNotFoundError(f"no audit.json in {output_dir} to record in {history}")
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    run, suffix = _join(history, f"run-{stamp}"), 1
    while _exists(_join(run, "audit.json")):  # two runs within a second
        suffix += 1
        run = _join(history, f"run-{stamp}-{suffix}")
    pointer = {"audit": _join(run, "audit.json"), "run": run, "source": output_dir,
               "created": now.isoformat()}
    copies = [("audit.json", "audit")]
    if _exists(_join(output_dir, "report.html")):
        copies.append(("report.html", "report"))
    from apache_beam.io.filesystems import FileSystems

    for name, key in copies:
        with FileSystems.open(_join(output_dir, name)) as handle:
            _write(_join(run, name), handle.read())
        pointer[key] = _join(run, name)
    _write(_join(history, LATEST), json.dumps(pointer, indent=1).encode("utf-8"))
    return pointer
