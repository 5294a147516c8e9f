"""The completeness identity on random architectures, and what breaks it.

For piecewise-linear networks in inference mode,
``logit_k(x) = sum(x * dL/dx) + sum_l sum(b_l * dL/dz_l) + logits_bias[k]``.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import fullgrad as ke
from tests.method.conftest import randomise
from tests.method.originals import pre_activation_logits

L = keras.layers


def _residual_net() -> keras.Model:
    inputs = keras.Input((16, 16, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = L.BatchNormalization()(x)
    shortcut = x
    x = L.SeparableConv2D(8, 3, padding="same", activation="relu")(x)
    x = L.DepthwiseConv2D(3, padding="same")(x)
    x = L.BatchNormalization()(x)
    x = L.Add()([x, shortcut])
    x = L.ReLU()(x)
    x = L.MaxPooling2D()(x)
    branch = L.Conv2D(4, 1, activation="relu")(x)
    x = L.Concatenate()([x, branch])
    x = L.ZeroPadding2D(1)(x)
    x = L.Conv2D(8, 3, strides=2)(x)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dense(16, activation="relu")(x)
    outputs = L.Dense(6, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def _transpose_net() -> keras.Model:
    inputs = keras.Input((12, 12, 2))
    x = L.Conv2D(6, 3, strides=2, padding="same", activation="relu")(inputs)
    x = L.Conv2DTranspose(4, 3, strides=2, padding="same", activation="relu")(x)
    x = L.BatchNormalization(scale=False)(x)
    x = L.AveragePooling2D(2)(x)
    x = L.Flatten()(x)
    outputs = L.Dense(3)(x)
    return keras.Model(inputs, outputs)


def _nested_net() -> keras.Model:
    backbone_in = keras.Input((16, 16, 3))
    y = L.Conv2D(6, 3, activation="relu")(backbone_in)
    y = L.BatchNormalization()(y)
    y = L.ReLU()(y)
    backbone = keras.Model(backbone_in, y, name="backbone")
    inputs = keras.Input((16, 16, 3))
    x = backbone(inputs)
    x = L.Conv2D(4, 3, activation="relu")(x)
    x = L.GlobalMaxPooling2D()(x)
    outputs = L.Dense(4, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def _sequential_net() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((14, 14, 1)),
            L.Conv2D(5, 3, activation="relu"),
            L.BatchNormalization(epsilon=0.2),
            L.ReLU(max_value=6.0),
            L.Conv2D(5, 3, use_bias=False),
            L.BatchNormalization(center=False),
            L.LeakyReLU(negative_slope=0.1),
            L.Flatten(),
            L.Dense(7, activation="relu"),
            L.Dense(3, activation="sigmoid"),
        ]
    )


def _conv1d_inside_image_net() -> keras.Model:
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    x = L.Reshape((64, 4))(x)
    x = L.Conv1D(5, 3, activation="relu")(x)
    x = L.GlobalAveragePooling1D()(x)
    outputs = L.Dense(3)(x)
    return keras.Model(inputs, outputs)


def _nested_deep_mixed_net() -> keras.Model:
    """Functional > Sequential > Functional > Sequential, with preprocessing inside."""
    innermost = keras.Sequential(
        [L.Conv2D(6, 1, activation="relu"), L.BatchNormalization()], name="innermost"
    )
    inner_in = keras.Input((14, 14, 6))
    inner = keras.Model(inner_in, L.Add()([inner_in, innermost(inner_in)]), name="inner")
    middle = keras.Sequential(
        [keras.Input((14, 14, 3)), L.Conv2D(6, 3, padding="same"), inner, L.ReLU()],
        name="middle",
    )
    inputs = keras.Input((14, 14, 3))
    x = L.Rescaling(1.0 / 4.0, offset=[0.5, -0.5, 0.25])(inputs)
    x = middle(x)
    x = L.Conv2D(4, 3, activation="relu")(x)
    x = L.GlobalAveragePooling2D()(x)
    outputs = L.Dense(5, activation="softmax")(x)
    return keras.Model(inputs, outputs)


ARCHITECTURES = {
    "nested_deep_mixed": (_nested_deep_mixed_net, (14, 14, 3)),
    "residual_separable_depthwise_concat": (_residual_net, (16, 16, 3)),
    "transpose_conv": (_transpose_net, (12, 12, 2)),
    "nested_model": (_nested_net, (16, 16, 3)),
    "sequential_relu6_leaky": (_sequential_net, (14, 14, 1)),
    "conv1d_inside": (_conv1d_inside_image_net, (8, 8, 3)),
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("seed", [0, 1])
def test_completeness_on_random_architectures(name, seed):
    build, shape = ARCHITECTURES[name]
    keras.utils.set_random_seed(seed)
    model = randomise(build(), seed)
    x = np.random.default_rng(seed).normal(0, 1, (5, *shape)).astype(np.float32)
    parts = ke.decompose(model, x)
    assert parts.residual.max() < 1e-4, parts.residual
    np.testing.assert_allclose(parts.reconstruction, parts.logits, rtol=1e-4, atol=1e-5)
    # every bias term takes part (no silently-dropped layer): none is identically zero
    assert all(np.abs(term).sum() > 0 for term in parts.biases)
    assert np.abs(parts.logits_bias).sum() > 0


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_exposed_logits_equal_the_original_model(name):
    """An inlined model must compute the original's function, not only be complete."""
    build, shape = ARCHITECTURES[name]
    keras.utils.set_random_seed(0)
    model = randomise(build(), 0)
    x = np.random.default_rng(0).normal(0, 1, (5, *shape)).astype(np.float32)
    exposed = ke.FullGrad(model).model
    np.testing.assert_allclose(
        exposed(x)[0].numpy(), pre_activation_logits(model, x), rtol=1e-5, atol=1e-6
    )


