"""Benchmark: the Beam job against the raw FullGrad engine, and its memory as data grows.

Prints two ratios, measured side by side in one run on the same model and batch size:

1. throughput: steady-state images/s of the job (``fullgrad.beam.job.run``: Parquet of PNGs ->
   maps Parquet, on the default local runner) / images/s of ``FullGrad.compute`` on the same
   images already decoded and preprocessed. Target >= 0.8. Steady state excludes what a job
   pays once per worker (imports, model load and tracing, pipeline construction, the final file
   commits): at ten million images those are noise. The job's rate is read *in-stream*, from
   the timestamps of its own progress lines (images explained between the first and the last
   line / seconds between them); the in-memory runner pushes each element through the whole
   fused read-decode-explain-record-write stage, so that span holds every per-image cost.
   Three cross-checks are printed: the marginal rate ``(4N - N) / (T(4N) - T(N))`` of two
   whole runs (the same quantity, but a difference of two wall times, so one slow start-up
   moves it a lot); the whole 4N run's rate with every one-off cost included; and the job's
   rate over the engine's when ``LOCAL_BUNDLES_IN_FLIGHT`` threads call it at once. The
   default local runner processes that many bundles at once, in threads
   (``fullgrad.beam.options``), so up to that many batches are in the model together, while
   the engine above is one caller, batch after batch: the third figure is what the job costs
   over the engine run the way the runner runs it.
2. memory: peak RSS of the job over 4N images / over N images. Target <= 1.15: memory does not
   grow with the data.

Each ratio is measured per input layout (``--layout``): ``parquet`` (PNGs in Parquet files of
128 rows) and ``folders`` (the same PNGs as files in 10 class folders, ``--format images``, one
file per element). The engine is always timed on the same images, decoded from Parquet.

A shared machine's load drifts, so the throughput is paired: each throughput subprocess times
the engine, runs the job and times the engine again, in the same process and minutes; the ratio
uses the engine's mean over those timings. The same is done with CPU seconds for the marginal
rate (this process and its threads; the in-memory runner runs in it). The N / 4N pair is
repeated (``--repeats``, 3 by default); the median of each ratio is the result, printed with
every repeat's. Peak RSS comes from separate subprocesses that only run the job
(``resource.getrusage``).

``--audit-baseline`` measures only the memory ratio, of the job with ``--audit --baseline``
(the audit's combiners, the per-class map sample for strategies and the drift against an
earlier run's ``audit.json``, made first by a job over the N images): peak RSS over 4N / over N.

Example:
    $ python benchmarks/bench_pipeline.py --images 256 --image-size 96 --batch-size 32
    $ python benchmarks/bench_pipeline.py --layout folders
    $ python benchmarks/bench_pipeline.py --audit-baseline --images 256
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import statistics
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


LAYOUTS = {"parquet": "*.parquet", "folders": "*/*.png"}


def write_dataset(folder: str, count: int, size: int, seed: int = 0,
                  layout: str = "parquet") -> None:
    """``count`` PNGs (smooth random pictures at ``size``) in Parquet files of 128 rows, or
    (``layout="folders"``) as files in 10 class folders; the same pictures either way."""
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
            if layout == "folders":
                path = os.path.join(folder, f"class-{index % 10}", f"img-{index:07d}.png")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as handle:
                    handle.write(buffer.getvalue())
        if layout == "parquet":
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


def _cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _engine_timing(model: str, data: str, size: int, batch: int, callers: int = 1) -> dict:
    """The engine alone on decoded, preprocessed images (decoding is not timed).

    ``callers`` > 1: that many threads call it at once, each on its share of the batches, as
    the local runner's bundles do (``fullgrad.beam.options.LOCAL_BUNDLES_IN_FLIGHT``).
    """
    import concurrent.futures
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
    starts = list(range(0, len(x), batch))

    def explain(share: list[int]) -> None:
        for begin in share:
            chunk = x[begin : begin + batch]
            engine.compute(chunk, np.full([len(chunk), 1], -1))

    wall, cpu = time.perf_counter(), _cpu_s()
    with concurrent.futures.ThreadPoolExecutor(callers) as pool:
        list(pool.map(explain, [starts[i::callers] for i in range(callers)]))
    wall, cpu = time.perf_counter() - wall, _cpu_s() - cpu
    return {"images_per_s": len(x) / wall, "cpu_s_per_image": cpu / len(x)}


class _ProgressClock(logging.Handler):
    """Keeps (time, images explained) of the job's progress lines (``ToRecords``)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.points: list[tuple[float, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.args and "images explained" in str(record.msg):
            self.points.append((record.created, int(record.args[0])))


