"""The explain stages of the Beam job: decode/preprocess, RunInference(FullGrad), records.

``rows -> DecodeRows -> RunInference(FullGradModelHandler) -> ToRecords -> explained records``,
with a dead letter (``fullgrad.beam.io.dead_letter``) out of every stage that can fail. The
explained records follow the shared contract (see ``ToRecords``).

Example:
    >>> explained, dead = rows | ExplainRows(config)
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any, ClassVar

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import PredictionResult, RunInference
from apache_beam.utils.windowed_value import WindowedValue

from fullgrad.beam.config import JobConfig
from fullgrad.beam.handler import METRICS_NAMESPACE, FullGradModelHandler, error_reason
from fullgrad.beam.io_images import ImageFile
from fullgrad.images import (
    ImageError,
    decode_image,
    decode_mask,
    pixels_to_array,
    preprocess,
    resize_map,
    thumbnail_rgb,
)
from fullgrad.record import dead_letter, explained
from fullgrad.targets import TARGET_PREDICTED
from fullgrad.variants import PART_MAP_KINDS

__all__ = ["DecodeRows", "ExplainRows", "ToRecords", "count_failure", "handler_for"]

_LOGGER = logging.getLogger(__name__)


def count_failure(dead: dict) -> dict:
    """Counts a dead letter in the job's metrics (``failures``, ``failures_<stage>``).

    Applied once to the flattened dead letters of every stage, so each failure counts once.

    Example:
        >>> dead = dead | beam.Map(count_failure)
    """
    Metrics.counter(METRICS_NAMESPACE, "failures").inc()
    Metrics.counter(METRICS_NAMESPACE, f"failures_{dead['stage']}").inc()
    return dead


class DecodeRows(beam.DoFn):
    """Row -> explain request (``image``, ``target``, ``thumbnail``, ``mask``, ``id``, ``label``).

    An image still in its file (``ImageFile``, from class folders) is read here, so the read
    overlaps the model like the decoding; a file that cannot be read is a dead letter at stage
    ``read``. Decoding errors (empty/corrupt/unsupported bytes, a decompression bomb, a bad
    mask) are dead letters at stage ``decode``; preprocessing errors (NaN/inf pixels, a missing or out-of-range
    label for ``--target label``) at stage ``preprocess``.

    With ``decode_threads`` > 0, rows are decoded by a small thread pool, up to
    ``batch_size + decode_threads`` rows ahead of what has been handed on. Downstream stages run
    inside this DoFn's output calls, so while the model works on one batch (TensorFlow and
    Pillow's decoders release the GIL) the pool decodes the next: decoding then costs the model
    a fraction of what it costs inline (``benchmarks/bench_pipeline.py``). Outputs keep their
    order, and each keeps its own row's timestamp and window; what is still pending at the end
    of a bundle is emitted in ``finish_bundle``. Memory: the look-ahead's decoded images.

    Example Usage:
        >>> decoded = rows | beam.ParDo(DecodeRows(config)).with_outputs("dead", main="requests")
    """

    def __init__(self, config: JobConfig) -> None:
        self._size = (config.image_size, config.image_size)
        self._channels = int(config.channels or 3)
        self._map_size = (config.resolved_map_size(),) * 2
        self._mode = config.preprocess
        self._max_pixels = config.max_pixels
        self._target = config.target
        self._target_index = config.target_index()
        self._num_classes = config.num_classes
        self._threads = int(config.decode_threads)
        self._lookahead = int(config.batch_size) + self._threads

    def setup(self) -> None:
        self._pool = (
            concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="decode")
            if self._threads
            else None
        )
        self._pending: collections.deque = collections.deque()

    def start_bundle(self) -> None:
        self._pending.clear()

    def process(
        self,
        row: dict,
        timestamp: Any = beam.DoFn.TimestampParam,
        window: Any = beam.DoFn.WindowParam,
    ) -> Iterator[Any]:
        if self._pool is None:
            yield from self._decode(row)
            return
        self._pending.append((self._pool.submit(self._decode_all, row), timestamp, window))
        while len(self._pending) > self._lookahead:
            yield from self._emit_oldest()

    def finish_bundle(self) -> Iterator[Any]:
        while self._pending:
            yield from self._emit_oldest()

    def teardown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _emit_oldest(self) -> Iterator[Any]:
        future, timestamp, window = self._pending.popleft()
        for output in future.result():  # an unexpected error fails the bundle, as inline
            if isinstance(output, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(
                    output.tag, WindowedValue(output.value, timestamp, (window,))
                )
            else:
                yield WindowedValue(output, timestamp, (window,))

    def _decode_all(self, row: dict) -> list[Any]:
        return list(self._decode(row))

    def _decode(self, row: dict) -> Iterator[Any]:
        """The request of one row, or its dead letter (a ``TaggedOutput``)."""
        record_id = row["id"]
        image = row["image"]
        if isinstance(image, ImageFile):
            try:
                image = image.read()
            except Exception as error:  # noqa: BLE001 -- a vanished or unreadable file is data
                message = f"cannot read {image.path}: {error}"[:2000]
                yield beam.pvalue.TaggedOutput("dead", dead_letter(record_id, "read", message))
                return
        try:
            if image is None:
                raise ImageError("image is null")
            if isinstance(image, str):
                raise ImageError(
                    "the image column holds text; expected PNG/JPEG bytes or a pixel array"
                )
            if isinstance(image, bytes | bytearray | memoryview):
                pixels = decode_image(image, self._size, self._max_pixels, self._channels)
            else:
                pixels = None  # a pixel array: checked (NaN) at the preprocess stage
            mask = None
            if row.get("mask") is not None:
                mask = decode_mask(row["mask"], self._map_size, self._max_pixels)
        except ImageError as error:
            yield beam.pvalue.TaggedOutput("dead", dead_letter(record_id, "decode", error))
            return
        try:
            if pixels is None:
                pixels = pixels_to_array(image, self._size, self._channels)
            target = self._resolve_target(row.get("label"))
            x = preprocess(pixels, self._mode)
        except (ImageError, ValueError) as error:
            yield beam.pvalue.TaggedOutput("dead", dead_letter(record_id, "preprocess", error))
            return
        yield {
            "id": record_id,
            "image": x,
            "target": target,
            "label": row.get("label"),
            "mask": mask,
            "thumbnail": self._thumbnail(pixels),
        }

    def _thumbnail(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 ``[h, w, 3]`` at the map size; a decoded RGB image is used as it is (no copy)."""
        rgb = thumbnail_rgb(pixels)
        if rgb.shape[:2] == self._map_size:
            return rgb
        from PIL import Image

        return np.asarray(Image.fromarray(rgb).resize(self._map_size[::-1], Image.BILINEAR))

    def _resolve_target(self, label: int | None) -> int:
        if self._target == "predicted":
            return TARGET_PREDICTED
        if self._target == "label":
            if label is None:
                raise ValueError("--target label, but this record has no label")
            target = int(label)
        else:
            target = int(self._target_index)
        if target < 0 or (self._num_classes is not None and target >= self._num_classes):
            raise ValueError(f"target class {target} is outside the model's {self._num_classes}")
        return target


