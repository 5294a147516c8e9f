"""Small random Keras models whose weights are far from their initialisation.

Biases, BatchNorm statistics and gammas are randomised so that every term of the FullGrad
decomposition is non-zero: a test that passes with zero biases proves little.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest

from tests.method.weights import randomise


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def sequential_model() -> keras.Sequential:
    """A conv-BN-ReLU classifier with fused activations, of the layers the reference supports."""
    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [
            keras.Input((20, 20, 3)),
            keras.layers.Conv2D(6, 3, padding="same", activation="relu"),
            keras.layers.BatchNormalization(epsilon=0.01),
            keras.layers.ReLU(),
            keras.layers.DepthwiseConv2D(3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(8, 3, strides=2, padding="valid"),
            keras.layers.BatchNormalization(scale=False),
            keras.layers.ReLU(),
            keras.layers.Conv2D(8, 1, use_bias=False),
            keras.layers.BatchNormalization(center=False),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(12, activation="relu"),
            keras.layers.Dense(5, activation="softmax"),
        ]
    )
    return randomise(model, seed=3)
