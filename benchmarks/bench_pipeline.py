"""Benchmark: the Beam job against the raw FullGrad engine, and its memory as data grows.

Prints two ratios, measured side by side in one run on the same model and batch size:

1. throughput: end-to-end images/s of ``fullgrad run`` (Parquet of PNGs -> maps Parquet, on the
   default local runner) / images/s of ``FullGrad.compute`` on the already decoded and
   preprocessed images. Target >= 0.8. The job's rate is its steady-state (marginal) rate,
   ``(4N - N) / (T(4N) - T(N))``, so the one-off costs (Python and TF start-up, model load and
   tracing) that a real job pays once per worker do not count; the raw wall-clock rate at 4N is
   printed too.
2. memory: peak RSS of the job over 4N images / over N images. Target <= 1.15: memory does not
   grow with the data.

Every measurement runs in its own subprocess (fresh interpreter; peak RSS from
``resource.getrusage``). On a shared machine the load drifts, so the engine is timed between
the job runs (before, between and after, five times) and each job size runs twice; the ratio
uses the best of each (load only ever slows a run down), which is conservative for the job:
its best run is compared with the engine's best.

Example:
    $ python benchmarks/bench_pipeline.py --images 256 --image-size 96 --batch-size 32
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_model(size: int, classes: int = 10):
    """A small VGG-like ReLU CNN: compute per image dominates like in a real classifier."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input([size, size, 3])
    x = inputs
    for filters in (16, 32, 64):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(classes, activation="softmax")(x))


def write_dataset(folder: str, count: int, size: int, seed: int = 0) -> None:
    """``count`` PNGs (smooth random pictures at ``size``) in Parquet files of 128 rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for start in range(0, count, 128):
        rows = []
        for index in range(start, min(start + 128, count)):
            small = rng.integers(0, 256, [8, 8, 3], dtype=np.uint8)
            picture = Image.fromarray(small).resize((size, size), Image.BILINEAR)
            buffer = io.BytesIO()
            picture.save(buffer, format="PNG")
            rows.append({"id": f"img-{index:07d}", "image": buffer.getvalue()})
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(folder, f"part-{start:07d}.parquet"))


def _child(argv: list[str]) -> dict:
    """Runs this script in ``--child`` mode in a fresh interpreter; returns its JSON line."""
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", *argv],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child_engine(model: str, data: str, size: int, batch: int) -> dict:
    """The engine alone on decoded, preprocessed images (decoding is not timed)."""
    import glob

    import keras
    import numpy as np
    import pyarrow.parquet as pq

    import fullgrad as ke
    from fullgrad.images import decode_image, preprocess

    images = []
    for path in sorted(glob.glob(os.path.join(data, "*.parquet"))):
        images += [decode_image(b, (size, size)) for b in pq.read_table(path)["image"].to_pylist()]
    x = preprocess(np.stack(images), "unit")
    engine = ke.FullGrad(keras.saving.load_model(model, compile=False))
    engine.compute(x[:batch], np.full([batch, 1], -1))  # trace, as the handler does at load
    start = time.perf_counter()
    for begin in range(0, len(x), batch):
        engine.compute(x[begin : begin + batch], np.full([len(x[begin : begin + batch]), 1], -1))
    wall = time.perf_counter() - start
    return {"images": len(x), "wall_s": wall, "images_per_s": len(x) / wall}


def child_job(model: str, data: str, size: int, batch: int, output: str) -> dict:
    """The whole job, in this process (the default in-memory local runner)."""
    from fullgrad.beam.job import JobConfig, run

    config = JobConfig(
        input=os.path.join(data, "*.parquet"), model=model, output=output, image_size=size,
        preprocess="unit", batch_size=batch, map_size=size // 4, map_dtype="uint8",
        progress_every=0, overwrite=True,
    )
    start = time.perf_counter()
    summary = run(config)
    wall = time.perf_counter() - start
    return {"images": summary["explained"], "failed": summary["failed"], "wall_s": wall,
            "peak_rss_mb": _peak_rss_mb()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="N; the large run uses 4N")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        size, batch = int(rest[2]), int(rest[3])
        if kind == "engine":
            result = child_engine(rest[0], rest[1], size, batch)
        else:
            result = child_job(rest[0], rest[1], size, batch, rest[4])
        print(json.dumps(result))
        return 0

    work = tempfile.mkdtemp(prefix="fullgrad-bench-")
    model = os.path.join(work, "model.keras")
    build_model(args.image_size).save(model)
    small, large = os.path.join(work, "data-1x"), os.path.join(work, "data-4x")
    write_dataset(small, args.images, args.image_size)
    write_dataset(large, 4 * args.images, args.image_size)
    common = [str(args.image_size), str(args.batch_size)]

    rates, jobs = [], {}
    for name, data in (("1x", small), ("4x", large), ("1x", small), ("4x", large)):
        rates.append(_child(["engine", model, large, *common])["images_per_s"])
        result = _child(["job", model, data, *common, os.path.join(work, f"out-{name}")])
        assert result["failed"] == 0, result
        jobs.setdefault(name, []).append(result)
    rates.append(_child(["engine", model, large, *common])["images_per_s"])
    engine = max(rates)
    # Best of two per size: the load of a shared machine only ever slows a run down.
    one = min(jobs["1x"], key=lambda r: r["wall_s"])
    four = min(jobs["4x"], key=lambda r: r["wall_s"])
    marginal = (four["images"] - one["images"]) / (four["wall_s"] - one["wall_s"])
    raw = four["images"] / four["wall_s"]
    print(f"model: {args.image_size}x{args.image_size} VGG-like CNN, batch {args.batch_size}, "
          f"N = {args.images}, cpus = {os.cpu_count()}")
    print(f"engine:            {engine:8.1f} images/s  (runs: "
          + ", ".join(f"{r:.1f}" for r in rates) + ")")
    print(f"job, steady state: {marginal:8.1f} images/s  "
          f"(1x: {one['wall_s']:.1f} s, 4x: {four['wall_s']:.1f} s)")
    print(f"job, wall at 4x:   {raw:8.1f} images/s (start-up included)")
    print(f"throughput ratio (job steady state / engine): {marginal / engine:.3f}  target >= 0.8")
    print(f"throughput ratio (job wall at 4x / engine):   {raw / engine:.3f}")
    rss_1x = max(r["peak_rss_mb"] for r in jobs["1x"])
    rss_4x = max(r["peak_rss_mb"] for r in jobs["4x"])
    print(f"peak RSS: 1x {rss_1x:.0f} MB, 4x {rss_4x:.0f} MB")
    print(f"memory ratio (4x / 1x): {rss_4x / rss_1x:.3f}  target <= 1.15")
    return 0


if __name__ == "__main__":
    sys.exit(main())