def test_deep_nesting_exposes_every_inner_bias_layer():
    model = _nested_deep_mixed_net()
    layers, _ = ke.inspection.layers_with_biases(model)
    kinds = sorted(type(layer).__name__ for layer in layers)
    assert kinds == ["BatchNormalization", "Conv2D", "Conv2D", "Conv2D", "Dense", "Rescaling"]
    assert len(ke.FullGrad(model).model.outputs) == 6


def test_layers_found_include_every_kind():
    keras.utils.set_random_seed(0)
    kinds = {type(layer).__name__ for layer in ke.inspection.layers_with_biases(_residual_net())[0]}
    assert {"Conv2D", "SeparableConv2D", "DepthwiseConv2D", "BatchNormalization", "Dense"} <= kinds
    kinds = {type(layer).__name__ for layer in ke.inspection.layers_with_biases(_transpose_net())[0]}
    assert "Conv2DTranspose" in kinds
    kinds = {
        type(layer).__name__
        for layer in ke.inspection.layers_with_biases(_conv1d_inside_image_net())[0]
    }
    assert "Conv1D" in kinds


def test_completeness_on_a_3d_model():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((6, 6, 6, 2))
    x = L.Conv3D(4, 3, activation="relu")(inputs)
    x = L.BatchNormalization()(x)
    x = L.GlobalAveragePooling3D()(x)
    model = randomise(keras.Model(inputs, L.Dense(3)(x)), 3)
    assert "Conv3D" in {type(layer).__name__ for layer in ke.inspection.layers_with_biases(model)[0]}
    parts = ke.decompose(model, np.random.default_rng(0).normal(size=(3, 6, 6, 6, 2)))
    assert parts.residual.max() < 1e-4


def test_nested_bias_layers_are_exposed_individually():
    model = _nested_net()
    logits = ke.inspection.get_logits_layer(model)
    inters, _ = ke.inspection.layers_with_biases(model, exclude=[logits])
    names = [layer.name for layer in inters]
    assert len(names) == 3  # backbone conv + BN, outer conv: not the backbone as one layer
    exposed = ke.inspection.expose(model, inters, logits)
    assert len(exposed.outputs) == 4


def _attention(x):
    tokens = L.Reshape((100, 6))(x)
    tokens = L.MultiHeadAttention(num_heads=2, key_dim=3)(tokens, tokens)
    return L.Reshape((10, 10, 6))(tokens)


@pytest.mark.parametrize(
    "activation_layer",
    [
        lambda: L.Activation("swish"),
        lambda: L.Activation("gelu"),
        lambda: L.Activation("hard_swish"),
        lambda: L.LayerNormalization(),
        lambda: _attention,
    ],
    ids=["swish", "gelu", "hard_swish", "layernorm", "attention"],
)
def test_smooth_nets_report_the_residual_without_failing(activation_layer):
    keras.utils.set_random_seed(5)
    inputs = keras.Input((12, 12, 3))
    x = L.Conv2D(6, 3)(inputs)
    x = activation_layer()(x)
    x = L.Conv2D(6, 3, activation="relu")(x)
    x = L.GlobalAveragePooling2D()(x)
    model = randomise(keras.Model(inputs, L.Dense(4)(x)), 5)
    x = np.random.default_rng(1).normal(0, 2, (4, 12, 12, 3)).astype(np.float32)
    parts = ke.decompose(model, x)
    assert np.isfinite(parts.residual).all()
    assert parts.residual.max() > 1e-3  # completeness does not hold, and the residual says so
    _, maps = ke.full_gradients(model, x)
    assert np.isfinite(maps).all()


