"""Running the Beam job on Dask: a local cluster's lifecycle and the runner's options.

``fullgrad run --runner dask`` ends up here. With ``--dask_client_address tcp://HOST:PORT``
the job runs on that scheduler's workers (a real multi-node cluster: ``dask scheduler``
on one node, ``dask worker tcp://HOST:8786`` on each, ``fullgrad`` installed everywhere).
Without it, a ``dask.distributed.LocalCluster`` is started on 127.0.0.1 with separate
worker processes talking TCP, exactly as remote workers would, and closed when the job ends.

Example:
    >>> with dask_pipeline_args(["--runner", "dask"], workers=2) as beam_args:
    ...     run_pipeline(beam_args)   # --runner=fullgrad.beam.dask_runner.DaskRunner ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = [
    "DASK_RUNNER_ALIASES",
    "DEFAULT_CONNECT_TIMEOUT_S",
    "RUNNER_NAME",
    "DaskSettings",
    "LocalClusterInfo",
    "add_dask_arguments",
    "connect_client",
    "dask_pipeline_args",
    "is_dask_runner",
    "local_cluster",
    "runner_flag",
]

_LOGGER = logging.getLogger(__name__)

#: The fully qualified name Beam's ``--runner`` flag takes for our Dask runner.
RUNNER_NAME = "fullgrad.beam.dask_runner.DaskRunner"
#: Default seconds to wait for a scheduler before failing (Dask's own default is 30 s).
DEFAULT_CONNECT_TIMEOUT_S = 10

#: ``--runner`` values that select Dask (Beam itself only accepts a class's full name).
DASK_RUNNER_ALIASES = frozenset({"dask", "daskrunner", RUNNER_NAME.lower(),
                                 "apache_beam.runners.dask.dask_runner.daskrunner"})

#: Loggers that report a cluster's orderly shutdown as warnings and tracebacks.
_SHUTDOWN_NOISE = ("distributed.nanny", "distributed.worker", "distributed.core",
                   "distributed.comm", "distributed.batched", "distributed.scheduler",
                   "distributed.client")


def connect_client(address: str | None, timeout: float | None = None, **kwargs: Any):
    """Connects a ``dask.distributed.Client``, failing fast with a clear message.

    Args:
        address: ``tcp://HOST:PORT`` of a running scheduler.
        timeout: Seconds to wait for the scheduler; ``DEFAULT_CONNECT_TIMEOUT_S`` when None.
        **kwargs: Passed on to ``Client`` (``name``, ``connection_limit``...).

    Returns:
        A connected client.

    Raises:
        ConnectionError: When no scheduler answers at ``address`` within ``timeout``.

    Example:
        >>> client = connect_client("tcp://127.0.0.1:8786", timeout=5)
    """
    from dask.distributed import Client

    timeout = DEFAULT_CONNECT_TIMEOUT_S if timeout is None else timeout
    try:
        return Client(address, timeout=timeout, set_as_default=False, **kwargs)
    except (OSError, TimeoutError) as error:
        raise ConnectionError(
            f"No Dask scheduler answered at {address!r} within {timeout} s "
            f"(--dask_connection_timeout). Is the scheduler running and reachable from here? "
            f"({type(error).__name__}: {error})"
        ) from error


@dataclasses.dataclass(frozen=True)
class DaskSettings:
    """The local cluster's shape (unused when ``--dask_client_address`` is given).

    Example:
        >>> DaskSettings(workers=4, threads_per_worker=2)
    """

    workers: int = 2
    threads_per_worker: int = 1
    memory_limit: str | int = "auto"

    @classmethod
    def from_args(cls, args: Any) -> DaskSettings:
        """From ``--dask-workers``, ``--dask-threads-per-worker``, ``--dask-memory-limit``."""
        return cls(args.dask_workers, args.dask_threads_per_worker, args.dask_memory_limit)


@dataclasses.dataclass(frozen=True)
class LocalClusterInfo:
    """What a started local cluster is: its address, worker processes and start-up time."""

    address: str
    worker_pids: dict[str, int]
    threads_per_worker: int
    startup_s: float


def is_dask_runner(runner: str | None) -> bool:
    """Whether a ``--runner`` value asks for Dask.

    Example:
        >>> is_dask_runner("dask"), is_dask_runner("DirectRunner")
        (True, False)
    """
    return bool(runner) and runner.lower() in DASK_RUNNER_ALIASES


def add_dask_arguments(parser) -> None:
    """Adds the local-cluster flags to an ``argparse`` parser.

    ``--dask_client_address`` and ``--dask_connection_timeout`` are Beam's own
    ``DaskOptions``; they pass through to the pipeline options untouched.

    Example:
        >>> add_dask_arguments(parser)   # then --dask-workers 2 --dask-threads-per-worker 1
    """
    group = parser.add_argument_group("Dask (with --runner dask)")
    group.add_argument("--dask-workers", type=int, default=2, metavar="N",
                       help="Worker processes of the local cluster started when no "
                            "--dask_client_address is given (default 2).")
    group.add_argument("--dask-threads-per-worker", type=int, default=1, metavar="M",
                       help="Threads per local worker process (default 1; each thread "
                            "runs one bundle at a time, all share the process's model).")
    group.add_argument("--dask-memory-limit", default="auto", metavar="BYTES",
                       help="Memory limit per local worker, e.g. 4GiB (default: auto).")


@contextlib.contextmanager
def local_cluster(
    workers: int = 2,
    threads_per_worker: int = 1,
    memory_limit: str | int = "auto",
    allowed_failures: int | None = None,
) -> Iterator[LocalClusterInfo]:
    """Starts a ``LocalCluster`` of worker processes on 127.0.0.1 and closes it on exit.

    No dashboard (it would need bokeh and a fixed port); workers are separate processes
    behind nannies, so a crashed worker is restarted and its tasks re-run, as on a real
    cluster. Shutdown warnings from the closing workers are silenced.

    Args:
        workers: Worker processes.
        threads_per_worker: Threads in each worker process.
        memory_limit: Per worker, bytes or a string like ``"4GiB"``; ``"auto"`` splits RAM.
        allowed_failures: How many workers may die running one task before Dask fails the
            job with ``KilledWorker``; None takes ``distributed.scheduler.allowed-failures``
            (3).

    Yields:
        The cluster's address, worker pids and start-up time.

    Example:
        >>> with local_cluster(workers=2) as cluster:
        ...     print(cluster.address)   # tcp://127.0.0.1:40123
    """
    from dask.distributed import LocalCluster

    if workers < 1 or threads_per_worker < 1:
        raise ValueError(f"need at least one worker and one thread, got {workers} x "
                         f"{threads_per_worker}")
    start = time.perf_counter()
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=threads_per_worker,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        # The scheduler still serves /health on HTTP; an ephemeral port on 127.0.0.1 keeps
        # it from taking 8787 (or warning that it is taken) on a shared machine.
        scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0",
                          "allowed_failures": allowed_failures},
        memory_limit=memory_limit,
    )
    try:
        client = connect_client(cluster.scheduler_address)
        try:
            client.wait_for_workers(workers, timeout=120)
            pids = client.run(_pid)
        finally:
            client.close()
        info = LocalClusterInfo(cluster.scheduler_address, dict(pids), threads_per_worker,
                                time.perf_counter() - start)
        _LOGGER.info("Dask LocalCluster at %s: %d worker processes x %d threads, up in %.1f s",
                     info.address, workers, threads_per_worker, info.startup_s)
        yield info
    finally:
        with _quiet(_SHUTDOWN_NOISE):
            _quiet_workers(cluster.scheduler_address)
            cluster.close(timeout=30)


def _quiet_workers(address: str) -> None:
    """Silences the workers' own loggers before a close: a worker whose heartbeat races
    the scheduler's shutdown otherwise prints a traceback, though nothing went wrong."""
    try:
        client = connect_client(address, timeout=5)
    except ConnectionError:
        return
    try:
        client.run(_silence_shutdown_noise)
    except Exception as error:  # noqa: BLE001 - best effort: a dead worker has nothing to say
        _LOGGER.debug("could not quiet the workers before closing: %s", error)
    finally:
        client.close()


