"""Pixel-perturbation faithfulness of saliency maps: deletion and insertion curves.

The test the FullGrad paper reports, in the deletion / insertion form of RISE (Petsiuk et al.,
BMVC 2018, arXiv:1806.07421):

- **Deletion**: the most salient pixels first are replaced by a Gaussian-blurred copy of the
  image, in steps of 10% of the pixels (``FRACTIONS`` = 0.0, 0.1, ..., 1.0); at each step the
  explained class's probability is recorded. A faithful map makes it fall fast: low AUC.
- **Insertion**: starting from the blurred image, the most salient pixels first are put back.
  A faithful map makes the probability rise fast: high AUC.
- **AUC**: trapezoid rule over the fractions, of the mean curve (equal to the mean of the
  per-image AUCs, the rule being linear).

Scores. The probability is the softmax of the model's pre-activation logits (the classifier's
fused activation is dropped, as for the maps). A one-logit model is scored with
``sigmoid(logit)``: the probability of the positive class, which is what its only unit explains.

Ranking. Pixels are ranked by saliency, highest first; ties are broken by a seeded random
permutation of the pixel positions (``tie_break_seed``), the same for every image and method,
so that a flat region is not deleted top-left first and the ranking does not depend on batching.

Chance. The chance curve is the expected curve of a uniformly random pixel order: the mean of
many ``random_maps`` seeds. For it, deleting a fraction ``f`` blurs a uniform random subset of
``f`` of the pixels, which is inserting ``1 - f``: its deletion curve at ``f`` is its insertion
curve at ``1 - f`` in expectation, and the two AUCs are equal. ``random_maps`` is one draw of it;
``blurred_random_maps`` blurs that same noise, the control of Song et al. (arXiv:2304.13836):
perturbation metrics reward a map for being smooth, whatever it shows.

Batching. Every perturbation step is one forward pass over the batch's deletion and insertion
images together; the two end steps (the image, its blurred copy) share one pass. Results do not depend on the batch size (up to float round-off).

Merging. ``EvaluationTotals`` holds sums of curves and counts, overall and per class, so partial
results merge (a Beam ``CombineFn`` can accumulate batch by batch); ``summary()`` gives the
``evaluation.json`` dictionary.

Example:
    >>> import fullgrad as ke
    >>> from fullgrad import baselines, evaluation
    >>> methods = {
    ...     "fullgrad": ke.FullGrad(model).explain,
    ...     "input_x_gradient": baselines.InputXGradient(model),
    ...     "gradcam": baselines.GradCAM(model),
    ...     "random": evaluation.random_maps(seed=0),
    ...     "blurred_random": evaluation.blurred_random_maps(seed=0),
    ... }
    >>> report = evaluation.evaluate(model, images, methods, classes=labels, batch_size=16)
    >>> report["methods"]["fullgrad"]["deletion_auc"]
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from fullgrad.baselines import cached_on, logits_model
from fullgrad.targets import TARGET_PREDICTED

__all__ = [
    "FRACTIONS",
    "EvaluationTotals",
    "MapFunction",
    "PerturbationCurves",
    "auc",
    "blurred_random_maps",
    "default_blur_sigma",
    "evaluate",
    "gaussian_blur",
    "random_maps",
    "salience_ranks",
    "sample_key",
    "stratified_sample",
]

#: Fractions of the pixels perturbed at each step: 0.0, 0.1, ..., 1.0.
FRACTIONS: tuple[float, ...] = tuple(round(step / 10, 1) for step in range(11))

#: A saliency method: ``(images [B, H, W, C], targets [B]) -> maps [B, H, W]``.
MapFunction = Callable[[np.ndarray, np.ndarray], np.ndarray]


# -- blur ---------------------------------------------------------------------------------


def default_blur_sigma(height: int, width: int) -> float:
    """The blur of the perturbation baseline: ``max(height, width) / 8`` pixels, at least 1.

    28 pixels at 224 x 224: objects lose their shape and texture, the image keeps its colours.
    Too little blur leaves small objects recognisable, so that every curve stays flat (RISE's
    sigma of 5 at 224, or 1.5 on a 24-pixel image with a 6-pixel object).

    Example:
        >>> default_blur_sigma(224, 224)
        28.0
    """
    return max(1.0, max(height, width) / 8)


def _gaussian_kernel(sigma: float, size: int) -> np.ndarray:
    radius = min(math.ceil(3 * sigma), size - 1)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).astype(np.float32)


def gaussian_blur(images: Any, sigma: float) -> tf.Tensor:
    """Blurs ``[B, H, W, C]`` images with a separable Gaussian, reflecting at the borders.

    The kernel reaches ``3 * sigma`` pixels (at most the image size less one, which reflection
    allows) and is normalised, so a constant image stays constant.

    Args:
        images: ``[B, H, W, C]`` float images (array or tensor).
        sigma: The standard deviation in pixels; 0 returns the images unchanged.

    Returns:
        The blurred images, float32, same shape.

    Example:
        >>> blurred = gaussian_blur(images, sigma=4.0)
    """
    images = tf.cast(tf.convert_to_tensor(images), tf.float32)
    if sigma <= 0:
        return images
    channels = images.shape[-1]
    for axis, size in ((1, images.shape[1]), (2, images.shape[2])):
        kernel = _gaussian_kernel(sigma, size)
        radius = len(kernel) // 2
        if radius == 0:
            continue
        shape = [len(kernel), 1] if axis == 1 else [1, len(kernel)]
        filters = tf.tile(tf.reshape(kernel, [*shape, 1, 1]), [1, 1, channels, 1])
        padding = [[0, 0], [radius, radius], [0, 0], [0, 0]]
        if axis == 2:
            padding = [[0, 0], [0, 0], [radius, radius], [0, 0]]
        images = tf.nn.depthwise_conv2d(
            tf.pad(images, padding, mode="REFLECT"), filters, [1, 1, 1, 1], "VALID"
        )
    return images


# -- random controls ----------------------------------------------------------------------


def _image_seed(image: np.ndarray, seed: int) -> list[int]:
    """A seed from the image's bytes: the same image gets the same noise in any batch."""
    digest = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=8).digest()
    return [seed, int.from_bytes(digest, "little")]


