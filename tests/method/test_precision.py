"""``FullGrad(precision=...)``: the model runs under a Keras mixed policy, sums stay float32."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import fullgrad as ke
from tests.method.conftest import randomise

L = keras.layers


def _relu_cnn() -> keras.Model:
    keras.utils.set_random_seed(11)
    inputs = keras.Input((24, 24, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.Conv2D(12, 3, strides=2, activation="relu")(x)
    x = L.MaxPooling2D()(x)
    x = L.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = L.GlobalAveragePooling2D()(x)
    outputs = L.Dense(5, activation="softmax")(x)
    return randomise(keras.Model(inputs, outputs), 11)


def _correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([np.corrcoef(p.ravel(), q.ravel())[0, 1] for p, q in zip(a, b, strict=True)])


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_maps_follow_float32(precision):
    model = _relu_cnn()
    x = np.random.default_rng(0).uniform(-1, 1, (6, 24, 24, 3)).astype(np.float32)
    exact = ke.FullGrad(model).compute(x)
    mixed_engine = ke.FullGrad(model, precision=precision)
    mixed = mixed_engine.compute(x, exact.targets)
    compute_dtype = {"mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}[precision]
    assert mixed_engine.model.layers[1].compute_dtype == compute_dtype
    assert mixed_engine.model.layers[1].variable_dtype == "float32"
    assert all(layer.dtype_policy.name == "float32" for layer in model.layers)  # untouched
    for field in ("maps", "logits", "residual"):
        assert getattr(mixed, field).dtype == np.float32, field
    r = _correlations(mixed.maps[..., 0], exact.maps[..., 0])
    assert r.mean() >= 0.99 and r.min() >= 0.98, r  # bf16: min 0.992, mean 0.996 here
    np.testing.assert_allclose(mixed.logits, exact.logits, rtol=0.05, atol=0.05)
    # The residual is reported, not hidden: finite, and above float32's ~1e-7.
    assert np.isfinite(mixed.residual).all()
    assert mixed.residual.max() > exact.residual.max()


def test_decompose_under_mixed_precision_reports_its_residual():
    model = _relu_cnn()
    x = np.random.default_rng(1).uniform(-1, 1, (3, 24, 24, 3)).astype(np.float32)
    parts = ke.FullGrad(model, precision="mixed_bfloat16").decompose(x)
    assert parts.input.dtype == np.float32 and all(t.dtype == np.float32 for t in parts.biases)
    assert np.isfinite(parts.residual).all() and parts.residual.max() < 0.1


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="mixed_bfloat16"):
        ke.FullGrad(_relu_cnn(), precision="bfloat16")
