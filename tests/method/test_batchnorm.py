"""Effective BatchNormalization biases use the layer's own epsilon, scale and center."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import fullgrad as ke


@pytest.mark.parametrize(
    "options",
    [{}, {"epsilon": 0.5}, {"scale": False}, {"center": False}, {"scale": False, "center": False}],
    ids=["default", "epsilon", "no_scale", "no_center", "neither"],
)
def test_effective_bias_formula_and_bn_of_zero(options):
    rng = np.random.default_rng(0)
    layer = keras.layers.BatchNormalization(**options)
    layer.build((None, 4, 4, 6))
    layer.moving_mean.assign(rng.normal(size=6))
    layer.moving_variance.assign(rng.uniform(0.1, 3, size=6))
    gamma = rng.normal(size=6) if layer.scale else np.ones(6)
    beta = rng.normal(size=6) if layer.center else np.zeros(6)
    if layer.scale:
        layer.gamma.assign(gamma)
    if layer.center:
        layer.beta.assign(beta)
    expected = beta - gamma * layer.moving_mean.numpy() / np.sqrt(
        layer.moving_variance.numpy() + layer.epsilon
    )
    bias = ke.inspection.effective_bias(layer)
    np.testing.assert_allclose(bias, expected, rtol=1e-5, atol=1e-6)
    # In inference mode BN is affine, so BN(0) is exactly its effective bias.
    at_zero = layer(np.zeros((1, 1, 1, 6), np.float32), training=False).numpy().ravel()
    np.testing.assert_allclose(bias, at_zero, rtol=1e-5, atol=1e-6)


def test_layers_with_biases_returns_effective_bn_bias():
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(3, 3, use_bias=False)(inputs)
    x = keras.layers.BatchNormalization(epsilon=0.3, name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    bn = model.get_layer("bn")
    bn.moving_mean.assign([1.0, -2.0, 0.5])
    bn.moving_variance.assign([0.7, 2.0, 0.0])
    head = ke.inspection.get_logits_layer(model)
    assert head.name == "head"
    layers, biases = ke.inspection.layers_with_biases(model, exclude=[head])
    assert [layer.name for layer in layers] == ["bn"]  # the bias-free conv is not listed
    np.testing.assert_allclose(
        biases[0], -np.array([1.0, -2.0, 0.5]) / np.sqrt(np.array([0.7, 2.0, 0.0]) + 0.3),
        rtol=1e-6,
    )
