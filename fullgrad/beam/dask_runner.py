"""A Beam runner for dask.distributed that keeps Beam's batch semantics.

Beam 2.77 ships ``apache_beam.runners.dask.dask_runner.DaskRunner``. Tried here on a
2-worker ``LocalCluster``, its translation loses data in the shapes a file-writing job
uses (tests/dask/test_dask_runner.py shows the first, second and fourth on the real thing):

- only the last leaf transform is computed, so every other sink silently never runs;
- a multi-output ``ParDo`` (``with_outputs``, ``with_exception_handling``) sends all its
  outputs, main and tagged, mixed into each consumer;
- elements emitted in ``finish_bundle`` are dropped, which loses ``BatchElements``' last
  batch, so ``RunInference`` loses rows;
- a side input is recomputed inside every task that reads it, so ``WriteToParquet``
  initialises a new temporary folder per read and finalises an empty file;
- ``beam.io.Read`` (``ReadFromParquet``, ``ReadFromTFRecord``) becomes a no-op with no data;
- ``setup``/``teardown`` run once per partition, so a model loads once per partition.

This runner reuses Beam's option set (``--dask_client_address`` etc.) and overrides the
translation. Bags carry plain values in the global window: it runs bounded pipelines
with global windowing, which is what a batch job over files is. Each DoFn is
deserialised, set up once per worker thread and reused for every bundle of the same run,
as Beam's own workers do, so ``RunInference`` loads its model once per worker process.

Beam metrics are collected per bundle on the workers and merged on the client, so
``result.metrics()`` works as on the DirectRunner (committed == attempted; a bundle that
Dask re-runs after a lost worker reports once, from the attempt that finished).

Example:
    $ fullgrad run ... --runner dask --dask_client_address tcp://10.0.0.5:8786
    or in Python:
    >>> options = PipelineOptions(runner="fullgrad.beam.dask_runner.DaskRunner",
    ...                           dask_client_address="tcp://127.0.0.1:8786")
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import threading
import uuid
import zlib
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics.execution import MetricsContainer
from apache_beam.pipeline import AppliedPTransform, PipelineVisitor
from apache_beam.runners.common import (
    DoFnContext,
    DoFnInvoker,
    DoFnSignature,
    Receiver,
    _OutputHandler,
)
from apache_beam.runners.dask.dask_runner import DaskOptions
from apache_beam.runners.dask.dask_runner import DaskRunner as _BeamDaskRunner
from apache_beam.runners.dask.overrides import (
    _Create,
    _Flatten,
    _GroupAlsoByWindow,
    _GroupByKeyOnly,
    _Read,
    _Reshuffle,
    dask_overrides,
)
from apache_beam.runners.direct.direct_metrics import DirectMetrics
from apache_beam.runners.runner import PipelineResult, PipelineState
from apache_beam.transforms.sideinputs import SideInputMap
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils.windowed_value import WindowedValue

from fullgrad.beam.dask import RUNNER_NAME, connect_client

__all__ = ["DaskRunner", "DaskRunnerResult"]

_LOGGER = logging.getLogger(__name__)

#: Tag under which a bundle reports its metric updates next to its outputs.
_METRICS_TAG = "__fullgrad_dask_metrics__"
#: Partitions per worker thread when a Reshuffle or a source split spreads the data.
_PARTITIONS_PER_THREAD = 2
#: How many runs' worth of set-up DoFns a worker keeps (a long-lived cluster serves many).
_RUNS_KEPT = 4


# --------------------------------------------------------------------------- worker side
# Set-up DoFns, per worker process: run id -> {(transform label, thread id): DoFn}.
_DOFNS: OrderedDict[str, dict[tuple[str, int], beam.DoFn]] = OrderedDict()
_DOFNS_LOCK = threading.Lock()


def _set_up_dofn(run_id: str, label: str, fresh: beam.DoFn) -> beam.DoFn:
    """Returns this thread's set-up instance of a DoFn, setting ``fresh`` up on first use.

    Beam reuses a DoFn instance across bundles and calls ``setup`` once; a Dask task
    carries its own pickled copy, so without this cache every partition would set up
    (and load a model) again. The oldest runs' DoFns are dropped, not torn down, when
    newer runs arrive: another job may still be using them, and Beam's teardown is
    best effort anyway.
    """
    key = (label, threading.get_ident())
    with _DOFNS_LOCK:
        run = _DOFNS.get(run_id)
        if run is None:
            run = _DOFNS[run_id] = {}
            while len(_DOFNS) > _RUNS_KEPT:
                _DOFNS.popitem(last=False)
        dofn = run.get(key)
    if dofn is None:
        fresh.setup()
        with _DOFNS_LOCK:
            dofn = run.setdefault(key, fresh)
    return dofn


class _Collect(Receiver):
    """Appends ``(tag, value)`` for every output of one tag."""

    def __init__(self, tag: str | None, out: list):
        self.tag = tag
        self.out = out

    def receive(self, windowed_value: WindowedValue) -> None:
        self.out.append((self.tag, windowed_value.value))


class _Receivers(dict):
    """Tag -> receiver, made on first use so undeclared tags still land in ``out``."""

    def __init__(self, out: list):
        super().__init__()
        self.out = out

    def __missing__(self, tag):
        receiver = self[tag] = _Collect(tag, self.out)
        return receiver


def _windowed(value: Any) -> WindowedValue:
    return GlobalWindows.windowed_value(value)


def _run_bundle(
    items: Iterable[Any],
    run_id: str,
    label: str,
    dofn: beam.DoFn,
    args: Sequence[Any],
    kwargs: dict,
    side_specs: Sequence[tuple[Any, dict]],
    *side_values: list,
) -> list[tuple[str | None, Any]]:
    """Runs one Dask partition through a DoFn as one Beam bundle.

    Returns every output as ``(tag, value)`` (main output tag None) and, last, the
    bundle's metric updates under ``_METRICS_TAG``.
    """
    out: list[tuple[str | None, Any]] = []
    receivers = _Receivers(out)
    handler = _OutputHandler(
        window_fn=GlobalWindows(),
        main_receivers=receivers[None],
        tagged_receivers=receivers,
        per_element_output_counter=None,
        output_batch_converter=None,
        process_yields_batches=False,
        process_batch_yields_elements=False,
    )
    side_inputs = [
        SideInputMap(view_class, options, [_windowed(v) for v in values])
        for (view_class, options), values in zip(side_specs, side_values, strict=True)
    ]
    container = MetricsContainer(label)
    with _scoped_metrics(label, container):
        # Set-up metrics (a model load) count with the first bundle that needed it.
        dofn = _set_up_dofn(run_id, label, dofn)
    invoker = DoFnInvoker.create_invoker(
        DoFnSignature(dofn),
        handler,
        context=DoFnContext(label, state=None),
        side_inputs=side_inputs,
        input_args=list(args),
        input_kwargs=dict(kwargs),
        user_state_context=None,
        bundle_finalizer_param=beam.DoFn.BundleFinalizerParam(),
    )
    with _scoped_metrics(label, container):
        invoker.invoke_start_bundle()
        for item in items:
            invoker.invoke_process(_windowed(item))
        # finish_bundle may emit (BatchElements' last batch): collect after it.
        invoker.invoke_finish_bundle()
    out.append((_METRICS_TAG, container.get_cumulative()))
    return out


@contextlib.contextmanager
def _scoped_metrics(label: str, container: MetricsContainer):
    """Makes ``container`` the one Beam's ``Metrics`` calls update in this thread.

    Beam finds the current container through the thread's state sampler, as the
    DirectRunner's executor sets it up. A sampler caches its states by name, with the
    first container it saw, so each bundle gets a fresh sampler.
    """
    from apache_beam.runners.worker import statesampler
    from apache_beam.utils import counters

    previous = statesampler.get_current_tracker()
    sampler = statesampler.StateSampler("", counters.CounterFactory())
    statesampler.set_current_tracker(sampler)
    try:
        with sampler.scoped_state(label, "process", metrics_container=container):
            yield container
    finally:
        statesampler.set_current_tracker(previous)


def _read_bundles(bundles: Iterable[Any]) -> list[Any]:
    values: list[Any] = []
    for bundle in bundles:
        tracker = bundle.source.get_range_tracker(bundle.start_position, bundle.stop_position)
        values.extend(bundle.source.read(tracker))
    return values


def _key_bucket(key: Any, buckets: int) -> int:
    """A bucket for a key that agrees across processes (``hash`` of str/None does not)."""
    import pickle

    return zlib.crc32(pickle.dumps(key, protocol=4)) % buckets


def _split_by_key(partition: Iterable[tuple[Any, WindowedValue]], buckets: int) -> list[list]:
    split: list[list] = [[] for _ in range(buckets)]
    for key, value in partition:
        split[_key_bucket(key, buckets)].append((key, value))
    return split


def _group(pieces: Sequence[list]) -> list[tuple[Any, list]]:
    groups: dict[Any, list] = defaultdict(list)
    for piece in pieces:
        for key, value in piece:
            groups[key].append(value.value if isinstance(value, WindowedValue) else value)
    return list(groups.items())


def _concat(parts: Sequence[list]) -> list:
    return list(itertools.chain.from_iterable(parts))


def _deal(partition: Iterable[Any], hands: int) -> list[list]:
    dealt: list[list] = [[] for _ in range(hands)]
    for index, value in enumerate(partition):
        dealt[index % hands].append(value)
    return dealt


def _has_tag(tag: Any, item: tuple) -> bool:
    return item[0] == tag


def _second(item: tuple) -> Any:
    return item[1]


# --------------------------------------------------------------------------- client side
def _check_batch(node: AppliedPTransform, pcoll: pvalue.PCollection) -> None:
    """Refuses what bags of plain values cannot carry: unbounded input, other windows."""
    if not pcoll.is_bounded:
        raise NotImplementedError(
            f"{RUNNER_NAME} runs bounded pipelines; {node.full_label} is unbounded.")
    windowing = getattr(pcoll, "_windowing", None) or getattr(pcoll, "windowing", None)
    if windowing is not None and not isinstance(windowing.windowfn, GlobalWindows):
        raise NotImplementedError(
            f"{RUNNER_NAME} runs globally windowed pipelines; {node.full_label} is windowed "
            f"by {type(windowing.windowfn).__name__}.")


class _Translator(PipelineVisitor):
    """Turns each primitive transform into a Dask bag, one bag per output PCollection."""

    def __init__(self, run_id: str, bag_kwargs: dict, parallelism: int):
        self.run_id = run_id
        self.bag_kwargs = bag_kwargs
        self.parallelism = max(1, parallelism)
        self.bags: dict[pvalue.PCollection, Any] = {}
        self.metric_bags: list[Any] = []
        self.consumed: set[pvalue.PCollection] = set()

    # Beam calls this for every primitive, producers before consumers.
    def visit_transform(self, node: AppliedPTransform) -> None:
        transform = node.transform
        inputs = [i for i in node.inputs if isinstance(i, pvalue.PCollection)]
        self.consumed.update(inputs)
        self.consumed.update(si.pvalue for si in node.side_inputs)
        input_bags = [self.bags[i] for i in inputs]
        if isinstance(transform, _Create):
            outputs = {None: self._create(list(transform.values))}
        elif isinstance(transform, beam.Impulse):
            outputs = {None: self._create([b""])}
        elif isinstance(transform, _Read):
            outputs = {None: self._read(transform.source)}
        elif isinstance(transform, _Flatten):
            outputs = {None: self._flatten(input_bags)}
        elif isinstance(transform, _GroupByKeyOnly):
            outputs = {None: self._group_by_key(input_bags[0])}
        elif isinstance(transform, (_Reshuffle, _GroupAlsoByWindow)):
            # GroupAlsoByWindow: the global window needs no second grouping step.
            outputs = {None: self._reshuffle(input_bags[0])
                       if isinstance(transform, _Reshuffle) else input_bags[0]}
        elif isinstance(transform, beam.ParDo):
            outputs = self._par_do(node, input_bags[0])
        else:
            raise NotImplementedError(
                f"{RUNNER_NAME} cannot run primitive {type(transform).__name__} "
                f"({node.full_label}); it runs bounded, globally windowed batch pipelines.")
        for tag, pcoll in node.outputs.items():
            _check_batch(node, pcoll)
            self.bags[pcoll] = outputs[tag if tag in outputs else None]

    def leaf_bags(self) -> list[Any]:
        """Bags of the PCollections nobody consumes: the sinks' ends."""
        return [bag for pcoll, bag in self.bags.items() if pcoll not in self.consumed]

    def _create(self, values: list) -> Any:
        import dask.bag as db

        npartitions = self.bag_kwargs.get("npartitions")
        size = self.bag_kwargs.get("partition_size")
        if not npartitions and not size:
            npartitions = min(len(values), self.parallelism) or 1
        return db.from_sequence(values, npartitions=npartitions, partition_size=size)

    def _read(self, source: Any) -> Any:
        import dask.bag as db

        # Split on the client, read on the workers: the same split a Beam worker makes.
        try:
            estimate = source.estimate_size() or 0
        except Exception:  # noqa: BLE001 - an estimate is only a sizing hint
            estimate = 0
        desired = max(1 << 20, math.ceil(estimate / self.parallelism)) if estimate else 64 << 20
        bundles = list(source.split(desired_bundle_size=desired))
        return db.from_sequence(bundles, npartitions=max(1, len(bundles))).map_partitions(
            _read_bundles)

    def _flatten(self, bags: list) -> Any:
        import dask.bag as db

        if not bags:
            return db.from_sequence([], npartitions=1)
        return db.concat(bags)

    def _reshuffle(self, bag: Any) -> Any:
        import dask.bag as db
        from dask import delayed

        # Spread the elements over ``n`` partitions, round robin within each input
        # partition: this lets a single input file fan out to every worker, and no task
        # holds more than one partition's worth of elements.
        n = self.bag_kwargs.get("npartitions") or self.parallelism
        parts = bag.to_delayed(optimize_graph=False)
        split = [delayed(_deal, nout=n)(part, n) for part in parts]
        return db.from_delayed([delayed(_concat)([s[i] for s in split]) for i in range(n)])

    def _group_by_key(self, bag: Any) -> Any:
        import dask.bag as db
        from dask import delayed

        parts = bag.to_delayed(optimize_graph=False)
        buckets = min(self.parallelism, max(1, len(parts)))
        split = [delayed(_split_by_key, nout=buckets)(p, buckets) for p in parts]
        return db.from_delayed(
            [delayed(_group)([s[i] for s in split]) for i in range(buckets)])

    def _par_do(self, node: AppliedPTransform, bag: Any) -> dict:
        from dask import delayed

        transform = node.transform
        args, kwargs = transform.raw_side_inputs
        side_specs = []
        side_values = []
        for si in node.side_inputs:
            side_specs.append((type(si), si._view_options()))
            side_values.append(delayed(_concat)(self.bags[si.pvalue].to_delayed(
                optimize_graph=False)))
        tagged = bag.map_partitions(
            _run_bundle, self.run_id, node.full_label, transform.fn, list(args), dict(kwargs),
            side_specs, *side_values)
        metrics = tagged.filter(functools.partial(_has_tag, _METRICS_TAG))
        self.metric_bags.append(metrics.map(_second))
        outputs = {None: tagged.filter(functools.partial(_has_tag, None)).map(_second)}
        for tag in node.outputs:
            if tag is not None and tag != "None":
                outputs[tag] = tagged.filter(functools.partial(_has_tag, tag)).map(_second)
        return outputs


