"""A Beam ``ModelHandler`` that runs FullGrad inside ``RunInference``.

``RunInference`` owns batching (``BatchElements``), model sharing and its standard metrics; this
handler only loads the model once per worker (or once per machine when shared), exposes its
bias layers, traces the FullGrad step at load time, and turns a batch of preprocessed images into
numpy results. It imports Keras and TensorFlow only: Beam's own TF handler imports
tensorflow_hub, which breaks on TF 2.21.

Each element is an *explain request*, a dict with at least ``"image"`` (float32 ``[H, W, 3]``,
preprocessed) and ``"target"`` (a class index, or ``TARGET_PREDICTED`` for the top-1 class);
other keys ride along untouched in ``PredictionResult.example``. ``PredictionResult.inference``
is a dict of numpy values: ``map`` ``[H, W]`` float32 in [0, 1], ``target``, ``logit``,
``residual``, ``topk_classes``, ``topk_logits`` (and ``part_maps`` ``[P, H, W]`` when the
handler was asked for parts) -- or ``error`` (a string) when that image
failed while its batch-mates succeeded.

Example Usage:
    >>> handler = FullGradModelHandler("model.keras", image_size=224, max_batch_size=32)
    >>> results, failed = requests | RunInference(handler).with_exception_handling()
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from fullgrad.beam.batches import BatchBuffers
from fullgrad.targets import TARGET_PREDICTED

__all__ = ["METRICS_NAMESPACE", "FullGradModelHandler", "LoadedExplainer", "error_reason"]

#: Every metric of the job (ours and RunInference's) lives under this namespace.
METRICS_NAMESPACE = "fullgrad"

_LOGGER = logging.getLogger(__name__)

#: Batch buffers lent to explain calls (``fullgrad.beam.batches``), shared by the process.
_BATCHES = BatchBuffers()

_NODE = re.compile(r"Detected at node '?([^'\s]+?)'? defined at")
#: Lines of TensorFlow's graph-execution messages that locate the op, not say what went wrong.
_TRACE_LINE = re.compile(r"^(File \"|Graph execution error|Detected at node|\[\[\{\{node )")


def error_reason(error: BaseException | str, kind: str | None = None) -> str:
    """``"Type: message"`` of an error, without the Python traceback TensorFlow embeds in it.

    Why: a graph-execution error carries the source line of every frame that built the failing
    op (often 40 lines); in a dead letter the reason is the op's own message and its node's
    name: ``InvalidArgumentError: assertion failed: [...] (at node model/check/Assert)``.

    Args:
        error: The exception, or its text.
        kind: The type name to prefix; the exception's own when None.

    Example:
        >>> error_reason(ValueError("bad shape"))
        'ValueError: bad shape'
    """
    name = kind or type(error).__name__
    text = error if isinstance(error, str) else getattr(error, "message", None) or str(error)
    node = _NODE.search(text)
    lines = [line.strip() for line in text.splitlines()]
    kept = [line for line in lines if line and not _TRACE_LINE.match(line)]
    reason = " ".join(kept) if kept else text.strip()
    if node:
        reason += f" (at node {node.group(1)})"
    return f"{name}: {reason}"


def _enable_gpu_memory_growth() -> None:
    """Lets several processes (or model copies) share a GPU instead of the first taking all."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # the GPU was initialised earlier in this process: too late
            pass


