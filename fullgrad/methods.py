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
    >>> maps = explainer(x)                                      # [B, H, W], top-1 class
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
from fullgrad.parts import PARTS, part_of_resolution
from fullgrad.targets import TARGET_PREDICTED

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "PRECISIONS",
    "TARGET_PREDICTED",
    "VARIANTS",
    "Decomposition",
    "FullGrad",
    "FullGradResult",
    "completeness",
    "decompose",
    "full_gradients",
]

_EPS = 1e-6

#: Images per traced step in ``explain``, ``compute``, ``decompose`` and ``full_gradients``.
DEFAULT_BATCH_SIZE = 32

#: The Keras dtype policies ``FullGrad(precision=...)`` runs the model under.
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")

#: The maps ``FullGrad(variant=...)`` computes from the same gradients (see ``FullGrad``).
VARIANTS = ("fullgrad", "simple")


def completeness(logits: Any, term_sums: Any, logits_bias: Any) -> tuple[tf.Tensor, tf.Tensor]:
    """The completeness check of the full-gradient decomposition: reconstruction and residual.

    ``reconstruction = sum_t term_sums[..., t] + logits_bias`` and
    ``residual = |logits - reconstruction| / (|logits| + sum_t |term_sums[..., t]| +
    |logits_bias|)``: the error relative to the size of the parts, so that it reads the same
    for large and small logits (captum's convergence delta, normalised). The one place where
    ``FullGrad``'s traced step, ``decompose`` and ``Decomposition`` compute it.

    Args:
        logits: ``[...]`` the explained logits.
        term_sums: ``[..., terms]`` the per-image sum of each term (input, then biases).
        logits_bias: ``[...]`` the classifier's bias for the explained unit.

    Returns:
        ``(reconstruction, residual)``, tensors of ``logits``' shape, in the inputs' dtype
        (tensors inside a ``tf.function``; numpy callers convert with ``.numpy()``).

    Example:
        >>> reconstruction, residual = completeness(parts.logits, sums, parts.logits_bias)
        >>> float(residual.numpy().max()) < 1e-5
        True
    """
    term_sums = tf.convert_to_tensor(term_sums)
    logits = tf.cast(logits, term_sums.dtype)
    logits_bias = tf.cast(logits_bias, term_sums.dtype)
    reconstruction = tf.reduce_sum(term_sums, axis=-1) + logits_bias
    scale = tf.abs(logits) + tf.reduce_sum(tf.abs(term_sums), -1) + tf.abs(logits_bias) + 1e-12
    return reconstruction, tf.abs(logits - reconstruction) / scale