def test_fused_and_separate_activations_give_the_same_decomposition():
    """Pre-activation gradients: Conv2D(activation='relu') == Conv2D then ReLU."""
    keras.utils.set_random_seed(9)
    inputs = keras.Input((10, 10, 3))
    fused = keras.Model(
        inputs,
        L.Dense(3)(L.GlobalAveragePooling2D()(L.Conv2D(5, 3, activation="relu")(inputs))),
    )
    randomise(fused, 9)
    inputs = keras.Input((10, 10, 3))
    separate = keras.Model(
        inputs, L.Dense(3)(L.GlobalAveragePooling2D()(L.ReLU()(L.Conv2D(5, 3)(inputs))))
    )
    separate.set_weights(fused.get_weights())
    x = np.random.default_rng(2).normal(size=(4, 10, 10, 3)).astype(np.float32)
    a, b = ke.decompose(fused, x), ke.decompose(separate, x)
    np.testing.assert_allclose(a.biases[0], b.biases[0], atol=1e-6)
    np.testing.assert_allclose(a.input, b.input, atol=1e-6)
    assert a.residual.max() < 1e-5
    # The exposed output is z = conv(x), before the ReLU (so it has negative values).
    z = ke.FullGrad(fused).model(x)[1].numpy()
    conv = separate.layers[1]
    np.testing.assert_allclose(z, conv(x).numpy(), atol=1e-6)
    assert z.min() < 0


def _grey_mini_xception(classes: int = 7) -> keras.Model:
    """64x64x1, bias-free convolutions, four residual blocks, Conv2D(classes) -> GAP -> softmax.

    Its eager Conv2D backprop crashes TF 2.21 with oneDNN on CPU (a glibc malloc assertion):
    ``decompose`` must take its gradients in a traced step.
    """
    inputs = keras.Input((64, 64, 1))
    x = L.Conv2D(8, 3, use_bias=False)(inputs)
    x = L.BatchNormalization()(x)
    x = L.Activation("relu")(x)
    x = L.Conv2D(8, 3, use_bias=False)(x)
    x = L.BatchNormalization()(x)
    x = L.Activation("relu")(x)
    for filters in (16, 32, 64, 128):
        residual = L.Conv2D(filters, 1, strides=2, padding="same", use_bias=False)(x)
        residual = L.BatchNormalization()(residual)
        x = L.SeparableConv2D(filters, 3, padding="same", use_bias=False)(x)
        x = L.BatchNormalization()(x)
        x = L.Activation("relu")(x)
        x = L.SeparableConv2D(filters, 3, padding="same", use_bias=False)(x)
        x = L.BatchNormalization()(x)
        x = L.MaxPooling2D(3, strides=2, padding="same")(x)
        x = L.Add()([x, residual])
    x = L.Conv2D(classes, 3, padding="same")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Activation("softmax")(x))


def test_decompose_of_a_grey_mini_xception_is_complete():
    keras.utils.set_random_seed(0)
    model = _grey_mini_xception()  # random weights, as in the crash report
    gap = next(layer for layer in model.layers if isinstance(layer, L.GlobalAveragePooling2D))
    layers, _ = ke.inspection.layers_with_biases(model, exclude=[gap])
    exposed = ke.inspection.expose(model, layers, logits_layer=gap)
    x = np.random.default_rng(0).uniform(0, 1, (4, 64, 64, 1)).astype(np.float32)
    parts = ke.decompose(exposed, x)
    logits = exposed(x)[0].numpy()
    np.testing.assert_allclose(parts.logits, logits.max(axis=1), rtol=1e-5)
    assert parts.residual.max() < 1e-4, parts.residual
    np.testing.assert_allclose(parts.reconstruction, parts.logits, rtol=1e-4, atol=1e-5)
    assert len(parts.biases) == len(layers) == 15  # 14 BatchNorms and the class convolution
    maps = ke.FullGrad(exposed).explain(x)
    assert maps.shape == (4, 64, 64) and np.isfinite(maps).all()
