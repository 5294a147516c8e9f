"""Find a Keras classifier's logits and bias layers, and expose them as model outputs.

FullGrad needs, besides the input gradient, the gradient of the explained logit with respect
to the PRE-activation output ``z_l`` of every layer that adds a bias ``b_l``. This module finds
those layers (``layers_with_biases``), computes their effective biases (BatchNormalization
included), and rebuilds the model so that it returns the pre-activation logits and every
``z_l`` (``expose``). Besides public Keras 3 APIs, it reads a symbolic tensor's
``_keras_history`` and a layer's ``_inbound_nodes`` (to walk back from the output to the
logits) and replays nested Functional models with ``Functional._run_through_graph``, as
``keras.models.clone_model`` does.

Example:
    >>> import fullgrad as ke
    >>> logits = ke.inspection.get_logits_layer(model)
    >>> inters, biases = ke.inspection.layers_with_biases(model, exclude=[logits])
    >>> exposed = ke.inspection.expose(model, inters, logits)
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterable, Sequence

import keras
import numpy as np

__all__ = [
    "ExposedModel",
    "effective_bias",
    "expose",
    "exposure_of",
    "flat_layers",
    "get_logits_layer",
    "has_bias",
    "layers_with_biases",
]


@dataclasses.dataclass(frozen=True)
class ExposedModel:
    """What ``expose`` knows about the model it built.

    Attributes:
        logits_layer: The classifier layer of ``source``.
        layers: The bias layers of ``source``, in the order of the exposed outputs.
        biases: Their effective biases, float32 arrays of shape ``[channels]``.
        logits_bias: The classifier's bias, ``[num_classes]`` (zeros when it has none).
    """

    logits_layer: keras.layers.Layer
    layers: tuple[keras.layers.Layer, ...]
    biases: tuple[np.ndarray, ...]
    logits_bias: np.ndarray


_EXPOSED: weakref.WeakKeyDictionary[keras.Model, ExposedModel] = weakref.WeakKeyDictionary()


def exposure_of(model: keras.Model) -> ExposedModel | None:
    """Returns what ``expose`` recorded for ``model``, or None if ``expose`` did not build it."""
    return _EXPOSED.get(model)


def flat_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Lists the leaf layers of ``model`` in graph order, descending into nested models.

    Args:
        model: A built Keras model; models used as layers inside it are expanded.

    Returns:
        Every layer that is not itself a model, input layers excluded.

    Example:
        >>> [layer.name for layer in flat_layers(model)]
    """
    layers: list[keras.layers.Layer] = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            layers.extend(flat_layers(layer))
        elif not isinstance(layer, keras.layers.InputLayer):
            layers.append(layer)
    return layers


def _variable(layer: keras.layers.Layer, name: str):
    try:
        return getattr(layer, name, None)
    except (AttributeError, ValueError):  # unbuilt layers raise on some properties
        return None


def _rescaling_offset(layer: keras.layers.Layer) -> np.ndarray:
    return np.asarray(layer.offset, dtype=np.float64)


def has_bias(layer: keras.layers.Layer) -> bool:
    """True for layers whose output adds a bias.

    Covers Conv1D/2D/3D, DepthwiseConv, SeparableConv, Conv*Transpose and Dense with
    ``use_bias=True``; every BatchNormalization and Normalization (their effective bias is
    non-zero whenever they have a mean or a beta); and Rescaling with a non-zero ``offset``.
    """
    if isinstance(layer, keras.layers.BatchNormalization | keras.layers.Normalization):
        return True
    if isinstance(layer, keras.layers.Rescaling):
        return bool(np.any(_rescaling_offset(layer) != 0))
    return _variable(layer, "bias") is not None and bool(getattr(layer, "use_bias", True))


def _per_channel(bias: np.ndarray, layer: keras.layers.Layer) -> np.ndarray:
    """Reduces a bias broadcastable against ``[..., C]`` to ``[C]`` (or a scalar)."""
    bias = np.asarray(bias)
    if bias.ndim > 1 and any(size != 1 for size in bias.shape[:-1]):
        raise ValueError(
            f"layer {layer.name!r} adds a bias of shape {bias.shape} that varies over more "
            "than the channel axis; fullgrad supports per-channel biases"
        )
    return bias.reshape(-1) if bias.ndim > 1 else bias


