"""Dask vs the local multi-process runner: throughput of ``fullgrad run`` on the same data.

Runs the job three ways on the same Parquet files and tiny CNN, side by side in one process:

1. Beam's local runner in 2 processes (``--direct_num_workers 2
   --direct_running_mode multi_processing``);
2. Dask, 2 worker processes x 1 thread, on a LocalCluster started beforehand (the
   steady state a long-lived cluster gives);
3. the same through ``--runner dask`` with no address, so the one-off cost of starting and
   closing the LocalCluster is included.

Prints images/s of each and the ratio Dask / local. Each job run includes the per-worker
model load and FullGrad tracing, as a real job does.

Example:
    $ PYTHONPATH=. python benchmarks/bench_dask.py --images 160
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _dataset(folder: str, images: int, size: int, files: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(images):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, [size, size, 3], dtype=np.uint8)).save(buffer, "PNG")
        rows.append({"id": f"img-{i:05d}", "image": buffer.getvalue(), "label": i % 5})
    per_file = -(-images // files)
    for f in range(files):
        chunk = rows[f * per_file:(f + 1) * per_file]
        pq.write_table(pa.Table.from_pylist(chunk), os.path.join(folder, f"part-{f}.parquet"),
                       row_group_size=16)


def _model(path: str, size: int) -> None:
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input([size, size, 3])
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(5, activation="softmax")(x)).save(path)


def _run(config_kwargs: dict, output: str, extra: list[str], dask=None) -> tuple[float, int]:
    from fullgrad.beam import job
    from fullgrad.beam.config import JobConfig

    shutil.rmtree(output, ignore_errors=True)
    start = time.perf_counter()
    summary = job.run(JobConfig(output=output, **config_kwargs), extra, dask=dask)
    return time.perf_counter() - start, summary["explained"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    import logging

    from fullgrad.beam.dask import DaskSettings, local_cluster

    for name in ("distributed", "distributed.scheduler", "distributed.core", "distributed.nanny",
                 "distributed.http.proxy", "distributed.worker"):
        logging.getLogger(name).setLevel(logging.WARNING)

    work = tempfile.mkdtemp(prefix="bench_dask_")
    data = os.path.join(work, "in")
    os.makedirs(data)
    _dataset(data, args.images, args.size, args.files)
    model = os.path.join(work, "model.keras")
    _model(model, args.size)
    config = {"input": os.path.join(data, "*.parquet"), "model": model,
              "image_size": args.size, "preprocess": "unit", "batch_size": args.batch_size,
              "progress_every": 0}
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from machine import machine_line

    print(machine_line())
    print(f"{args.images} images {args.size}x{args.size}, {args.files} Parquet files, "
          f"batch {args.batch_size}, {os.cpu_count()} CPUs")

    local_s, n = _run(config, os.path.join(work, "local"),
                      ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"])
    print(f"local runner, 2 processes:          {local_s:7.1f} s  {n / local_s:7.2f} images/s")

    with local_cluster(workers=2, threads_per_worker=1) as cluster:
        startup_s = cluster.startup_s
        dask_s, n2 = _run(config, os.path.join(work, "dask"),
                          ["--runner", "dask", f"--dask_client_address={cluster.address}"])
        close_start = time.perf_counter()
    close_s = time.perf_counter() - close_start
    print(f"dask, 2 workers x 1 thread (warm):  {dask_s:7.1f} s  {n2 / dask_s:7.2f} images/s")

    cold_s, n3 = _run(config, os.path.join(work, "dask-cold"), ["--runner", "dask"],
                      dask=DaskSettings(workers=2, threads_per_worker=1))
    print(f"dask incl. cluster start and close: {cold_s:7.1f} s  {n3 / cold_s:7.2f} images/s")
    assert n == n2 == n3 == args.images, (n, n2, n3)
    print(f"LocalCluster start-up: {startup_s:.1f} s, close: {close_s:.1f} s")
    print(f"throughput ratio dask/local (warm cluster): {local_s / dask_s:.2f}")
    print(f"throughput ratio dask/local (incl. start):  {local_s / cold_s:.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
