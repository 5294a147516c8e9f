"""Writes the committed test data of issue 12 with the real libraries users write it with.

Run once in a throwaway environment (these libraries are not dependencies of ``fullgrad``):

    python -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install datasets webdataset pillow
    /tmp/hfvenv/bin/python tests/data/make_data.py

It writes, next to this script:

- ``hf/embedded.parquet``: Hugging Face ``datasets`` ``Image`` feature with the bytes inside,
  ``label`` a ``ClassLabel`` (names ant, bee, cow), no id column; row 3 is a corrupt PNG.
- ``hf/by_path.parquet``: the same feature holding only paths, relative to the file's folder
  (``images/...``); row 2 points at a file that does not exist.
- ``webdataset/shard-0000{0,1}.tar``: WebDataset's ``TarWriter`` samples ``<key>.png`` or
  ``<key>.jpg``, ``<key>.cls`` and ``<key>.mask.png``; sample ``b0002`` holds a corrupt PNG.

Expected ids, labels and which rows fail are listed in ``tests/beam/readerdata.py``.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = ["ant", "bee", "cow"]
BROKEN_PNG = b"\x89PNG\r\n\x1a\n broken"


def picture(seed: int, fmt: str = "PNG", mask: bool = False) -> bytes:
    """A small smooth picture (it compresses to a few hundred bytes), or its object mask."""
    rng = np.random.default_rng(seed)
    if mask:
        array = np.zeros([40, 44], np.uint8)
        array[seed % 10 : seed % 10 + 20, 5:25] = 255
        image = Image.fromarray(array)
    else:
        small = rng.integers(0, 256, [6, 6, 3], dtype=np.uint8)
        image = Image.fromarray(small).resize((44, 40), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def hugging_face() -> None:
    import datasets

    folder = os.path.join(HERE, "hf")
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)}
    )
    embedded = [{"bytes": picture(i), "path": None} for i in range(6)]
    embedded[3] = {"bytes": BROKEN_PNG, "path": None}
    table = datasets.Dataset.from_dict(
        {"image": embedded, "label": [i % 3 for i in range(6)]}, features=features
    )
    table.to_parquet(os.path.join(folder, "embedded.parquet"))

    paths = []
    for i in range(5):
        name = f"images/{i:03d}.png"
        if i != 2:
            with open(os.path.join(folder, name), "wb") as handle:
                handle.write(picture(100 + i))
        paths.append({"bytes": None, "path": name})
    # ``to_parquet`` would try to embed the files (and fail on the missing one); a dataset
    # published with paths keeps them, so the table is written with the feature's own Arrow
    # schema, whose ``huggingface`` metadata carries the ClassLabel names.
    schema = features.arrow_schema
    columns = {"image": paths, "label": [(i + 1) % 3 for i in range(5)]}
    pq.write_table(pa.Table.from_pydict(columns, schema=schema),
                   os.path.join(folder, "by_path.parquet"))


def web_dataset() -> None:
    import webdataset

    folder = os.path.join(HERE, "webdataset")
    os.makedirs(folder, exist_ok=True)
    for shard in range(2):
        path = os.path.join(folder, f"shard-{shard:05d}.tar")
        with webdataset.TarWriter(path) as writer:
            for i in range(4):
                key = f"{'ab'[shard]}{i:04d}"
                fmt = "jpg" if i == 1 else "png"
                image = picture(200 + 10 * shard + i, "JPEG" if fmt == "jpg" else "PNG")
                if key == "b0002":
                    image = BROKEN_PNG
                writer.write({"__key__": key, fmt: image, "cls": (shard + i) % 3,
                              "mask.png": picture(i, mask=True)})


if __name__ == "__main__":
    hugging_face()
    web_dataset()