def random_maps(seed: int = 0) -> MapFunction:
    """A control method: uniform noise in [0, 1), seeded by ``seed`` and each image's content.

    Args:
        seed: Changes every map; the same seed and image always give the same map.

    Returns:
        A ``MapFunction`` ignoring the targets.

    Example:
        >>> maps = random_maps(seed=0)(images, targets)       # [B, H, W]
    """

    def explain(images: np.ndarray, targets: np.ndarray | None = None) -> np.ndarray:
        images = np.asarray(images)
        return np.stack(
            [
                np.random.default_rng(_image_seed(image, seed))
                .random(image.shape[:2])
                .astype(np.float32)
                for image in images
            ]
        )

    return explain


def blurred_random_maps(seed: int = 0, sigma: float | None = None) -> MapFunction:
    """The control of Song et al. (arXiv:2304.13836): ``random_maps(seed)``, Gaussian-blurred.

    It carries no information about the model, yet scores better than raw noise on deletion
    and insertion because it is smooth: a method should beat this control, not only raw noise.

    Args:
        seed: As for ``random_maps``; the same seed blurs the same noise.
        sigma: The blur in pixels; ``default_blur_sigma`` of the image size when None.

    Returns:
        A ``MapFunction`` ignoring the targets, maps min-max scaled to [0, 1].

    Example:
        >>> maps = blurred_random_maps(seed=0)(images, targets)
    """
    noise = random_maps(seed)

    def explain(images: np.ndarray, targets: np.ndarray | None = None) -> np.ndarray:
        maps = noise(images)
        height, width = maps.shape[1:3]
        blur = default_blur_sigma(height, width) if sigma is None else sigma
        blurred = gaussian_blur(maps[..., None], blur).numpy()[..., 0]
        low = blurred.min(axis=(1, 2), keepdims=True)
        high = blurred.max(axis=(1, 2), keepdims=True)
        return (blurred - low) / np.maximum(high - low, 1e-12)

    return explain


# -- curves -------------------------------------------------------------------------------