def effective_bias(layer: keras.layers.Layer, channels: int | None = None) -> np.ndarray:
    """Returns the bias a layer adds to its output, as float32 ``[channels]``.

    For BatchNormalization in inference mode, ``y = gamma * (x - mean) / sqrt(var + eps) + beta``
    is an affine map ``y = s * x + b`` with effective bias
    ``b = beta - gamma * moving_mean / sqrt(moving_variance + epsilon)``, using the layer's own
    ``epsilon``; ``gamma = 1`` when ``scale=False`` and ``beta = 0`` when ``center=False``.
    Normalization computes ``(x - mean) / max(sqrt(var), eps)``: its bias is
    ``-mean / max(sqrt(var), eps)`` (``mean`` when ``invert=True``). Rescaling computes
    ``x * scale + offset``: its bias is ``offset``; ``scale`` is linear and the gradient flows
    through it.

    Args:
        layer: A layer for which ``has_bias(layer)`` is true.
        channels: The layer's output channels: a scalar bias (Rescaling's ``offset=-1.0``,
            Normalization with ``axis=None``) is broadcast to ``[channels]``.

    Returns:
        The bias, ``[channels]``; a scalar bias stays a scalar when ``channels`` is None.

    Raises:
        ValueError: The layer has no bias, or its bias varies over more than the channels.

    Example:
        >>> effective_bias(model.get_layer("bn1"))
    """
    if isinstance(layer, keras.layers.BatchNormalization):
        mean = np.asarray(layer.moving_mean, dtype=np.float64)
        variance = np.asarray(layer.moving_variance, dtype=np.float64)
        gamma = np.asarray(layer.gamma, dtype=np.float64) if layer.scale else 1.0
        beta = np.asarray(layer.beta, dtype=np.float64) if layer.center else 0.0
        bias = beta - gamma * mean / np.sqrt(variance + layer.epsilon)
    elif isinstance(layer, keras.layers.Normalization):
        mean = np.asarray(layer.mean, dtype=np.float64)
        if layer.invert:
            bias = mean
        else:
            std = np.maximum(np.sqrt(np.asarray(layer.variance, np.float64)), keras.config.epsilon())
            bias = -mean / std
    elif isinstance(layer, keras.layers.Rescaling):
        bias = _rescaling_offset(layer)
    else:
        bias = _variable(layer, "bias")
        if bias is None:
            raise ValueError(f"layer {layer.name!r} ({type(layer).__name__}) has no bias")
    bias = _per_channel(np.asarray(bias, dtype=np.float64), layer)
    if channels is not None:
        bias = np.broadcast_to(bias, [channels])
    return np.array(bias, dtype=np.float32)


def _output_channels(layer: keras.layers.Layer) -> int | None:
    try:
        return int(layer.output.shape[-1])
    except (AttributeError, ValueError, TypeError):  # unbuilt, or called at several places
        return None


#: Layers after the logits that do not change which class wins: final activations and
#: inference-time no-ops.
_TAIL = (
    keras.layers.Activation,
    keras.layers.Softmax,
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D,
    keras.layers.GaussianDropout,
    keras.layers.GaussianNoise,
    keras.layers.AlphaDropout,
    keras.layers.ActivityRegularization,
    keras.layers.Identity,
)

#: Linear, shape-only or pooling layers that turn a convolution's class maps into
#: ``[batch, classes]`` scores; a bias before them is a (spatial) bias term.
_POOLING_HEADS = (
    keras.layers.Reshape,
    keras.layers.Flatten,
    keras.layers.GlobalAveragePooling1D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalAveragePooling3D,
    keras.layers.GlobalMaxPooling1D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.GlobalMaxPooling3D,
)


def _model_outputs(model: keras.Model) -> list | None:
    try:
        return list(model.outputs)
    except (AttributeError, ValueError):
        return None


def _output_chain(model: keras.Model):
    """Yields the layers from ``model``'s output backwards, along single-input layers.

    Nested models are entered at their output and left at their input. Stops at the model's
    input or at the first layer with several inputs.
    """
    outputs = _model_outputs(model)
    if not outputs or len(outputs) != 1:
        return
    tensor = outputs[0]
    entered: list[tuple[keras.layers.Layer, int]] = []  # nested models, to leave at their input
    while True:
        history = getattr(tensor, "_keras_history", None)
        if history is None:
            return
        operation, node_index, tensor_index = history
        if isinstance(operation, keras.Model):
            inner = _model_outputs(operation)
            if inner is None:
                return
            entered.append((operation, node_index))
            tensor = inner[tensor_index]
            continue
        if isinstance(operation, keras.layers.InputLayer):
            if not entered:
                return
            operation, node_index = entered.pop()
        else:
            yield operation
        inputs = operation._inbound_nodes[node_index].input_tensors
        if len(inputs) != 1:
            return
        tensor = inputs[0]