def _job(model: str, data: str, size: int, batch: int, output: str, layout: str = "parquet",
         baseline: str | None = None) -> dict:
    """The whole job, in this process (the default in-memory local runner).

    Besides the whole run's wall and CPU time, returns the job's in-stream rate: images between
    its first and last progress line over the seconds between them. The in-memory runner
    processes the fused read-decode-explain-record-write stage element by element, so that span
    holds all per-image work and none of the start-up or the final file commits.
    """
    from fullgrad.beam.job import JobConfig, run

    clock = _ProgressClock()
    progress = logging.getLogger("fullgrad.beam.transforms")
    progress.setLevel(logging.INFO)
    progress.addHandler(clock)
    config = JobConfig(
        input=os.path.join(data, LAYOUTS[layout]), model=model, output=output, image_size=size,
        preprocess="unit", batch_size=batch, map_size=size // 4, map_dtype="uint8",
        progress_every=2 * batch, overwrite=True,
        audit=baseline is not None, baseline=baseline or None,
    )
    wall, cpu = time.perf_counter(), _cpu_s()
    summary = run(config)
    wall, cpu = time.perf_counter() - wall, _cpu_s() - cpu
    progress.removeHandler(clock)
    assert summary["failed"] == 0, summary
    assert len(clock.points) >= 2, "too few images for two progress lines"
    (start, first), (end, last) = clock.points[0], clock.points[-1]
    return {"images": summary["explained"], "wall_s": wall, "cpu_s": cpu,
            "in_stream_images_per_s": (last - first) / (end - start)}


def child(kind: str, model: str, data: str, size: int, batch: int, output: str,
          engine_data: str, layout: str) -> dict:
    """``memory``: the job only, with its peak RSS; ``paired``: engine, job, engine;
    ``memory-audit``: the job with ``--audit --baseline engine_data`` (a folder with an
    ``audit.json``), with its peak RSS."""
    if kind in ("memory", "memory-audit"):
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from rss import peak_rss_mb, reset_peak_rss

        reset_peak_rss()  # else the child reports its parent's peak (kept across fork+exec)
        baseline = engine_data if kind == "memory-audit" else None
        return {**_job(model, data, size, batch, output, layout, baseline),
                "peak_rss_mb": peak_rss_mb()}
    from fullgrad.beam.options import LOCAL_BUNDLES_IN_FLIGHT

    before = _engine_timing(model, engine_data, size, batch)
    result = _job(model, data, size, batch, output, layout)
    after = _engine_timing(model, engine_data, size, batch)
    threaded = _engine_timing(model, engine_data, size, batch, LOCAL_BUNDLES_IN_FLIGHT)
    return {**result, "engine": [before, after], "engine_threaded": threaded}


def _throughput(one: dict, four: dict) -> dict:
    """One N / 4N pair -> the engine's rate, the job's rates and their ratios."""
    engines = one["engine"] + four["engine"]
    engine = sum(e["images_per_s"] for e in engines) / len(engines)
    engine_cpu = sum(e["cpu_s_per_image"] for e in engines) / len(engines)
    extra = four["images"] - one["images"]
    marginal = extra / (four["wall_s"] - one["wall_s"])
    marginal_cpu = (four["cpu_s"] - one["cpu_s"]) / extra
    in_stream = four["in_stream_images_per_s"]
    threaded = statistics.mean(run["engine_threaded"]["images_per_s"] for run in (one, four))
    return {
        "engine": engine, "in_stream": in_stream, "marginal": marginal,
        "wall_1x": one["wall_s"], "wall_4x": four["wall_s"],
        "ratio": in_stream / engine, "ratio_marginal": marginal / engine,
        "ratio_marginal_cpu": engine_cpu / marginal_cpu,
        "ratio_whole": four["images"] / four["wall_s"] / engine,
        "ratio_threaded": in_stream / threaded, "engine_threaded": threaded,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="N; the large run uses 4N")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="N / 4N pairs; the median counts")
    parser.add_argument("--layout", default="parquet,folders",
                        help=f"comma-separated input layouts among {sorted(LAYOUTS)}")
    parser.add_argument("--audit-baseline", action="store_true",
                        help="only the memory ratio, of the job with --audit --baseline")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, model, data, size, batch, output, engine_data, layout = args.child
        print(json.dumps(child(kind, model, data, int(size), int(batch), output, engine_data,
                               layout)))
        return 0
    layouts = [name.strip() for name in args.layout.split(",") if name.strip()]
    if not layouts or set(layouts) - set(LAYOUTS):
        parser.error(f"--layout: choose among {sorted(LAYOUTS)}")

    work = tempfile.mkdtemp(prefix="fullgrad-bench-")
    model = os.path.join(work, "model.keras")
    build_model(args.image_size).save(model)
    engine_data = os.path.join(work, "engine-data")
    write_dataset(engine_data, args.images, args.image_size)
    common = [str(args.image_size), str(args.batch_size)]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from machine import machine_line

    print(machine_line())
    print(f"model: {args.image_size}x{args.image_size} VGG-like CNN, batch {args.batch_size}, "
          f"N = {args.images}, cpus = {os.cpu_count()}, {max(1, args.repeats)} repeats")
    for layout in layouts:
        _measure(args, work, model, engine_data, common, layout)
    return 0


