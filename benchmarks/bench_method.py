"""FullGrad cost relative to a forward pass, the gradient pass and the bias gradients it needs.

Prints the CPU model, then for ResNet50 (random weights) and each batch size, from one run:

- median seconds of every mode, and how noisy they were (max / min over the repeats)
- gradient pass / forward, all bias gradients / forward, FullGrad / forward
- FullGrad / all bias gradients: the post-processing's share (goal <= 1.10)
- FullGrad / gradient pass (the floor is about 1.0)
- peak RSS FullGrad / gradient pass, each measured in its own subprocess (goal <= 1.15)

"gradient" is the backward pass to the input only; "all_gradients" is the backward pass to the
input and every bias layer's output that FullGrad needs, without post-processing. Modes are
timed interleaved (round-robin over repeats) so that machine noise hits all alike.
``--baseline PATH`` adds ``fullgrad_baseline``: the ``FullGrad`` of another ``methods.py``
(e.g. ``git show main:fullgrad/methods.py > /tmp/old.py``), for before / after in one run.

Usage:
    python benchmarks/bench_method.py [--batches 8,16] [--repeats 5] [--no-memory] [--xla]
        [--baseline /tmp/old_methods.py]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import tensorflow as tf

import fullgrad as ke

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_model
from rss import peak_rss_mb, reset_peak_rss

MEMORY_MODES = ("gradient", "fullgrad")


def load_baseline(path: str):
    """The ``FullGrad`` class of another copy of ``fullgrad/methods.py``."""
    spec = importlib.util.spec_from_file_location("fullgrad_baseline_methods", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.FullGrad


def build_modes(
    model: keras.Model, shape: tuple[int, ...], xla: bool = False, baseline: str | None = None
) -> dict:
    """One callable per mode; the first call traces it."""
    signature = [tf.TensorSpec([None, *shape[1:]], tf.float32)]

    def forward(x):
        return model(x, training=False)

    def gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = model(x, training=False)
            top1 = tf.reduce_sum(tf.reduce_max(logits, axis=-1))
        return tape.gradient(top1, x)

    fullgrad = ke.FullGrad(model)
    exposed = fullgrad.model

    def all_gradients(x):
        """The backward pass FullGrad needs, without its post-processing.

        Each gradient is reduced to a scalar in the graph: returning the tensors themselves
        would time copying all of them out to numpy, which FullGrad never does (that made
        this pass look 8% slower than it is, and FullGrad's overhead smaller).
        """
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits, *pre_activations = exposed(x, training=False)
            top1 = tf.reduce_sum(tf.reduce_max(logits, axis=-1))
        grads = tape.gradient(top1, [x, *pre_activations])
        return tf.add_n([tf.reduce_sum(grad) for grad in grads])

    modes = {
        "forward": tf.function(forward, input_signature=signature),
        "gradient": tf.function(gradient, input_signature=signature),
        "all_gradients": tf.function(all_gradients, input_signature=signature),
        "fullgrad": lambda x: fullgrad.compute(x, batch_size=None),
    }
    if baseline:
        before = load_baseline(baseline)(model)
        modes["fullgrad_baseline"] = lambda x: before.compute(x, batch_size=None)
    if xla:
        compiled = ke.FullGrad(model, jit_compile=True)
        modes["gradient_xla"] = tf.function(gradient, input_signature=signature, jit_compile=True)
        modes["fullgrad_xla"] = lambda x: compiled.compute(x, batch_size=None)
    return modes


def _run(fn, x) -> None:
    out = fn(x)
    for tensor in tf.nest.flatten(out):
        if isinstance(tensor, tf.Tensor):
            tensor.numpy()


def _inputs(batch: int, size: int) -> tuple[keras.Model, tf.Tensor]:
    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None, input_shape=(size, size, 3))
    x = tf.constant(np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)), tf.float32)
    return model, x


def time_modes(
    batch: int, size: int, repeats: int, xla: bool, baseline: str | None
) -> dict[str, list[float]]:
    model, x = _inputs(batch, size)
    modes = build_modes(model, tuple(x.shape), xla, baseline)
    for fn in modes.values():  # trace and warm up
        _run(fn, x)
        _run(fn, x)
    samples: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(repeats):
        for name, fn in modes.items():
            start = time.perf_counter()
            _run(fn, x)
            samples[name].append(time.perf_counter() - start)
    return samples


def peak_memory_mb(mode: str, batch: int, size: int, baseline: str | None) -> float:
    """Peak RSS (MB) of a fresh process that builds the model and runs ``mode`` twice."""
    code = f"import benchmarks.bench_method as b; b.memory_probe({mode!r}, {batch}, {size}, " \
           f"{baseline!r})"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=root
    ).stdout
    return float(output.strip().splitlines()[-1])


def memory_probe(mode: str, batch: int, size: int, baseline: str | None = None) -> None:
    reset_peak_rss()
    model, x = _inputs(batch, size)
    fn = build_modes(model, tuple(x.shape), baseline=baseline)[mode]
    _run(fn, x)
    _run(fn, x)
    print(peak_rss_mb())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="8,16", help="comma-separated batch sizes")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--xla", action="store_true", help="also time jit_compile=True")
    parser.add_argument("--baseline", help="another methods.py to time as fullgrad_baseline")
    args = parser.parse_args()
    started = time.perf_counter()
    print(f"CPU: {cpu_model()} ({os.cpu_count()} CPUs); TF {tf.__version__}; "
          f"GPU: {bool(tf.config.list_physical_devices('GPU'))}; "
          f"ResNet50 {args.image_size}x{args.image_size}, {args.repeats} repeats")
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        samples = time_modes(batch, args.image_size, args.repeats, args.xla, args.baseline)
        t = {name: statistics.median(values) for name, values in samples.items()}
        print(f"\nbatch {batch}: median s (max/min over repeats)  " + ", ".join(
            f"{k} {t[k]:.3f} ({max(v) / min(v):.2f})" for k, v in samples.items()))
        row = {
            "batch": batch,
            "gradient / forward": t["gradient"] / t["forward"],
            "all bias grads / forward": t["all_gradients"] / t["forward"],
            "FullGrad / forward": t["fullgrad"] / t["forward"],
            "FullGrad / all bias grads": t["fullgrad"] / t["all_gradients"],
            "FullGrad / gradient": t["fullgrad"] / t["gradient"],
        }
        if args.baseline:
            row["baseline / all bias grads"] = t["fullgrad_baseline"] / t["all_gradients"]
        if args.xla:
            row["XLA FullGrad / XLA gradient"] = t["fullgrad_xla"] / t["gradient_xla"]
        if not args.no_memory:
            peaks = {m: peak_memory_mb(m, batch, args.image_size, None) for m in MEMORY_MODES}
            print("  peak RSS MB: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))
            row["peak RSS FullGrad / gradient"] = peaks["fullgrad"] / peaks["gradient"]
        rows.append(row)
    columns = list(rows[0])
    print("\n| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(
            str(row[c]) if c == "batch" else f"{row[c]:.2f}" for c in columns) + " |")
    print(f"\n(took {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