def get_logits_layer(
    model: keras.Model, name: str | keras.layers.Layer | None = None
) -> keras.layers.Layer:
    """Returns the layer whose output are the pre-activation class scores.

    Walking back from the model's output, final activations and inference no-ops (Activation,
    Softmax, Dropout) are skipped; the logits are the output of the first layer reached that
    has a kernel (Dense, a convolution) or that pools or reshapes class maps into
    ``[batch, classes]`` (Reshape, Flatten, GlobalAveragePooling, GlobalMaxPooling). So a
    ``Conv2D(classes, 1) -> Reshape -> Activation`` head (MobileNet) gives the Reshape, and a
    ``Conv2D(classes) -> GlobalAveragePooling2D -> Activation("softmax")`` head the pooling
    layer: the convolution's bias is then a spatial bias term. When the walk finds neither, the
    last layer with a kernel is taken.

    Args:
        model: A built Keras classifier; nested models are searched too.
        name: The logits layer, or its name, to override the choice.

    Returns:
        The layer whose PRE-activation output are the logits that FullGrad explains.

    Raises:
        ValueError: No such layer.

    Example:
        >>> logits = get_logits_layer(model)
        >>> logits = get_logits_layer(model, name="global_average_pooling2d")
    """
    layers = flat_layers(model)
    if isinstance(name, keras.layers.Layer):
        if not any(layer is name for layer in layers):
            raise ValueError(f"layer {name.name!r} is not part of model {model.name!r}")
        return name
    if name is not None:
        for layer in layers:
            if layer.name == name:
                return layer
        raise ValueError(f"model {model.name!r} has no layer named {name!r}")
    for layer in _output_chain(model):
        if isinstance(layer, _TAIL):
            continue
        if isinstance(layer, _POOLING_HEADS) or _variable(layer, "kernel") is not None:
            return layer
        break
    for layer in reversed(layers):
        if _variable(layer, "kernel") is not None:
            return layer
    raise ValueError(f"model {model.name!r} has no layer with a kernel to explain")


def _names(layers: Iterable[keras.layers.Layer | str]) -> set[str]:
    return {layer if isinstance(layer, str) else layer.name for layer in layers}


def layers_with_biases(
    model: keras.Model, exclude: Sequence[keras.layers.Layer | str] = ()
) -> tuple[list[keras.layers.Layer], list[np.ndarray]]:
    """Finds every layer that adds a bias, and its effective bias.

    Args:
        model: A built Keras model; nested models are searched too.
        exclude: Layers (or their names) to leave out, usually the logits layer.

    Returns:
        ``(layers, biases)``: the layers in graph order and their effective biases.

    Example:
        >>> logits = get_logits_layer(model)
        >>> inters, biases = layers_with_biases(model, exclude=[logits])
    """
    excluded = _names(exclude)
    layers = [
        layer for layer in flat_layers(model) if has_bias(layer) and layer.name not in excluded
    ]
    for layer in layers:
        if getattr(layer, "data_format", "channels_last") == "channels_first":
            raise ValueError(
                f"layer {layer.name!r} is channels_first; fullgrad supports channels_last models"
            )
    return layers, [effective_bias(layer, _output_channels(layer)) for layer in layers]


def _check_channels_last(layer: keras.layers.Layer, rank: int) -> None:
    if isinstance(layer, keras.layers.BatchNormalization | keras.layers.Normalization):
        axes = layer.axis if isinstance(layer.axis, list | tuple) else [layer.axis]
        if any(axis not in (None, -1, rank - 1) for axis in axes):
            raise ValueError(
                f"{type(layer).__name__} {layer.name!r} normalises axis {layer.axis}; fullgrad "
                "supports channels_last models"
            )


_LINEAR = keras.activations.get("linear")


def _activation_of(layer: keras.layers.Layer) -> Callable | None:
    """The layer's fused activation as a callable, None if it has none or it is the identity.

    A string (the seed's ``model.layers[-1].activation = 'linear'``) is resolved too.
    """
    activation = getattr(layer, "activation", None)
    if activation is None:
        return None
    activation = keras.activations.get(activation)
    return None if activation is _LINEAR else activation


def _linear_twin(layer: keras.layers.Layer) -> keras.layers.Layer:
    """A copy of ``layer`` without its activation; weights are copied once it is built."""
    activation = layer.activation
    if isinstance(activation, str):  # get_config() cannot serialise a bare string
        layer.activation = keras.activations.get(activation)
    config = layer.get_config()
    layer.activation = activation
    config["activation"] = "linear"
    config["name"] = f"{layer.name}_preactivation"
    return type(layer).from_config(config)


