"""``fullgrad demo``: the project's main job on an embedded default, end to end.

1. makes the demo dataset (:mod:`fullgrad.demo.data`): a training set and a held-out set to
   explain, with object masks and a corner mark planted in most images of one class, and writes
   ``demo.json`` (``{"shortcut_class": k, ...}``) -- which the audit never reads;
2. trains the small conv-BN-ReLU CNN (:mod:`fullgrad.demo.model`) and saves ``model.keras``;
3. runs the Beam job (``fullgrad run`` with ``--audit``) over the held-out Parquet, which writes
   the maps, ``audit.json`` and ``report.html`` into the output folder;
4. prints the per-class mask energies, the flagged classes and where the report is.

Reproducibility: the data and the training are seeded, so on one machine the same command gives
the same model bit for bit, and the same accuracy, maps and audit (``tests/demo`` checks it).
Across machines the trained weights, and so the figures, differ: TensorFlow's oneDNN kernels
are chosen by the CPU's instruction set (AVX2, AVX-512, AMX) and the number of threads changes
the order of float sums. TensorFlow's op determinism removes neither (it changes which kernels
run, not their dependence on the CPU), so the demo leaves it off. The planted class was flagged
with oneDNN's AVX-512/AMX kernels and with oneDNN held to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``),
at held-out accuracies 0.910 and 0.955.

Example:
    $ fullgrad demo --output demo-output
    $ fullgrad demo --output control --shortcut-fraction 0     # the control: nothing planted
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["add_arguments", "main", "run_demo"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``fullgrad demo``; unknown flags go to Beam's ``PipelineOptions``."""
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument("--output", default="demo-output", help="folder for everything")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--train-images", type=int, default=2400)
    parser.add_argument("--explain-images", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--shortcut-fraction",
        type=float,
        default=0.9,
        help="share of the shortcut class's images with the corner mark (0: control run)",
    )


def run_demo(
    output: str,
    size: int = 64,
    train_images: int = 2400,
    explain_images: int = 200,
    epochs: int = 5,
    seed: int = 0,
    shortcut_fraction: float = 0.9,
    extra: Sequence[str] = (),
) -> dict[str, Any]:
    """Builds the data and the model, runs the job with the audit; returns what happened.

    Args:
        output: Folder for the data, the model, the maps and the report.
        size: Image side in pixels.
        train_images: Training images.
        explain_images: Held-out images the job explains and audits.
        epochs: Training epochs.
        seed: Seed of the data and the training.
        shortcut_fraction: Share of the shortcut class's images with the mark.
        extra: Beam pipeline flags.

    Returns:
        ``{"report", "audit", "summary", "accuracy", "timings"}``; ``audit`` is the parsed
        ``audit.json``.

    Example:
        >>> run_demo("demo-output")["audit"]["flagged_classes"]
        ['3']
    """
    import numpy as np

    from fullgrad.beam.config import JobConfig
    from fullgrad.beam.job import run
    from fullgrad.demo import data
    from fullgrad.demo import model as demo_model

    timings: dict[str, float] = {}
    start = time.perf_counter()
    os.makedirs(output, exist_ok=True)
    images, _, labels, _ = data.make_images(
        train_images, size, seed, shortcut_fraction=shortcut_fraction
    )
    held = data.make_images(explain_images, size, seed + 1, shortcut_fraction=shortcut_fraction)
    explain_path = data.write_parquet(
        os.path.join(output, "data", "explain.parquet"), held[0], held[1], held[2]
    )
    with open(os.path.join(output, "demo.json"), "w") as handle:
        json.dump(
            {
                "shortcut_class": data.SHORTCUT_CLASS,
                "shortcut_fraction": shortcut_fraction,
                "class_names": list(data.CLASS_NAMES),
                "mark_box": list(data.mark_box(size)),
                "seed": seed,
            },
            handle,
            indent=1,
        )
    timings["data_s"] = time.perf_counter() - start

    tick = time.perf_counter()
    model = demo_model.build_model(size, len(data.CLASS_NAMES), seed=seed)
    demo_model.train(model, images, labels, epochs=epochs, seed=seed)
    model_path = os.path.join(output, "model.keras")
    model.save(model_path)
    predicted = model.predict(held[0].astype(np.float32), verbose=0).argmax(axis=1)
    accuracy = float((predicted == held[2]).mean())
    timings["train_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    config = JobConfig(
        input=explain_path,
        model=model_path,
        output=output,
        image_size=size,
        preprocess="none",  # the model scales its own pixels
        batch_size=32,
        target="predicted",
        top_k=3,
        map_dtype="float32",
        audit=True,
        overwrite=True,
        progress_every=0,
        audit_options={"class_names": list(data.CLASS_NAMES)},
    )
    summary = run(config, extra)
    timings["job_s"] = time.perf_counter() - tick
    timings["total_s"] = time.perf_counter() - start
    with open(os.path.join(output, "audit.json")) as handle:
        audit = json.load(handle)
    return {
        "report": os.path.join(output, "report.html"),
        "audit": audit,
        "summary": summary,
        "accuracy": accuracy,
        "timings": {k: round(v, 1) for k, v in timings.items()},
    }


def main(args: argparse.Namespace, extra: Sequence[str]) -> int:
    """Runs the demo and prints the per-class mask energies and where the report is."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    result = run_demo(
        args.output,
        size=args.size,
        train_images=args.train_images,
        explain_images=args.explain_images,
        epochs=args.epochs,
        seed=args.seed,
        shortcut_fraction=args.shortcut_fraction,
        extra=extra,
    )
    audit = result["audit"]
    print(f"held-out accuracy {result['accuracy']:.3f}; timings (s) {result['timings']}")
    # Each location statistic as raw / chance / lift, then each part's border and mask lift.
    parts = next(iter(audit["classes"].values()), {}).get("parts", {})
    print(
        f"{'class':<16}{'images':>7}  {'mask raw/chance/lift':<21}{'border raw/chance/lift':<23}"
        + "".join(f"{name + ' b/m lift':<22}" for name in parts)
        + "verdict"
    )

    def number(value: float | None) -> str:
        return "  nan" if value is None else f"{value:5.2f}"

    for info in audit["classes"].values():
        verdict = "FLAGGED: " + info["verdict"] if info["flagged"] else "ok"
        mask = "/".join(number(info[k]) for k in ("mask_energy", "mask_chance", "mask_lift"))
        border = "/".join(
            number(info[k]) for k in ("border_energy", "border_chance", "border_lift")
        )
        lifts = "".join(
            f"{number(v['border_lift']) + ' / ' + number(v['mask_lift']):<22}"
            for v in info["parts"].values()
        )
        print(f"{info['name']:<16}{info['count']:>7}  {mask:<21}{border:<23}{lifts}{verdict}")
    print(f"flagged classes: {audit['flagged_classes'] or 'none'}")
    print(f"report: {os.path.abspath(result['report'])}")
    return 0
