"""A plain FullGrad, written from the paper and the authors' PyTorch code, for tests only.

It shares no code with ``fullgrad``: it runs a Sequential model's forward pass by hand from the
layers' weights (so every pre-activation ``z_l`` is an explicit tensor), takes gradients with a
tape, and post-processes as the authors' ``FullGrad.saliency`` does: per term abs, per-sample
min-max over C x H x W, bilinear upsampling (align_corners=True) of EVERY channel, then the sum
over channels; no shortcut. The final min-max matches fullgrad's output convention.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

SUPPORTED = (
    keras.layers.Conv2D,
    keras.layers.DepthwiseConv2D,
    keras.layers.BatchNormalization,
    keras.layers.ReLU,
    keras.layers.MaxPooling2D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.Flatten,
    keras.layers.Dense,
)


def _activate(name: str, z: tf.Tensor) -> tf.Tensor:
    if name == "linear":
        return z
    if name == "relu":
        return tf.maximum(z, 0.0)
    if name == "softmax":
        return tf.nn.softmax(z)
    raise NotImplementedError(name)


def _forward(model: keras.Sequential, x: tf.Tensor):
    """Returns (pre-activation logits, [(z_l, b_l)]) with z_l recorded by hand."""
    biased = []
    h = x
    layers = model.layers
    for index, layer in enumerate(layers):
        last = index == len(layers) - 1
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            kernel = layer.kernel.numpy()  # [kh, kw, in, multiplier]
            z = tf.nn.depthwise_conv2d(h, kernel, [1, *layer.strides, 1], layer.padding.upper())
            if layer.use_bias:
                z = z + layer.bias.numpy()
                biased.append((z, layer.bias.numpy()))
            h = _activate(layer.activation.__name__, z)
        elif isinstance(layer, keras.layers.Conv2D):
            z = tf.nn.conv2d(h, layer.kernel.numpy(), layer.strides, layer.padding.upper())
            if layer.use_bias:
                z = z + layer.bias.numpy()
                biased.append((z, layer.bias.numpy()))
            h = _activate(layer.activation.__name__, z)
        elif isinstance(layer, keras.layers.BatchNormalization):
            gamma = layer.gamma.numpy() if layer.scale else 1.0
            beta = layer.beta.numpy() if layer.center else 0.0
            mean, var = layer.moving_mean.numpy(), layer.moving_variance.numpy()
            weight = gamma / np.sqrt(var + layer.epsilon)
            bias = -mean * weight + beta  # the authors' get_bias for BatchNorm2d
            h = z = h * weight + bias
            biased.append((z, bias))
        elif isinstance(layer, keras.layers.ReLU):
            h = tf.maximum(h, 0.0)
        elif isinstance(layer, keras.layers.MaxPooling2D):
            h = tf.nn.max_pool2d(h, layer.pool_size, layer.strides, layer.padding.upper())
        elif isinstance(layer, keras.layers.GlobalAveragePooling2D):
            h = tf.reduce_mean(h, axis=[1, 2])
        elif isinstance(layer, keras.layers.Flatten):
            h = tf.reshape(h, [tf.shape(h)[0], -1])
        elif isinstance(layer, keras.layers.Dense):
            z = tf.matmul(h, layer.kernel.numpy()) + (layer.bias.numpy() if layer.use_bias else 0)
            if last:
                return z, biased
            if layer.use_bias:
                biased.append((z, layer.bias.numpy()))
            h = _activate(layer.activation.__name__, z)
        else:
            raise NotImplementedError(type(layer).__name__)
    raise ValueError("the model must end in a Dense classifier")


def _bilinear_align_corners(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """[h, w] -> [height, width], as torch's interpolate(mode='bilinear', align_corners=True)."""
    h, w = image.shape
    rows = np.linspace(0, h - 1, height) if h > 1 else np.zeros(height)
    cols = np.linspace(0, w - 1, width) if w > 1 else np.zeros(width)
    r0 = np.floor(rows).astype(int)
    c0 = np.floor(cols).astype(int)
    r1, c1 = np.minimum(r0 + 1, h - 1), np.minimum(c0 + 1, w - 1)
    fr, fc = (rows - r0)[:, None], (cols - c0)[None, :]
    top = image[r0][:, c0] * (1 - fc) + image[r0][:, c1] * fc
    bottom = image[r1][:, c0] * (1 - fc) + image[r1][:, c1] * fc
    return top * (1 - fr) + bottom * fr


def _post_process(term: np.ndarray, per_channel: bool) -> np.ndarray:
    """abs, then min-max per sample (over C x H x W, or per channel), as _postProcess."""
    term = np.abs(term.astype(np.float64))
    axes = (1, 2) if per_channel else (1, 2, 3)
    term = term - term.min(axis=axes, keepdims=True)
    return term / (term.max(axis=axes, keepdims=True) + 1e-6)


def reference_fullgrad(
    model: keras.Sequential, x: np.ndarray, targets: np.ndarray, per_channel: bool = False
) -> tuple[np.ndarray, np.ndarray, float]:
    """Returns (logits [B, 1], maps [B, H, W] in [0, 1], max completeness gap).

    ``targets`` is ``[B, 1]``: one explained class per image.
    """
    x = tf.constant(x, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits, biased = _forward(model, x)
        pre_activations = [z for z, _ in biased]
        chosen = tf.gather(logits, targets, batch_dims=1)
        total = tf.reduce_sum(chosen)
    gradients = tape.gradient(total, [x, *pre_activations])
    input_term = (x * gradients[0]).numpy()
    bias_terms = [(g * b).numpy() for g, (_, b) in zip(gradients[1:], biased, strict=True)]
    batch, height, width = x.shape[0], x.shape[1], x.shape[2]
    cam = _post_process(input_term, per_channel).sum(axis=-1)
    for term in bias_terms:
        if term.ndim != 4:
            continue
        normalised = _post_process(term, per_channel)
        for i in range(batch):
            for c in range(term.shape[-1]):
                cam[i] += _bilinear_align_corners(normalised[i, ..., c], height, width)
    low = cam.min(axis=(1, 2), keepdims=True)
    cam = (cam - low) / (cam.max(axis=(1, 2), keepdims=True) - low + 1e-6)
    last = model.layers[-1]
    logits_bias = last.bias.numpy()[targets[:, 0]] if last.use_bias else 0.0
    sums = input_term.reshape(batch, -1).sum(1) + logits_bias
    for term in bias_terms:
        sums = sums + term.reshape(batch, -1).sum(1)
    gap = float(np.max(np.abs(sums - chosen.numpy()[:, 0])))
    return chosen.numpy(), cam, gap
