"""Writes the legacy Keras 2 HDF5 classifiers that tests/method/test_models.py loads.

Run with tf_keras 2.21.0 (Keras 2) on TensorFlow 2.21.0, in a throwaway environment that is
not the project's (the project runs Keras 3):

    python3.11 -m venv /tmp/tfk
    /tmp/tfk/bin/pip install tensorflow==2.21.0 tf_keras==2.21.0
    /tmp/tfk/bin/python tests/data/make_legacy_models.py

It writes, next to this script:

- ``legacy_allconv.h5``: Rescaling(1/255, offset=-0.5) -> Conv2D -> BatchNormalization ->
  Activation('relu') -> DepthwiseConv2D -> Activation('relu') -> MaxPooling2D -> Conv2D(5) -> GlobalAveragePooling2D -> Activation('softmax'), the
  classic all-convolutional head, with Keras 2 ``Activation`` layers.
- ``legacy_grey_xception.hdf5``: a one-channel mini-Xception: bias-free convolutions, a
  residual block of bias-free SeparableConv2D layers with MaxPooling2D(3, 2, 'same') and Add,
  then Conv2D(7) -> GlobalAveragePooling2D -> Activation('softmax').
- ``legacy_lambda.h5``: a Lambda layer (Python bytecode in the file), which safe_mode refuses.
- ``legacy_expected.npz``: for each model a fixed input (``<name>_x``) and the logits tf_keras
  computes for it before the softmax (``<name>_logits``), and the tf_keras version.

Biases and BatchNormalization statistics are random, so that every FullGrad term is non-zero.
"""

from __future__ import annotations

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"

import numpy as np
import tf_keras as keras

HERE = os.path.dirname(os.path.abspath(__file__))
L = keras.layers


def _randomise(model: keras.Model, rng: np.random.Generator) -> None:
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights(
                [
                    rng.normal(1.0, 0.3, gamma.shape),
                    rng.normal(0.0, 0.3, beta.shape),
                    rng.normal(0.0, 0.5, mean.shape),
                    rng.uniform(0.5, 2.0, variance.shape),
                ]
            )
        elif getattr(layer, "use_bias", False):
            weights = layer.get_weights()
            weights[-1] = rng.normal(0.0, 0.2, weights[-1].shape)
            layer.set_weights(weights)


def allconv() -> keras.Model:
    inputs = keras.Input((16, 16, 3))
    x = L.Rescaling(1.0 / 255.0, offset=-0.5)(inputs)
    x = L.Conv2D(8, 3, padding="same")(x)
    x = L.BatchNormalization()(x)
    x = L.Activation("relu")(x)
    x = L.DepthwiseConv2D(3, padding="same")(x)
    x = L.Activation("relu")(x)
    x = L.MaxPooling2D()(x)
    x = L.Conv2D(5, 3, padding="same", name="class_maps")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    outputs = L.Activation("softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="legacy_allconv")


def grey_xception() -> keras.Model:
    inputs = keras.Input((16, 16, 1))
    x = L.Conv2D(8, 3, use_bias=False)(inputs)
    x = L.BatchNormalization()(x)
    x = L.Activation("relu")(x)
    shortcut = L.Conv2D(16, 1, strides=2, padding="same", use_bias=False)(x)
    shortcut = L.BatchNormalization()(shortcut)
    x = L.SeparableConv2D(16, 3, padding="same", use_bias=False)(x)
    x = L.BatchNormalization()(x)
    x = L.Activation("relu")(x)
    x = L.SeparableConv2D(16, 3, padding="same", use_bias=False)(x)
    x = L.BatchNormalization()(x)
    x = L.MaxPooling2D(3, strides=2, padding="same")(x)
    x = L.Add()([x, shortcut])
    x = L.Conv2D(7, 3, padding="same", name="class_maps")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    outputs = L.Activation("softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="legacy_grey_xception")


def main() -> None:
    rng = np.random.default_rng(11)
    expected = {"tf_keras_version": np.array(keras.__version__)}
    for name, build, filename in [
        ("allconv", allconv, "legacy_allconv.h5"),
        ("grey_xception", grey_xception, "legacy_grey_xception.hdf5"),
    ]:
        keras.utils.set_random_seed(0)
        model = build()
        _randomise(model, rng)
        shape = model.input_shape[1:]
        low, high = (0.0, 255.0) if name == "allconv" else (-1.0, 1.0)
        x = rng.uniform(low, high, (3, *shape)).astype(np.float32)
        pre_softmax = keras.Model(model.input, model.get_layer("pool").output)
        expected[f"{name}_x"] = x
        expected[f"{name}_logits"] = pre_softmax(x, training=False).numpy()
        model.save(os.path.join(HERE, filename), save_format="h5")
    inputs = keras.Input((4,))
    doubled = keras.Model(inputs, L.Lambda(lambda t: t * 2.0)(inputs), name="legacy_lambda")
    doubled.save(os.path.join(HERE, "legacy_lambda.h5"), save_format="h5")
    np.savez(os.path.join(HERE, "legacy_expected.npz"), **expected)
    print(f"wrote the legacy models with tf_keras {keras.__version__}")


if __name__ == "__main__":
    main()
