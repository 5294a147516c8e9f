"""Real data for the Beam job's tests: a tiny Keras model, images, Parquet and TFRecord files."""

from __future__ import annotations

import glob
import io
import os

import keras
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

SIZE = 32
CLASSES = 5


def build_model(size: int = SIZE, classes: int = CLASSES, seed: int = 0) -> keras.Model:
    """A small ReLU CNN ending in softmax (so the job must explain pre-activation logits)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input([size, size, 3])
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(8, 3, padding="same")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    # Non-trivial BatchNorm statistics, so its effective bias matters.
    bn = model.layers[4]
    bn.moving_mean.assign(np.linspace(-0.2, 0.3, 8).astype(np.float32))
    bn.moving_variance.assign(np.linspace(0.5, 2.0, 8).astype(np.float32))
    return model


def random_image(seed: int, size: int = 40, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, [size, size + 4, 3], dtype=np.uint8)
    image = Image.fromarray(array)
    return image.convert(mode) if mode != "RGB" else image


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def mask_png(seed: int, size: int = 40) -> bytes:
    mask = np.zeros([size, size + 4], np.uint8)
    mask[seed % 10 : seed % 10 + 20, 5:25] = 255
    return encode(Image.fromarray(mask))


def good_rows(count: int, start: int = 0, with_mask: bool = True) -> list[dict]:
    """Valid rows in assorted modes and formats: RGB/L/RGBA/P PNGs and RGB JPEGs."""
    modes = ["RGB", "L", "RGBA", "P"]
    rows = []
    for i in range(start, start + count):
        image = random_image(i, mode=modes[i % 4])
        data = encode(image, "JPEG") if i % 5 == 4 and image.mode in ("RGB", "L") else encode(image)
        rows.append(
            {
                "id": f"img-{i:04d}",
                "image": data,
                "label": i % CLASSES,
                "mask": mask_png(i) if with_mask else None,
            }
        )
    return rows


def write_parquet(path: str, rows: list[dict], row_group_size: int | None = None) -> str:
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_tfrecord(path: str, rows: list[dict], keys: dict | None = None) -> str:
    import tensorflow as tf

    keys = keys or {"id": "image/id", "image": "image/encoded", "label": "image/class/label",
                    "mask": "image/mask"}
    with tf.io.TFRecordWriter(path) as writer:
        for row in rows:
            feature = {}
            for field, key in keys.items():
                value = row.get(field)
                if value is None:
                    continue
                if isinstance(value, int):
                    feature[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
                else:
                    data = value.encode() if isinstance(value, str) else value
                    feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[data]))
            example = tf.train.Example(features=tf.train.Features(feature=feature))
            writer.write(example.SerializeToString())
    return path


def read_output(folder: str) -> tuple[pa.Table, pa.Table]:
    """(maps, dead letters) tables of a finished run."""
    maps = pa.concat_tables(
        [pq.read_table(p) for p in sorted(glob.glob(os.path.join(folder, "maps-*.parquet")))]
    )
    dead = pa.concat_tables(
        [pq.read_table(p) for p in sorted(glob.glob(os.path.join(folder, "dead_letter-*.parquet")))]
    )
    return maps.sort_by("id"), dead.sort_by("id")


def stored_maps(table: pa.Table) -> np.ndarray:
    """The ``map`` column as float32 ``[N, h, w]`` in [0, 1], read as the file format says.

    The column is an Arrow ``fixed_shape_tensor``; ``fullgrad.map_scale`` in the schema's
    metadata undoes uint8 storage. Read here, not with the package's reader, so a test of the
    written files does not depend on where that reader lives.
    """
    scale = float((table.schema.metadata or {}).get(b"fullgrad.map_scale", b"1"))
    return table.column("map").combine_chunks().to_numpy_ndarray().astype(np.float32) / scale
