"""FullGrad saliency (Srinivas & Fleuret, NeurIPS 2019, arXiv:1905.00780) for Keras 3 models.

For a ReLU network in inference mode, a logit decomposes exactly into an input term and one
term per bias:

    logit_k(x) = sum(x * dlogit_k/dx) + sum_l sum(b_l * dlogit_k/dz_l) + logits_bias[k]

where ``z_l`` is the PRE-activation output of bias layer ``l``. The saliency map post-processes
every spatial term ``psi(t) = upsample(sum_c minmax(|t|))`` and adds them up:

    S(x) = psi(x * grad_x) + sum_l psi(b_l * grad_{z_l})

with the authors' per-sample min-max over C x H x W and bilinear upsampling
(``align_corners=True``, as in their released code). Because upsampling is linear, channels are
summed before resizing and terms are resized once per distinct resolution: the same map at a
fraction of the cost. The final map is min-max normalised per image to [0, 1].

Example:
    >>> import fullgrad as ke
    >>> logits, maps = ke.full_gradients(model, x, y)           # y: [B, k] unit indices
    >>> explainer = ke.FullGrad(model)
    >>> maps = explainer.explain(x)                              # [B, H, W], top-1 class
    >>> parts = ke.decompose(model, x)                           # completeness, term by term
    >>> parts.residual                                           # ~1e-7 for ReLU nets
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from fullgrad import inspection
from fullgrad.targets import TARGET_PREDICTED

__all__ = [
    "TARGET_PREDICTED",
    "Decomposition",
    "FullGrad",
    "FullGradResult",
    "decompose",
    "full_gradients",
]

_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class FullGradResult:
    """One batch explained.

    Attributes:
        maps: ``[B, H, W, k]`` float32 saliency in [0, 1], one map per explained unit.
        targets: ``[B, k]`` int32, the explained units.
        logits: ``[B, k]`` float32, the explained pre-activation logits.
        all_logits: ``[B, classes]`` float32, every pre-activation logit (for top-k).
        residual: ``[B, k]`` float32, the relative completeness error (see ``Decomposition``).
    """

    maps: np.ndarray
    targets: np.ndarray
    logits: np.ndarray
    all_logits: np.ndarray
    residual: np.ndarray


@dataclasses.dataclass(frozen=True)
class Decomposition:
    """The full-gradient decomposition of one explained logit per image.

    Attributes:
        logits: ``[B]`` the explained pre-activation logits.
        targets: ``[B]`` the explained classes.
        input: ``[B, H, W, C]`` the input term ``x * dlogit/dx``.
        biases: One array per bias layer, ``[B, h, w, c]`` or ``[B, c]``: ``b_l * dlogit/dz_l``.
        layer_names: The bias layers' names, aligned with ``biases``.
        logits_bias: ``[B]`` the classifier's bias for the explained class.
        residual: ``[B]`` ``|logit - reconstruction| / (|logit| + sum_t |sum(t)|)``: the
            completeness error relative to the size of the parts. About 1e-7 for piecewise-linear
            networks in float32; large for swish/GELU/sigmoid, LayerNorm or Rescaling offsets,
            where completeness does not hold.
    """

    logits: np.ndarray
    targets: np.ndarray
    input: np.ndarray
    biases: list[np.ndarray]
    layer_names: list[str]
    logits_bias: np.ndarray
    residual: np.ndarray

    @property
    def reconstruction(self) -> np.ndarray:
        """``[B]`` the sum of every part: equals ``logits`` when completeness holds."""
        total = _per_sample_sum(self.input) + self.logits_bias
        for term in self.biases:
            total = total + _per_sample_sum(term)
        return total


def _per_sample_sum(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, np.float64).reshape(len(array), -1).sum(axis=1)


def _minmax(tensor: tf.Tensor, axes: Sequence[int]) -> tf.Tensor:
    low = tf.reduce_min(tensor, axis=axes, keepdims=True)
    high = tf.reduce_max(tensor, axis=axes, keepdims=True)
    return (tensor - low) / (high - low + _EPS)


def _resize_bilinear(maps: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """Bilinear upsampling of ``[B, h, w]`` with aligned corners, as the authors' code does."""
    resized = tf.raw_ops.ResizeBilinear(
        images=maps[..., None], size=size, align_corners=True, half_pixel_centers=False
    )
    return resized[..., 0]