def _silence_shutdown_noise() -> None:
    for name in _SHUTDOWN_NOISE:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _pid() -> int:
    import os

    return os.getpid()


@contextlib.contextmanager
def _quiet(names: Sequence[str]) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _flag_value(args: Sequence[str], name: str) -> str | None:
    """The value of ``--name=V`` or ``--name V`` in ``args`` (last one wins), else None."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def runner_flag(beam_args: Sequence[str]) -> str | None:
    """The ``--runner`` value in Beam arguments, or None.

    Example:
        >>> runner_flag(["--runner", "dask", "--dask_npartitions", "8"])
        'dask'
    """
    return _flag_value(beam_args, "--runner")


def _without_flag(args: Sequence[str], name: str) -> list[str]:
    out: list[str] = []
    skip = False
    for i, arg in enumerate(args):
        if skip:
            skip = False
        elif arg == name:
            skip = i + 1 < len(args)
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


@contextlib.contextmanager
def dask_pipeline_args(
    beam_args: Sequence[str], settings: DaskSettings | None = None
) -> Iterator[list[str]]:
    """Turns ``--runner dask`` Beam arguments into ones Beam runs, with a cluster to run on.

    The runner becomes ``fullgrad.beam.dask_runner.DaskRunner``. Without
    ``--dask_client_address`` a local cluster of ``settings`` is started for the duration
    of the block. An address given is checked first, so an unreachable scheduler fails
    here, within ``--dask_connection_timeout`` seconds (default 10), naming the address.

    Args:
        beam_args: Beam pipeline arguments, including ``--runner``.
        settings: The local cluster's shape; ``DaskSettings()`` (2 x 1) when None.

    Yields:
        The arguments to build ``PipelineOptions`` from.

    Raises:
        ConnectionError: The scheduler at ``--dask_client_address`` does not answer.

    Example:
        >>> with dask_pipeline_args(["--runner=dask"], DaskSettings(workers=2)) as args:
        ...     PipelineOptions(args)
    """
    settings = settings or DaskSettings()
    args = _without_flag(list(beam_args), "--runner")
    args.insert(0, f"--runner={RUNNER_NAME}")
    address = _flag_value(args, "--dask_client_address")
    if address:
        timeout_flag = _flag_value(args, "--dask_connection_timeout")
        timeout = int(timeout_flag) if timeout_flag else DEFAULT_CONNECT_TIMEOUT_S
        connect_client(address, timeout=timeout).close()
        yield args
        return
    with local_cluster(settings.workers, settings.threads_per_worker,
                       settings.memory_limit) as cluster:
        yield [*args, f"--dask_client_address={cluster.address}"]