class LoadedExplainer:
    """The per-worker model: a loaded classifier wrapped in a traced explainer of ``map_kind``.

    It is what ``FullGradModelHandler.load_model`` returns, so it is also the object Beam shares
    across processes (through ``multi_process_shared``) when ``model_copies``/``large_model``
    is set: its one method takes and returns numpy arrays only.

    Args:
        model_path: The ``.keras`` / ``.h5`` file or URI.
        image_size: The input side; the step is traced and warmed for it at load time.
        top_k: How many top predictions to return per image.
        safe_mode: Keras' safe_mode.
        logits_layer: The layer whose output is the logits; found through the head when None.
        precision: The Keras dtype policy of ``fullgrad.FullGrad(precision=...)``.
        map_kind: The map (``fullgrad.variants.MAP_KINDS``): FullGrad, ``simple``, ``smooth``,
            ``input_x_gradient`` or ``gradcam``. The residual is FullGrad's for the first
            three, NaN for the baselines (see ``fullgrad.variants``).
        smooth_samples: Noisy copies per image for ``smooth``.
        smooth_noise: The noise std of ``smooth``, as a share of each image's range.
        parts: Also return the map's parts (``FullGrad.compute(..., parts=True)``, same pass).

    Example:
        >>> explainer = LoadedExplainer("model.keras", image_size=32)
        >>> out = explainer.explain(images, np.full([len(images)], TARGET_PREDICTED))
        >>> out["maps"].shape
        (8, 32, 32)
    """

    def __init__(
        self,
        model_path: str,
        image_size: int,
        top_k: int = 5,
        safe_mode: bool = True,
        logits_layer: str | None = None,
        precision: str = "float32",
        map_kind: str = "fullgrad",
        smooth_samples: int = 16,
        smooth_noise: float = 0.15,
        parts: bool = False,
    ) -> None:
        _enable_gpu_memory_growth()
        import fullgrad
        from fullgrad.variants import explainer_for

        model = fullgrad.load_model(model_path, safe_mode=safe_mode)
        self.map_kind = map_kind
        self.engine = explainer_for(
            model, map_kind, smooth_samples=smooth_samples, smooth_noise=smooth_noise,
            logits_layer=logits_layer, precision=precision,
        )
        self.num_classes = int(model.outputs[0].shape[-1])
        self.top_k = max(1, min(int(top_k), self.num_classes))
        self.parts = bool(parts)
        # Trace now, on one dummy image: the signature has a free batch dimension, so no batch
        # size traces again and the first real batch pays no tracing cost.
        channels = int(model.inputs[0].shape[-1] or 3)
        blank = np.zeros([1, image_size, image_size, channels], np.float32)
        self.explain(blank, np.array([TARGET_PREDICTED]))

    def explain(self, images: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
        """Explains a batch.

        Args:
            images: ``[B, H, W, C]`` float32, preprocessed.
            targets: ``[B]`` ints; ``TARGET_PREDICTED`` means "the top-1 predicted class".

        Returns:
            ``maps [B, H, W]``, ``targets [B]``, ``logits [B]``, ``residual [B]``,
            ``topk_classes [B, k]``, ``topk_logits [B, k]``, and ``part_maps [B, P, H, W]``
            when built with ``parts=True``: numpy arrays.
        """
        targets = np.asarray(targets, np.int32).reshape(-1, 1)
        options = {"parts": True} if self.parts else {}  # only FullGrad engines have parts
        result = self.engine.compute(
            np.asarray(images, np.float32), targets, batch_size=None, **options
        )
        order = np.argsort(-result.all_logits, axis=1, kind="stable")[:, : self.top_k]
        extra = {"part_maps": result.parts[..., 0]} if self.parts else {}
        return {
            **extra,
            "maps": result.maps[..., 0],
            "targets": result.targets[:, 0],
            "logits": result.logits[:, 0],
            "residual": result.residual[:, 0],
            "topk_classes": order.astype(np.int32),
            "topk_logits": np.take_along_axis(result.all_logits, order, axis=1),
        }


class FullGradModelHandler(ModelHandler[dict, PredictionResult, LoadedExplainer]):
    """FullGrad for ``RunInference``: one model per worker, numpy in and out.

    Args:
        model_path: The ``.keras`` / ``.h5`` classifier, local or ``gs://`` / ``s3://``.
        image_size: The side of the (square) preprocessed images.
        logits_layer: The layer whose output is the logits; found through the head when None.
        precision: The Keras dtype policy the model runs under (``fullgrad.FullGrad``).
        parts: Also explain the map's parts (input term, bias groups) in the same pass; each
            inference then has ``part_maps`` ``[P, H, W]``.
        top_k: Top predictions kept per image.
        safe_mode: Keras' safe_mode when loading.
        min_batch_size: Smallest batch ``BatchElements`` forms.
        max_batch_size: Largest batch ``BatchElements`` forms (the model's batch).
        model_copies: Load exactly this many copies per machine, shared by its processes
            (useful on a GPU machine with several SDK processes).
        large_model: Share a single copy across the machine's processes.
        map_kind: The map kind (``fullgrad.variants.MAP_KINDS``).
        smooth_samples: Noisy copies per image for ``map_kind="smooth"``.
        smooth_noise: Its noise std as a share of each image's range.

    Example Usage:
        >>> handler = FullGradModelHandler("gs://b/model.keras", image_size=224,
        ...                                max_batch_size=64, model_copies=1)
        >>> results = requests | RunInference(handler)
    """

    def __init__(
        self,
        model_path: str,
        image_size: int,
        *,
        logits_layer: str | None = None,
        precision: str = "float32",
        parts: bool = False,
        top_k: int = 5,
        safe_mode: bool = True,
        min_batch_size: int | None = None,
        max_batch_size: int | None = None,
        model_copies: int | None = None,
        large_model: bool = False,
        map_kind: str = "fullgrad",
        smooth_samples: int = 16,
        smooth_noise: float = 0.15,
    ) -> None:
        super().__init__(
            min_batch_size=min_batch_size,
            max_batch_size=max_batch_size,
            model_copies=model_copies,
            large_model=large_model,
            # Honoured by TF at GPU initialisation, even if our explicit call comes too late.
            env_vars={"TF_FORCE_GPU_ALLOW_GROWTH": "true"},
        )
        self.model_path = model_path
        self.image_size = int(image_size)
        self.logits_layer = logits_layer
        self.precision = precision
        self.parts = bool(parts)
        self.top_k = int(top_k)
        self.safe_mode = safe_mode
        self.map_kind = map_kind
        self.smooth_samples = int(smooth_samples)
        self.smooth_noise = float(smooth_noise)
        # RunInference counts inferences (num_inferences) and times batches
        # (inference_batch_latency_micro_secs) itself, under get_metrics_namespace().
        self._loads = Metrics.counter(METRICS_NAMESPACE, "model_loads")
        self._unreported_loads = 0

    def load_model(self) -> LoadedExplainer:
        """Loads the model, exposes its biases and traces FullGrad: once per worker."""
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        start = time.perf_counter()
        explainer = LoadedExplainer(
            self.model_path,
            self.image_size,
            top_k=self.top_k,
            safe_mode=self.safe_mode,
            logits_layer=self.logits_layer,
            precision=self.precision,
            map_kind=self.map_kind,
            smooth_samples=self.smooth_samples,
            smooth_noise=self.smooth_noise,
            parts=self.parts,
        )
        # DoFn.setup (where RunInference loads) has no metrics context: counted at first use.
        self._unreported_loads += 1
        _LOGGER.info(
            "fullgrad: loaded %s in %.1f s (pid %d)",
            self.model_path,
            time.perf_counter() - start,
            os.getpid(),
        )
        return explainer

    def run_inference(
        self,
        batch: Sequence[dict],
        model: LoadedExplainer,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        """Explains a batch of requests; returns one ``PredictionResult`` per request.

        A batch that fails as a whole is retried image by image, so one bad image costs only
        itself: it comes back with ``inference["error"]`` and its batch-mates with maps.
        """
        if self._unreported_loads:
            self._loads.inc(self._unreported_loads)
            self._unreported_loads = 0
        try:
            outputs = [self._explain(batch, model)]
            groups = [list(batch)]
        except Exception as error:  # noqa: BLE001 -- retried per image below
            _LOGGER.warning("fullgrad: batch of %d failed (%s); retrying per image", len(batch),
                            error)
            outputs, groups = [], []
            for request in batch:
                try:
                    outputs.append(self._explain([request], model))
                except Exception as single:  # noqa: BLE001 -- becomes this image's dead letter
                    outputs.append({"error": error_reason(single)})
                groups.append([request])
        results = []
        for requests, output in zip(groups, outputs, strict=True):
            for index, request in enumerate(requests):
                if "error" in output:
                    results.append(PredictionResult(request, {"error": output["error"]}))
                    continue
                inference = {
                    "map": output["maps"][index],
                    "target": output["targets"][index],
                    "logit": output["logits"][index],
                    "residual": output["residual"][index],
                    "topk_classes": output["topk_classes"][index],
                    "topk_logits": output["topk_logits"][index],
                }
                if "part_maps" in output:
                    inference["part_maps"] = output["part_maps"][index]
                results.append(PredictionResult(request, inference))
        return results

    def _explain(self, batch: Sequence[dict], model: LoadedExplainer) -> dict[str, np.ndarray]:
        targets = np.array([int(request["target"]) for request in batch], np.int32)
        with _BATCHES.stacked([request["image"] for request in batch]) as images:
            return model.explain(images, targets)

    def get_num_bytes(self, batch: Sequence[dict]) -> int:
        """The images' bytes: cheaper and closer to the truth than pickling the batch."""
        return int(sum(np.asarray(request["image"]).nbytes for request in batch))

    def get_metrics_namespace(self) -> str:
        """RunInference's own metrics go under the job's namespace too."""
        return METRICS_NAMESPACE

    def batch_elements_kwargs(self) -> Mapping[str, Any]:
        """Kwargs for ``beam.BatchElements``: the min/max batch sizes given at construction."""
        return dict(self._batching_kwargs)

    def __repr__(self) -> str:
        return f"FullGradModelHandler({self.model_path!r}, image_size={self.image_size})"