class FullGrad:
    """FullGrad saliency for a Keras classifier, traced once per input shape.

    Srinivas & Fleuret, "Full-Gradient Representation for Neural Network Visualization",
    NeurIPS 2019 (arXiv:1905.00780). The model is exposed (``inspection.expose``) unless it
    already is; one ``tf.function`` computes logits, the gradients with respect to the input and
    to every bias layer's pre-activation output, the post-processed map and the completeness
    residual, in a single forward and a single backward pass per explained unit.

    Args:
        model: A Keras classifier, or a model returned by ``inspection.expose``.
        biases: Effective biases aligned with the exposed outputs (from ``layers_with_biases``);
            collected from the model when None.
        normalize_channels: Min-max each channel separately (the paper's formula) instead of
            each term as a whole (the authors' code).
        jit_compile: Compile the step with XLA.
        logits_layer: The layer (or its name) whose output are the class scores, when
            ``inspection.get_logits_layer`` does not find it.

    Example:
        >>> explainer = FullGrad(model)
        >>> maps = explainer.explain(images)                 # [B, H, W], top-1 class
        >>> maps = explainer.explain(images, labels)         # [B, H, W], given classes
        >>> result = explainer.compute(images)               # maps, logits, residuals
    """

    def __init__(
        self,
        model: keras.Model,
        *,
        biases: Sequence[Any] | None = None,
        normalize_channels: bool = False,
        jit_compile: bool = False,
        logits_layer: keras.layers.Layer | str | None = None,
    ) -> None:
        exposure = inspection.exposure_of(model)
        if exposure is not None and logits_layer is not None:
            raise ValueError("this model is already exposed; pass logits_layer= to expose")
        if exposure is None and len(model.outputs) == 1:
            logits_layer = inspection.get_logits_layer(model, logits_layer)
            layers, _ = inspection.layers_with_biases(model, exclude=[logits_layer])
            model = inspection.expose(model, layers, logits_layer)
            exposure = inspection.exposure_of(model)
        if biases is None:
            if exposure is None:
                raise ValueError(
                    "this model has several outputs but was not built by fullgrad.inspection."
                    "expose; pass biases= aligned with its outputs[1:]"
                )
            biases = exposure.biases
        if len(biases) != len(model.outputs) - 1:
            raise ValueError(
                f"got {len(biases)} biases for {len(model.outputs) - 1} exposed bias outputs"
            )
        self.model = model
        self.exposure = exposure
        self.layer_names = (
            [layer.name for layer in exposure.layers]
            if exposure
            else [f"bias_{i}" for i in range(len(biases))]
        )
        self._biases = [tf.constant(np.asarray(b, np.float32)) for b in biases]
        num_classes = model.outputs[0].shape[-1]
        self._logits_bias = tf.constant(
            exposure.logits_bias if exposure else np.zeros([num_classes], np.float32)
        )
        self.normalize_channels = normalize_channels
        self.jit_compile = jit_compile
        self._steps: dict[tuple, Any] = {}

    # -- public API -----------------------------------------------------------------------

    def explain(self, inputs: Any, targets: Any = None, batch_size: int | None = 32) -> np.ndarray:
        """Returns one ``[H, W]`` map per image for one class each.

        Args:
            inputs: ``[B, H, W, C]`` numpy array or tensor, or a ``tf.data.Dataset`` of such
                batches, or of ``(batch, targets)`` pairs.
            targets: ``[B]`` class indices; each image's top-1 class when None.
            batch_size: Images per step for arrays and tensors (datasets keep their batches).

        Returns:
            ``[B, H, W]`` float32 maps in [0, 1].
        """
        if targets is not None:
            targets = np.asarray(targets).reshape(-1, 1)
        return self.compute(inputs, targets, batch_size=batch_size).maps[..., 0]

    def __call__(self, inputs: Any, targets: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """The seed's call: ``(logits [B, k], maps [B, H, W, k])`` for ``targets`` ``[B, k]``."""
        result = self.compute(inputs, targets, batch_size=None)
        return result.logits, result.maps

    def compute(
        self, inputs: Any, targets: Any = None, batch_size: int | None = None
    ) -> FullGradResult:
        """Explains ``inputs`` and returns maps, targets, logits and completeness residuals.

        Args:
            inputs: As for ``explain``.
            targets: ``[B, k]`` (or ``[B]``) unit indices; the top-1 class when None.
            batch_size: Images per step; all at once when None.

        Returns:
            A ``FullGradResult`` of numpy arrays.
        """
        parts = [self._compute_batch(x, y) for x, y in _batches(inputs, targets, batch_size)]
        if not parts:
            raise ValueError("no inputs to explain")
        return FullGradResult(
            *[np.concatenate(arrays) for arrays in zip(*[dataclasses.astuple(p) for p in parts])]
        )

    def decompose(self, inputs: Any, targets: Any = None) -> Decomposition:
        """Returns every term of the full-gradient decomposition for one class per image.

        Args:
            inputs: ``[B, H, W, C]`` images (any rank the model accepts).
            targets: ``[B]`` classes; the top-1 class when None.

        Returns:
            A ``Decomposition``; ``logits == reconstruction`` when completeness holds.
        """
        x = tf.convert_to_tensor(np.asarray(inputs, np.float32))
        y = _targets_tensor(targets, len(x), 1)
        _, logits, targets, input_terms, bias_grads = self._gradients(x, y)
        logits, targets = logits[:, 0].numpy(), targets[:, 0].numpy()
        input_term = input_terms[0].numpy()
        bias_terms = [(g * b).numpy() for g, b in zip(bias_grads[0], self._biases, strict=True)]
        logits_bias = self._logits_bias.numpy()[targets]
        sums = [_per_sample_sum(input_term), *[_per_sample_sum(t) for t in bias_terms]]
        reconstruction = np.sum(sums, axis=0) + logits_bias
        scale = np.abs(logits) + np.sum(np.abs(sums), axis=0) + np.abs(logits_bias) + 1e-12
        return Decomposition(
            logits=logits,
            targets=targets,
            input=input_term,
            biases=bias_terms,
            layer_names=list(self.layer_names),
            logits_bias=logits_bias,
            residual=(np.abs(logits - reconstruction) / scale).astype(np.float32),
        )

    # -- internals ------------------------------------------------------------------------

    def _compute_batch(self, x: np.ndarray | tf.Tensor, y: np.ndarray | None) -> FullGradResult:
        x = tf.cast(tf.convert_to_tensor(x), tf.float32)
        k = 1 if y is None else int(np.asarray(y).reshape(len(x), -1).shape[1])
        y = _targets_tensor(y, int(x.shape[0]), k)
        key = (tuple(x.shape[1:]), k)
        step = self._steps.get(key)
        if step is None:
            signature = [
                tf.TensorSpec([None, *x.shape[1:]], tf.float32),
                tf.TensorSpec([None, k], tf.int32),
            ]
            step = tf.function(self._step, input_signature=signature, jit_compile=self.jit_compile)
            self._steps[key] = step
        outputs = step(x, y)
        return FullGradResult(**{name: value.numpy() for name, value in outputs.items()})

    def _gradients(self, x: tf.Tensor, y: tf.Tensor):
        """One forward pass, then one backward pass per explained unit.

        Returns:
            ``(all_logits [B,classes], logits [B,k], targets [B,k], input_terms, bias_grads)``:
            ``input_terms[j]`` is ``x * grad_x`` for unit ``j`` and ``bias_grads[j][l]`` is
            ``grad_{z_l}``, the gradient at bias layer ``l``'s pre-activation output.
        """
        k = y.shape[1]
        with tf.GradientTape(persistent=k > 1, watch_accessed_variables=False) as tape:
            tape.watch(x)
            all_logits, *pre_activations = self.model(x, training=False)
            all_logits = tf.cast(all_logits, tf.float32)
            top1 = tf.argmax(all_logits, axis=-1, output_type=tf.int32)[:, None]
            targets = tf.where(y < 0, top1, y)
            logits = tf.gather(all_logits, targets, batch_dims=1)
            unit_sums = [tf.reduce_sum(logits[:, j]) for j in range(k)]
        input_terms, bias_grads = [], []
        for unit_sum in unit_sums:
            grads = tape.gradient(
                unit_sum,
                [x, *pre_activations],
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
            input_terms.append(x * grads[0])
            bias_grads.append([tf.cast(g, tf.float32) for g in grads[1:]])
        return all_logits, logits, targets, input_terms, bias_grads

    def _step(self, x: tf.Tensor, y: tf.Tensor) -> dict[str, tf.Tensor]:
        all_logits, logits, targets, input_terms, bias_grads = self._gradients(x, y)
        height, width = x.shape[1], x.shape[2]
        spatial_rank = x.shape.rank
        maps, unit_sums = [], []
        for input_term, grads in zip(input_terms, bias_grads, strict=True):
            by_resolution: dict[tuple[int, int], tf.Tensor] = {}
            _accumulate(by_resolution, self._post_process(tf.abs(input_term)))
            for grad, bias in zip(grads, self._biases, strict=True):
                if grad.shape.rank == spatial_rank:  # dense terms: completeness, not the map
                    _accumulate(by_resolution, self._post_process_bias(grad, bias))
            saliency = by_resolution.pop((height, width))
            for partial in by_resolution.values():
                saliency += _resize_bilinear(partial, (height, width))
            maps.append(_minmax(saliency, axes=[1, 2]))
            # sum(b * g) = sum_c b_c * sum_hw g_hwc: the bias terms are never materialised.
            sums = [tf.reduce_sum(input_term, axis=list(range(1, spatial_rank)))]
            for grad, bias in zip(grads, self._biases, strict=True):
                per_channel = tf.reduce_sum(grad, axis=list(range(1, grad.shape.rank - 1)))
                sums.append(tf.reduce_sum(per_channel * bias, axis=-1))
            unit_sums.append(tf.stack(sums, axis=1))
        logits_bias = tf.gather(self._logits_bias, targets)
        sums = tf.stack(unit_sums, axis=1)  # [B, k, terms]
        reconstruction = tf.reduce_sum(sums, axis=-1) + logits_bias
        scale = tf.abs(logits) + tf.reduce_sum(tf.abs(sums), -1) + tf.abs(logits_bias) + 1e-12
        return {
            "maps": tf.stack(maps, axis=-1),
            "targets": targets,
            "logits": logits,
            "all_logits": all_logits,
            "residual": tf.abs(logits - reconstruction) / scale,
        }

    def _post_process(self, magnitude: tf.Tensor) -> tf.Tensor:
        """``sum_c minmax(|t|)`` of a term given as ``|t|`` ``[B, h, w, C]`` -> ``[B, h, w]``."""
        axes = [1, 2] if self.normalize_channels else [1, 2, 3]
        return tf.reduce_sum(_minmax(magnitude, axes=axes), axis=-1)

    def _post_process_bias(self, grad: tf.Tensor, bias: tf.Tensor) -> tf.Tensor:
        """``sum_c minmax(|b * g|)`` without materialising ``b * g`` when it can.

        Since ``|b_c g_hwc| = |b_c| |g_hwc|`` with ``|b_c| >= 0``, the per-term minimum and
        maximum come from per-channel minima and maxima of ``|g|``, and the channel sum is a
        matrix product with ``|b|``: three reads of ``|g|`` instead of seven passes.
        """
        magnitude, weight = tf.abs(grad), tf.abs(bias)
        if self.normalize_channels:
            # Per channel a constant-gradient channel has a tiny range and a huge scale:
            # subtract before scaling, elementwise, to avoid cancellation.
            return self._post_process(magnitude * weight)
        low = tf.reduce_min(tf.reduce_min(magnitude, axis=[1, 2]) * weight, axis=-1)
        high = tf.reduce_max(tf.reduce_max(magnitude, axis=[1, 2]) * weight, axis=-1)
        channels = tf.cast(tf.shape(grad)[-1], tf.float32)
        summed = tf.tensordot(magnitude, weight, axes=[[3], [0]])
        return (summed - channels * low[:, None, None]) / (high - low + _EPS)[:, None, None]


def _accumulate(by_resolution: dict[tuple[int, int], tf.Tensor], partial: tf.Tensor) -> None:
    """Adds a ``[B, h, w]`` partial map to the running sum at its resolution."""
    size = (partial.shape[1], partial.shape[2])
    by_resolution[size] = by_resolution[size] + partial if size in by_resolution else partial


def _targets_tensor(targets: Any, batch: int, k: int) -> tf.Tensor:
    if targets is None:
        return tf.fill([batch, k], TARGET_PREDICTED)
    targets = np.asarray(targets).astype(np.int32).reshape(batch, -1)
    return tf.constant(targets)


def _batches(inputs: Any, targets: Any, batch_size: int | None):
    """Yields ``(x, y)`` batches from arrays, tensors or a ``tf.data.Dataset``."""
    if isinstance(inputs, tf.data.Dataset):
        if targets is not None:
            raise ValueError("a dataset carries its own targets: yield (images, targets)")
        for element in inputs:
            if isinstance(element, tuple | list):
                yield element[0], np.asarray(element[1])
            else:
                yield element, None
        return
    if not isinstance(inputs, tf.Tensor):
        inputs = np.asarray(inputs, np.float32)
    total = int(inputs.shape[0])
    if targets is not None:
        targets = np.asarray(targets).reshape(total, -1)
    step = total if not batch_size else batch_size
    for start in range(0, total, max(step, 1)):
        stop = start + step
        yield inputs[start:stop], None if targets is None else targets[start:stop]


_ENGINES_ATTRIBUTE = "_fullgrad_engines"


def cached_engines(model: keras.Model) -> dict[tuple, FullGrad]:
    """The engines ``full_gradients`` and ``decompose`` built for ``model``, by their options.

    They live on the model itself: an engine references its (exposed) model, so a weakly keyed
    registry would keep every model alive; an attribute makes it a cycle the collector frees.
    ``object.__setattr__`` keeps Keras from tracking the cache as model state.
    """
    engines = model.__dict__.get(_ENGINES_ATTRIBUTE)
    if engines is None:
        engines = {}
        object.__setattr__(model, _ENGINES_ATTRIBUTE, engines)
    return engines


def _engine(model: keras.Model, biases: Sequence[Any] | None, **options: Any) -> FullGrad:
    """One FullGrad per (model, biases, options), so repeated calls reuse the traced step."""
    engines = cached_engines(model)
    key = (None if biases is None else id(biases), *sorted(options.items()))
    if key not in engines:
        engines[key] = FullGrad(model, biases=biases, **options)
    return engines[key]


def full_gradients(
    model: keras.Model,
    inputs: Any,
    indices: Any = None,
    biases: Sequence[Any] | None = None,
    *,
    normalize_channels: bool = False,
    jit_compile: bool = False,
    logits_layer: keras.layers.Layer | str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """FullGrad maps for the units ``indices``, following keras-explainable's call.

    Args:
        model: A model from ``inspection.expose`` (or any classifier: it is exposed here).
        inputs: ``[B, H, W, C]`` images, already preprocessed for the model.
        indices: ``[B, k]`` unit indices per image, e.g. ``argsort(logits)[:, ::-1][:, :1]``;
            each image's top-1 class when None.
        biases: The effective biases from ``inspection.layers_with_biases``, aligned with the
            exposed outputs; collected again when None.
        normalize_channels: The paper's per-channel normalisation instead of per-term.
        jit_compile: Compile with XLA.
        logits_layer: The layer (or its name) whose output are the class scores.

    Returns:
        ``(logits, maps)``: ``[B, k]`` pre-activation logits of the explained units and
        ``[B, H, W, k]`` maps in [0, 1].

    Example:
        >>> logits = ke.inspection.get_logits_layer(model)
        >>> inters, biases = ke.inspection.layers_with_biases(model, exclude=[logits])
        >>> model = ke.inspection.expose(model, inters, logits)
        >>> logits, maps = ke.full_gradients(model, x, y, biases=biases)
    """
    engine = _engine(
        model,
        biases,
        normalize_channels=normalize_channels,
        jit_compile=jit_compile,
        logits_layer=logits_layer,
    )
    return engine(inputs, indices)


def decompose(
    model: keras.Model,
    inputs: Any,
    targets: Any = None,
    *,
    logits_layer: keras.layers.Layer | str | None = None,
) -> Decomposition:
    """The full-gradient decomposition of each image's explained logit.

    Args:
        model: A Keras classifier or a model from ``inspection.expose``.
        inputs: ``[B, ...]`` preprocessed inputs.
        targets: ``[B]`` classes; the top-1 class when None.
        logits_layer: The layer (or its name) whose output are the class scores.

    Returns:
        A ``Decomposition`` with ``.logits``, ``.input``, ``.biases``, ``.logits_bias`` and
        ``.residual``.

    Example:
        >>> parts = ke.decompose(model, x)
        >>> np.testing.assert_allclose(parts.logits, parts.reconstruction, rtol=1e-4)
    """
    return _engine(model, None, logits_layer=logits_layer).decompose(inputs, targets)
