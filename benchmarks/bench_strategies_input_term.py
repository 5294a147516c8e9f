"""Experiment: does clustering FullGrad's input term find the demo's shortcut as the full map does?

Over a ``fullgrad demo`` output folder (its ``model.keras``, ``data/explain.parquet`` and the
job's ``maps-*.parquet``), per explained class: the full FullGrad maps the job wrote, and the
input-term maps ``|x * dlogit/dx|`` (per-image min-max over C x H x W, summed over channels,
min-max again: FullGrad's post-processing of that one term) from ``FullGrad.decompose``. Both
go through the same strategy discovery (``MapReservoir`` at 16 x 16, ``discover_strategies``)
and, per class, the script prints the clusters (share, excess, where) and, for the class with
the mark, the share of its marked images (``demo.json``'s ``mark_box``) whose map puts most of
its salient mass in the mark's corner. It writes a figure of every class's cluster mean maps,
full map above, input term below.

Example:
    $ fullgrad demo --output demo-output
    $ python benchmarks/bench_strategies_input_term.py demo-output --figure input-term.png
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _minmax(values):
    import numpy as np

    low = values.min(axis=tuple(range(1, values.ndim)), keepdims=True)
    high = values.max(axis=tuple(range(1, values.ndim)), keepdims=True)
    return (values - low) / np.maximum(high - low, 1e-12)


def input_term_maps(model_path: str, images, targets, batch: int = 32):
    """FullGrad's post-processing applied to the input term alone: ``[B, H, W]`` in [0, 1]."""
    import numpy as np

    import fullgrad

    engine = fullgrad.FullGrad(fullgrad.load_model(model_path))
    out = []
    for begin in range(0, len(images), batch):
        parts = engine.decompose(images[begin:begin + batch], targets[begin:begin + batch])
        term = _minmax(np.abs(parts.input)).sum(axis=-1)
        out.append(_minmax(term))
    return np.concatenate(out)


def main() -> int:
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from fullgrad import record
    from fullgrad.audit.stats import image_statistics
    from fullgrad.audit.strategies import MapReservoir, discover_strategies

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo", help="a fullgrad demo output folder")
    parser.add_argument("--figure", help="where to write the PNG figure")
    args = parser.parse_args()

    tables = [pq.read_table(p) for p in sorted(glob.glob(os.path.join(args.demo, "maps-*.parquet")))]
    written = {r["id"]: r for t in tables for r in record.from_table(t)}
    data = pq.read_table(os.path.join(args.demo, "data", "explain.parquet")).to_pylist()
    ids = [row["id"] for row in data if row["id"] in written]
    rows = {row["id"]: row for row in data}
    images = np.stack([np.asarray(Image.open(io.BytesIO(rows[i]["image"])).convert("RGB"),
                                  np.float32) for i in ids])
    targets = np.array([written[i]["target"] for i in ids])
    terms = input_term_maps(os.path.join(args.demo, "model.keras"), images, targets)
    with open(os.path.join(args.demo, "demo.json")) as handle:
        demo = json.load(handle)
    _, _, bottom, right = demo["mark_box"]
    size = images.shape[1]

    kinds = {"full map": [written[i]["map"] for i in ids], "input term": list(terms)}
    results = {}
    for kind, maps in kinds.items():
        reservoirs = {}
        for image_id, target, saliency in zip(ids, targets, maps, strict=True):
            reservoirs.setdefault(int(target), MapReservoir(2000, 16)).add(
                image_id, saliency, image_statistics(saliency))
        results[kind] = discover_strategies(reservoirs)
        print(f"{kind}: verdicts {results[kind]['verdicts']}")
        for key, entry in results[kind]["classes"].items():
            print(f"  class {key} ({entry['sample']} maps): " + "; ".join(
                f"cluster {c['cluster']} {c['share']:.0%} excess {c['excess']:.2f} "
                f"{c['region']}{' FLAGGED' if c['flagged'] else ''}" for c in entry["clusters"]))
        # How many images of the shortcut class look mostly at the mark's corner.
        shortcut = [m for m, t in zip(maps, targets, strict=True)
                    if t == demo["shortcut_class"]]
        corner = np.zeros((size, size), bool)
        corner[: 2 * bottom, : 2 * right] = True  # the mark sits in the top-left corner
        shares = [float(np.asarray(m)[corner].sum() / max(np.asarray(m).sum(), 1e-12))
                  for m in shortcut]
        print(f"  class {demo['shortcut_class']}: mean share of the map in the mark's corner "
              f"region {np.mean(shares):.3f} (the region is {corner.mean():.1%} of the image)")

    if args.figure:
        from matplotlib.figure import Figure

        classes = sorted(results["full map"]["classes"])
        columns = max(sum(len(results[k]["classes"][c]["clusters"]) for c in classes)
                      for k in kinds)
        figure = Figure(figsize=(1.8 * columns, 4.2))
        for row, kind in enumerate(kinds):
            column = 0
            for key in classes:
                for cluster in results[kind]["classes"][key]["clusters"]:
                    column += 1
                    axis = figure.add_subplot(2, columns, row * columns + column)
                    axis.imshow(np.asarray(cluster["mean_map"]), cmap="jet")
                    axis.axis("off")
                    axis.set_title(f"{kind}\nclass {key} c{cluster['cluster']} "
                                   f"{cluster['share']:.0%}{' FLAG' if cluster['flagged'] else ''}",
                                   fontsize=7, color="crimson" if cluster["flagged"] else "black")
        figure.savefig(args.figure, dpi=90, bbox_inches="tight")
        print(f"figure: {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