class DaskRunnerResult(PipelineResult):
    """The running job: its futures, the client, and metrics once it finishes."""

    def __init__(self, client: Any, futures: Sequence[Any], n_leaves: int, owns_client: bool):
        super().__init__(PipelineState.RUNNING)
        self.client = client
        self.futures = list(futures)
        self._n_leaves = n_leaves
        self._owns_client = owns_client
        self._metrics = DirectMetrics()

    def wait_until_finish(self, duration: float | None = None) -> str:
        from dask.distributed import as_completed

        if self._state in (PipelineState.DONE, PipelineState.FAILED):
            return self._state
        try:
            timeout = None if duration is None else duration / 1000
            # Results stay on the workers; only failures and metric updates come back.
            for future in as_completed(self.futures, timeout=timeout, loop=self.client.loop):
                if future.status == "error":
                    future.result()  # raises the task's exception here, with its traceback
            for future in self.futures[self._n_leaves:]:
                for updates in future.result():
                    self._metrics.update_physical(None, updates)
                    self._metrics.commit_logical(None, updates)
            self._state = PipelineState.DONE
        except BaseException:
            self._state = PipelineState.FAILED
            self.client.cancel(self.futures)
            raise
        finally:
            if self._owns_client and self._state in (PipelineState.DONE, PipelineState.FAILED):
                self.client.close()
        return self._state

    def cancel(self) -> str:
        self.client.cancel(self.futures)
        self._state = PipelineState.CANCELLED
        return self._state

    def metrics(self) -> DirectMetrics:
        return self._metrics


