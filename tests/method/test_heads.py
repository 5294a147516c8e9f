"""Classifier heads beyond Dense, preprocessing layers and nested Sequential models.

Each model is checked four ways: the logits layer found, maps and every decomposition term
equal to the independent reference (tests/method/reference.py), completeness, and the
exposed model's logits equal to the ORIGINAL model's pre-activation output.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import fullgrad as ke
from tests.method.conftest import randomise
from tests.method.originals import pre_activation_logits
from tests.method.reference import reference_decomposition, reference_fullgrad
from tests.method.test_reference import assert_terms_equal

L = keras.layers


def _trunk(channels: int = 3) -> list[keras.layers.Layer]:
    return [
        keras.Input((12, 12, channels)),
        L.Conv2D(6, 3, padding="same", activation="relu"),
        L.BatchNormalization(),
        L.ReLU(),
        L.MaxPooling2D(),
    ]


def _conv1x1_reshape() -> keras.Sequential:
    """keras.applications.MobileNet's head."""
    return keras.Sequential(
        [
            *_trunk(),
            L.GlobalAveragePooling2D(keepdims=True),
            L.Dropout(0.3),
            L.Conv2D(5, 1, name="conv_preds"),
            L.Reshape((5,), name="logits"),
            L.Activation("softmax"),
        ]
    )


def _conv1x1_flatten() -> keras.Sequential:
    """keras.applications.MobileNetV3's head."""
    return keras.Sequential(
        [
            *_trunk(),
            L.GlobalAveragePooling2D(keepdims=True),
            L.Conv2D(7, 1, activation="relu"),
            L.Dropout(0.2),
            L.Conv2D(5, 1),
            L.Flatten(name="logits"),
            L.Activation("softmax"),
        ]
    )


def _conv_gap() -> keras.Sequential:
    """The all-convolutional head: Conv2D(classes) -> GlobalAveragePooling2D -> softmax."""
    return keras.Sequential(
        [*_trunk(), L.Conv2D(5, 3, padding="same"), L.GlobalAveragePooling2D(name="logits"),
         L.Activation("softmax")]
    )


def _conv_gmp() -> keras.Sequential:
    return keras.Sequential(
        [*_trunk(), L.Conv2D(5, 3), L.GlobalMaxPooling2D(name="logits"), L.Dropout(0.5),
         L.Softmax()]
    )


def _dense_tail() -> keras.Sequential:
    """Dense -> Dropout -> Activation -> Softmax: the tail is skipped, Dense is the logits."""
    return keras.Sequential(
        [*_trunk(), L.GlobalAveragePooling2D(), L.Dense(5, name="logits"), L.Dropout(0.5),
         L.Activation("linear"), L.Softmax()]
    )


def _preprocessing_inside() -> keras.Sequential:
    """A ReLU net that carries its own preprocessing: scalar offset, per-channel statistics."""
    return keras.Sequential(
        [
            keras.Input((12, 12, 3)),
            L.Rescaling(1.0 / 127.5, offset=-1.0),
            L.Normalization(mean=[0.2, -0.1, 0.4], variance=[0.5, 2.0, 1.3]),
            *_trunk()[1:],
            L.GlobalAveragePooling2D(),
            L.Dense(5, activation="softmax", name="logits"),
        ]
    )


def _preprocessing_per_channel_grey() -> keras.Sequential:
    """One channel; per-channel Rescaling after a convolution, scalar Normalization first."""
    return keras.Sequential(
        [
            keras.Input((12, 12, 1)),
            L.Normalization(axis=None, mean=0.3, variance=2.5),
            L.Conv2D(4, 3, padding="same", activation="relu"),
            L.Rescaling([0.5, 2.0, -1.0, 1.5], offset=[0.1, -0.2, 0.3, 0.0]),
            L.ReLU(),
            L.Conv2D(5, 3),
            L.GlobalAveragePooling2D(name="logits"),
            L.Activation("softmax"),
        ]
    )


def _nested_sequential() -> keras.Sequential:
    """Sequential blocks inside Sequential blocks, as keras.applications.ConvNeXt builds them."""
    inner = keras.Sequential([L.Conv2D(6, 1, activation="relu"), L.BatchNormalization()])
    block = keras.Sequential([L.Conv2D(6, 3, padding="same"), inner, L.ReLU()])
    return keras.Sequential(
        [
            keras.Input((12, 12, 3)),
            L.Rescaling(2.0, offset=0.5),
            block,
            keras.Sequential([L.MaxPooling2D(), keras.Sequential([L.Conv2D(5, 1)])]),
            L.GlobalMaxPooling2D(name="logits"),
            L.Activation("softmax"),
        ]
    )


#: name -> (builder, the class of the logits layer it must find)
HEADS = {
    "conv1x1_reshape": (_conv1x1_reshape, L.Reshape),
    "conv1x1_flatten": (_conv1x1_flatten, L.Flatten),
    "conv_gap": (_conv_gap, L.GlobalAveragePooling2D),
    "conv_gmp": (_conv_gmp, L.GlobalMaxPooling2D),
    "dense_dropout_activation_softmax": (_dense_tail, L.Dense),
    "rescaling_normalization": (_preprocessing_inside, L.Dense),
    "grey_scalar_normalization_per_channel_rescaling": (
        _preprocessing_per_channel_grey,
        L.GlobalAveragePooling2D,
    ),
    "nested_sequential": (_nested_sequential, L.GlobalMaxPooling2D),
}


