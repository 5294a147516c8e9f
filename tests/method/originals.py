"""The ORIGINAL model's pre-activation class scores, computed without fullgrad.

A wrongly inlined or wrongly cut model would still be "complete" against its own logits, so
tests compare the exposed model's logits with these. The helper walks back over the original
model's trailing Activation/Softmax/Dropout layers, turns off the fused activation of the layer
it reaches, and evaluates ``keras.Model(model.inputs, that_layer.output)`` on the original,
shared weights.
"""

from __future__ import annotations

import keras
import numpy as np

_TAIL = (keras.layers.Activation, keras.layers.Softmax, keras.layers.Dropout)


def pre_activation_logits(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """Returns ``[B, classes]``: the original model's output before its final activation."""
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    index = len(layers) - 1
    while isinstance(layers[index], _TAIL):
        index -= 1
    head = layers[index]
    activation = getattr(head, "activation", None)
    if activation is not None:
        head.activation = keras.activations.linear
    try:
        return np.asarray(keras.Model(model.inputs[0], head.output)(x, training=False))
    finally:
        if activation is not None:
            head.activation = activation
