"""FullGrad cost relative to a forward pass and to the gradient pass it cannot avoid.

Prints, for ResNet50 at 224x224 (random weights) and each batch size, from one run:

- ``FullGrad / forward``
- ``FullGrad / (forward + backward to the input)``: the floor is 1.0; the target is <= 1.15
- the backward pass to the input and every bias layer, without post-processing
- the same with XLA (``jit_compile=True``) for both sides
- peak resident memory of each mode, measured in its own subprocess

Modes are timed interleaved (round-robin over repeats) so that machine noise hits all alike.

Usage:
    python benchmarks/bench_method.py [--batch-sizes 8 16] [--repeats 5] [--no-memory]
"""

from __future__ import annotations

import argparse
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
from rss import peak_rss_mb, reset_peak_rss

MODES = ("forward", "gradient", "all_gradients", "fullgrad", "gradient_xla", "fullgrad_xla")


def build_modes(model: keras.Model, shape: tuple[int, ...]) -> dict:
    """One callable per mode, each already traced for ``shape``."""
    signature = [tf.TensorSpec([None, *shape[1:]], tf.float32)]

    def forward(x):
        return model(x, training=False)

    def gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = model(x, training=False)
            top1 = tf.reduce_sum(tf.reduce_max(logits, axis=-1))
        return tape.gradient(top1, x)

    exposed = ke.FullGrad(model).model

    def all_gradients(x):
        """The backward pass FullGrad needs, without its post-processing."""
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits, *pre_activations = exposed(x, training=False)
            top1 = tf.reduce_sum(tf.reduce_max(logits, axis=-1))
        return tape.gradient(top1, [x, *pre_activations])

    engines = {
        "fullgrad": ke.FullGrad(model),
        "fullgrad_xla": ke.FullGrad(model, jit_compile=True),
    }
    modes = {
        "forward": tf.function(forward, input_signature=signature),
        "gradient": tf.function(gradient, input_signature=signature),
        "all_gradients": tf.function(all_gradients, input_signature=signature),
        "gradient_xla": tf.function(gradient, input_signature=signature, jit_compile=True),
        "fullgrad": lambda x: engines["fullgrad"].compute(x),
        "fullgrad_xla": lambda x: engines["fullgrad_xla"].compute(x),
    }
    return modes


def _run(fn, x) -> None:
    out = fn(x)
    if isinstance(out, tf.Tensor):
        out.numpy()


def time_modes(batch: int, size: int, repeats: int) -> dict[str, float]:
    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None, input_shape=(size, size, 3))
    x = tf.constant(np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)), tf.float32)
    modes = build_modes(model, tuple(x.shape))
    for fn in modes.values():  # trace and warm up
        _run(fn, x)
        _run(fn, x)
    samples: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(repeats):
        for name, fn in modes.items():
            start = time.perf_counter()
            _run(fn, x)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def peak_memory_mb(mode: str, batch: int, size: int) -> float:
    """Peak RSS (MB) of a fresh process that builds the model and runs ``mode`` twice."""
    code = (
        "import benchmarks.bench_method as b; "
        f"b.memory_probe({mode!r}, {batch}, {size})"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=root
    ).stdout
    return float(output.strip().splitlines()[-1])


def memory_probe(mode: str, batch: int, size: int) -> None:
    reset_peak_rss()
    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None, input_shape=(size, size, 3))
    x = tf.constant(np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)), tf.float32)
    fn = build_modes(model, tuple(x.shape))[mode]
    _run(fn, x)
    _run(fn, x)
    print(peak_rss_mb())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    print(f"ResNet50 {args.image_size}x{args.image_size}, TF {tf.__version__}, "
          f"{os.cpu_count()} CPUs, GPU: {bool(tf.config.list_physical_devices('GPU'))}")
    for batch in args.batch_sizes:
        t = time_modes(batch, args.image_size, args.repeats)
        print(f"\nbatch {batch}: median seconds " + ", ".join(f"{k} {v:.3f}" for k, v in t.items()))
        print(f"  gradient pass / forward          {t['gradient'] / t['forward']:.2f}")
        print(f"  FullGrad / forward               {t['fullgrad'] / t['forward']:.2f}")
        print(f"  FullGrad / gradient pass         {t['fullgrad'] / t['gradient']:.2f}")
        print(f"  of which: all bias gradients     {t['all_gradients'] / t['gradient']:.2f}")
        print(f"  XLA: FullGrad / gradient pass    {t['fullgrad_xla'] / t['gradient_xla']:.2f}")
        print(f"  XLA FullGrad / plain FullGrad    {t['fullgrad_xla'] / t['fullgrad']:.2f}")
        if not args.no_memory:
            peaks = {mode: peak_memory_mb(mode, batch, args.image_size) for mode in MODES}
            print("  peak RSS MB: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))
            print(f"  peak RSS FullGrad / gradient pass {peaks['fullgrad'] / peaks['gradient']:.2f}")


if __name__ == "__main__":
    main()