class ToRecords(beam.DoFn):
    """``PredictionResult`` -> explained record, or a dead letter at stage ``explain``.

    The record is :mod:`fullgrad.record`'s, with the map resized to the map size. A non-finite
    map or logit is a dead letter, never a row. Logs a progress line every ``progress_every``
    images per worker.

    Example Usage:
        >>> records = results | beam.ParDo(ToRecords(config)).with_outputs("dead", main="explained")
    """

    def __init__(self, config: JobConfig) -> None:
        self._map_size = (config.resolved_map_size(),) * 2
        self._progress_every = int(config.progress_every)
        # Copies of this DoFn unpickled in one process (bundles run in threads) share a count.
        self._progress_key = uuid.uuid4().hex

    def setup(self) -> None:
        self._progress = _Progress.of(self._progress_key)
        self._explained = Metrics.counter(METRICS_NAMESPACE, "images_explained")

    def process(self, result: PredictionResult) -> Iterator[Any]:
        request, inference = result.example, result.inference
        if "error" in inference:
            yield beam.pvalue.TaggedOutput(
                "dead", dead_letter(request["id"], "explain", inference["error"])
            )
            return
        saliency = np.asarray(inference["map"], np.float32)
        scalars = [inference["logit"]]  # a baseline map's residual is NaN by design
        part_maps = inference.get("part_maps")
        if part_maps is not None:
            part_maps = np.stack([resize_map(p, self._map_size) for p in part_maps])
            scalars.append(float(np.sum(part_maps)))  # finite iff every part is
        if not (np.all(np.isfinite(saliency)) and np.all(np.isfinite(scalars))):
            yield beam.pvalue.TaggedOutput(
                "dead",
                dead_letter(request["id"], "explain", "the map or logit is NaN/inf"),
            )
            return
        self._explained.inc()
        self._progress.add(self._progress_every)
        resized = {"map": resize_map(saliency, self._map_size), "part_maps": part_maps}
        yield explained(request, {**inference, **resized})


