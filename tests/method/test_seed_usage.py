"""The seed library's documented usage runs as written, with ``import fullgrad as ke``."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import fullgrad as ke
from tests.method.conftest import randomise


def _softmax_classifier(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((24, 24, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Conv2D(8, 3, strides=2)(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    return randomise(keras.Model(inputs, outputs), seed)


@pytest.mark.parametrize("seed_line", [True, False], ids=["with_linear_line", "softmax_kept"])
def test_seed_template(seed_line):
    model = _softmax_classifier()
    x_check = np.random.default_rng(0).random((4, 24, 24, 3)).astype(np.float32)
    probabilities = model.predict(x_check, verbose=0)
    if seed_line:
        model.layers[-1].activation = "linear"  # the seed's line, verbatim
    logits = ke.inspection.get_logits_layer(model)
    inters, biases = ke.inspection.layers_with_biases(model, exclude=[logits])
    model = ke.inspection.expose(model, inters, logits)
    x, y = (
        np.random.rand(4, 24, 24, 3),
        np.random.randint(10, size=[4, 1]),
    )
    logits, maps = ke.full_gradients(model, x, y, biases=biases)

    assert logits.shape == (4, 1)
    assert maps.shape == (4, 24, 24, 1)
    assert maps.min() >= 0.0 and maps.max() <= 1.0 + 1e-6
    np.testing.assert_allclose(maps.reshape(4, -1).max(axis=1), 1.0, atol=1e-4)
    # The logits are pre-activation: softmax over all of them gives back the probabilities.
    all_logits = model(x_check)[0].numpy()
    np.testing.assert_allclose(tf.nn.softmax(all_logits).numpy(), probabilities, atol=1e-5)
    chosen = model(x.astype(np.float32))[0].numpy()[np.arange(4), y[:, 0]]
    np.testing.assert_allclose(logits[:, 0], chosen, rtol=1e-5)


def test_seed_explaining_units_and_visualize(tmp_path):
    model = _softmax_classifier(1)
    images = np.random.default_rng(2).random((3, 24, 24, 3)).astype(np.float32)
    logits = model.predict(images, verbose=0)
    indices = np.argsort(logits, axis=-1)[:, ::-1]
    explaining_units = indices[:, :1]
    logits_layer = ke.inspection.get_logits_layer(model)
    inters, biases = ke.inspection.layers_with_biases(model, exclude=[logits_layer])
    exposed = ke.inspection.expose(model, inters, logits_layer)
    _, maps = ke.full_gradients(exposed, images, explaining_units, biases=biases)
    # y=None explains the top-1 class: the same maps.
    _, top1_maps = ke.full_gradients(exposed, images)
    np.testing.assert_allclose(maps, top1_maps, atol=1e-6)
    figure = ke.utils.visualize(
        images=[*images, *maps, *images],
        overlays=[None] * (2 * len(images)) + [*maps],
        path=str(tmp_path / "grid.png"),
    )
    assert len(figure.axes) == 9
    from PIL import Image

    with Image.open(tmp_path / "grid.png") as png:
        assert png.size[0] > 100 and png.size[1] > 100


def test_several_units_per_image():
    model = _softmax_classifier(2)
    x = np.random.default_rng(3).random((2, 24, 24, 3)).astype(np.float32)
    units = np.array([[0, 3, 7], [9, 1, 1]])
    logits, maps = ke.full_gradients(model, x, units)
    assert logits.shape == (2, 3) and maps.shape == (2, 24, 24, 3)
    for j in range(3):
        single_logits, single_maps = ke.full_gradients(model, x, units[:, j : j + 1])
        np.testing.assert_allclose(maps[..., j], single_maps[..., 0], atol=1e-5)
        np.testing.assert_allclose(logits[:, j], single_logits[:, 0], rtol=1e-5)
    # units 1 and 1 of image 2 are the same unit: same map
    np.testing.assert_allclose(maps[1, ..., 1], maps[1, ..., 2], atol=1e-6)


@pytest.mark.slow
def test_seed_on_xception_299():
    model = keras.applications.Xception(classifier_activation=None, weights=None)
    assert model.get_layer("avg_pool").input.shape[1:3] == (10, 10)
    images = np.random.default_rng(4).uniform(0, 255, (1, 299, 299, 3)).astype(np.float32)
    inputs = keras.applications.imagenet_utils.preprocess_input(images.copy(), mode="tf")
    logits = ke.inspection.get_logits_layer(model)
    inters, biases = ke.inspection.layers_with_biases(model, exclude=[logits])
    exposed = ke.inspection.expose(model, inters, logits)
    explaining_units = np.argsort(model.predict(inputs, verbose=0), axis=-1)[:, ::-1][:, :1]
    logits_values, maps = ke.full_gradients(exposed, inputs, explaining_units, biases=biases)
    assert maps.shape == (1, 299, 299, 1)
    assert np.isfinite(maps).all() and maps.max() == pytest.approx(1.0, abs=1e-4)
    parts = ke.decompose(exposed, inputs, explaining_units[:, 0])
    np.testing.assert_allclose(parts.logits, logits_values[:, 0], rtol=1e-4)
    assert parts.residual.max() < 1e-4
