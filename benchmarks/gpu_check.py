"""The GPU check: FullGrad throughput on a GPU, in float32 and bfloat16, and the Beam job on it.

Run by ``benchmarks/gpu_check.sh`` on a machine with an NVIDIA GPU; prints, side by side in one
run (ResNet50, random weights, 224x224):

- FullGrad images/s at batch 32, 64 and 128, in float32 and mixed_bfloat16;
- FullGrad / gradient pass (the backward to the input), the same batches;
- the Beam job's images/s with ``--model-copies 1`` and ``2`` on one GPU, and each / the engine.

``--smoke`` shrinks everything (64x64, batches 4 and 8, a few images) so the script itself can be
checked on a CPU; its figures then mean nothing.

Example:
    $ python benchmarks/gpu_check.py            # on the GPU machine, about 5 minutes
    $ python benchmarks/gpu_check.py --smoke    # anywhere, to check the script runs
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import tensorflow as tf

import fullgrad as ke

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine_line


def median_seconds(fn, x: tf.Tensor, repeats: int) -> float:
    fn(x)  # trace and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gradient_pass(model: keras.Model):
    """The backward pass to the input only (of the top logit): FullGrad's floor."""

    @tf.function(reduce_retracing=True)
    def gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = tf.cast(model(x, training=False)[0], tf.float32)
            top = tf.reduce_max(logits, axis=-1)
        return tape.gradient(top, x)

    return lambda images: gradient(images).numpy()


def engine_figures(size: int, batches: list[int], repeats: int) -> list[tuple]:
    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None, input_shape=(size, size, 3), classes=1000)
    rows = []
    for precision in ("float32", "mixed_bfloat16"):
        engine = ke.FullGrad(model, precision=precision)
        explain = engine.compute
        gradient = gradient_pass(engine.model)
        for batch in batches:
            x = tf.random.uniform([batch, size, size, 3], -1, 1)
            fullgrad = median_seconds(lambda images, run=explain: run(images, batch_size=None),
                                      x, repeats)
            plain = median_seconds(gradient, x, repeats)
            rows.append((precision, batch, batch / fullgrad, fullgrad / plain))
    return rows


def job_figures(size: int, images: int, batch: int) -> list[tuple]:
    from bench_pipeline import write_dataset

    from fullgrad.beam import job
    from fullgrad.beam.config import JobConfig

    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None, input_shape=(size, size, 3), classes=1000)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        model_path = os.path.join(folder, "resnet50.keras")
        model.save(model_path)
        write_dataset(os.path.join(folder, "data"), images, size)
        engine = ke.FullGrad(model)
        x = tf.random.uniform([batch, size, size, 3], 0, 1)
        engine_rate = batch / median_seconds(lambda b: engine.compute(b, batch_size=None), x, 3)
        for copies in (1, 2):
            summary = job.run(
                JobConfig(input=os.path.join(folder, "data", "*.parquet"), model=model_path,
                          output=os.path.join(folder, f"out-{copies}"), image_size=size,
                          preprocess="unit", batch_size=batch, model_copies=copies,
                          progress_every=0),
                ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"],
            )
            rate = summary["images_per_s"]
            rows.append((copies, rate, rate / engine_rate))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script")
    args = parser.parse_args()
    size, batches, repeats, images = (64, [4, 8], 2, 16) if args.smoke else (
        224, [32, 64, 128], 5, 2048)
    gpus = tf.config.list_physical_devices("GPU")
    print(f"{machine_line()}; GPUs: {[g.name for g in gpus] or 'none'}; TF {tf.__version__}")
    if not gpus and not args.smoke:
        print("no GPU here: this check is for a GPU machine (--smoke checks the script on a CPU)")
        return
    print(f"{'precision':<16}{'batch':>6}{'FullGrad img/s':>16}{'FullGrad / gradient':>21}")
    for precision, batch, rate, ratio in engine_figures(size, batches, repeats):
        print(f"{precision:<16}{batch:>6}{rate:>16.1f}{ratio:>21.2f}")
    print(f"{'model copies':<16}{'job img/s':>12}{'job / engine':>14}")
    for copies, rate, ratio in job_figures(size, images, batches[0]):
        print(f"{copies:<16}{rate:>12.1f}{ratio:>14.2f}")


if __name__ == "__main__":
    main()