@dataclasses.dataclass(frozen=True)
class FullGradResult:
    """One batch explained.

    Attributes:
        maps: ``[B, H, W, k]`` float32 saliency in [0, 1], one map per explained unit.
        targets: ``[B, k]`` int32, the explained units.
        logits: ``[B, k]`` float32, the explained pre-activation logits.
        all_logits: ``[B, classes]`` float32, every pre-activation logit (for top-k).
        residual: ``[B, k]`` float32, the relative completeness error (see ``Decomposition``).
        parts: ``[B, P, H, W, k]`` float32 in [0, 1], the map's parts (``fullgrad.parts.PARTS``:
            the input term, then the bias terms grouped by resolution), each the sum of its
            post-processed terms min-max normalised per image; None unless
            ``compute(..., parts=True)``.
    """

    maps: np.ndarray
    targets: np.ndarray
    logits: np.ndarray
    all_logits: np.ndarray
    residual: np.ndarray
    parts: np.ndarray | None = None


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
        sums = np.stack([_per_sample_sum(term) for term in (self.input, *self.biases)], axis=1)
        reconstruction, _ = completeness(self.logits, sums, self.logits_bias)
        return reconstruction.numpy()


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
    residual, in a single forward and a single backward pass per explained unit. Calling the
    explainer is ``explain``, as for every xplique explainer.

    Args:
        model: A Keras classifier, or a model returned by ``inspection.expose``.
        biases: Effective biases aligned with the exposed outputs (from ``layers_with_biases``);
            collected from the model when None.
        normalize_channels: Min-max each channel separately (the paper's formula) instead of
            each term as a whole (the authors' code).
        jit_compile: Compile the whole step with XLA. The last partial batch of an array is
            then padded to ``batch_size`` so that XLA compiles one shape, not two.
        precision: The Keras dtype policy the model runs under: ``"float32"`` (default),
            ``"mixed_bfloat16"`` or ``"mixed_float16"``. Mixed policies run a copy of the
            exposed model whose layers compute in 16 bits (weights copied, kept in float32,
            the user's model untouched); gradients are cast to float32 as they leave the model,
            so post-processing and every sum accumulate in float32. The residual then measures
            the 16-bit forward/backward error honestly: about 1e-4 (float16) to 1e-2
            (bfloat16) rather than float32's 1e-7.
            On a GPU this is the speed option; on a CPU it mostly checks the numbers.
            ``mixed_float16`` uses no loss scaling: gradients below float16's range flush to 0.
        variant: ``"fullgrad"`` (default) or ``"simple"``: the same terms without the per-term
            min-max, ``S = minmax(sum_t up(sum_c |t|))``, so a term is weighed by its own
            magnitude and a large, spread-out bias term cannot wash out a sharp input term.
            Same traced pass, same logits and residual; only the post-processing differs.
            (The authors' released ``simple_fullgrad.py`` differs again: it keeps the
            per-term min-max and uses the raw gradients at the layers without the biases.)
        logits_layer: The layer (or its name) whose output are the class scores, when
            ``inspection.get_logits_layer`` does not find it.

    Example:
        >>> explainer = FullGrad(model)
        >>> maps = explainer(images)                         # [B, H, W], top-1 class
        >>> maps = explainer(images, labels)                 # [B, H, W], given classes
        >>> result = explainer.compute(images)               # maps, logits, residuals
        >>> fast = FullGrad(model, precision="mixed_bfloat16")
        >>> simple = FullGrad(model, variant="simple")
    """

    def __init__(
        self,
        model: keras.Model,
        *,
        biases: Sequence[Any] | None = None,
        normalize_channels: bool = False,
        jit_compile: bool = False,
        precision: str = "float32",
        variant: str = "fullgrad",
        logits_layer: keras.layers.Layer | str | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
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
        self.model = model if precision == "float32" else _under_policy(model, precision)
        self.precision = precision
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
        self.variant = variant
        self._steps: dict[tuple, Any] = {}

    # -- public API -----------------------------------------------------------------------

    def explain(
        self, inputs: Any, targets: Any = None, batch_size: int | None = DEFAULT_BATCH_SIZE
    ) -> np.ndarray:
        """Returns one ``[H, W]`` map per image for one class each.

        Args:
            inputs: ``[B, H, W, C]`` numpy array or tensor, or a ``tf.data.Dataset`` of such
                batches, or of ``(batch, targets)`` pairs.
            targets: ``[B]`` class indices; each image's top-1 class when None.
            batch_size: Images per step for arrays and tensors (datasets keep their batches);
                all at once when None.

        Returns:
            ``[B, H, W]`` float32 maps in [0, 1].

        Example:
            >>> maps = FullGrad(model).explain(images, labels, batch_size=16)
        """
        if targets is not None:
            targets = np.asarray(targets).reshape(-1, 1)
        return self.compute(inputs, targets, batch_size=batch_size).maps[..., 0]

    def __call__(
        self, inputs: Any, targets: Any = None, batch_size: int | None = DEFAULT_BATCH_SIZE
    ) -> np.ndarray:
        """``explain``: ``[B, H, W]`` maps, one class per image (xplique's contract).

        Example:
            >>> maps = FullGrad(model)(images)
        """
        return self.explain(inputs, targets, batch_size=batch_size)

    def compute(
        self,
        inputs: Any,
        targets: Any = None,
        batch_size: int | None = DEFAULT_BATCH_SIZE,
        *,
        parts: bool = False,
    ) -> FullGradResult:
        """Explains ``inputs`` and returns maps, targets, logits and completeness residuals.

        Args:
            inputs: As for ``explain``.
            targets: ``[B, k]`` (or ``[B]``) unit indices; the top-1 class when None.
            batch_size: Images per step; all at once when None.
            parts: Also return the map's parts (``FullGradResult.parts``), from the same
                gradients in the same step; the maps are the same to the last bit either way.
                Off by default: the default step does no parts work.

        Returns:
            A ``FullGradResult`` of numpy arrays.

        Example:
            >>> result = FullGrad(model).compute(images, parts=True)
            >>> result.maps.shape, result.parts.shape     # [B, H, W, 1], [B, 4, H, W, 1]
        """
        pad_to = batch_size if self.jit_compile else None
        batches = [
            self._compute_batch(x, y, pad_to, parts)
            for x, y in input_batches(inputs, targets, batch_size)
        ]
        if not batches:
            raise ValueError("no inputs to explain")
        return FullGradResult(
            **{
                field.name: None
                if getattr(batches[0], field.name) is None
                else np.concatenate([getattr(b, field.name) for b in batches])
                for field in dataclasses.fields(FullGradResult)
            }
        )

    def decompose(
        self, inputs: Any, targets: Any = None, batch_size: int | None = DEFAULT_BATCH_SIZE
    ) -> Decomposition:
        """Returns every term of the full-gradient decomposition for one class per image.

        The gradients are taken in a traced step (one per input shape), never eagerly: TF
        2.21's eager Conv2D backprop with oneDNN corrupts the heap on some CPU models.

        Args:
            inputs: ``[B, H, W, C]`` images (any rank the model accepts).
            targets: ``[B]`` classes; the top-1 class when None.
            batch_size: Images per step; all at once when None.

        Returns:
            A ``Decomposition``; ``logits == reconstruction`` when completeness holds.

        Example:
            >>> parts = FullGrad(model).decompose(images)
            >>> parts.residual.max()
        """
        if targets is not None:
            targets = np.asarray(targets).reshape(-1, 1)
        batches = []
        for x, y in input_batches(inputs, targets, batch_size):
            x = tf.cast(tf.convert_to_tensor(x), tf.float32)
            step = self._traced(self._decompose_step, "decompose", x, 1)
            out = step(x, _targets_tensor(y, int(x.shape[0]), 1))
            batches.append(tf.nest.map_structure(lambda t: t.numpy(), out))
        if not batches:
            raise ValueError("no inputs to decompose")
        return Decomposition(
            logits=np.concatenate([b["logits"] for b in batches]),
            targets=np.concatenate([b["targets"] for b in batches]),
            input=np.concatenate([b["input"] for b in batches]),
            biases=[np.concatenate(terms) for terms in zip(*[b["biases"] for b in batches])],
            layer_names=list(self.layer_names),
            logits_bias=np.concatenate([b["logits_bias"] for b in batches]),
            residual=np.concatenate([b["residual"] for b in batches]),
        )

    # -- internals ------------------------------------------------------------------------

    def _traced(self, function: Any, kind: str, x: tf.Tensor, k: int) -> Any:
        """The ``tf.function`` of ``function`` for this input shape, traced on first use."""
        key = (kind, tuple(x.shape[1:]), k)
        step = self._steps.get(key)
        if step is None:
            signature = [
                tf.TensorSpec([None, *x.shape[1:]], tf.float32),
                tf.TensorSpec([None, k], tf.int32),
            ]
            step = tf.function(function, input_signature=signature, jit_compile=self.jit_compile)
            self._steps[key] = step
        return step

    def _compute_batch(
        self,
        x: np.ndarray | tf.Tensor,
        y: np.ndarray | None,
        pad_to: int | None = None,
        parts: bool = False,
    ) -> FullGradResult:
        x = tf.cast(tf.convert_to_tensor(x), tf.float32)
        count = int(x.shape[0])
        k = 1 if y is None else int(np.asarray(y).reshape(count, -1).shape[1])
        y = _targets_tensor(y, count, k)
        if pad_to and count < pad_to:
            # One batch shape per input shape: an XLA step compiles again for every new one.
            x = tf.pad(x, [[0, pad_to - count]] + [[0, 0]] * (x.shape.rank - 1))
            y = tf.pad(y, [[0, pad_to - count], [0, 0]], constant_values=TARGET_PREDICTED)
        step = self._traced(self._step_with_parts, "parts", x, k) if parts else self._traced(
            self._step, "compute", x, k
        )
        outputs = step(x, y)
        return FullGradResult(**{name: value[:count].numpy() for name, value in outputs.items()})

    def _gradients(self, x: tf.Tensor, y: tf.Tensor):
        """One forward pass, then one backward pass per explained unit.

        Returns:
            ``(all_logits [B,classes], logits [B,k], targets [B,k], input_terms, bias_grads)``:
            ``input_terms[j]`` is ``x * grad_x`` for unit ``j`` and ``bias_grads[j][l]`` is
            ``grad_{z_l}``, the gradient at bias layer ``l``'s pre-activation output, float32
            whatever the precision the model runs in.
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
            input_terms.append(x * tf.cast(grads[0], tf.float32))
            bias_grads.append([tf.cast(g, tf.float32) for g in grads[1:]])
        return all_logits, logits, targets, input_terms, bias_grads

    def _step_with_parts(self, x: tf.Tensor, y: tf.Tensor) -> dict[str, tf.Tensor]:
        return self._step(x, y, parts=True)

    def _step(self, x: tf.Tensor, y: tf.Tensor, parts: bool = False) -> dict[str, tf.Tensor]:
        all_logits, logits, targets, input_terms, bias_grads = self._gradients(x, y)
        height, width = x.shape[1], x.shape[2]
        spatial_rank = x.shape.rank
        maps, unit_sums, unit_parts = [], [], []
        for input_term, grads in zip(input_terms, bias_grads, strict=True):
            by_resolution: dict[tuple[int, int], tf.Tensor] = {}
            input_partial = self._post_process(tf.abs(input_term))
            _accumulate(by_resolution, input_partial)
            bias_partials: dict[tuple[int, int], tf.Tensor] = {}
            sums = [tf.reduce_sum(input_term, axis=list(range(1, spatial_rank)))]
            for grad, bias in zip(grads, self._biases, strict=True):
                if grad.shape.rank == spatial_rank:  # dense terms: completeness, not the map
                    partial, term_sum = self._post_process_bias(grad, bias)
                    _accumulate(by_resolution, partial)
                    if parts:
                        _accumulate(bias_partials, partial)
                else:
                    term_sum = _per_image_sum(grad * bias)
                sums.append(term_sum)
            # The map is summed in the same order with or without parts: the same bits.
            saliency = by_resolution.pop((height, width))
            resized = {}
            for size, partial in by_resolution.items():
                resized[size] = _resize_bilinear(partial, (height, width))
                saliency += resized[size]
            maps.append(_minmax(saliency, axes=[1, 2]))
            unit_sums.append(tf.stack(sums, axis=1))
            if parts:
                unit_parts.append(_part_maps(input_partial, bias_partials, resized))
        _, residual = completeness(
            logits, tf.stack(unit_sums, axis=1), tf.gather(self._logits_bias, targets)
        )
        outputs = {
            "maps": tf.stack(maps, axis=-1),
            "targets": targets,
            "logits": logits,
            "all_logits": all_logits,
            "residual": residual,
        }
        if parts:
            outputs["parts"] = tf.stack(unit_parts, axis=-1)
        return outputs

    def _decompose_step(self, x: tf.Tensor, y: tf.Tensor) -> dict[str, Any]:
        _, logits, targets, input_terms, bias_grads = self._gradients(x, y)
        input_term = input_terms[0]
        bias_terms = [grad * bias for grad, bias in zip(bias_grads[0], self._biases, strict=True)]
        logits_bias = tf.gather(self._logits_bias, targets[:, 0])
        sums = tf.stack([_per_image_sum(term) for term in (input_term, *bias_terms)], axis=1)
        _, residual = completeness(logits[:, 0], sums, logits_bias)
        return {
            "logits": logits[:, 0],
            "targets": targets[:, 0],
            "input": input_term,
            "biases": bias_terms,
            "logits_bias": logits_bias,
            "residual": residual,
        }

    def _post_process(self, magnitude: tf.Tensor) -> tf.Tensor:
        """``sum_c minmax(|t|)`` of a term given as ``|t|`` ``[B, h, w, C]`` -> ``[B, h, w]``.

        ``sum_c |t|`` for the simple variant: its one min-max is the final one.
        """
        if self.variant == "simple":
            return tf.reduce_sum(magnitude, axis=-1)
        axes = [1, 2] if self.normalize_channels else [1, 2, 3]
        return tf.reduce_sum(_minmax(magnitude, axes=axes), axis=-1)

    def _post_process_bias(self, grad: tf.Tensor, bias: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """``(sum_c minmax(|b * g|) [B, h, w], sum(b * g) [B])`` for one spatial bias term.

        Every reduction runs over the innermost axes, which are contiguous: reductions over
        ``h, w`` alone (per-channel extrema) cost two to three times more on a CPU. With
        ``sum_c (m - low) = sum_c m - C * low`` the normalised term is never materialised.
        """
        weighted = grad * bias
        magnitude = tf.abs(weighted)
        if self.normalize_channels or self.variant == "simple":
            partial = self._post_process(magnitude)
        else:
            low = tf.reduce_min(magnitude, axis=[1, 2, 3])
            high = tf.reduce_max(magnitude, axis=[1, 2, 3])
            channels = tf.cast(tf.shape(grad)[-1], tf.float32)
            summed = tf.reduce_sum(magnitude, axis=-1)
            partial = (summed - channels * low[:, None, None]) / (high - low + _EPS)[:, None, None]
        return partial, tf.reduce_sum(tf.reduce_sum(weighted, axis=-1), axis=[1, 2])


def _part_maps(
    input_partial: tf.Tensor,
    bias_partials: dict[tuple[int, int], tf.Tensor],
    resized: dict[tuple[int, int], tf.Tensor],
) -> tf.Tensor:
    """``[B, P, H, W]``: the input part and each bias group (``fullgrad.parts``), min-max'd.

    ``bias_partials`` holds the post-processed bias terms summed per resolution; ``resized``
    the same sums already upsampled to the input's size for the map (below the input's
    resolution the input term is not mixed in), so no term is resized twice.
    """
    size = (input_partial.shape[1], input_partial.shape[2])
    groups = {name: tf.zeros_like(input_partial) for name in PARTS[1:]}
    for resolution, partial in bias_partials.items():
        upsampled = partial if resolution == size else resized[resolution]
        group = part_of_resolution(resolution, size)
        groups[group] = groups[group] + upsampled
    stacked = [input_partial, *(groups[name] for name in PARTS[1:])]
    return tf.stack([_minmax(part, axes=[1, 2]) for part in stacked], axis=1)


def _per_image_sum(tensor: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(tensor, axis=list(range(1, tensor.shape.rank)))


def _under_policy(model: keras.Model, precision: str) -> keras.Model:
    """A copy of ``model`` whose layers run under the dtype policy ``precision``.

    A policy applies to layers as they are created, so the layers are rebuilt from their
    configs with the policy and given the original (float32) weights; the original model and
    its exposure record stay as they are.
    """
    policy = keras.DTypePolicy(precision)

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        config["dtype"] = policy
        return type(layer).from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def _accumulate(by_resolution: dict[tuple[int, int], tf.Tensor], partial: tf.Tensor) -> None:
    """Adds a ``[B, h, w]`` partial map to the running sum at its resolution."""
    size = (partial.shape[1], partial.shape[2])
    by_resolution[size] = by_resolution[size] + partial if size in by_resolution else partial


def _targets_tensor(targets: Any, batch: int, k: int) -> tf.Tensor:
    if targets is None:
        return tf.fill([batch, k], TARGET_PREDICTED)
    targets = np.asarray(targets).astype(np.int32).reshape(batch, -1)
    return tf.constant(targets)


def input_batches(inputs: Any, targets: Any, batch_size: int | None):
    """Yields ``(x, y)`` batches from arrays, tensors or a ``tf.data.Dataset``.

    The one input clean-up of every explainer (FullGrad, the baselines): ``y`` is ``[b, k]``
    or None; a dataset yields image batches or ``(images, targets)`` batches.

    Example:
        >>> [x.shape[0] for x, _ in input_batches(np.zeros([7, 8, 8, 3]), None, 3)]
        [3, 3, 1]
    """
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
    batch_size: int | None = DEFAULT_BATCH_SIZE,
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
        batch_size: Images per step; all at once when None.
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
    result = engine.compute(inputs, indices, batch_size=batch_size)
    return result.logits, result.maps


def decompose(
    model: keras.Model,
    inputs: Any,
    targets: Any = None,
    batch_size: int | None = DEFAULT_BATCH_SIZE,
    *,
    logits_layer: keras.layers.Layer | str | None = None,
) -> Decomposition:
    """The full-gradient decomposition of each image's explained logit, in a traced step.

    Args:
        model: A Keras classifier or a model from ``inspection.expose``.
        inputs: ``[B, ...]`` preprocessed inputs.
        targets: ``[B]`` classes; the top-1 class when None.
        batch_size: Images per step; all at once when None.
        logits_layer: The layer (or its name) whose output are the class scores.

    Returns:
        A ``Decomposition`` with ``.logits``, ``.input``, ``.biases``, ``.logits_bias`` and
        ``.residual``.

    Example:
        >>> parts = ke.decompose(model, x)
        >>> np.testing.assert_allclose(parts.logits, parts.reconstruction, rtol=1e-4)
    """
    return _engine(model, None, logits_layer=logits_layer).decompose(
        inputs, targets, batch_size=batch_size
    )
