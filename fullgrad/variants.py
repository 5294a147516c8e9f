"""The map kinds the job offers: FullGrad, its simple and smooth variants, and two baselines.

One entry point, :func:`explainer_for`, builds any of them for a loaded classifier; each
returns the same :class:`fullgrad.methods.FullGradResult` (maps ``[B, H, W, 1]``, explained
targets, logits, every logit, completeness residual), so the Beam handler and the evaluation
treat them alike.

- ``fullgrad``: :class:`fullgrad.methods.FullGrad` (per-term min-max, the authors' code).
- ``simple``: ``FullGrad(variant="simple")``, the same terms without the per-term min-max,
  from the same traced pass.
- ``smooth``: :class:`SmoothFullGrad`, FullGrad maps averaged over ``samples`` noisy copies of
  each image (noise std ``noise * (max - min)`` of that image, the authors' ``std_spread``),
  min-max scaled. The noise is seeded by the seed and each image's bytes, so a rerun, or the
  same image in another batch, gets the same map.
- ``input_x_gradient`` and ``gradcam``: :mod:`fullgrad.baselines`.

Completeness residual. The decomposition does not depend on how its terms are drawn, so the
three FullGrad kinds report the residual of the plain image's explained logit (the smooth
variant runs one extra, clean pass for it, and for the logits and targets). The baselines
have no decomposition: their residual is NaN.

Example:
    >>> from fullgrad import variants
    >>> explainer = variants.explainer_for(model, "smooth", smooth_samples=8)
    >>> result = explainer.compute(images, targets)          # targets [B], -1: top-1
    >>> result.maps.shape                                    # [B, H, W, 1]
"""

from __future__ import annotations

import hashlib
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from fullgrad import baselines, evaluation, inspection
from fullgrad.methods import FullGrad, FullGradResult
from fullgrad.targets import TARGET_PREDICTED

__all__ = [
    "DEFAULT_SMOOTH_NOISE",
    "DEFAULT_SMOOTH_SAMPLES",
    "FULLGRAD_KINDS",
    "MAP_KINDS",
    "PART_MAP_KINDS",
    "BaselineExplainer",
    "SmoothFullGrad",
    "evaluation_methods",
    "explainer_for",
    "expose_for",
]

#: Every map kind, in the order reports list them.
MAP_KINDS = ("fullgrad", "simple", "smooth", "input_x_gradient", "gradcam")

#: The kinds built from the full-gradient decomposition (they report its residual).
FULLGRAD_KINDS = ("fullgrad", "simple", "smooth")
#: The kinds whose engine also gives the map's parts (``FullGrad.compute(parts=True)``).
PART_MAP_KINDS = ("fullgrad", "simple")

#: Noisy copies per image of the smooth variant.
DEFAULT_SMOOTH_SAMPLES = 16

#: The smooth variant's noise std as a share of each image's value range (the authors' 0.15).
DEFAULT_SMOOTH_NOISE = 0.15


def _image_seed(image: np.ndarray, seed: int) -> list[int]:
    digest = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=8).digest()
    return [seed, int.from_bytes(digest, "little")]


