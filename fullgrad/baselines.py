"""Baseline saliency maps to compare FullGrad with: input x gradient and Grad-CAM.

Both explain the PRE-activation logit of the target class (a classifier ending in softmax or
sigmoid is explained on its logits, as FullGrad is), trace one ``tf.function`` per input shape
with a free batch dimension, and return ``[B, H, W]`` maps in [0, 1]. Gradients are only taken
inside traced functions: eager convolution backprops crash TF 2.21 with oneDNN on some shapes.

- Input x gradient (Shrikumar et al., 2016, arXiv:1605.01713):
  ``S = minmax(sum_c |x * dlogit/dx|)``, the FullGrad input term on its own.
- Grad-CAM (Selvaraju et al., ICCV 2017, arXiv:1610.02391) on a layer with output ``A``
  ``[B, h, w, K]``: ``alpha_k = mean_hw dlogit/dA_k``, ``S = minmax(up(relu(sum_k alpha_k A_k)))``
  with ``up`` bilinear upsampling to the input size (half-pixel centres, ``tf.image.resize``).

Example:
    >>> from fullgrad import baselines
    >>> maps = baselines.input_x_gradient(model, images)          # [B, H, W], top-1 class
    >>> maps = baselines.grad_cam(model, images, labels)          # given classes
    >>> explainer = baselines.GradCAM(model, layer="conv3")       # xplique-like object
    >>> maps = explainer.explain(images, labels)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from fullgrad import inspection
from fullgrad.methods import input_batches
from fullgrad.targets import TARGET_PREDICTED

__all__ = [
    "GradCAM",
    "InputXGradient",
    "cached_on",
    "grad_cam",
    "input_x_gradient",
    "logits_model",
    "minmax_maps",
]

_EPS = 1e-12


def logits_model(
    model: keras.Model,
    layer: keras.layers.Layer | str | None = None,
    *,
    last_spatial: bool = False,
) -> keras.Model:
    """A model returning the pre-activation logits, and optionally an inner layer's output.

    ``model`` is exposed (``inspection.expose``) without bias layers, unless ``expose`` built it
    already, so a fused softmax or sigmoid on the classifier is dropped. When a layer is asked
    for, the exposed model is cloned (sharing every weight) to return that layer's output too,
    after its fused activation.

    Args:
        model: A Keras classifier, or a model built by ``inspection.expose``.
        layer: The inner layer (or its name) whose output to return as well.
        last_spatial: Return the output of the last layer with a 4-D output computed before
            the logits (Grad-CAM's "last convolution") as well; ignored when ``layer`` is given.

    Returns:
        A model with output ``logits`` ``[B, classes]``, or ``[logits, activations]``.

    Raises:
        ValueError: The layer is not in the model, or no layer has a 4-D output.

    Example:
        >>> logits = logits_model(model)(images)
        >>> logits, features = logits_model(model, last_spatial=True)(images)
    """
    if inspection.exposure_of(model) is None:
        model = inspection.expose(model, [], inspection.get_logits_layer(model))
    logits = model.outputs[0]
    if layer is None and not last_spatial:
        return keras.Model(model.inputs[0], logits, name=f"{model.name}_logits")
    name = layer if isinstance(layer, str) or layer is None else layer.name
    seen: list[tuple[keras.layers.Layer, Any]] = []

    def call_layer(current: keras.layers.Layer, *args, **kwargs):
        result = current(*args, **kwargs)
        seen.append((current, result))
        return result

    cloned = keras.models.clone_model(
        model, clone_function=lambda current: current, call_function=call_layer
    )
    cloned_logits = cloned.outputs[0]
    if name is not None:
        found = [result for current, result in seen if current.name == name]
        if len(found) != 1:
            where = "is not in" if not found else "is called more than once in"
            raise ValueError(f"layer {name!r} {where} model {model.name!r}")
        activations = found[0]
    else:
        before_logits = []
        for _, result in seen:
            if result is cloned_logits:
                break
            if isinstance(result, keras.KerasTensor) and len(result.shape) == 4:
                before_logits.append(result)
        if not before_logits:
            raise ValueError(f"model {model.name!r} has no layer with a 4-D output")
        activations = before_logits[-1]
    return keras.Model(cloned.inputs[0], [cloned_logits, activations], name=f"{model.name}_cam")


def minmax_maps(maps: tf.Tensor) -> tf.Tensor:
    """Scales each ``[H, W]`` map of ``[B, H, W]`` to [0, 1]; a constant map becomes zeros.

    Example:
        >>> minmax_maps(tf.constant([[[1.0, 3.0]]])).numpy()
        array([[[0., 1.]]], dtype=float32)
    """
    low = tf.reduce_min(maps, axis=[1, 2], keepdims=True)
    high = tf.reduce_max(maps, axis=[1, 2], keepdims=True)
    return (maps - low) / tf.maximum(high - low, _EPS)


def _targets_of(logits: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    top1 = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return tf.where(y < 0, top1, y)


class _Explainer:
    """Shared batching, target handling and per-shape tracing of the baselines."""

    def __init__(self, model: keras.Model, batch_size: int | None) -> None:
        self.model = model
        self.batch_size = batch_size
        self._steps: dict[tuple, Any] = {}

    def explain(self, inputs: Any, targets: Any = None) -> np.ndarray:
        """Returns one map per image for one class each.

        Args:
            inputs: ``[B, H, W, C]`` array or tensor, or a ``tf.data.Dataset`` of batches
                (or of ``(images, targets)`` batches).
            targets: ``[B]`` classes; ``TARGET_PREDICTED`` (or None for all) means the top-1.

        Returns:
            ``[B, H, W]`` float32 maps in [0, 1].
        """
        return self._explain(inputs, targets, self.batch_size)

    __call__ = explain

    def _explain(self, inputs: Any, targets: Any, batch_size: int | None) -> np.ndarray:
        maps = [self._run(x, y) for x, y in input_batches(inputs, targets, batch_size)]
        if not maps:
            raise ValueError("no inputs to explain")
        return np.concatenate(maps)

    def _run(self, x: Any, y: Any) -> np.ndarray:
        x = tf.cast(tf.convert_to_tensor(x), tf.float32)
        batch = int(x.shape[0])
        y = (
            tf.fill([batch], TARGET_PREDICTED)
            if y is None
            else tf.cast(tf.reshape(tf.convert_to_tensor(y), [batch]), tf.int32)
        )
        key = tuple(x.shape[1:])
        step = self._steps.get(key)
        if step is None:
            signature = [
                tf.TensorSpec([None, *x.shape[1:]], tf.float32),
                tf.TensorSpec([None], tf.int32),
            ]
            step = tf.function(self._step, input_signature=signature)
            self._steps[key] = step
        return step(x, y).numpy()

    def _step(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError


class InputXGradient(_Explainer):
    """Input x gradient: ``minmax(sum_c |x * dlogit_k/dx|)`` per image.

    Shrikumar et al., "Not Just a Black Box: Learning Important Features Through Propagating
    Activation Differences", 2016 (arXiv:1605.01713). The magnitude is summed over channels,
    as FullGrad post-processes its own input term.

    Args:
        model: A Keras classifier (explained on its pre-activation logits).
        batch_size: Images per traced call for arrays and tensors; all at once when None.

    Example:
        >>> maps = InputXGradient(model).explain(images)          # [B, H, W], top-1 class
    """

    def __init__(self, model: keras.Model, batch_size: int | None = 32) -> None:
        super().__init__(logits_model(model), batch_size)

    def _step(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(x)
            logits = tf.cast(self.model(x, training=False), tf.float32)
            explained = tf.reduce_sum(tf.gather(logits, _targets_of(logits, y), batch_dims=1))
        grad = tape.gradient(explained, x)
        return minmax_maps(tf.reduce_sum(tf.abs(x * grad), axis=-1))


class GradCAM(_Explainer):
    """Grad-CAM on the last layer with a 4-D output before the logits, or on ``layer``.

    Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
    Localization", ICCV 2017 (arXiv:1610.02391). With ``A`` the layer's output (after its fused
    activation) and ``L`` the target's pre-activation logit:
    ``alpha_k = mean_hw dL/dA_k``, ``cam = relu(sum_k alpha_k A_k)``, upsampled bilinearly to the
    input size (``tf.image.resize``, half-pixel centres) and min-max scaled per image.

    Args:
        model: A Keras classifier with a spatial (4-D) layer before its logits.
        layer: The layer (or its name) to explain from; the last 4-D output when None.
        batch_size: Images per traced call for arrays and tensors; all at once when None.

    Example:
        >>> maps = GradCAM(model).explain(images, labels)         # [B, H, W]
        >>> maps = GradCAM(model, layer="block3_conv")(images)
    """

    def __init__(
        self,
        model: keras.Model,
        layer: keras.layers.Layer | str | None = None,
        batch_size: int | None = 32,
    ) -> None:
        super().__init__(logits_model(model, layer, last_spatial=True), batch_size)

    def _step(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            # The tape records only ops downstream of a watched tensor, the activations' too.
            tape.watch(x)
            logits, activations = self.model(x, training=False)
            logits = tf.cast(logits, tf.float32)
            explained = tf.reduce_sum(tf.gather(logits, _targets_of(logits, y), batch_dims=1))
        grad = tape.gradient(explained, activations)
        activations, grad = tf.cast(activations, tf.float32), tf.cast(grad, tf.float32)
        weights = tf.reduce_mean(grad, axis=[1, 2], keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * activations, axis=-1, keepdims=True))
        cam = tf.image.resize(cam, tf.shape(x)[1:3], method="bilinear")[..., 0]
        return minmax_maps(cam)


_CACHE_ATTRIBUTE = "_fullgrad_baselines"


def cached_on(model: keras.Model, key: tuple, build: Callable[[], Any]) -> Any:
    """One object per ``(model, key)``, built once and kept on the model so traces are reused.

    An attribute rather than a weak registry: the object references the model, so a weakly
    keyed registry would keep every model alive. ``object.__setattr__`` keeps Keras from
    tracking the cache as model state.

    Args:
        model: The model the object belongs to.
        key: What distinguishes it from the model's other cached objects (method, options).
        build: Makes the object when it is not cached yet.

    Returns:
        The cached object.

    Example:
        >>> explainer = cached_on(model, ("grad_cam", None), lambda: GradCAM(model))
    """
    cache = model.__dict__.get(_CACHE_ATTRIBUTE)
    if cache is None:
        cache = {}
        object.__setattr__(model, _CACHE_ATTRIBUTE, cache)
    if key not in cache:
        cache[key] = build()
    return cache[key]


def input_x_gradient(
    model: keras.Model, inputs: Any, targets: Any = None, batch_size: int | None = 32
) -> np.ndarray:
    """Input x gradient maps; see ``InputXGradient``. The explainer is cached on the model.

    Args:
        model: A Keras classifier.
        inputs: ``[B, H, W, C]`` preprocessed images (or a ``tf.data.Dataset`` of batches).
        targets: ``[B]`` classes; the top-1 class when None.
        batch_size: Images per traced call.

    Returns:
        ``[B, H, W]`` float32 maps in [0, 1].

    Example:
        >>> maps = input_x_gradient(model, images)
    """
    explainer = cached_on(model, ("input_x_gradient",), lambda: InputXGradient(model))
    return explainer._explain(inputs, targets, batch_size)


def grad_cam(
    model: keras.Model,
    inputs: Any,
    targets: Any = None,
    layer: keras.layers.Layer | str | None = None,
    batch_size: int | None = 32,
) -> np.ndarray:
    """Grad-CAM maps; see ``GradCAM``. The explainer is cached on the model.

    Args:
        model: A Keras classifier with a 4-D layer before its logits.
        inputs: ``[B, H, W, C]`` preprocessed images (or a ``tf.data.Dataset`` of batches).
        targets: ``[B]`` classes; the top-1 class when None.
        layer: The layer (or its name) to explain from; the last 4-D output when None.
        batch_size: Images per traced call.

    Returns:
        ``[B, H, W]`` float32 maps in [0, 1].

    Example:
        >>> maps = grad_cam(model, images, labels)
    """
    name = layer if isinstance(layer, str) or layer is None else layer.name
    explainer = cached_on(model, ("grad_cam", name), lambda: GradCAM(model, layer))
    return explainer._explain(inputs, targets, batch_size)
