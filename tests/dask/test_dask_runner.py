"""The Dask runner against Beam's local runner, on a real 2-process LocalCluster.

Each pipeline shape here is one that Beam 2.77's own DaskRunner gets wrong (see the module
docstring of ``fullgrad.beam.dask_runner``): several sinks, tagged outputs, output from
``finish_bundle``, side inputs feeding file writes, ``beam.io.Read`` sources, set-up per
bundle. The outputs must equal the local runner's.
"""

from __future__ import annotations

import glob
import os
import socket
import time

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from fullgrad.beam.dask import RUNNER_NAME, connect_client, dask_pipeline_args
from fullgrad.beam.options import DEFAULT_RUNNER


class _Split(beam.DoFn):
    """Multiples of 7 go to a tagged output; marks each set-up with a file per process."""

    def __init__(self, marks: str):
        self._marks = marks

    def setup(self):
        path = os.path.join(self._marks, f"setup-{os.getpid()}-{time.time_ns()}")
        open(path, "w").close()

    def process(self, row):
        Metrics.counter("test", "rows").inc()
        if row["v"] % 7 == 0:
            yield beam.pvalue.TaggedOutput("sevens", row["id"])
        else:
            yield row


def _pipeline(options: PipelineOptions, data: str, out: str, read_all: bool):
    p = beam.Pipeline(options=options)
    if read_all:
        rows = (p | beam.Create([os.path.join(data, "*.parquet")])
                | beam.io.ReadAllFromParquet() | beam.Reshuffle())
    else:
        rows = p | beam.io.ReadFromParquet(os.path.join(data, "*.parquet"))
    marks = os.path.join(out, "marks")
    os.makedirs(marks)
    split = rows | beam.ParDo(_Split(marks)).with_outputs("sevens", main="rest")
    _ = split.rest | "Ids" >> beam.Map(lambda r: r["id"]) | "A" >> beam.io.WriteToText(out + "/a")
    _ = split.sevens | "B" >> beam.io.WriteToText(out + "/b")
    values = split.rest | "V" >> beam.Map(lambda r: r["v"])
    total = values | "Sum" >> beam.CombineGlobally(sum)
    _ = total | "S" >> beam.Map(str) | "C" >> beam.io.WriteToText(out + "/c")
    # BatchElements emits its last batch in finish_bundle.
    batched = values | beam.BatchElements(min_batch_size=3, max_batch_size=3)
    _ = (batched | "Len" >> beam.Map(len) | "SumLen" >> beam.CombineGlobally(sum)
         | "S2" >> beam.Map(str) | "D" >> beam.io.WriteToText(out + "/d"))
    # A side input read in another branch.
    _ = (split.sevens | "Pair" >> beam.Map(lambda i, t: f"{i}:{t}", beam.pvalue.AsSingleton(total))
         | "E" >> beam.io.WriteToText(out + "/e"))
    return p


def _lines(out: str, prefix: str) -> list[str]:
    lines = []
    for path in glob.glob(os.path.join(out, f"{prefix}-*-of-*")):
        with open(path) as handle:
            lines += handle.read().split()
    return sorted(lines)


def _run(options, data, out, read_all):
    result = _pipeline(options, data, out, read_all).run()
    result.wait_until_finish()
    rows = result.metrics().query(MetricsFilter().with_name("rows"))["counters"]
    return {p: _lines(out, p) for p in "abcde"}, sum(r.committed for r in rows)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    for part in range(3):
        ids = range(part * 30, part * 30 + 30)
        table = pa.table({"id": [f"r{i:03d}" for i in ids], "v": list(ids)})
        pq.write_table(table, folder / f"part-{part}.parquet", row_group_size=7)
    return str(folder)