class DaskRunner(_BeamDaskRunner):
    """Runs a bounded Beam pipeline on a dask.distributed cluster.

    Takes Beam's Dask options: ``--dask_client_address`` (required: start a cluster with
    ``fullgrad.beam.dask.local_cluster`` or point at one), ``--dask_connection_timeout``
    (seconds, default 10), ``--dask_npartitions``.

    Example:
        >>> with beam.Pipeline(options=PipelineOptions(
        ...         runner=RUNNER_NAME, dask_client_address=address)) as p:
        ...     p | beam.Create(range(10)) | beam.Map(print)
    """

    def run_pipeline(self, pipeline: beam.Pipeline, options: Any) -> DaskRunnerResult:
        import dask

        dask_options = options.view_as(DaskOptions).get_all_options(
            drop_default=True, current_only=True)
        bag_kwargs = DaskOptions._extract_bag_kwargs(dask_options)
        address = dask_options.pop("address", None)
        if not address and not dask_options.get("scheduler_file"):
            raise ValueError(
                "--dask_client_address is required: start a cluster with "
                "fullgrad.beam.dask.local_cluster() or `fullgrad run --runner dask`, "
                "or point at a running scheduler (tcp://HOST:PORT).")
        timeout = dask_options.pop("timeout", None)
        if timeout is dask.config.no_default:
            timeout = None
        client = connect_client(address, timeout=timeout, **dask_options)
        try:
            threads = sum(client.nthreads().values()) or 1
            pipeline.replace_all(dask_overrides())
            translator = _Translator(uuid.uuid4().hex, bag_kwargs,
                                     threads * _PARTITIONS_PER_THREAD)
            pipeline.visit(translator)
            leaves = translator.leaf_bags()
            metric_bags = translator.metric_bags
            # No graph optimisation: fusing would copy a shared upstream task (the
            # write's initialisation, say) into each consumer and run it twice.
            futures = client.compute([*leaves, *metric_bags], optimize_graph=False)
        except BaseException:
            client.close()
            raise
        return DaskRunnerResult(client, futures, len(leaves), owns_client=True)
