"""Beam pipeline options for fullgrad's commands: the pinned local runner and strict flags.

``fullgrad run`` and ``fullgrad audit`` take their own flags plus any Beam pipeline option
(``--runner``, ``--project``, ``--temp_location``, ``--direct_num_workers`` ...). A flag that
is neither is refused, naming the closest known flag, before anything runs: Beam itself only
logs "Discarding unparseable args" and goes on, so a mistyped ``--batchsize 4`` would run with
the default batch size and nothing would tell the user.

Example:
    >>> args, beam_args = parse_flags(parser, ["--input", "a.parquet", "--runner", "dask"])
    >>> options = pipeline_options(beam_args)
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence
from typing import Any

__all__ = [
    "DEFAULT_RUNNER",
    "LOCAL_BUNDLES_IN_FLIGHT",
    "beam_option_parser",
    "parse_flags",
    "pipeline_options",
]

#: The local runner used when no ``--runner`` is given: Beam's FnApiRunner, in-process (or
#: ``--direct_running_mode multi_processing``). Beam 2.77's ``DirectRunner`` first tries the
#: Prism runner, which downloads a Go binary from GitHub: that fails (slowly) offline.
DEFAULT_RUNNER = "apache_beam.runners.portability.fn_api_runner.fn_runner.FnApiRunner"

#: Bundles of a stage the default local runner processes at once, in threads of one process
#: (``--direct_running_mode multi_threading --direct_num_workers 3``), unless either flag is
#: given. With one bundle the model's step waits while each batch's results are recorded and
#: written and the next batch is gathered, and a single step leaves cores idle between its
#: ops; with three, the steps and the Python work of different bundles overlap, and the model
#: is still loaded once per process (``benchmarks/bench_pipeline.py`` measures it: on 2 cores
#: the job used 1.65 cores with one bundle, 1.92 with three; two fell in between, closer to
#: one). Memory: up to three batches in the model at once; ``--direct_num_workers 1`` for one.
LOCAL_BUNDLES_IN_FLIGHT = 3

_LOCAL_PARALLELISM_FLAGS = ("direct_num_workers", "direct_running_mode")


def pipeline_options(extra: Sequence[str] = (), **overrides: Any):
    """Beam ``PipelineOptions`` from pass-through flags, with the offline runner pinned.

    Without ``--runner`` the job runs on ``DEFAULT_RUNNER`` (no download, no network), with
    ``LOCAL_BUNDLES_IN_FLIGHT`` bundles in threads unless ``--direct_num_workers`` or
    ``--direct_running_mode`` is given; every other flag is Beam's own. Keyword ``overrides``
    win over the flags.

    Example:
        >>> pipeline_options(["--direct_num_workers", "2",
        ...                   "--direct_running_mode", "multi_processing"])
    """
    from apache_beam.options.pipeline_options import (
        DirectOptions,
        PipelineOptions,
        StandardOptions,
    )

    options = PipelineOptions(list(extra), **overrides)
    if not options.view_as(StandardOptions).runner:
        options.view_as(StandardOptions).runner = DEFAULT_RUNNER
        given = {flag.split("=", 1)[0].lstrip("-") for flag in extra} | set(overrides)
        if not given & set(_LOCAL_PARALLELISM_FLAGS):
            direct = options.view_as(DirectOptions)
            direct.direct_running_mode = "multi_threading"
            direct.direct_num_workers = LOCAL_BUNDLES_IN_FLIGHT
    return options


def beam_option_parser() -> argparse.ArgumentParser:
    """A parser that knows every registered Beam ``PipelineOptions`` flag.

    Beam builds it itself (``PipelineOptions.get_all_options`` hands it to a callback), so
    options that runners register (Dataflow, Flink, Spark, S3, the Dask runner's) are all
    there.

    Example:
        >>> beam_option_parser().parse_known_args(["--runner", "dask", "--x"])[1]
        ['--x']
    """
    from apache_beam.options.pipeline_options import PipelineOptions

    try:  # registers Beam's DaskOptions (--dask_client_address ...) when dask is installed
        import apache_beam.runners.dask.dask_runner  # noqa: F401
    except ImportError:
        pass
    captured: list[argparse.ArgumentParser] = []
    PipelineOptions([]).get_all_options(add_extra_args_fn=captured.append)
    return captured[0]


def _closest(flag: str, parsers: Sequence[argparse.ArgumentParser]) -> str | None:
    known = [
        option
        for parser in parsers
        for action in parser._actions  # argparse keeps its options here
        for option in action.option_strings
        if option.startswith("--")
    ]
    match = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
    if not match:  # --batchsize vs --batch-size: compare without separators too
        bare = {option.replace("-", "").replace("_", ""): option for option in known}
        match = [bare[m] for m in difflib.get_close_matches(
            flag.replace("-", "").replace("_", ""), list(bare), n=1, cutoff=0.6)]
    return match[0] if match else None


def parse_flags(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> tuple[argparse.Namespace, list[str]]:
    """Parses ``argv`` into the command's flags and Beam's, refusing anything else.

    Args:
        parser: The command's own parser.
        argv: The command line (without the program and subcommand).

    Returns:
        ``(args, beam_args)``: the command's parsed flags and the Beam flags, in order.

    Raises:
        SystemExit: Exit status 2, through ``parser.error``, for a flag that neither the
            command nor Beam knows (naming the closest known flag) or a stray positional value.

    Example:
        >>> parse_flags(parser, ["--input", "a.parquet", "--batchsize", "4"])
        # fullgrad run: error: unknown flag --batchsize (did you mean --batch-size?)
    """
    args, rest = parser.parse_known_args(list(argv))
    if not rest:
        return args, []
    beam = beam_option_parser()
    _, unknown = beam.parse_known_args(rest)
    if unknown:
        first = unknown[0]
        if not first.startswith("-"):
            parser.error(f"unexpected value {first!r} (a flag's value without its flag?)")
        flag = first.split("=", 1)[0]
        closest = _closest(flag, [parser, beam])
        hint = f" (did you mean {closest}?)" if closest else ""
        parser.error(
            f"unknown flag {flag}{hint}; it is neither a flag of this command nor a Beam "
            "pipeline option"
        )
    return args, rest