@pytest.mark.parametrize("read_all", [True, False], ids=["ReadAllFromParquet", "ReadFromParquet"])
def test_every_sink_tag_and_batch_equals_the_local_runner(client, cluster, data, tmp_path,
                                                          read_all):
    local, local_rows = _run(PipelineOptions([f"--runner={DEFAULT_RUNNER}"]), data,
                             str(tmp_path / "local"), read_all)
    dask_options = PipelineOptions([f"--runner={RUNNER_NAME}",
                                    f"--dask_client_address={cluster.address}"])
    on_dask, dask_rows = _run(dask_options, data, str(tmp_path / "dask"), read_all)
    sevens = [f"r{i:03d}" for i in range(0, 90, 7)]
    assert local["b"] == sevens and len(local["a"]) == 90 - len(sevens)
    assert local["c"] == [str(sum(i for i in range(90) if i % 7))]
    assert local["d"] == [str(90 - len(sevens))]
    assert on_dask == local
    # Beam metrics are collected from the workers.
    assert dask_rows == local_rows == 90
    # Beam's temporary write folders are finalised and removed, once each.
    assert not glob.glob(str(tmp_path / "dask" / "beam-temp-*"))


def test_setup_runs_once_per_worker_process_not_per_bundle(client, cluster, data, tmp_path):
    options = PipelineOptions([f"--runner={RUNNER_NAME}",
                               f"--dask_client_address={cluster.address}",
                               "--dask_npartitions=12"])
    out = str(tmp_path / "dask")
    _run(options, data, out, read_all=True)
    setups = os.listdir(os.path.join(out, "marks"))
    pids = {name.split("-")[1] for name in setups}
    worker_pids = {str(pid) for pid in client.run(os.getpid).values()}
    # 12 bundles, 2 worker processes with one thread each: one set-up per process.
    assert pids <= worker_pids
    assert len(setups) == len(pids) <= 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_scheduler_fails_fast_naming_the_address():
    address = f"tcp://127.0.0.1:{_free_port()}"
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match=f"No Dask scheduler answered at '{address}'"):
        connect_client(address, timeout=2)
    assert time.perf_counter() - start < 10
    start = time.perf_counter()
    args = ["--runner", "dask", f"--dask_client_address={address}", "--dask_connection_timeout=2"]
    with pytest.raises(ConnectionError, match="--dask_connection_timeout"), \
            dask_pipeline_args(args):
        pass
    assert time.perf_counter() - start < 10


def test_the_runner_refuses_to_start_its_own_unmanaged_cluster():
    options = PipelineOptions([f"--runner={RUNNER_NAME}"])
    with pytest.raises(ValueError, match="--dask_client_address is required"):
        beam.Pipeline(options=options).__enter__().run()


def test_runner_arguments_are_rewritten_and_an_address_is_kept(cluster):
    with dask_pipeline_args(["--runner", "dask", "--dask_client_address", cluster.address,
                             "--dask_npartitions=4"]) as args:
        assert args == [f"--runner={RUNNER_NAME}", "--dask_client_address", cluster.address,
                        "--dask_npartitions=4"]


def test_beams_own_dask_runner_still_mixes_outputs_and_loses_sinks(client, cluster, data,
                                                                   tmp_path):
    """Why this project has its own runner; if this starts failing, Beam fixed it."""
    options = PipelineOptions(["--runner=apache_beam.runners.dask.dask_runner.DaskRunner",
                               f"--dask_client_address={cluster.address}"])
    # The tagged output ("sevens", plain ids) reaches the main output's consumer, which
    # expects rows.
    result = _pipeline(options, data, str(tmp_path / "mixed"), read_all=True).run()
    try:
        with pytest.raises(TypeError, match="string indices"):
            result.wait_until_finish()
    finally:
        result.client.close()
    # Two sinks: only the one applied last is computed, and it writes an empty file: each
    # read of the write's side inputs re-ran its initialisation (three temporary folders).
    out = str(tmp_path / "sinks")
    p = beam.Pipeline(options=options)
    numbers = p | beam.Create([str(i) for i in range(10)])
    _ = numbers | "First" >> beam.io.WriteToText(out + "/first")
    _ = numbers | "Last" >> beam.io.WriteToText(out + "/last")
    result = p.run()
    try:
        result.wait_until_finish()
    finally:
        result.client.close()
    assert not glob.glob(os.path.join(out, "first-*"))
    assert glob.glob(os.path.join(out, "last-*")) and _lines(out, "last") == []
    assert len(glob.glob(os.path.join(out, "beam-temp-last-*"))) > 1