class SmoothFullGrad:
    """FullGrad averaged over noisy copies of each image (Smooth FullGrad).

    ``S(x) = minmax(mean_n FullGrad(x + e_n))`` with ``e_n ~ N(0, (noise * (max x - min x))^2)``
    per image, explaining the class explained on the clean image. The copies run as
    ``samples`` passes over the batch, so memory is that of one plain batch. The authors'
    ``smooth_fullgrad.py`` averages the signed terms before post-processing; averaging the
    maps keeps this a wrapper of the traced step at the same cost.

    Args:
        engine: The ``FullGrad`` to average (its variant and precision are kept).
        samples: Noisy copies per image (at least 1).
        noise: The noise std as a share of each image's value range (0: no noise).
        seed: Changes every image's noise; the same seed and image give the same map.

    Example:
        >>> smooth = SmoothFullGrad(FullGrad(model), samples=16, noise=0.15)
        >>> maps = smooth.explain(images)                        # [B, H, W]
    """

    def __init__(
        self,
        engine: FullGrad,
        samples: int = DEFAULT_SMOOTH_SAMPLES,
        noise: float = DEFAULT_SMOOTH_NOISE,
        seed: int = 0,
    ) -> None:
        if int(samples) < 1:
            raise ValueError(f"samples must be at least 1, got {samples}")
        if float(noise) < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.engine = engine
        self.samples = int(samples)
        self.noise = float(noise)
        self.seed = int(seed)

    def noisy_copies(self, images: np.ndarray) -> list[np.ndarray]:
        """The ``samples`` noisy batches of ``images``, seeded per image.

        Example:
            >>> copies = SmoothFullGrad(engine, samples=4).noisy_copies(images)   # 4 x [B,...]
        """
        images = np.asarray(images, np.float32)
        draws = []
        for image in images:
            spread = self.noise * float(image.max() - image.min())
            rng = np.random.default_rng(_image_seed(image, self.seed))
            draws.append(rng.standard_normal((self.samples, *image.shape)).astype(np.float32)
                         * np.float32(spread))
        noise = np.stack(draws, axis=1)  # [samples, B, ...]
        return [images + noise[n] for n in range(self.samples)]

    def compute(self, images: Any, targets: Any = None, batch_size: int | None = None
                ) -> FullGradResult:
        """The smooth maps, with the clean image's targets, logits and residual.

        Args:
            images: ``[B, H, W, C]`` preprocessed images.
            targets: ``[B]`` classes; ``TARGET_PREDICTED`` (or None) for the top-1.
            batch_size: Images per traced step; all at once when None.

        Returns:
            A ``FullGradResult`` with ``[B, H, W, 1]`` maps.
        """
        images = np.asarray(images, np.float32)
        clean = self.engine.compute(images, _column(targets, len(images)), batch_size)
        total = np.zeros(clean.maps.shape[:3], np.float64)
        for noisy in self.noisy_copies(images):
            total += self.engine.compute(noisy, clean.targets, batch_size).maps[..., 0]
        maps = baselines.minmax_maps(tf.constant(total / self.samples, tf.float32)).numpy()
        return FullGradResult(maps[..., None], clean.targets, clean.logits, clean.all_logits,
                              clean.residual)

    def explain(self, images: Any, targets: Any = None) -> np.ndarray:
        """``[B, H, W]`` smooth maps (a ``fullgrad.evaluation.MapFunction``)."""
        return self.compute(images, targets).maps[..., 0]

    __call__ = explain


class BaselineExplainer:
    """A baseline map with the logits and targets the job records; residual NaN.

    Args:
        model: A Keras classifier (or a model built by ``inspection.expose``).
        kind: ``"input_x_gradient"`` or ``"gradcam"`` (on the last 4-D layer).

    Example:
        >>> result = BaselineExplainer(model, "gradcam").compute(images)
        >>> np.isnan(result.residual).all()
        True
    """

    def __init__(self, model: keras.Model, kind: str) -> None:
        if kind == "input_x_gradient":
            self.method = baselines.InputXGradient(model, batch_size=None)
        elif kind == "gradcam":
            self.method = baselines.GradCAM(model, batch_size=None)
        else:
            raise ValueError(f"no baseline {kind!r}; choose input_x_gradient or gradcam")
        self.kind = kind
        self._logits = baselines.logits_model(model)
        self._steps: dict[tuple, Any] = {}

    def compute(self, images: Any, targets: Any = None, batch_size: int | None = None
                ) -> FullGradResult:
        """Maps ``[B, H, W, 1]``, resolved targets, logits; ``residual`` NaN.

        Args:
            images: ``[B, H, W, C]`` preprocessed images.
            targets: ``[B]`` (or ``[B, 1]``) classes; ``TARGET_PREDICTED`` for the top-1.
            batch_size: Ignored (the job hands over one batch at a time).
        """
        images = np.asarray(images, np.float32)
        shape = images.shape[1:]
        step = self._steps.get(shape)
        if step is None:
            spec = tf.TensorSpec([None, *shape], tf.float32)
            step = tf.function(lambda x: tf.cast(self._logits(x, training=False), tf.float32),
                               input_signature=[spec])
            self._steps[shape] = step
        all_logits = step(tf.constant(images)).numpy()
        wanted = _column(targets, len(images))[:, 0]
        resolved = np.where(wanted < 0, all_logits.argmax(axis=-1), wanted).astype(np.int32)
        maps = self.method.explain(images, resolved)
        logits = np.take_along_axis(all_logits, resolved[:, None], axis=1)
        return FullGradResult(
            maps=np.asarray(maps, np.float32)[..., None],
            targets=resolved[:, None],
            logits=logits.astype(np.float32),
            all_logits=all_logits,
            residual=np.full([len(images), 1], np.nan, np.float32),
        )

    def explain(self, images: Any, targets: Any = None) -> np.ndarray:
        """``[B, H, W]`` maps (a ``fullgrad.evaluation.MapFunction``)."""
        return self.compute(images, targets).maps[..., 0]

    __call__ = explain