def _model_and_input(name: str, seed: int = 0):
    build, _ = HEADS[name]
    keras.utils.set_random_seed(seed)
    model = randomise(build(), seed)
    x = np.random.default_rng(seed).normal(0, 1, (4, *model.input_shape[1:])).astype(np.float32)
    if name == "rescaling_normalization":
        x = np.random.default_rng(seed).uniform(0, 255, x.shape).astype(np.float32)
    return model, x


@pytest.mark.parametrize("name", sorted(HEADS))
def test_logits_layer_is_found_through_the_head(name):
    model, _ = _model_and_input(name)
    found = ke.inspection.get_logits_layer(model)
    assert isinstance(found, HEADS[name][1])
    assert found.name == "logits"


@pytest.mark.parametrize("name", sorted(HEADS))
def test_maps_and_terms_equal_reference(name):
    model, x = _model_and_input(name)
    targets = np.array([[0], [1], [4], [2]])
    ref_logits, ref_maps, _ = reference_fullgrad(model, x, targets)
    logits, maps = ke.full_gradients(model, x, targets)
    np.testing.assert_allclose(logits[:, 0], ref_logits[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(maps[..., 0], ref_maps, atol=1e-5)
    parts = ke.decompose(model, x, targets[:, 0])
    _, ref_input, ref_biases, ref_logits_bias = reference_decomposition(model, x, targets)
    assert_terms_equal(parts, ref_input, ref_biases, ref_logits_bias)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_complete_and_equal_to_the_original(name):
    model, x = _model_and_input(name, seed=1)
    parts = ke.decompose(model, x)
    assert parts.residual.max() < 1e-6, parts.residual
    assert all(np.abs(term).sum() > 0 for term in parts.biases)
    original = pre_activation_logits(model, x)
    # Every class, not only the explained one: a max-pooled head can hide a wrong inlining
    # from the winning class.
    np.testing.assert_allclose(
        ke.FullGrad(model).model(x)[0].numpy(), original, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        parts.logits, original[np.arange(len(x)), parts.targets], rtol=1e-5, atol=1e-6
    )


def test_preprocessing_offsets_are_bias_terms():
    model, _ = _model_and_input("rescaling_normalization")
    layers, biases = ke.inspection.layers_with_biases(model)
    kinds = [type(layer).__name__ for layer in layers]
    assert kinds[:2] == ["Rescaling", "Normalization"]
    np.testing.assert_allclose(biases[0], [-1.0, -1.0, -1.0])
    np.testing.assert_allclose(
        biases[1], -np.array([0.2, -0.1, 0.4]) / np.sqrt([0.5, 2.0, 1.3]), rtol=1e-6
    )


def test_rescaling_without_offset_adds_no_term():
    model = keras.Sequential(
        [keras.Input((6, 6, 2)), L.Rescaling(0.5), L.Conv2D(3, 3), L.GlobalAveragePooling2D()]
    )
    layers, _ = ke.inspection.layers_with_biases(model)
    assert [type(layer).__name__ for layer in layers] == ["Conv2D"]


@pytest.mark.parametrize("entry", ["FullGrad", "decompose", "full_gradients"])
def test_logits_layer_can_be_named(entry):
    """Overriding the choice: explain the Conv2D(classes) head's pooled output explicitly,
    on a model whose head the search cannot see through (a ReLU after the pooling)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((10, 10, 3))
    x = L.Conv2D(4, 3, activation="relu")(inputs)
    x = L.Conv2D(3, 3)(x)
    pooled = L.GlobalAveragePooling2D(name="pooled")(x)
    model = randomise(keras.Model(inputs, L.ReLU()(pooled)))
    images = np.random.default_rng(0).normal(0, 1, (3, 10, 10, 3)).astype(np.float32)
    # Without the override the last kernel layer is taken, and it is spatial.
    with pytest.raises(ValueError, match="logits_layer="):
        ke.FullGrad(model)
    expected = keras.Model(inputs, pooled)(images).numpy()
    if entry == "FullGrad":
        logits = ke.FullGrad(model, logits_layer="pooled").compute(images).all_logits
    elif entry == "decompose":
        parts = ke.decompose(model, images, logits_layer=model.get_layer("pooled"))
        assert parts.residual.max() < 1e-6
        logits = expected.copy()
        logits[np.arange(3), parts.targets] = parts.logits
    else:
        logits, _ = ke.full_gradients(model, images, [[0], [1], [2]], logits_layer="pooled")
        expected = expected[np.arange(3), [0, 1, 2]][:, None]
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


def test_head_inside_a_nested_model_is_found():
    """The common transfer-learning shape: Sequential([backbone, Sequential(head)])."""
    keras.utils.set_random_seed(2)
    backbone = keras.Sequential([keras.Input((10, 10, 3)), L.Conv2D(6, 3, activation="relu")])
    head = keras.Sequential(
        [L.Conv2D(4, 1), L.GlobalAveragePooling2D(name="logits"), L.Activation("softmax")]
    )
    model = randomise(keras.Sequential([keras.Input((10, 10, 3)), backbone, head]), 2)
    assert ke.inspection.get_logits_layer(model) is head.layers[1]
    x = np.random.default_rng(2).normal(0, 1, (3, 10, 10, 3)).astype(np.float32)
    original = head.layers[1](head.layers[0](backbone(x))).numpy()
    parts = ke.decompose(model, x)
    assert parts.residual.max() < 1e-6
    np.testing.assert_allclose(ke.FullGrad(model).model(x)[0].numpy(), original, rtol=1e-5, atol=1e-6)
