"""Smoke tests on keras.applications architectures (random weights, small inputs).

Each reports its completeness residual; the piecewise-linear ones must be complete. EfficientNet
has swish, sigmoid gates and Rescaling/Normalization offsets inside, so its residual is only
reported.
"""

from __future__ import annotations

import re
import time

import keras
import numpy as np
import pytest

import fullgrad as ke
from tests.method.conftest import randomise
from tests.method.originals import pre_activation_logits

#: name -> (input size, must be complete)
APPLICATIONS = {
    "Xception": (71, True),
    "ResNet50": (32, True),
    "ResNet50V2": (32, True),
    "VGG16": (32, True),
    "MobileNetV2": (32, True),
    "EfficientNetB0": (32, False),
    "DenseNet121": (32, True),
    "InceptionV3": (75, True),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(APPLICATIONS))
def test_application_smoke(name, record_property, capsys):
    size, complete = APPLICATIONS[name]
    keras.utils.set_random_seed(0)
    # Randomised biases and BN statistics: a freshly initialised MobileNetV2 or EfficientNet
    # outputs logits of ~1e-12, whose maps are flat noise.
    model = randomise(
        getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), classes=10)
    )
    x = np.random.default_rng(0).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    explainer = ke.FullGrad(model)
    result = explainer.compute(x)
    assert result.maps.shape == (2, size, size, 1)
    assert np.isfinite(result.maps).all()
    np.testing.assert_allclose(result.maps.reshape(2, -1).max(axis=1), 1.0, atol=1e-4)
    residual = float(result.residual.max())
    record_property("completeness_residual", residual)
    with capsys.disabled():
        print(f"\n{name}: completeness residual {residual:.2e}")
    assert np.isfinite(residual)
    assert np.abs(result.logits).min() > 1e-3
    # The exposed model computes the original's function, up to the final activation. Both
    # run eagerly: the traced step's fused kernels round differently, and randomised deep
    # swish nets (EfficientNetV2-L: logits ~1e6) amplify that far beyond any tolerance.
    original = pre_activation_logits(model, x)
    np.testing.assert_allclose(
        explainer.model(x)[0].numpy(), original, rtol=1e-5, atol=1e-6 * np.abs(original).max()
    )
    if complete:
        assert residual < 1e-4
    else:
        assert residual > 1e-4  # the identity does not hold for swish nets, and it shows


def _constructors() -> list[str]:
    return sorted(
        name
        for name in dir(keras.applications)
        if name[:1].isupper() and callable(getattr(keras.applications, name))
    )


def _build_smallest(name: str) -> tuple[keras.Model, int]:
    """Builds ``name`` with the smallest square input it accepts among a few candidates."""
    builder = getattr(keras.applications, name)
    candidates = [32, 64, 75, 96, 128, 224, 331]
    errors = []
    while candidates:
        size = candidates.pop(0)
        try:
            return builder(weights=None, input_shape=(size, size, 3), classes=10), size
        except ValueError as error:  # "Input size must be at least 75x75", or a size collapse
            errors.append(f"{size}: {error}")
            found = re.search(r"at least (\d+)", str(error))
            if found:
                candidates = [int(found.group(1))] + [c for c in candidates if c > int(found.group(1))]
    raise AssertionError(f"{name} accepts none of the sizes tried: {errors}")


@pytest.mark.slow
@pytest.mark.applications
@pytest.mark.parametrize("name", _constructors())
def test_every_application(name, record_property, capsys):
    """FullGrad(model) with defaults on every keras.applications constructor."""
    keras.utils.set_random_seed(0)
    start = time.perf_counter()
    model, size = _build_smallest(name)
    randomise(model)
    x = np.random.default_rng(0).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    explainer = ke.FullGrad(model)
    result = explainer.compute(x)
    seconds = time.perf_counter() - start
    residual = float(result.residual.max())
    record_property("completeness_residual", residual)
    with capsys.disabled():
        print(f"\nAPPLICATION {name} size={size} residual={residual:.2e} seconds={seconds:.0f}")
    assert result.maps.shape == (2, size, size, 1)
    assert np.isfinite(result.maps).all()
    assert np.isfinite(residual)
    original = pre_activation_logits(model, x)  # eagerly, as in test_application_smoke
    np.testing.assert_allclose(
        explainer.model(x)[0].numpy(), original, rtol=1e-5, atol=1e-6 * np.abs(original).max()
    )
