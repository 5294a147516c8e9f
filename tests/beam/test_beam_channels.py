"""Models of any channel count through the job: grey (1), RGBA-like (4), multispectral arrays."""

from __future__ import annotations

import keras
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from beamdata import encode, random_image, read_output

import fullgrad as ke
from fullgrad.beam import job
from fullgrad.beam.config import JobConfig
from fullgrad.images import ImageError, decode_image, pixels_to_array
from fullgrad.record import read_maps

SIZE = 16


def grey_images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Grey 16x16 noise; class 1 also holds a bright square somewhere."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 90, (count, SIZE, SIZE, 1)).astype(np.uint8)
    labels = rng.integers(0, 2, count)
    for image, label in zip(images, labels, strict=True):
        if label:
            row, col = rng.integers(0, SIZE - 5, 2)
            image[row : row + 5, col : col + 5] = 240
    return images, labels


@pytest.fixture(scope="module")
def grey_model_path(tmp_path_factory) -> str:
    """A one-channel CNN trained here, as a user with grey data (X-rays, digits) has."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input([SIZE, SIZE, 1])
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalMaxPooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    images, labels = grey_images(256, seed=0)
    history = model.fit(images.astype(np.float32), labels, epochs=12, batch_size=32, verbose=0)
    assert history.history["accuracy"][-1] > 0.9  # it learned the task
    path = str(tmp_path_factory.mktemp("grey") / "grey.keras")
    model.save(path)
    return path


def test_a_grey_model_explains_grey_and_colour_inputs(tmp_path, grey_model_path):
    images, labels = grey_images(6, seed=5)
    colour = np.repeat(images, 3, axis=-1)
    colour[..., 0] = np.clip(colour[..., 0].astype(int) + 20, 0, 255)  # not grey: luminance
    rows = [
        {"id": "grey-png-0", "image": encode(_pil(images[0][..., 0])), "label": int(labels[0])},
        {"id": "grey-png-1", "image": encode(_pil(images[1][..., 0])), "label": int(labels[1])},
        {"id": "rgb-png-2", "image": encode(_pil(colour[2])), "label": int(labels[2])},
        {"id": "grey-array-3", "image": images[3][..., 0].tolist(), "label": int(labels[3])},
        {"id": "rgb-array-4", "image": colour[4].tolist(), "label": int(labels[4])},
        {"id": "bands-5", "image": np.zeros([SIZE, SIZE, 2]).tolist(), "label": 0},
    ]
    # One Parquet column holds one type: bytes, [H, W] arrays and [H, W, C] arrays apart.
    (tmp_path / "in").mkdir()
    for name, part in (("png", rows[:3]), ("grey", rows[3:4]), ("colour", rows[4:])):
        pq.write_table(pa.Table.from_pylist(part), tmp_path / "in" / f"{name}.parquet")
    config = JobConfig(input=str(tmp_path / "in" / "*.parquet"), model=grey_model_path,
                       output=str(tmp_path / "out"), image_size=SIZE, batch_size=4,
                       map_dtype="float32")
    summary = job.run(config)
    assert (summary["input"], summary["explained"], summary["failed"]) == (6, 5, 1)
    maps, dead = read_output(str(tmp_path / "out"))
    assert dead.to_pylist() == [{
        "id": "bands-5", "stage": "preprocess",
        "error": "pixel array has 2 channels; the model takes 1 (only grey <-> RGB and RGBA -> "
                 "RGB are converted)",
    }]  # fmt: skip
    # What the job fed the model: luminance for colour, the values themselves for grey.
    fed = np.stack([
        decode_image(rows[0]["image"], (SIZE, SIZE), channels=1),
        decode_image(rows[1]["image"], (SIZE, SIZE), channels=1),
        decode_image(rows[2]["image"], (SIZE, SIZE), channels=1),
        pixels_to_array(rows[3]["image"], channels=1),
        pixels_to_array(rows[4]["image"], channels=1),
    ]).astype(np.float32)  # fmt: skip
    expected = ke.FullGrad(ke.load_model(grey_model_path)).compute(fed)
    order = np.argsort([r["id"] for r in rows[:5]])  # read_output sorts by id
    assert maps.column("id").to_pylist() == [rows[i]["id"] for i in order]
    np.testing.assert_allclose(read_maps(maps), expected.maps[order, ..., 0], atol=1e-5)
    assert maps.column("target").to_pylist() == expected.targets[order, 0].tolist()
    # The grey model sees the square: it predicts the labels of these clean images.
    assert maps.column("target").to_pylist() == labels[order].tolist()
    assert max(maps.column("residual").to_pylist()) < 1e-4  # ReLU net, Rescaling has no offset


def _pil(array: np.ndarray):
    from PIL import Image

    return Image.fromarray(array)


def test_a_four_channel_model_takes_four_channel_arrays(tmp_path):
    keras.utils.set_random_seed(2)
    inputs = keras.Input([SIZE, SIZE, 4])
    x = keras.layers.Conv2D(5, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.GlobalMaxPooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    model_path = str(tmp_path / "bands.keras")
    model.save(model_path)
    rng = np.random.default_rng(3)
    bands = rng.uniform(0, 255, (5, SIZE, SIZE, 4)).astype(np.float32)
    rows = [{"id": f"tile-{i}", "image": bands[i].tolist()} for i in range(5)]
    rows.append({"id": "rgb-tile", "image": bands[0][..., :3].tolist()})
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in" / "tiles.parquet")
    summary = job.run(JobConfig(input=str(tmp_path / "in" / "*.parquet"), model=model_path,
                                output=str(tmp_path / "out"), image_size=SIZE, preprocess="unit",
                                map_dtype="float32"))
    assert (summary["explained"], summary["failed"]) == (5, 1)
    maps, dead = read_output(str(tmp_path / "out"))
    assert dead.column("error").to_pylist() == [(
        "pixel array has 3 channels; the model takes 4 (only grey <-> RGB and RGBA -> RGB are "
        "converted)"
    )]
    expected = ke.FullGrad(ke.load_model(model_path)).compute(bands / 255.0)
    np.testing.assert_allclose(read_maps(maps), expected.maps[..., 0], atol=1e-5)
    # Thumbnails show the first three bands.
    from fullgrad.images import decode_image as decode

    thumbnail = decode(maps.column("thumbnail")[0].as_py())
    assert thumbnail.shape == (SIZE, SIZE, 3)
    error = np.abs(thumbnail.astype(np.float32) - bands[0][..., :3])
    assert error.mean() < 10  # JPEG of noise; the fourth band would be far off
    assert np.abs(thumbnail.astype(np.float32) - bands[0][..., 1:]).mean() > 40


def test_model_checks_say_which_setting_is_wrong(tmp_path, grey_model_path):
    data = tmp_path / "x.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "a", "image": encode(random_image(0))}]), data)

    def check(**overrides):
        settings = {"input": str(data), "model": grey_model_path, "output": str(tmp_path / "o"),
                    "image_size": SIZE, **overrides}
        return job.check_model(JobConfig(**settings))

    assert check() == (2, 1)
    with pytest.raises(job.JobError, match=r"takes 16x16 images, .* resizes to 32x32: set "
                                           r"--image-size 16"):
        check(image_size=32)
    with pytest.raises(job.JobError, match=r"--preprocess torch is for RGB images, .* takes 1 "
                                           r"channels: use --preprocess none, unit or tf"):
        check(preprocess="torch")


def test_encoded_images_cannot_carry_more_than_four_channels():
    with pytest.raises(ImageError, match="store 5-channel images as pixel arrays"):
        decode_image(encode(random_image(0)), channels=5)
    rgba = decode_image(encode(random_image(1, mode="RGBA")), channels=4)
    assert rgba.shape[-1] == 4
    grey = decode_image(encode(random_image(2)), channels=1)
    rgb = decode_image(encode(random_image(2)), channels=3).astype(np.float32)
    np.testing.assert_allclose(grey[..., 0], rgb @ [0.299, 0.587, 0.114], atol=1.0)