def _measure(args: argparse.Namespace, work: str, model: str, engine_data: str,
             common: list[str], layout: str) -> None:
    """Writes the N and 4N datasets in ``layout``, runs the pairs and prints both ratios."""
    small = os.path.join(work, f"{layout}-1x")
    large = os.path.join(work, f"{layout}-4x")
    write_dataset(small, args.images, args.image_size, layout=layout)
    write_dataset(large, 4 * args.images, args.image_size, layout=layout)

    def run_child(kind: str, name: str, data: str) -> dict:
        out = os.path.join(work, f"out-{layout}-{kind}-{name}")
        return _child([kind, model, data, *common, out, engine_data, layout])

    if args.audit_baseline:
        audit_memory(work, model, small, large, common, args.images, layout)
        return

    pairs = [_throughput(run_child("paired", "1x", small), run_child("paired", "4x", large))
             for _ in range(max(1, args.repeats))]
    memory_1x, memory_4x = run_child("memory", "1x", small), run_child("memory", "4x", large)

    print(f"== layout {layout} ({LAYOUTS[layout]})")
    from fullgrad.beam.options import LOCAL_BUNDLES_IN_FLIGHT

    for index, pair in enumerate(pairs, 1):
        print(f"repeat {index}: engine {pair['engine']:6.1f} images/s "
              f"({pair['engine_threaded']:6.1f} by {LOCAL_BUNDLES_IN_FLIGHT} threads); "
              f"job in-stream {pair['in_stream']:6.1f}, marginal {pair['marginal']:6.1f} images/s "
              f"(N: {pair['wall_1x']:.1f} s, 4N: {pair['wall_4x']:.1f} s)")

    def median(key: str) -> str:
        values = sorted(pair[key] for pair in pairs)
        return f"{statistics.median(values):.3f} (repeats {', '.join(f'{v:.3f}' for v in values)})"

    print(f"throughput ratio (job steady state, in-stream / engine): {median('ratio')}"
          "  target >= 0.8")
    print(f"  cross-check, marginal N -> 4N, wall: {median('ratio_marginal')}")
    print(f"  cross-check, marginal N -> 4N, CPU:  {median('ratio_marginal_cpu')}")
    print(f"  whole 4N run with model load, tracing and pipeline start: {median('ratio_whole')}")
    print(f"  in-stream / the engine called by {LOCAL_BUNDLES_IN_FLIGHT} threads at once, as the "
          f"runner's bundles call it: {median('ratio_threaded')}")
    rss_1x, rss_4x = memory_1x["peak_rss_mb"], memory_4x["peak_rss_mb"]
    print(f"peak RSS: N {rss_1x:.0f} MB, 4N {rss_4x:.0f} MB")
    print(f"memory ratio (4N / N): {rss_4x / rss_1x:.3f}  target <= 1.15", flush=True)


def audit_memory(work: str, model: str, small: str, large: str, common: list[str],
                 images: int, layout: str) -> None:
    """Peak RSS of the job with ``--audit --baseline`` over 4N images / over N images."""
    import shutil

    baseline = os.path.join(work, "baseline")
    # The baseline: an audited run over the N images (its audit.json is what --baseline reads).
    _child(["memory-audit", model, small, *common, baseline, "", layout])
    os.remove(os.path.join(baseline, "summary.json"))  # only its audit is kept as a baseline
    kept = os.path.join(work, "baseline-audit")
    os.makedirs(kept)
    shutil.copy(os.path.join(baseline, "audit.json"), kept)
    runs = {name: _child(["memory-audit", model, data, *common,
                          os.path.join(work, f"out-audit-{name}"), kept, layout])
            for name, data in (("1x", small), ("4x", large))}
    for name, result in runs.items():
        with open(os.path.join(work, f"out-audit-{name}", "audit.json")) as handle:
            drift = json.load(handle)["drift"]
        print(f"{name}: {result['images']} images, drift section with "
              f"{len(drift['classes'])} classes, drifted {drift['drifted_classes']}")
    rss_1x, rss_4x = runs["1x"]["peak_rss_mb"], runs["4x"]["peak_rss_mb"]
    print(f"--audit --baseline: N = {images}, peak RSS: N {rss_1x:.0f} MB, 4N {rss_4x:.0f} MB")
    print(f"memory ratio (4N / N): {rss_4x / rss_1x:.3f}  target <= 1.15")


if __name__ == "__main__":
    sys.exit(main())
