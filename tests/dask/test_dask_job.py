"""``fullgrad run --runner dask`` on a real 2-process LocalCluster, against the local runner.

Real Parquet and TFRecord files with bad rows; the outputs (maps, dead letters, summary,
counts, overlays, audit) must equal the local runner's row for row, by id. Maps are compared to
1e-6: a worker batches different images together, which moves float32 sums by an ulp.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import threading
import time

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.metrics.metric import MetricsFilter
from beamdata import (
    SIZE,
    encode,
    good_rows,
    random_image,
    read_output,
    write_parquet,
    write_tfrecord,
)

from fullgrad.beam import job
from fullgrad.beam.config import JobConfig
from fullgrad.beam.dask import RUNNER_NAME
from fullgrad.beam.io import safe_file_name
from fullgrad.beam.options import pipeline_options
from fullgrad.record import read_maps


def _config(data: str, pattern: str, output: str, model_path: str, **overrides) -> JobConfig:
    settings = {"input": os.path.join(data, pattern), "model": model_path, "output": output,
                "image_size": SIZE, "preprocess": "unit", "batch_size": 4,
                "map_dtype": "float32", "overlays": 4, "progress_every": 0}
    settings.update(overrides)
    return JobConfig(**settings)


def _dask_args(cluster) -> list[str]:
    return ["--runner", "dask", f"--dask_client_address={cluster.address}"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """20 good images and 5 bad rows over Parquet files; 8 good + 3 bad TFRecord records."""
    folder = tmp_path_factory.mktemp("data")
    png = encode(random_image(50))
    bad = [
        {"id": "../../x", "image": png, "label": 1, "mask": None},  # fine, but a hostile id
        {"id": "empty", "image": b"", "label": 1, "mask": None},
        {"id": "corrupt", "image": png[:80], "label": 1, "mask": None},
        {"id": None, "image": png, "label": 1, "mask": None},
        {"id": "text", "image": b"<html>not an image</html>", "label": 2, "mask": None},
    ]
    rows = good_rows(20) + bad
    write_parquet(str(folder / "a.parquet"), rows[:13], row_group_size=4)
    write_parquet(str(folder / "b.parquet"), rows[13:], row_group_size=5)
    (folder / "c.parquet").write_bytes(b"PAR1 not parquet at all")
    records = good_rows(8, start=100) + [
        {"id": "no-image", "label": 1},
        {"id": "jpeg-junk", "image": b"\xff\xd8\xff\xe0 broken", "label": 1},
        {"id": "../escape", "image": png, "label": 0},
    ]
    write_tfrecord(str(folder / "a.tfrecord"), records[:6])
    write_tfrecord(str(folder / "b.tfrecord"), records[6:])
    return str(folder)


@pytest.fixture(scope="module")
def local_parquet(data, model_path, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("local") / "out")
    summary = job.run(_config(data, "*.parquet", output, model_path, audit=True))
    return output, summary


def _assert_close(got, want, path="audit") -> None:
    """Equal JSON, numbers to 1e-5 (float32 sums depend on batch composition)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), path
        for key in want:
            _assert_close(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_close(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), path
    else:
        assert got == want, path


def _assert_same_outputs(local: str, on_dask: str) -> None:
    local_maps, local_dead = read_output(local)
    dask_maps, dask_dead = read_output(on_dask)
    assert dask_maps.column("id").to_pylist() == local_maps.column("id").to_pylist()
    for column in ("target", "label", "topk_classes", "thumbnail", "mask"):
        assert dask_maps.column(column).equals(local_maps.column(column)), column
    for column in ("logit", "residual"):
        np.testing.assert_allclose(dask_maps.column(column).to_numpy(),
                                   local_maps.column(column).to_numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.array(dask_maps.column("topk_logits").to_pylist()),
        np.array(local_maps.column("topk_logits").to_pylist()), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(read_maps(dask_maps), read_maps(local_maps), atol=1e-6)
    assert dask_dead.equals(local_dead)
    summaries = []
    for folder in (local, on_dask):
        with open(os.path.join(folder, "summary.json")) as handle:
            summary = json.load(handle)
        summaries.append({k: summary[k] for k in ("input", "explained", "failed",
                                                   "failed_by_stage", "files")})
    assert summaries[0] == summaries[1]
    with open(os.path.join(local, "overlays", "index.json")) as a, \
            open(os.path.join(on_dask, "overlays", "index.json")) as b:
        assert json.load(a) == json.load(b)
    assert not [n for n in os.listdir(on_dask) if n.startswith("beam-temp")]


def test_parquet_run_equals_the_local_runner_and_ids_stay_inside(
        cluster, client, data, model_path, local_parquet, tmp_path):
    local, local_summary = local_parquet
    assert (local_summary["input"], local_summary["explained"]) == (26, 21)
    output = str(tmp_path / "out")
    summary = job.run(_config(data, "*.parquet", output, model_path, audit=True),
                      _dask_args(cluster))
    _assert_same_outputs(local, output)
    # The audit (Beam combiners over the explained records) agrees too.
    with open(os.path.join(local, "audit.json")) as a, \
            open(os.path.join(output, "audit.json")) as b:
        local_audit, dask_audit = json.load(a), json.load(b)
    _assert_close(dask_audit, local_audit)
    assert (summary["input"], summary["explained"], summary["failed"]) == (26, 21, 5)
    # Beam metrics come back from the Dask workers: the same counts as locally, and the
    # model loaded once per worker process at most (2 here), not once per bundle.
    local_metrics, metrics = local_summary["metrics"], summary["metrics"]
    assert metrics["images_explained"] == local_metrics["images_explained"] == 21
    assert metrics["failures_decode"] == local_metrics["failures_decode"]
    assert local_metrics["model_loads"] == 1 and 1 <= metrics["model_loads"] <= 2
    # The hostile id "../../x" is explained and stays data: its overlay is inside overlays/.
    maps, _ = read_output(output)
    assert "../../x" in maps.column("id").to_pylist()
    assert os.path.isfile(os.path.join(output, "overlays", safe_file_name("../../x")))
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert not os.path.exists(os.path.join(os.path.dirname(output), "..", "x"))


def test_tfrecord_run_equals_the_local_runner_and_loads_the_model_once_per_worker(
        cluster, client, data, model_path, tmp_path):
    local = str(tmp_path / "local")
    job.run(_config(data, "*.tfrecord", local, model_path, overlays=0))
    # Build the job's pipeline directly to read the handler's model_loads metric.
    config = _config(data, "*.tfrecord", str(tmp_path / "dask"), model_path, overlays=0,
                     batch_size=2)
    config.num_classes, config.channels = job.check_model(config)
    job.prepare_output(config)
    options = pipeline_options([f"--runner={RUNNER_NAME}",
                                f"--dask_client_address={cluster.address}",
                                "--dask_npartitions=6"])
    pipeline = beam.Pipeline(options=options)
    outputs = job.build_pipeline(pipeline, config)
    del outputs
    result = pipeline.run()
    result.wait_until_finish()
    loads = result.metrics().query(MetricsFilter().with_name("model_loads"))["counters"]
    inferences = result.metrics().query(MetricsFilter().with_name("num_inferences"))["counters"]
    # 9 decodable images in 6 bundles (batches of 2) over 2 worker processes x 1 thread:
    # Beam's own DaskRunner would load once per bundle; we load once per process.
    assert sum(m.committed for m in inferences) == 9
    assert 1 <= sum(m.committed for m in loads) <= 2
    local_maps, local_dead = read_output(local)
    dask_maps, dask_dead = read_output(str(tmp_path / "dask"))
    assert dask_maps.column("id").to_pylist() == local_maps.column("id").to_pylist()
    assert "../escape" in dask_maps.column("id").to_pylist()
    np.testing.assert_allclose(read_maps(dask_maps), read_maps(local_maps), atol=1e-6)
    assert dask_dead.equals(local_dead)
    assert sorted(dask_dead.column("id").to_pylist()) == ["jpeg-junk", "no-image"]


def _kill_a_busy_worker(client, done: threading.Event, killed: list) -> None:
    """Kills (SIGKILL) a worker that the scheduler has had running the same Beam bundle for
    0.3 s, checked again just before the kill; records the worker, its pid and those bundles."""
    pids = client.run(os.getpid)
    while not done.is_set():
        for worker, keys in client.processing().items():
            bundles = {str(key) for key in keys if "_run_bundle" in str(key)}
            if not bundles:
                continue
            time.sleep(0.3)
            if done.is_set():
                return
            still = bundles & {str(key) for key in client.processing().get(worker, ())}
            if still:
                os.kill(pids[worker], signal.SIGKILL)
                killed.append({"pid": pids[worker], "worker": worker, "bundles": still,
                               "at": time.perf_counter()})
                return
        time.sleep(0.05)


def _transitions(dask_scheduler) -> list[tuple[str, str, str, str]]:
    """The scheduler's transition log as (key, from, to, stimulus id); runs on the scheduler."""
    return [(str(t.key), t.start, t.finish, t.stimulus_id) for t in dask_scheduler.transition_log]


def test_a_worker_killed_mid_run_is_replaced_and_no_row_is_lost_or_doubled(
        cluster, client, data, model_path, local_parquet, tmp_path):
    local, _ = local_parquet
    output = str(tmp_path / "out")
    done, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_a_busy_worker, args=(client, done, killed))
    killer.start()
    try:
        job.run(_config(data, "*.parquet", output, model_path), _dask_args(cluster))
    finally:
        finished = time.perf_counter()
        done.set()
        killer.join()
    assert killed and killed[0]["at"] < finished, "no worker was killed while the job ran"
    client.wait_for_workers(2, timeout=120)
    assert killed[0]["pid"] not in client.run(os.getpid).values()  # the nanny started a new one
    # The scheduler's own record: a bundle it had on the killed worker went from processing
    # back to released when that worker's connection dropped, and was then run again to the
    # end (processing -> memory) on a live worker.
    log = client.run_on_scheduler(_transitions)
    lost = {key: index for index, (key, start, finish, stimulus) in enumerate(log)
            if key in killed[0]["bundles"] and (start, finish) == ("processing", "released")
            and stimulus.startswith("handle-worker-cleanup")}
    assert lost, f"no bundle of {killed[0]['bundles']} was lost with worker {killed[0]['worker']}"
    rerun = [key for key, index in lost.items()
             if any(k == key and (start, finish) == ("processing", "memory")
                    for k, start, finish, _ in log[index + 1:])]
    assert rerun == list(lost), "a lost bundle was not run again to completion"
    # Dask re-ran the lost tasks: the same rows, each exactly once.
    _assert_same_outputs(local, output)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_with_an_unreachable_scheduler_fails_fast_and_writes_nothing(
        data, model_path, tmp_path, capsys):
    address = f"tcp://127.0.0.1:{_free_port()}"
    parser = argparse.ArgumentParser()
    job.add_arguments(parser)
    args, extra = parser.parse_known_args([
        "--input", os.path.join(data, "*.parquet"), "--model", model_path,
        "--output", str(tmp_path / "out"), "--image-size", str(SIZE),
        "--runner", "dask", "--dask_client_address", address, "--dask_connection_timeout", "2",
    ])
    start = time.perf_counter()
    assert job.main(args, extra) == 2
    assert time.perf_counter() - start < 30  # model check + a 2 s connect timeout
    error = capsys.readouterr().err
    assert f"No Dask scheduler answered at '{address}' within 2 s" in error
    assert not os.listdir(tmp_path / "out")


def test_cli_flags_select_dask_and_size_the_local_cluster():
    from fullgrad.beam.dask import DaskSettings, is_dask_runner, runner_flag

    parser = argparse.ArgumentParser()
    job.add_arguments(parser)
    args, extra = parser.parse_known_args(
        ["--input", "x", "--model", "m", "--output", "o", "--runner", "dask",
         "--dask-workers", "3", "--dask-threads-per-worker", "2",
         "--dask-memory-limit", "4GiB", "--dask_npartitions", "8"])
    assert DaskSettings.from_args(args) == DaskSettings(3, 2, "4GiB")
    # Beam's own Dask flags are not ours: they pass through to the pipeline options.
    assert extra == ["--runner", "dask", "--dask_npartitions", "8"]
    assert is_dask_runner(runner_flag(extra))
    # Without the flags, the local cluster is 2 processes x 1 thread, memory split by Dask.
    defaults, extra = parser.parse_known_args(
        ["--input", "x", "--model", "m", "--output", "o", "--runner=DaskRunner"])
    assert DaskSettings.from_args(defaults) == DaskSettings(2, 1, "auto")
    assert runner_flag(extra) == "DaskRunner" and is_dask_runner("DaskRunner")
    assert not is_dask_runner(runner_flag(["--runner", "DirectRunner"]))
    assert not is_dask_runner(runner_flag([]))


def test_when_dask_gives_up_on_a_killed_worker_the_run_fails_and_looks_incomplete(
        data, model_path, tmp_path):
    from dask.distributed import KilledWorker

    from fullgrad.beam.dask import connect_client, local_cluster

    output = str(tmp_path / "out")
    # allowed_failures=0: the first worker death fails its tasks instead of re-running them.
    with local_cluster(workers=2, threads_per_worker=1, allowed_failures=0) as strict:
        client = connect_client(strict.address)
        done, killed = threading.Event(), []
        killer = threading.Thread(target=_kill_a_busy_worker, args=(client, done, killed))
        killer.start()
        try:
            with pytest.raises(KilledWorker, match="workers died while running it"):
                job.run(_config(data, "*.parquet", output, model_path),
                        ["--runner", "dask", f"--dask_client_address={strict.address}"])
        finally:
            done.set()
            killer.join()
            client.close()
    assert killed
    # No summary.json (written only after the whole pipeline finished): the folder is
    # recognisably incomplete. Whatever else is there is Beam's temporary files or sinks
    # that had finished before the kill.
    left = os.listdir(output)
    assert "summary.json" not in left
    assert all(n.startswith(("beam-temp-", "maps-", "dead_letter-", "overlays")) for n in left)


def test_the_cli_starts_and_closes_its_own_cluster_quietly(data, model_path, local_parquet,
                                                          tmp_path):
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    output = str(tmp_path / "out")
    command = [sys.executable, "-m", "fullgrad.cli", "run",
               "--input", os.path.join(data, "*.parquet"), "--model", model_path,
               "--output", output, "--image-size", str(SIZE), "--preprocess", "unit",
               "--batch-size", "4", "--map-dtype", "float32", "--overlays", "4",
               "--progress-every", "0", "--runner", "dask", "--dask-workers", "2",
               "--dask-threads-per-worker", "1"]
    env = {**os.environ, "PYTHONPATH": repo, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_outputs(local_parquet[0], output)
    assert "Dask LocalCluster at tcp://127.0.0.1:" in done.stderr
    # A clean close: no tracebacks or shutdown warnings from the workers.
    for noise in ("Traceback", "CommClosedError", "still alive", "Port 8787"):
        assert noise not in done.stderr, done.stderr[-3000:]