class _Progress:
    """Images one job has explained in this process, over all its ``ToRecords`` copies.

    The local runner processes bundles in threads, each with its own DoFn copy; a count per
    copy would log interleaved, overlapping progress lines. One count per job and process
    (keyed by the DoFn's construction) gives one ordered series per worker process. A process
    that runs many jobs (a notebook, the tests) keeps one small entry per job.
    """

    _by_key: ClassVar[dict[str, _Progress]] = {}
    _registry_lock = threading.Lock()

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self._start = time.perf_counter()

    @classmethod
    def of(cls, key: str) -> _Progress:
        """The count of the job whose ``ToRecords`` was built with ``key``, in this process."""
        with cls._registry_lock:
            return cls._by_key.setdefault(key, cls())

    def add(self, every: int) -> None:
        """Counts one image; logs a line when the count reaches a multiple of ``every``."""
        with self._lock:  # logged under the lock, so the lines come in order
            self._count += 1
            if every and self._count % every == 0:
                elapsed = time.perf_counter() - self._start
                _LOGGER.info(
                    "fullgrad: %d images explained by this worker (pid %d), %.1f images/s",
                    self._count,
                    os.getpid(),
                    self._count / max(elapsed, 1e-9),
                )


def _batch_failures(failure: tuple[Any, tuple]) -> Iterator[dict]:
    """RunInference's dead letter ``(batch, (type, repr, traceback))`` -> one per image."""
    batch, (error_type, error_repr, _) = failure
    name = getattr(error_type, "__name__", str(error_type))
    for request in batch:
        yield dead_letter(request["id"], "explain", error_reason(error_repr, name))


def handler_for(config: JobConfig) -> FullGradModelHandler:
    """The ``FullGradModelHandler`` that ``config`` describes.

    Example:
        >>> handler_for(JobConfig(input="x.parquet", model="m.keras", output="o")).image_size
        224
    """
    return FullGradModelHandler(
        config.model,
        config.image_size,
        logits_layer=config.logits_layer,
        precision=config.precision,
        # Parts decompose FullGrad's own terms: there are none for smooth or the baselines.
        parts=(config.audit or config.part_maps) and config.map in PART_MAP_KINDS,
        top_k=config.top_k,
        safe_mode=config.safe_mode,
        min_batch_size=config.min_batch_size or config.batch_size,
        max_batch_size=config.batch_size,
        model_copies=config.model_copies,
        large_model=config.large_model,
        map_kind=config.map,
        smooth_samples=config.smooth_samples,
        smooth_noise=config.smooth_noise,
    )


class ExplainRows(beam.PTransform):
    """Rows -> ``(explained records, dead letters)``: decode, RunInference(FullGrad), records.

    Example Usage:
        >>> explained, dead = rows | ExplainRows(config)
    """

    def __init__(self, config: JobConfig) -> None:
        super().__init__()
        self._config = config
        #: RunInference's results once applied (requests with their images, inferences).
        self.inference_results: beam.PCollection | None = None

    def expand(self, rows: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection]:
        decoded = rows | "Decode" >> beam.ParDo(DecodeRows(self._config)).with_outputs(
            "dead", main="requests"
        )
        results, failed = (
            decoded.requests
            | "FullGrad" >> RunInference(handler_for(self._config)).with_exception_handling()
        )
        # The --evaluate branch samples its images from here, before the records drop them.
        self.inference_results = results
        records = results | "Records" >> beam.ParDo(ToRecords(self._config)).with_outputs(
            "dead", main="explained"
        )
        batch_dead = failed.failed_inferences | "BatchFailures" >> beam.FlatMap(_batch_failures)
        dead = (decoded.dead, records.dead, batch_dead) | "ExplainDead" >> beam.Flatten()
        return records.explained, dead
