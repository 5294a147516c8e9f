"""Benchmark: where a job's start-up goes, as shares of one whole run in a fresh process.

``bench_pipeline.py`` reads the job's steady state and prints its whole-run ratio beside it;
this script explains the gap. One fresh Python process runs the job's phases in order, timed
side by side: importing fullgrad (TensorFlow, Keras), importing Beam and the job, the model
check (``check_model`` loads the model), building the pipeline, and running it over ``--images``
images (which includes the worker's own model load and tracing, and the runner's start). The
run's explain time is read from its progress lines, so the printed shares are of one wall clock:
``phase / whole run``. The ratio to remember is ``start-up / whole run`` at the chosen size.

Example:
    $ python benchmarks/bench_startup.py --images 256 --image-size 96
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The probe: run in a fresh interpreter so imports are really paid.
PROBE = r"""
import json, logging, sys, time
start = time.perf_counter()
marks = {}
import fullgrad  # TensorFlow and Keras
marks["import fullgrad (TensorFlow, Keras)"] = time.perf_counter()
import apache_beam as beam
from fullgrad.beam import job
from fullgrad.beam.config import JobConfig
from fullgrad.beam.options import pipeline_options
marks["import Beam and the job"] = time.perf_counter()
settings = json.loads(sys.argv[1])
config = JobConfig(**settings)
config.num_classes, config.channels = job.check_model(config)
marks["model check (loads the model)"] = time.perf_counter()
job.check_input(config)
job.prepare_output(config)
marks["input listing and output check"] = time.perf_counter()
pipeline = beam.Pipeline(options=pipeline_options())
job.build_pipeline(pipeline, config)
marks["pipeline construction"] = time.perf_counter()
seen = []
class Progress(logging.Handler):
    def emit(self, record):
        if "images explained by this worker" in record.getMessage():
            seen.append(time.perf_counter())
logging.getLogger("fullgrad.beam.transforms").addHandler(Progress())
logging.getLogger("fullgrad.beam.transforms").setLevel(logging.INFO)
result = pipeline.run()
result.wait_until_finish()
end = time.perf_counter()
print(json.dumps({"start": start, "marks": marks, "progress": seen, "end": end}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from bench_pipeline import build_model, write_dataset
    from machine import machine_line

    with tempfile.TemporaryDirectory() as folder:
        model_path = os.path.join(folder, "model.keras")
        build_model(args.image_size).save(model_path)
        write_dataset(os.path.join(folder, "data"), args.images, args.image_size)
        data = os.path.join(folder, "data", "*.parquet")
        every = max(1, args.batch_size)
        settings = {
            "input": data, "model": model_path, "output": os.path.join(folder, "out"),
            "image_size": args.image_size, "preprocess": "unit", "batch_size": args.batch_size,
            "progress_every": every, "decode_threads": 2,
        }
        env = {**os.environ, "PYTHONPATH": REPO}
        process = subprocess.run(
            [sys.executable, "-c", PROBE, json.dumps(settings)],
            check=True, capture_output=True, text=True, env=env,
        )
        timing = json.loads(process.stdout.strip().splitlines()[-1])
    start, end = timing["start"], timing["end"]
    whole = end - start
    rows, previous = [], start
    for name, mark in timing["marks"].items():
        rows.append((name, mark - previous))
        previous = mark
    progress = timing["progress"]
    if len(progress) >= 2:
        first, last = progress[0], progress[-1]
        # Before the first progress line: runner start, worker model load and tracing, the
        # first batch; between first and last: steady explaining; after: the final commits.
        per_batch = (last - first) / (len(progress) - 1)
        rows.append(("runner start, worker model load + tracing", first - previous - per_batch))
        rows.append(("explaining (all batches, steady rate)", (last - first) + per_batch))
        rows.append(("final commits (files, counts)", end - last))
    else:
        rows.append(("pipeline run", end - previous))
    print(f"{machine_line()}; {args.images} images {args.image_size}x{args.image_size}, "
          f"batch {args.batch_size}")
    print(f"{'phase':<46}{'seconds':>9}{'share':>8}")
    for name, seconds in rows:
        print(f"{name:<46}{seconds:>9.2f}{seconds / whole:>8.1%}")
    startup = whole - next((s for n, s in rows if n.startswith("explaining")), 0.0)
    print(f"{'whole run':<46}{whole:>9.2f}{1:>8.1%}")
    print(f"start-up and commits / whole run: {startup / whole:.2f}")


if __name__ == "__main__":
    main()
