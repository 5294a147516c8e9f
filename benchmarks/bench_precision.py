"""Mixed precision against float32: how close the maps stay, the residual, and the time.

For ResNet50 (random weights, seed 0, with every bias and BatchNormalization statistic given a
random non-zero value: ``weights=None`` leaves them all zero, and then every bias term of
FullGrad is zero and its map is the input-gradient term alone) at each image size, explains
the same batch under
``float32``, ``mixed_bfloat16`` and ``mixed_float16`` (``FullGrad(precision=...)``), the mixed
runs explaining float32's top-1 classes, and prints per precision:

- the per-image Pearson r of the maps against float32's (min / mean; goal r >= 0.99), and of
  the map's input-gradient part alone (``fullgrad.parts``: it comes out of the whole backward
  pass, so rounding accumulates in it most; the bias terms, coarse ones above all, dominate
  ResNet50's map),
- the largest completeness residual (reported as it is: mixed precision does not hide it),
- the time of one FullGrad step / float32's, measured side by side (on a CPU without native
  float16 arithmetic, float16 is emulated and slow: there it is a correctness check only).

Usage:
    python benchmarks/bench_precision.py [--sizes 64,224] [--batch 8] [--repeats 3]
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from machine import machine_line

from tests.method.weights import randomise  # the tests' non-zero biases and statistics

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


def correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image Pearson r between two stacks of maps ``[B, H, W]``."""
    return np.array([np.corrcoef(p.ravel(), q.ravel())[0, 1] for p, q in zip(a, b, strict=True)])


def measure(size: int, batch: int, repeats: int) -> list[dict]:
    """One row per precision for ResNet50 at ``size``x``size``."""
    keras.utils.set_random_seed(0)
    model = randomise(keras.applications.ResNet50(weights=None, input_shape=(size, size, 3)))
    x = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    engines = {p: ke.FullGrad(model, precision=p) for p in PRECISIONS}
    exact = engines["float32"].compute(x, batch_size=None, parts=True)
    results = {"float32": exact}
    for precision in PRECISIONS[1:]:
        results[precision] = engines[precision].compute(
            x, exact.targets, batch_size=None, parts=True
        )
    seconds: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for _ in range(repeats):  # interleaved, so that machine noise hits all alike
        for precision, engine in engines.items():
            start = time.perf_counter()
            engine.compute(x, exact.targets, batch_size=None)
            seconds[precision].append(time.perf_counter() - start)
    base = statistics.median(seconds["float32"])
    rows = []
    for precision in PRECISIONS:
        r = correlations(results[precision].maps[..., 0], exact.maps[..., 0])
        r_input = correlations(results[precision].parts[:, 0, ..., 0], exact.parts[:, 0, ..., 0])
        rows.append({
            "size": size, "precision": precision, "r_min": r.min(), "r_mean": r.mean(),
            "r_input_min": r_input.min(), "r_input_mean": r_input.mean(),
            "residual_max": float(np.abs(results[precision].residual).max()),
            "time_ratio": statistics.median(seconds[precision]) / base,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,224", help="comma-separated image sizes")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(machine_line())
    print(f"ResNet50 (random weights and biases), batch {args.batch}, {args.repeats} repeats")
    print("| size | precision | map r min / mean vs float32 | input part r min / mean | "
          "residual max | time / float32 |")
    print("|---|---|---|---|---|---|")
    for size in [int(s) for s in args.sizes.split(",")]:
        for row in measure(size, args.batch, args.repeats):
            print(f"| {row['size']} | {row['precision']} | {row['r_min']:.3f} / "
                  f"{row['r_mean']:.3f} | {row['r_input_min']:.3f} / {row['r_input_mean']:.3f} | "
                  f"{row['residual_max']:.1e} | "
                  f"{row['time_ratio']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
