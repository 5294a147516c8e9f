"""Cost of the faithfulness evaluation per image, as a ratio to the FullGrad explain pass.

Prints, from one run on the same images, timed side by side (round-robin over repeats, median):

- ``explain``: ``FullGrad(model).explain`` per image, the reference (1.0)
- ``curves / explain``: deletion + insertion curves of one method's given maps
  (11 steps, one forward pass of 2 x batch images each)
- ``evaluate fullgrad / explain``: the FullGrad maps and their curves
- ``evaluate all five / explain``: FullGrad, input x gradient, Grad-CAM, random and blurred
  random maps and their curves
- ``evaluate --evaluate / explain``: what ``fullgrad run --evaluate`` computes per sampled
  image: the five map kinds (fullgrad, simple, smooth with ``--smooth-samples`` copies,
  input x gradient, Grad-CAM) and both random controls (``variants.evaluation_methods``)

and the CPU model from /proc/cpuinfo.

Usage:
    python benchmarks/bench_evaluate.py [--model demo|resnet50] [--batch-size 16] [--repeats 5]
        [--smooth-samples 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

import fullgrad as ke
from fullgrad import baselines, evaluation, variants
from fullgrad.demo.model import build_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine_line


def make_model(name: str, size: int) -> keras.Model:
    if name == "resnet50":
        return keras.applications.ResNet50(weights=None, input_shape=(size, size, 3))
    return build_model(size=size, classes=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["demo", "resnet50"], default="demo")
    parser.add_argument("--size", type=int, default=None, help="input side (64 demo, 224 resnet)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smooth-samples", type=int, default=variants.DEFAULT_SMOOTH_SAMPLES)
    args = parser.parse_args()
    size = args.size or (224 if args.model == "resnet50" else 64)
    model = make_model(args.model, size)
    images = np.random.default_rng(0).uniform(0, 255, (args.images, size, size, 3))
    images = images.astype(np.float32)
    batch = args.batch_size

    fullgrad = ke.FullGrad(model)
    curves = evaluation.PerturbationCurves(model)
    targets = curves.predicted(images)
    maps = fullgrad.explain(images, targets, batch_size=batch)
    everything = {
        "fullgrad": fullgrad.explain,
        "input_x_gradient": baselines.InputXGradient(model, batch_size=batch),
        "gradcam": baselines.GradCAM(model, batch_size=batch),
        "random": evaluation.random_maps(0),
        "blurred_random": evaluation.blurred_random_maps(0),
    }
    job_methods = variants.evaluation_methods(model, smooth_samples=args.smooth_samples)

    def curves_only() -> None:
        for start in range(0, len(images), batch):
            stop = start + batch
            curves(images[start:stop], targets[start:stop], maps[start:stop])

    modes = {
        "explain": lambda: fullgrad.explain(images, batch_size=batch),
        "curves": curves_only,
        "evaluate fullgrad": lambda: evaluation.evaluate(
            model, images, {"fullgrad": fullgrad.explain}, batch_size=batch
        ),
        "evaluate all five": lambda: evaluation.evaluate(
            model, images, everything, batch_size=batch
        ),
        "evaluate --evaluate": lambda: evaluation.evaluate(
            model, images, job_methods, batch_size=batch
        ),
    }
    for run in modes.values():  # trace every function once before timing
        run()
    samples: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.repeats):
        for name, run in modes.items():
            start = time.perf_counter()
            run()
            samples[name].append((time.perf_counter() - start) / len(images))
    per_image = {name: statistics.median(times) for name, times in samples.items()}

    print(machine_line())
    print(
        f"model: {args.model} {size}x{size}, {len(images)} images, batch {batch}, "
        f"{args.repeats} repeats (median), blur sigma {curves.sigma_for(size, size)}"
    )
    reference = per_image["explain"]
    for name, seconds in per_image.items():
        print(f"{name:>20}: {1000 * seconds:8.2f} ms/image  {seconds / reference:6.2f} x explain")


if __name__ == "__main__":
    main()
