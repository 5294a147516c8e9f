"""The demo classifier: a small conv-BN-ReLU CNN, trained in seconds on 2 CPU cores.

Three ``Conv2D(use_bias=False) -> BatchNormalization -> ReLU`` blocks, global average pooling
and a dense logits layer. It takes raw RGB pixels in [0, 255] (a ``Rescaling(1/255)`` layer, which
has no offset and so keeps FullGrad's completeness exact) and outputs logits.

Example:
    >>> model = build_model(size=64, classes=4)
    >>> history = train(model, images, labels, epochs=5, seed=0)
    >>> model.save("model.keras")
"""

from __future__ import annotations

import keras
import numpy as np

__all__ = ["build_model", "train"]


def build_model(size: int = 64, classes: int = 4, width: int = 16, seed: int = 0) -> keras.Model:
    """Builds the (untrained) demo CNN.

    Args:
        size: Input side in pixels.
        classes: Number of logits.
        width: Channels of the first block; doubled at each of the next two.
        seed: Seed of the weight initialisers, so re-initialised copies are reproducible.

    Returns:
        A ``keras.Model`` mapping ``[B, size, size, 3]`` pixels in [0, 255] to logits.

    Example:
        >>> build_model(32, 4).count_params()
    """
    inputs = keras.Input((size, size, 3), name="image")
    x = keras.layers.Rescaling(1.0 / 255.0, name="scale")(inputs)
    for block, channels in enumerate((width, 2 * width, 4 * width, 4 * width)):
        x = keras.layers.Conv2D(
            channels,
            3,
            padding="same",
            use_bias=False,
            kernel_initializer=keras.initializers.HeNormal(seed=seed + block),
            name=f"conv{block}",
        )(x)
        x = keras.layers.BatchNormalization(name=f"bn{block}")(x)
        x = keras.layers.ReLU(name=f"relu{block}")(x)
        if block < 3:
            x = keras.layers.MaxPooling2D(name=f"pool{block}")(x)
    x = keras.layers.GlobalMaxPooling2D(name="gmp")(x)
    outputs = keras.layers.Dense(
        classes, kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 7), name="logits"
    )(x)
    return keras.Model(inputs, outputs, name="demo_cnn")


def train(
    model: keras.Model,
    images: np.ndarray,
    labels: np.ndarray,
    epochs: int = 5,
    batch_size: int = 16,
    learning_rate: float = 3e-3,
    seed: int = 0,
    verbose: int = 0,
) -> keras.callbacks.History:
    """Trains the model in place with Adam on sparse categorical cross-entropy (from logits).

    Args:
        model: The model from :func:`build_model`.
        images: uint8 or float ``[N, H, W, 3]`` pixels in [0, 255].
        labels: ``[N]`` class indices.
        epochs: Passes over the data.
        batch_size: Images per step.
        learning_rate: Adam's step size.
        seed: Seeds Python, numpy and TensorFlow (shuffling, dropout-free training).
        verbose: Keras' ``fit`` verbosity.

    Returns:
        The Keras ``History``.

    Example:
        >>> train(model, images, labels, epochs=2).history["accuracy"][-1]
    """
    keras.utils.set_random_seed(seed)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model.fit(
        np.asarray(images, np.float32),
        np.asarray(labels),
        epochs=epochs,
        batch_size=batch_size,
        shuffle=True,
        verbose=verbose,
    )
