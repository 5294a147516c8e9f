"""Random, non-trivial biases and BatchNorm statistics for Keras models (tests, benchmarks).

A fresh model (``keras.applications.*(weights=None)`` included) has every bias and BatchNorm
mean and beta at zero: every bias term of FullGrad is then zero, and a check that passes on it
proves little.
"""

from __future__ import annotations

import keras
import numpy as np

__all__ = ["randomise"]


def randomise(model: keras.Model, seed: int = 0) -> keras.Model:
    """Gives every bias and BatchNorm statistic of ``model`` random, non-trivial values."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            randomise(layer, seed + 1)
            continue
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 0.5, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape))
            if layer.scale:
                layer.gamma.assign(rng.normal(1.0, 0.3, layer.gamma.shape))
            if layer.center:
                layer.beta.assign(rng.normal(0, 0.3, layer.beta.shape))
        bias = getattr(layer, "bias", None)
        if bias is not None and not isinstance(layer, keras.layers.BatchNormalization):
            bias.assign(rng.normal(0, 0.2, bias.shape))
    return model