def salience_ranks(maps: Any, tie_break_seed: int = 0) -> np.ndarray:
    """Ranks each map's pixels, 0 for the most salient; ties by a seeded pixel permutation.

    Args:
        maps: ``[B, H, W]`` saliency (any real scale).
        tie_break_seed: Seeds the permutation that orders equal values; one permutation per
            map size, shared by every image and method.

    Returns:
        ``[B, H, W]`` int32 ranks, a permutation of ``0 .. H*W-1`` per image.

    Raises:
        ValueError: A map holds NaN or infinity.

    Example:
        >>> salience_ranks(np.array([[[0.2, 0.9], [0.9, 0.1]]]))
        array([[[2, 0],
                [1, 3]]], dtype=int32)
    """
    maps = np.asarray(maps, np.float64)
    if not np.all(np.isfinite(maps)):
        raise ValueError("saliency maps must be finite to be ranked")
    batch, height, width = maps.shape
    flat = maps.reshape(batch, -1)
    tie_break = np.random.default_rng(tie_break_seed).permutation(height * width)
    # lexsort sorts along the last axis by its last key first: by -value, then by tie_break.
    order = np.lexsort((np.broadcast_to(tie_break, flat.shape), -flat))
    ranks = np.empty(flat.shape, np.int32)
    positions = np.broadcast_to(np.arange(height * width, dtype=np.int32), flat.shape)
    np.put_along_axis(ranks, order, positions, axis=1)
    return ranks.reshape(batch, height, width)


def auc(curve: Sequence[float], fractions: Sequence[float] = FRACTIONS) -> float:
    """Area under a curve by the trapezoid rule over ``fractions``.

    Example:
        >>> auc([1.0, 0.0], [0.0, 1.0])
        0.5
    """
    return float(np.trapezoid(np.asarray(curve, np.float64), np.asarray(fractions, np.float64)))


