"""The job over ``s3://``: input, model and output in a bucket, through Beam's S3 filesystem.

The bucket is served by moto's S3 server on 127.0.0.1 (a real HTTP server speaking the S3 API),
and Beam's own ``s3://`` filesystem (``apache-beam[aws]``, boto3) talks to it through the
pipeline flags a user would pass for any S3-compatible store (``--s3_endpoint_url`` ...). The
run's outputs must equal those of the same job on local files.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import boto3
import numpy as np
import pytest
from beamdata import SIZE, build_model, good_rows, read_output, write_parquet, write_tfrecord

from fullgrad.beam import job
from fullgrad.beam.config import JobConfig
from fullgrad.record import read_maps

BUCKET = "fullgrad-test"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """``(boto3 client, Beam flags, request log)`` for a bucket on a local S3 server.

    The log is the server's own: one line per HTTP request it answered (method and path).
    """
    port = _free_port()
    log_path = tmp_path_factory.mktemp("moto") / "server.log"
    log = open(log_path, "wb")  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")
    deadline = time.monotonic() + 60
    while True:
        try:
            client.create_bucket(Bucket=BUCKET)
            break
        except Exception:  # noqa: BLE001 -- the server is still starting
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail(f"the local S3 server did not start (see {log.name})")
            time.sleep(0.3)
    flags = ["--s3_endpoint_url", endpoint, "--s3_access_key_id", "test",
             "--s3_secret_access_key", "test", "--s3_region_name", "us-east-1"]
    yield client, flags, log_path
    server.terminate()
    server.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory, s3):
    """The same rows (one corrupt) as local Parquet and TFRecord files and as S3 objects."""
    client, _, _ = s3
    local = tmp_path_factory.mktemp("local")
    rows = good_rows(6)
    rows[2] = {**rows[2], "image": b"\x89PNG\r\n\x1a\n broken"}
    (local / "in").mkdir()
    write_parquet(str(local / "in" / "part-0.parquet"), rows[:4])
    write_parquet(str(local / "in" / "part-1.parquet"), rows[4:])
    write_tfrecord(str(local / "in" / "part-0.tfrecord"), rows)
    build_model().save(str(local / "model.keras"))
    for name in ("part-0.parquet", "part-1.parquet", "part-0.tfrecord"):
        client.upload_file(str(local / "in" / name), BUCKET, f"in/{name}")
    client.upload_file(str(local / "model.keras"), BUCKET, "models/model.keras")
    return local


def _config(input_: str, model: str, output: str, **overrides) -> JobConfig:
    return JobConfig(input=input_, model=model, output=output, image_size=SIZE,
                     preprocess="unit", batch_size=4, map_dtype="float32", **overrides)


def _download(client, prefix: str, folder) -> list[str]:
    """Copies every object under ``prefix`` into ``folder``; returns their names."""
    os.makedirs(folder, exist_ok=True)
    names = []
    for item in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", []):
        name = item["Key"][len(prefix):]
        names.append(name)
        if "/" not in name:
            client.download_file(BUCKET, item["Key"], os.path.join(folder, name))
    return sorted(names)


@pytest.mark.parametrize("kind", ["parquet", "tfrecord"])
def test_a_run_on_s3_equals_the_same_run_on_local_files(s3, files, tmp_path, kind):
    client, flags, _ = s3
    pattern = "part-*.parquet" if kind == "parquet" else "part-*.tfrecord"
    summary = job.run(
        _config(f"s3://{BUCKET}/in/{pattern}", f"s3://{BUCKET}/models/model.keras",
                f"s3://{BUCKET}/out-{kind}"),
        flags,
    )
    assert (summary["input"], summary["explained"], summary["failed"]) == (6, 5, 1)
    names = _download(client, f"out-{kind}/", tmp_path / "s3")
    assert "summary.json" in names and not any(n.startswith("beam-temp") for n in names)
    local = job.run(_config(str(files / "in" / pattern), str(files / "model.keras"),
                            str(tmp_path / "local")))
    assert local["explained"] == 5
    on_s3, dead_s3 = read_output(str(tmp_path / "s3"))
    on_disk, dead_disk = read_output(str(tmp_path / "local"))
    assert on_s3.column("id").to_pylist() == on_disk.column("id").to_pylist()
    np.testing.assert_array_equal(read_maps(on_s3), read_maps(on_disk))
    assert dead_s3.equals(dead_disk) and dead_s3.column("stage").to_pylist() == ["decode"]
    # `fullgrad audit` over the maps in the bucket, in a fresh process (so with only its own
    # flags to configure the s3:// filesystem), the report written next to them.
    audit = subprocess.run(
        [sys.executable, "-c", "import sys; from fullgrad.cli import main; sys.exit(main())",
         "audit", "--maps", f"s3://{BUCKET}/out-{kind}", *flags],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert audit.returncode == 0, audit.stdout + audit.stderr[-2000:]
    assert "5 images" in audit.stdout
    _download(client, f"out-{kind}/", tmp_path / "audited")
    with open(tmp_path / "audited" / "audit.json") as handle:
        assert json.load(handle)["images"] == 5
    assert (tmp_path / "audited" / "report.html").stat().st_size > 0


def _objects(client, prefix: str = "") -> dict[str, tuple]:
    """``{key: (ETag, LastModified)}`` of every object under ``prefix``."""
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return {item["Key"]: (item["ETag"], item["LastModified"]) for item in listed}


#: Earlier outputs under names a 1-shard rerun never writes, and one file that is not the job's.
STALE = ("maps-00007-of-00009.parquet", "dead_letter-00003-of-00004.parquet",
         "maps-00002-of-00003.tfrecord", "audit.json")


def test_a_rerun_on_s3_is_refused_then_replaced_with_overwrite(s3, files, tmp_path):
    client, flags, _ = s3
    config = _config(f"s3://{BUCKET}/in/part-0.parquet", f"s3://{BUCKET}/models/model.keras",
                     f"s3://{BUCKET}/rerun")
    assert job.run(config, flags)["explained"] == 3
    with pytest.raises(job.JobError, match="--overwrite"):
        job.run(config, flags)
    for name in STALE:
        client.put_object(Bucket=BUCKET, Key=f"rerun/{name}", Body=b"stale")
    client.put_object(Bucket=BUCKET, Key="rerun/notes.txt", Body=b"mine")
    again = job.run(_config(f"s3://{BUCKET}/in/part-1.parquet",
                            f"s3://{BUCKET}/models/model.keras", f"s3://{BUCKET}/rerun",
                            overwrite=True), flags)
    assert again["explained"] == 2
    left = set(_objects(client, "rerun/"))
    assert not {f"rerun/{name}" for name in STALE} & left, sorted(left)
    assert client.get_object(Bucket=BUCKET, Key="rerun/notes.txt")["Body"].read() == b"mine"
    _download(client, "rerun/", tmp_path / "rerun")
    maps, _ = read_output(str(tmp_path / "rerun"))
    assert maps.column("id").to_pylist() == ["img-0004", "img-0005"]  # nothing of run one


def test_a_missing_model_on_s3_fails_before_any_read(s3, files):
    client, flags, log_path = s3
    before = _objects(client)
    assert any(key.startswith("in/") for key in before)  # there is input it could have read
    offset = log_path.stat().st_size
    with pytest.raises(job.JobError, match="model"):
        job.run(_config(f"s3://{BUCKET}/in/*.parquet", f"s3://{BUCKET}/models/none.keras",
                        f"s3://{BUCKET}/never"), flags)
    # A request after the job's, waited for in the server's log, so the job's are logged too.
    client.head_object(Bucket=BUCKET, Key="models/model.keras")
    deadline = time.monotonic() + 30
    while "HEAD /fullgrad-test/models/model.keras" not in log_path.read_text()[offset:]:
        assert time.monotonic() < deadline, "the server did not log the marker request"
        time.sleep(0.1)
    requests = [line for line in log_path.read_text()[offset:].splitlines() if "HTTP/1" in line]
    job_requests = requests[:-1]
    assert job_requests and all("none.keras" in line for line in job_requests), job_requests
    assert _objects(client) == before  # nothing written, moved or rewritten
    assert not _objects(client, "never")


@pytest.mark.parametrize("layout", ["folders", "huggingface"])
def test_class_folders_and_hugging_face_paths_in_a_bucket(s3, tmp_path, layout):
    """Issue 12's layouts in S3: ids, labels and dead letters as on local files."""
    from readerdata import (
        FOLDERS_DEAD,
        FOLDERS_EXPECTED,
        HF_DEAD,
        HF_EXPECTED,
        HF_NAMES,
        check_outputs,
        copy_hf,
        write_class_folders,
    )

    client, flags, _ = s3
    data = tmp_path / "data"
    if layout == "folders":
        write_class_folders(str(data), keras_check=False)
        pattern, fmt, expected, dead = "*/*", "images", FOLDERS_EXPECTED, FOLDERS_DEAD
    else:  # the image paths inside the Parquet files resolve against the bucket folder
        copy_hf(str(data))
        pattern, fmt, expected, dead = "*.parquet", None, HF_EXPECTED, HF_DEAD
    for path in data.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"{layout}/{path.relative_to(data)}")
    build_model().save(str(tmp_path / "model.keras"))
    client.upload_file(str(tmp_path / "model.keras"), BUCKET, f"{layout}-model.keras")
    summary = job.run(
        _config(f"s3://{BUCKET}/{layout}/{pattern}", f"s3://{BUCKET}/{layout}-model.keras",
                f"s3://{BUCKET}/out-{layout}", format=fmt, target="label"),
        flags,
    )
    assert (summary["explained"], summary["failed"]) == (len(expected), len(dead))
    assert summary["class_names"] == HF_NAMES
    _download(client, f"out-{layout}/", tmp_path / "out")
    check_outputs(*read_output(str(tmp_path / "out")), expected, dead)