def _column(targets: Any, count: int) -> np.ndarray:
    if targets is None:
        return np.full([count, 1], TARGET_PREDICTED, np.int32)
    return np.asarray(targets, np.int32).reshape(count, 1)


def expose_for(model: keras.Model, logits_layer: str | None = None) -> keras.Model:
    """``model`` exposed for FullGrad, with the logits at ``logits_layer`` when it is named.

    Example:
        >>> exposed = expose_for(model, "dense_logits")
    """
    if inspection.exposure_of(model) is not None or not logits_layer:
        return model
    layer = inspection.get_logits_layer(model, logits_layer)
    layers, _ = inspection.layers_with_biases(model, exclude=[layer])
    return inspection.expose(model, layers, layer)


def explainer_for(
    model: keras.Model,
    kind: str = "fullgrad",
    *,
    smooth_samples: int = DEFAULT_SMOOTH_SAMPLES,
    smooth_noise: float = DEFAULT_SMOOTH_NOISE,
    seed: int = 0,
    logits_layer: str | None = None,
    engine: FullGrad | None = None,
    precision: str = "float32",
) -> FullGrad | SmoothFullGrad | BaselineExplainer:
    """The explainer of a map kind; each has ``compute(images, targets) -> FullGradResult``.

    Args:
        model: A Keras classifier.
        kind: One of ``MAP_KINDS``.
        smooth_samples: Noisy copies per image (``smooth``).
        smooth_noise: Noise std as a share of each image's range (``smooth``).
        seed: Seeds the smooth variant's noise.
        logits_layer: The layer whose output is the logits; found through the head when None.
        engine: A plain ``FullGrad`` of ``model`` to reuse (``fullgrad`` returns it,
            ``smooth`` averages it), so traced steps are shared.
        precision: The Keras dtype policy of the FullGrad kinds (``FullGrad(precision=)``);
            the baselines run in the model's own precision.

    Returns:
        A ``FullGrad`` (``fullgrad``, ``simple``), ``SmoothFullGrad`` or ``BaselineExplainer``.

    Raises:
        ValueError: An unknown kind.

    Example:
        >>> result = explainer_for(model, "simple").compute(images)
    """
    if kind not in MAP_KINDS:
        raise ValueError(f"unknown map {kind!r}; choose from {MAP_KINDS}")
    model = expose_for(model, logits_layer)
    if kind in ("fullgrad", "smooth"):
        plain = engine or FullGrad(model, precision=precision)
        if kind == "fullgrad":
            return plain
        return SmoothFullGrad(plain, smooth_samples, smooth_noise, seed)
    if kind == "simple":
        return FullGrad(model, variant="simple", precision=precision)
    return BaselineExplainer(model, kind)


def evaluation_methods(
    model: keras.Model,
    *,
    smooth_samples: int = DEFAULT_SMOOTH_SAMPLES,
    smooth_noise: float = DEFAULT_SMOOTH_NOISE,
    seed: int = 0,
    logits_layer: str | None = None,
) -> dict[str, evaluation.MapFunction]:
    """Every map kind and the two random controls, as ``fullgrad.evaluation`` methods.

    What ``fullgrad run --evaluate`` compares: ``MAP_KINDS`` (the smooth variant reuses the
    plain FullGrad's traced step), then ``random`` and ``blurred_random`` seeded by ``seed``.

    Args:
        model: A Keras classifier.
        smooth_samples: Noisy copies per image of ``smooth``.
        smooth_noise: Its noise std as a share of each image's range.
        seed: Seeds the smooth noise and the random controls.
        logits_layer: The layer whose output is the logits; found through the head when None.

    Returns:
        ``{name: (images, targets) -> maps}``.

    Example:
        >>> report = evaluation.evaluate(model, images, evaluation_methods(model))
    """
    model = expose_for(model, logits_layer)
    plain = FullGrad(model)
    methods: dict[str, evaluation.MapFunction] = {}
    for kind in MAP_KINDS:
        explainer = explainer_for(
            model, kind, smooth_samples=smooth_samples, smooth_noise=smooth_noise, seed=seed,
            engine=plain,
        )
        methods[kind] = _map_function(explainer)
    methods["random"] = evaluation.random_maps(seed)
    methods["blurred_random"] = evaluation.blurred_random_maps(seed)
    return methods


def _map_function(explainer: Any) -> evaluation.MapFunction:
    def explain(images: np.ndarray, targets: np.ndarray) -> np.ndarray:
        column = _column(targets, len(images))
        return explainer.compute(images, column, batch_size=None).maps[..., 0]

    return explain