def expose(
    model: keras.Model,
    intermediates: Sequence[keras.layers.Layer],
    logits_layer: keras.layers.Layer | str | None = None,
) -> keras.Model:
    """Rebuilds ``model`` to output the pre-activation logits and the bias layers' outputs.

    The new model shares every weight with ``model``, except that a bias layer (or the logits
    layer) with a fused non-linear activation, such as ``Conv2D(activation="relu")`` or a
    ``Dense(activation="softmax")`` classifier, is split into a linear copy (weights copied)
    followed by its activation, so that the exposed output is ``z_l``, before the activation.
    Models nested inside ``model`` are inlined. Call it after training: copied weights do not
    follow later updates.

    Args:
        model: A built single-input Keras classifier (Functional or Sequential).
        intermediates: The bias layers to expose, from ``layers_with_biases``.
        logits_layer: The logits layer or its name; ``get_logits_layer(model)`` when None.

    Returns:
        A model whose outputs are ``[logits, *[z_l for l in intermediates]]``.

    Raises:
        ValueError: The model has several inputs, a layer is not part of it or is called at
            several places, or the logits are not ``[batch, classes]``.

    Example:
        >>> logits = get_logits_layer(model)
        >>> inters, biases = layers_with_biases(model, exclude=[logits])
        >>> exposed = expose(model, inters, logits)
        >>> logits_values, *bias_outputs = exposed(x)
    """
    logits_layer = get_logits_layer(model, logits_layer)
    if isinstance(model, keras.Sequential):
        if not model.built or not model.inputs:
            raise ValueError("build the Sequential model (give it an Input) before exposing it")
        model = keras.Model(model.inputs, model.outputs, name=model.name)
    if len(model.inputs) != 1:
        raise ValueError(f"fullgrad explains single-input models; {model.name!r} has "
                         f"{len(model.inputs)} inputs")
    targets: dict[int, keras.layers.Layer] = {id(layer): layer for layer in intermediates}
    targets[id(logits_layer)] = logits_layer
    # id(twin) -> (twin, original, activation)
    twins: dict[int, tuple[keras.layers.Layer, keras.layers.Layer, Callable]] = {}
    outputs: dict[int, list] = {}

    def clone_layer(layer: keras.layers.Layer) -> keras.layers.Layer:
        if id(layer) not in targets:
            return layer  # shared, not copied
        activation = _activation_of(layer)
        # A string activation (the seed's `activation = 'linear'`) is not callable: twin it too.
        if activation is None and not isinstance(getattr(layer, "activation", None), str):
            return layer
        twin = _linear_twin(layer)
        twins[id(twin)] = (twin, layer, activation)
        return twin

    def call_layer(layer: keras.layers.Layer, *args, **kwargs):
        if isinstance(layer, keras.Sequential):  # clone_model takes no call_function for these
            result = args[0]
            for inner in layer.layers:
                if not isinstance(inner, keras.layers.InputLayer):
                    result = call_layer(clone_layer(inner), result)
            return result
        if isinstance(layer, keras.Model):  # inline nested models so their layers are visible
            inputs = args[0] if len(args) == 1 else list(args)
            # What clone_model does, without building a Functional on `inputs`: Keras refuses
            # one whose inputs are not Input tensors (a nested model past the first layer).
            return layer._run_through_graph(
                inputs, operation_fn=clone_layer, call_fn=call_layer
            )
        result = layer(*args, **kwargs)
        _, original, activation = twins.get(id(layer), (layer, layer, None))
        if id(original) in targets:
            outputs.setdefault(id(original), []).append(result)
        if activation is not None:
            result = keras.layers.Activation(activation, name=f"{original.name}_activation")(
                result
            )
        return result

    cloned = keras.models.clone_model(model, clone_function=clone_layer, call_function=call_layer)
    for twin, original, _ in twins.values():
        twin.set_weights(original.get_weights())
    exposed_layers = [logits_layer, *intermediates]
    for layer in exposed_layers:
        found = outputs.get(id(layer), [])
        if len(found) != 1:
            where = "is not part of" if not found else "is called more than once in"
            raise ValueError(f"layer {layer.name!r} {where} model {model.name!r}")
        _check_channels_last(layer, len(found[0].shape))
    logits = outputs[id(logits_layer)][0]
    if len(logits.shape) != 2:
        raise ValueError(
            f"the logits layer {logits_layer.name!r} outputs shape {tuple(logits.shape)}; "
            "fullgrad needs [batch, classes]; name the layer that outputs the class scores "
            "with logits_layer="
        )
    exposed = keras.Model(
        cloned.inputs[0],
        [logits, *[outputs[id(layer)][0] for layer in intermediates]],
        name=f"{model.name}_fullgrad",
    )
    classes = logits.shape[-1]
    logits_bias = (
        effective_bias(logits_layer, classes)
        if has_bias(logits_layer)
        else np.zeros([classes], np.float32)
    )
    # Weakly keyed and holding no reference to either model, so both can be collected.
    _EXPOSED[exposed] = ExposedModel(
        logits_layer=logits_layer,
        layers=tuple(intermediates),
        biases=tuple(
            effective_bias(layer, outputs[id(layer)][0].shape[-1]) for layer in intermediates
        ),
        logits_bias=logits_bias,
    )
    return exposed