class PerturbationCurves:
    """Deletion and insertion curves of a classifier, one traced function per image shape.

    Args:
        model: A Keras classifier (scored on the softmax of its pre-activation logits).
        fractions: The perturbed fractions of the pixels, increasing, in [0, 1].
        blur_sigma: The baseline's blur in pixels; ``default_blur_sigma`` when None.
        tie_break_seed: Seeds the order of equally salient pixels.

    Example:
        >>> curves = PerturbationCurves(model)
        >>> targets = curves.predicted(images)
        >>> deletion, insertion = curves(images, targets, maps)   # [B, 11] each
    """

    def __init__(
        self,
        model: keras.Model,
        fractions: Sequence[float] = FRACTIONS,
        blur_sigma: float | None = None,
        tie_break_seed: int = 0,
    ) -> None:
        fractions = tuple(float(f) for f in fractions)
        if any(b < a for a, b in itertools.pairwise(fractions)) or not all(
            0.0 <= f <= 1.0 for f in fractions
        ):
            raise ValueError(f"fractions must increase within [0, 1], got {fractions}")
        self.model = logits_model(model)
        self.fractions = fractions
        self.blur_sigma = blur_sigma
        self.tie_break_seed = tie_break_seed
        self._steps: dict[tuple, Any] = {}

    def sigma_for(self, height: int, width: int) -> float:
        """The blur used for images of this size."""
        return default_blur_sigma(height, width) if self.blur_sigma is None else self.blur_sigma

    def _scores(self, images: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
        logits = tf.cast(self.model(images, training=False), tf.float32)
        if logits.shape[-1] == 1:
            return tf.sigmoid(logits[:, 0])
        return tf.gather(tf.nn.softmax(logits, axis=-1), targets, batch_dims=1)

    def predicted(self, images: Any, targets: Any = None) -> np.ndarray:
        """Resolves ``TARGET_PREDICTED`` (or None) to each image's top-1 class.

        Args:
            images: ``[B, H, W, C]`` preprocessed images.
            targets: ``[B]`` classes, ``TARGET_PREDICTED`` where the top-1 is wanted.

        Returns:
            ``[B]`` int32 classes.
        """
        images = np.asarray(images, np.float32)
        wanted = (
            np.full(len(images), TARGET_PREDICTED, np.int32)
            if targets is None
            else np.asarray(targets, np.int32).reshape(len(images))
        )
        if np.all(wanted >= 0):
            return wanted
        logits = self._step(images.shape[1:], "logits")(tf.constant(images)).numpy()
        return np.where(wanted < 0, logits.argmax(axis=-1), wanted).astype(np.int32)

    def __call__(self, images: Any, targets: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
        """Deletion and insertion curves of ``maps`` for the classes ``targets``.

        Args:
            images: ``[B, H, W, C]`` preprocessed images.
            targets: ``[B]`` explained classes (resolved, no ``TARGET_PREDICTED``).
            maps: ``[B, H, W]`` saliency maps of the images.

        Returns:
            ``(deletion, insertion)``, each ``[B, len(fractions)]`` float32 scores.
        """
        images = np.asarray(images, np.float32)
        targets = np.asarray(targets, np.int32).reshape(len(images))
        if np.any(targets < 0):
            raise ValueError("resolve TARGET_PREDICTED with predicted() first")
        maps = np.asarray(maps)
        if maps.shape != images.shape[:3]:
            raise ValueError(f"maps {maps.shape} do not match images {images.shape[:3]}")
        ranks = salience_ranks(maps, self.tie_break_seed)
        step = self._step(images.shape[1:], "curves")
        deletion, insertion = step(tf.constant(images), tf.constant(targets), tf.constant(ranks))
        return deletion.numpy(), insertion.numpy()

    def _step(self, shape: tuple[int, ...], kind: str):
        key = (tuple(shape), kind)
        if key in self._steps:
            return self._steps[key]
        image_spec = tf.TensorSpec([None, *shape], tf.float32)
        if kind == "logits":
            step = tf.function(
                lambda x: self.model(x, training=False), input_signature=[image_spec]
            )
        else:
            height, width = shape[0], shape[1]
            sigma = self.sigma_for(height, width)
            counts = [round(f * height * width) for f in self.fractions]

            def curves(x: tf.Tensor, targets: tf.Tensor, ranks: tf.Tensor):
                blurred = gaussian_blur(x, sigma)
                both_targets = tf.concat([targets, targets], axis=0)
                batch = tf.shape(x)[0]
                # The image and its blurred copy end both curves: one pass scores them for
                # the steps at 0 and at every pixel, whatever the map.
                scored = {}
                if 0 in counts or height * width in counts:
                    ends = self._scores(tf.concat([x, blurred], axis=0), both_targets)
                    scored[0] = (ends[:batch], ends[batch:])
                    scored[height * width] = (ends[batch:], ends[:batch])
                deletion, insertion = [], []
                for count in counts:
                    if count not in scored:
                        salient = (ranks < count)[..., None]
                        deleted = tf.where(salient, blurred, x)
                        inserted = tf.where(salient, x, blurred)
                        # One forward pass per step over the batch, both curves at once.
                        scores = self._scores(tf.concat([deleted, inserted], axis=0), both_targets)
                        scored[count] = (scores[:batch], scores[batch:])
                    deletion.append(scored[count][0])
                    insertion.append(scored[count][1])
                return tf.stack(deletion, axis=1), tf.stack(insertion, axis=1)

            step = tf.function(
                curves,
                input_signature=[
                    image_spec,
                    tf.TensorSpec([None], tf.int32),
                    tf.TensorSpec([None, height, width], tf.int32),
                ],
            )
        self._steps[key] = step
        return step


# -- totals -------------------------------------------------------------------------------


@dataclasses.dataclass
class _CurveSums:
    images: int
    deletion: np.ndarray
    insertion: np.ndarray

    def add(self, deletion: np.ndarray, insertion: np.ndarray) -> None:
        self.images += len(deletion)
        self.deletion = self.deletion + np.asarray(deletion, np.float64).sum(axis=0)
        self.insertion = self.insertion + np.asarray(insertion, np.float64).sum(axis=0)

    def merged(self, other: _CurveSums) -> _CurveSums:
        return _CurveSums(
            self.images + other.images,
            self.deletion + other.deletion,
            self.insertion + other.insertion,
        )

    def summary(self, fractions: Sequence[float]) -> dict[str, Any]:
        count = max(self.images, 1)
        deletion = (self.deletion / count).tolist()
        insertion = (self.insertion / count).tolist()
        return {
            "images": self.images,
            "deletion_auc": auc(deletion, fractions),
            "insertion_auc": auc(insertion, fractions),
            "deletion_curve": deletion,
            "insertion_curve": insertion,
        }


@dataclasses.dataclass
class EvaluationTotals:
    """Sums of curves and image counts, per method and per class: mergeable, picklable.

    Attributes:
        fractions: The perturbed fractions the curves are sampled at.
        blur_sigma: The baseline's blur in pixels (None until images are added).
        images: The number of distinct images added.
        methods: ``{method: sums}`` over every image.
        classes: ``{class: {method: sums}}``.

    Example:
        >>> totals = EvaluationTotals()
        >>> totals.add("fullgrad", labels, deletion, insertion)
        >>> totals = totals.merge(other_totals)
        >>> summary = totals.summary()
    """

    fractions: tuple[float, ...] = FRACTIONS
    blur_sigma: float | None = None
    images: int = 0
    methods: dict[str, _CurveSums] = dataclasses.field(default_factory=dict)
    classes: dict[str, dict[str, _CurveSums]] = dataclasses.field(default_factory=dict)

    def _empty(self) -> _CurveSums:
        zeros = np.zeros(len(self.fractions), np.float64)
        return _CurveSums(0, zeros, zeros.copy())

    def add(self, method: str, classes: Iterable[Hashable], deletion: Any, insertion: Any) -> None:
        """Adds one batch's curves of one method.

        Args:
            method: The method's name.
            classes: ``[B]`` each image's class (the key of the per-class table, as a string).
            deletion: ``[B, F]`` deletion curves.
            insertion: ``[B, F]`` insertion curves.
        """
        deletion = np.asarray(deletion, np.float64)
        insertion = np.asarray(insertion, np.float64)
        if deletion.shape != insertion.shape or deletion.shape[1:] != (len(self.fractions),):
            raise ValueError(
                f"curves {deletion.shape}, {insertion.shape} do not match "
                f"{len(self.fractions)} fractions"
            )
        self.methods.setdefault(method, self._empty()).add(deletion, insertion)
        keys = np.array([str(c) for c in classes])
        for key in sorted(set(keys.tolist())):
            rows = keys == key
            per_class = self.classes.setdefault(key, {})
            per_class.setdefault(method, self._empty()).add(deletion[rows], insertion[rows])

    def merge(self, other: EvaluationTotals) -> EvaluationTotals:
        """Returns the totals of both (neither is changed).

        Raises:
            ValueError: The fractions or the blur differ.
        """
        if tuple(self.fractions) != tuple(other.fractions):
            raise ValueError("cannot merge evaluations at different fractions")
        if None not in (self.blur_sigma, other.blur_sigma) and self.blur_sigma != other.blur_sigma:
            raise ValueError("cannot merge evaluations with different blurs")

        def merged(a: Mapping[str, _CurveSums], b: Mapping[str, _CurveSums]):
            return {
                k: a[k].merged(b[k]) if k in a and k in b else a.get(k) or b[k]
                for k in sorted({*a, *b})
            }

        return EvaluationTotals(
            fractions=tuple(self.fractions),
            blur_sigma=self.blur_sigma if self.blur_sigma is not None else other.blur_sigma,
            images=self.images + other.images,
            methods=merged(self.methods, other.methods),
            classes={
                key: merged(self.classes.get(key, {}), other.classes.get(key, {}))
                for key in sorted({*self.classes, *other.classes})
            },
        )

    def summary(self) -> dict[str, Any]:
        """The ``evaluation.json`` dictionary: mean curves and their AUCs.

        Returns:
            ``{"images", "fractions", "blur_sigma", "methods": {name: {"images",
            "deletion_auc", "insertion_auc", "deletion_curve", "insertion_curve"}},
            "classes": {class: {name: {...}}}}``.
        """
        return {
            "images": self.images,
            "fractions": list(self.fractions),
            "blur_sigma": self.blur_sigma,
            "methods": {name: sums.summary(self.fractions) for name, sums in self.methods.items()},
            "classes": {
                key: {name: sums.summary(self.fractions) for name, sums in methods.items()}
                for key, methods in sorted(self.classes.items())
            },
        }


def evaluate(
    model: keras.Model,
    images: Any,
    methods: Mapping[str, MapFunction],
    targets: Any = None,
    classes: Any = None,
    *,
    batch_size: int = 32,
    fractions: Sequence[float] = FRACTIONS,
    blur_sigma: float | None = None,
    tie_break_seed: int = 0,
    totals: EvaluationTotals | None = None,
) -> dict[str, Any]:
    """Deletion and insertion of every method's maps over ``images``, batch by batch.

    Args:
        model: The Keras classifier the maps explain.
        images: ``[N, H, W, C]`` preprocessed images (a bounded sample: see
            ``stratified_sample``).
        methods: ``{name: (images, targets) -> maps}``; every method explains the same classes.
        targets: ``[N]`` classes to explain; the top-1 class where None or ``TARGET_PREDICTED``.
        classes: ``[N]`` keys of the per-class table (e.g. labels); the explained class when
            None.
        batch_size: Images per batch, for the maps and for each perturbation step's forward pass.
        fractions: The perturbed fractions.
        blur_sigma: The baseline's blur; ``default_blur_sigma`` of the image size when None.
        tie_break_seed: Seeds the order of equally salient pixels.
        totals: Running totals to add to (changed in place); new ones when None.

    Returns:
        The ``evaluation.json`` dictionary (``EvaluationTotals.summary``).

    Example:
        >>> report = evaluate(model, images, {"fullgrad": ke.FullGrad(model).explain,
        ...                                   "random": random_maps(0)}, classes=labels)
        >>> report["methods"]["fullgrad"]["insertion_auc"]
    """
    images = np.asarray(images, np.float32)
    total = len(images)
    if targets is not None:
        targets = np.asarray(targets).reshape(total)
    if classes is not None:
        classes = np.asarray(classes).reshape(total)
    options = (tuple(float(f) for f in fractions), blur_sigma, tie_break_seed)
    curves = cached_on(
        model, ("perturbation_curves", *options), lambda: PerturbationCurves(model, *options)
    )
    if totals is None:
        totals = EvaluationTotals(fractions=curves.fractions)
    totals.blur_sigma = curves.sigma_for(*images.shape[1:3])
    for start in range(0, total, max(batch_size, 1)):
        batch = images[start : start + batch_size]
        explained = curves.predicted(
            batch, None if targets is None else targets[start : start + batch_size]
        )
        keys = explained if classes is None else classes[start : start + batch_size]
        for name, method in methods.items():
            maps = np.asarray(method(batch, explained))
            deletion, insertion = curves(batch, explained, maps)
            totals.add(name, keys, deletion, insertion)
        totals.images += len(batch)
    return totals.summary()


# -- sampling -----------------------------------------------------------------------------


def sample_key(identifier: Any, seed: int = 0) -> int:
    """A stable pseudo-random key of an id: the sample keeps, per class, the smallest keys.

    Independent of the order the ids arrive in and of the process, so a distributed job can
    pick the same sample with a per-class ``Top.Smallest`` on it.

    Example:
        >>> sample_key("img-001") == sample_key("img-001")
        True
    """
    digest = hashlib.blake2b(f"{seed}:{identifier}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def stratified_sample(
    ids: Iterable[Any], classes: Iterable[Any], limit: int, seed: int = 0
) -> list[Any]:
    """Chooses at most ``limit`` ids, balanced over classes, deterministically.

    Within each class the ids are ordered by ``sample_key``; classes (sorted by their string
    form) then take turns giving their next id, so every class gets ``limit // classes`` ids or
    all it has, and the remainder goes to the classes that still have ids, in class order.

    Args:
        ids: Image ids (unique).
        classes: Each id's class, aligned with ``ids``.
        limit: The most ids to return.
        seed: Changes which ids are drawn.

    Returns:
        The chosen ids, in round-robin order (class by class, smallest key first).

    Example:
        >>> stratified_sample(["a", "b", "c", "d"], [0, 0, 0, 1], limit=2)   # one of each
    """
    by_class: dict[str, list[tuple[int, Any]]] = {}
    ids, classes = list(ids), list(classes)
    if len(ids) != len(classes):
        raise ValueError(f"{len(ids)} ids but {len(classes)} classes")
    for identifier, label in zip(ids, classes, strict=True):
        by_class.setdefault(str(label), []).append((sample_key(identifier, seed), identifier))
    queues = [sorted(members, key=lambda item: item[0]) for _, members in sorted(by_class.items())]
    chosen: list[Any] = []
    depth = 0
    while len(chosen) < limit and any(depth < len(queue) for queue in queues):
        for queue in queues:
            if depth < len(queue) and len(chosen) < limit:
                chosen.append(queue[depth][1])
        depth += 1
    return chosen
