"""A plain FullGrad, written from the paper and the authors' PyTorch code, for tests only.

It shares no code with ``fullgrad``: it runs a Sequential model's forward pass (nested
Sequential models expanded in place) by hand from the layers' weights (so every pre-activation ``z_l`` is an explicit tensor), takes gradients with a
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
    keras.layers.GlobalMaxPooling2D,
    keras.layers.Flatten,
    keras.layers.Reshape,
    keras.layers.Dense,
    keras.layers.Dropout,
    keras.layers.Activation,
    keras.layers.Softmax,
    keras.layers.Rescaling,
    keras.layers.Normalization,
    keras.Sequential,  # nested, expanded in place
)

#: Trailing layers that act on the logits: the reference stops before them.
_AFTER_LOGITS = (keras.layers.Activation, keras.layers.Softmax, keras.layers.Dropout)


def _activate(name: str, z: tf.Tensor) -> tf.Tensor:
    if name == "linear":
        return z
    if name == "relu":
        return tf.maximum(z, 0.0)
    if name == "softmax":
        return tf.nn.softmax(z)
    raise NotImplementedError(name)


def _leaves(model: keras.Sequential) -> list:
    leaves = []
    for layer in model.layers:
        leaves.extend(_leaves(layer) if isinstance(layer, keras.Sequential) else [layer])
    return leaves


def _channel_vector(value, channels: int) -> np.ndarray:
    """A constant broadcast against ``[..., channels]``, as a ``[channels]`` vector."""
    return np.broadcast_to(np.asarray(value, np.float64).reshape(-1), [channels]).copy()


def _forward(model: keras.Sequential, x: tf.Tensor):
    """Returns (pre-activation logits, [(z_l, b_l)], logits bias) with z_l recorded by hand.

    The logits are the output of the last layer before trailing Activation/Softmax/Dropout
    layers; a Dense or Conv2D there keeps its bias as the logits bias and drops its activation,
    while a pooling or reshaping layer there has no bias of its own.
    """
    layers = _leaves(model)
    end = len(layers) - 1
    while isinstance(layers[end], _AFTER_LOGITS):
        end -= 1
    biased = []
    h = x
    for index, layer in enumerate(layers[: end + 1]):
        last = index == end
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            kernel = layer.kernel.numpy()  # [kh, kw, in, multiplier]
            z = tf.nn.depthwise_conv2d(h, kernel, [1, *layer.strides, 1], layer.padding.upper())
        elif isinstance(layer, keras.layers.Conv2D):
            z = tf.nn.conv2d(h, layer.kernel.numpy(), layer.strides, layer.padding.upper())
        elif isinstance(layer, keras.layers.Dense):
            z = tf.matmul(h, layer.kernel.numpy())
        if isinstance(layer, keras.layers.Conv2D | keras.layers.DepthwiseConv2D | keras.layers.Dense):
            bias = layer.bias.numpy() if layer.use_bias else np.zeros(z.shape[-1], np.float32)
            z = z + bias
            if last:
                return z, biased, bias
            if layer.use_bias:
                biased.append((z, bias))
            h = _activate(layer.activation.__name__, z)
            continue
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma = layer.gamma.numpy() if layer.scale else 1.0
            beta = layer.beta.numpy() if layer.center else 0.0
            mean, var = layer.moving_mean.numpy(), layer.moving_variance.numpy()
            weight = gamma / np.sqrt(var + layer.epsilon)
            bias = -mean * weight + beta  # the authors' get_bias for BatchNorm2d
            h = z = h * weight + bias
            biased.append((z, bias))
        elif isinstance(layer, keras.layers.Rescaling):
            channels = h.shape[-1]
            scale = _channel_vector(layer.scale, channels).astype(np.float32)
            offset = _channel_vector(layer.offset, channels).astype(np.float32)
            h = z = h * scale + offset
            if np.any(offset != 0):
                biased.append((z, offset))
        elif isinstance(layer, keras.layers.Normalization):
            channels = h.shape[-1]
            mean = _channel_vector(layer.mean, channels)
            std = np.maximum(np.sqrt(_channel_vector(layer.variance, channels)), 1e-7)
            bias = (-mean / std).astype(np.float32)
            h = z = h * (1.0 / std).astype(np.float32) + bias
            biased.append((z, bias))
        elif isinstance(layer, keras.layers.ReLU):
            h = tf.maximum(h, 0.0)
        elif isinstance(layer, keras.layers.Activation | keras.layers.Softmax):
            h = _activate(layer.activation.__name__ if hasattr(layer, "activation") else "softmax", h)
        elif isinstance(layer, keras.layers.Dropout):
            pass  # inference
        elif isinstance(layer, keras.layers.MaxPooling2D):
            h = tf.nn.max_pool2d(h, layer.pool_size, layer.strides, layer.padding.upper())
        elif isinstance(layer, keras.layers.GlobalAveragePooling2D):
            h = tf.reduce_mean(h, axis=[1, 2], keepdims=layer.keepdims)
        elif isinstance(layer, keras.layers.GlobalMaxPooling2D):
            h = tf.reduce_max(h, axis=[1, 2], keepdims=layer.keepdims)
        elif isinstance(layer, keras.layers.Flatten):
            h = tf.reshape(h, [tf.shape(h)[0], -1])
        elif isinstance(layer, keras.layers.Reshape):
            h = tf.reshape(h, [tf.shape(h)[0], *layer.target_shape])
        else:
            raise NotImplementedError(type(layer).__name__)
        if last:
            if len(h.shape) != 2:
                raise ValueError(f"the logits have shape {h.shape}; expected [batch, classes]")
            return h, biased, np.zeros(h.shape[-1], np.float32)
    raise AssertionError("unreachable")


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


def reference_decomposition(
    model: keras.Sequential, x: np.ndarray, targets: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], np.ndarray]:
    """Returns (logits [B, 1], input term, [bias terms, in layer order], logits bias [B]).

    ``targets`` is ``[B, 1]``: one explained class per image.
    """
    x = tf.constant(x, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits, biased, logits_bias = _forward(model, x)
        pre_activations = [z for z, _ in biased]
        chosen = tf.gather(logits, targets, batch_dims=1)
        total = tf.reduce_sum(chosen)
    gradients = tape.gradient(total, [x, *pre_activations])
    input_term = (x * gradients[0]).numpy()
    bias_terms = [(g * b).numpy() for g, (_, b) in zip(gradients[1:], biased, strict=True)]
    return chosen.numpy(), input_term, bias_terms, np.asarray(logits_bias)[targets[:, 0]]


def reference_fullgrad(
    model: keras.Sequential, x: np.ndarray, targets: np.ndarray, per_channel: bool = False
) -> tuple[np.ndarray, np.ndarray, float]:
    """Returns (logits [B, 1], maps [B, H, W] in [0, 1], max completeness gap).

    ``targets`` is ``[B, 1]``: one explained class per image.
    """
    chosen, input_term, bias_terms, logits_bias = reference_decomposition(model, x, targets)
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
    sums = input_term.reshape(batch, -1).sum(1) + logits_bias
    for term in bias_terms:
        sums = sums + term.reshape(batch, -1).sum(1)
    gap = float(np.max(np.abs(sums - chosen[:, 0])))
    return chosen, cam, gap
