"""Input x gradient and Grad-CAM against hand computations, and batching invariance."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from fullgrad import baselines
from fullgrad.targets import TARGET_PREDICTED


def _minmax(maps: np.ndarray) -> np.ndarray:
    low = maps.min(axis=(1, 2), keepdims=True)
    high = maps.max(axis=(1, 2), keepdims=True)
    return (maps - low) / np.maximum(high - low, 1e-12)


def _randomise(model: keras.Model, seed: int) -> keras.Model:
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        for variable in layer.weights:
            if "moving_variance" in variable.path:
                variable.assign(rng.uniform(0.5, 2.0, variable.shape))
            else:
                variable.assign(rng.normal(0, 0.5, variable.shape))
    return model


@pytest.fixture(scope="module")
def cam_model() -> keras.Model:
    """conv (relu, full resolution) -> global average pool -> softmax classifier."""
    inputs = keras.Input((6, 6, 2))
    features = keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="conv")(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    outputs = keras.layers.Dense(4, activation="softmax", name="classifier")(pooled)
    return _randomise(keras.Model(inputs, outputs), seed=1)


def test_grad_cam_equals_the_hand_computation(cam_model, rng):
    x = rng.uniform(-1, 1, (5, 6, 6, 2)).astype(np.float32)
    targets = np.array([0, 1, 2, 3, 1])
    features = keras.Model(cam_model.inputs[0], cam_model.get_layer("conv").output)(x).numpy()
    kernel = cam_model.get_layer("classifier").kernel.numpy()  # [3, 4]
    # logit_k = sum_c W[c, k] * mean_hw A_c + b_k, so dlogit_k/dA_c = W[c, k] / (h * w).
    alpha = kernel[:, targets].T / 36.0  # [B, 3]
    cam = np.maximum(np.einsum("bhwc,bc->bhw", features, alpha), 0.0)
    maps = baselines.grad_cam(cam_model, x, targets)
    assert maps.shape == (5, 6, 6)
    np.testing.assert_allclose(maps, _minmax(cam), atol=1e-5)
    assert maps.min() == 0.0 and np.allclose(maps.max(axis=(1, 2)), 1.0)


def test_grad_cam_upsamples_the_last_spatial_layer(rng):
    inputs = keras.Input((8, 8, 2))
    conv = keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="conv")(inputs)
    pooled = keras.layers.MaxPooling2D(name="pool")(conv)
    logits = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(pooled))
    model = _randomise(keras.Model(inputs, logits), seed=2)
    x = rng.uniform(-1, 1, (4, 8, 8, 2)).astype(np.float32)
    features = keras.Model(model.inputs[0], model.get_layer("pool").output)(x).numpy()
    kernel = model.layers[-1].kernel.numpy()
    targets = model(x).numpy().argmax(axis=1)
    cam = np.maximum(np.einsum("bhwc,bc->bhw", features, kernel[:, targets].T / 16.0), 0.0)
    expected = _minmax(tf.image.resize(cam[..., None], (8, 8)).numpy()[..., 0])
    maps = baselines.grad_cam(model, x)  # the pooling output is the last 4-D one
    np.testing.assert_allclose(maps, expected, atol=1e-5)
    np.testing.assert_allclose(baselines.grad_cam(model, x, layer="pool"), maps, atol=1e-6)
    on_conv = baselines.GradCAM(model, layer=model.get_layer("conv")).explain(x)
    assert on_conv.shape == (4, 8, 8) and not np.allclose(on_conv, maps, atol=1e-3)
    with pytest.raises(ValueError, match="not in"):
        baselines.GradCAM(model, layer="missing")


def test_input_x_gradient_equals_the_closed_form_of_a_linear_model(rng):
    inputs = keras.Input((5, 5, 2))
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(inputs))
    model = _randomise(keras.Model(inputs, outputs), seed=3)
    x = rng.uniform(-1, 1, (6, 5, 5, 2)).astype(np.float32)
    kernel = model.layers[-1].kernel.numpy()  # [50, 3]
    logits = x.reshape(6, -1) @ kernel + model.layers[-1].bias.numpy()
    targets = logits.argmax(axis=1)
    # d logit_k / dx = W[:, k]: the softmax is not differentiated through.
    grad = kernel[:, targets].T.reshape(6, 5, 5, 2)
    expected = _minmax(np.abs(x * grad).sum(axis=-1))
    np.testing.assert_allclose(baselines.input_x_gradient(model, x), expected, atol=1e-6)
    given = np.array([2, 0, 1, 2, 0, TARGET_PREDICTED])
    grad = kernel[:, np.where(given < 0, targets, given)].T.reshape(6, 5, 5, 2)
    np.testing.assert_allclose(
        baselines.InputXGradient(model).explain(x, given),
        _minmax(np.abs(x * grad).sum(axis=-1)),
        atol=1e-6,
    )


@pytest.mark.parametrize("method", ["input_x_gradient", "grad_cam"])
def test_batched_equals_unbatched_and_traces_once(sequential_model, rng, method):
    explainer = (
        baselines.InputXGradient(sequential_model, batch_size=None)
        if method == "input_x_gradient"
        else baselines.GradCAM(sequential_model, batch_size=None)
    )
    x = rng.uniform(-1, 1, (7, 20, 20, 3)).astype(np.float32)
    y = rng.integers(0, 5, 7)
    whole = explainer.explain(x, y)
    one_by_one = np.concatenate([explainer.explain(x[i : i + 1], y[i : i + 1]) for i in range(7)])
    np.testing.assert_allclose(one_by_one, whole, atol=1e-6)
    explainer.batch_size = 3
    np.testing.assert_allclose(explainer.explain(x, y), whole, atol=1e-6)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(2)
    np.testing.assert_allclose(explainer.explain(dataset), whole, atol=1e-6)
    (step,) = explainer._steps.values()
    assert step.experimental_get_tracing_count() == 1
    assert whole.shape == (7, 20, 20) and whole.min() >= 0.0 and whole.max() <= 1.0 + 1e-6
    # Targets change the map: the explainer does not ignore them.
    assert not np.allclose(explainer.explain(x, (y + 1) % 5), whole, atol=1e-3)
