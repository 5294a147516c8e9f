"""The job's ``--evaluate`` branch: deletion / insertion faithfulness on a bounded sample.

``RunInference results -> sample -> batches -> EvaluateBatches -> merged totals ->
evaluation.json + evaluation.html``:

- **Sample.** The explained images (those that got a finite map) are keyed by
  ``fullgrad.evaluation.sample_key(id)`` and grouped by the *explained* class.
  :class:`StratifiedSampleFn` keeps, per class, the ``ceil(N / classes)`` smallest keys (a
  mergeable top-k, so the sample is the same on every runner and for every bundling), then
  takes classes in turn, smallest key first, until ``N`` images. The preprocessed image rides
  in the sample, taken from the request before the record drops it. Memory: at most
  ``classes * ceil(N / classes)`` images (``N`` plus at most one per class) per accumulator.
  A class the model never predicts gets no images; the sample is then smaller than ``N``
  when other classes run short too.
- **Evaluate.** :class:`EvaluateBatches` loads the model once per worker (``setup``), builds
  every map kind plus the ``random`` and ``blurred_random`` controls
  (``fullgrad.variants.evaluation_methods``),
  and runs ``fullgrad.evaluation.evaluate`` on fixed-size batches: each perturbation step is
  one forward pass over the batch. It outputs ``EvaluationTotals`` (sums), merged by
  :class:`MergeTotalsFn` with ``CombineGlobally``.

Example:
    >>> _ = results | EvaluateFaithfulness(config)      # writes evaluation.json into --output
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import PredictionResult

from fullgrad.beam.config import JobConfig
from fullgrad.evaluation import EvaluationTotals, sample_key

__all__ = [
    "EvaluateBatches",
    "EvaluateFaithfulness",
    "MergeTotalsFn",
    "StratifiedSampleFn",
    "sample_entry",
]

#: Seeds the sample keys, the smooth variant's noise and the random controls.
SEED = 0


def sample_entry(result: PredictionResult, seed: int = SEED) -> Iterator[tuple]:
    """``(class, key, id, item)`` of an explained image, or nothing for a failed one.

    ``item`` holds what the evaluation needs: ``id``, the preprocessed ``image`` and the
    explained ``target``; the class is that target, as a string.

    Example:
        >>> entries = results | beam.FlatMap(sample_entry)
    """
    inference = result.inference
    if "error" in inference or not np.isfinite(inference["logit"]):
        return
    if not np.all(np.isfinite(inference["map"])):
        return
    request = result.example
    target = int(inference["target"])
    identifier = str(request["id"])
    item = {"id": identifier, "image": np.asarray(request["image"], np.float32),
            "target": target}
    yield str(target), sample_key(identifier, seed), identifier, item


class StratifiedSampleFn(beam.CombineFn):
    """A bounded, class-stratified, deterministic sample: per class the smallest keys.

    Inputs are ``(class, key, id, item)``; the output is the list of items, classes (sorted by
    name) taking turns, smallest key first, at most ``limit`` of them. Per class only the
    ``ceil(limit / classes)`` smallest ``(key, id)`` are kept, so any merge order gives the
    same sample.

    Args:
        limit: The most images in the sample.
        classes: How many classes share it (the model's class count).

    Example:
        >>> sample = entries | beam.CombineGlobally(StratifiedSampleFn(256, classes=10))
    """

    def __init__(self, limit: int, classes: int) -> None:
        self._limit = int(limit)
        self._per_class = max(1, math.ceil(self._limit / max(int(classes), 1)))

    def create_accumulator(self) -> dict[str, list]:
        return {}

    def _keep(self, entries: list, entry: tuple) -> None:
        bisect.insort(entries, entry, key=lambda e: (e[0], e[1]))
        del entries[self._per_class:]

    def add_input(self, accumulator: dict[str, list], entry: tuple) -> dict[str, list]:
        label, key, identifier, item = entry
        self._keep(accumulator.setdefault(label, []), (key, identifier, item))
        return accumulator

    def merge_accumulators(self, accumulators: Any) -> dict[str, list]:
        merged: dict[str, list] = {}
        for accumulator in accumulators:
            for label, entries in accumulator.items():
                kept = merged.setdefault(label, [])
                for entry in entries:
                    self._keep(kept, entry)
        return merged

    def extract_output(self, accumulator: dict[str, list]) -> list[dict]:
        queues = [accumulator[label] for label in sorted(accumulator)]
        chosen: list[dict] = []
        for depth in range(self._per_class):
            for queue in queues:
                if depth < len(queue) and len(chosen) < self._limit:
                    chosen.append(queue[depth][2])
        return chosen


class EvaluateBatches(beam.DoFn):
    """A batch of sampled items -> its ``EvaluationTotals`` for every method.

    The model and the explainers are built once per worker in ``setup``; the smooth variant
    reuses the plain FullGrad's traced step.

    Example Usage:
        >>> totals = batches | beam.ParDo(EvaluateBatches(config))
    """

    def __init__(self, config: JobConfig) -> None:
        self._model_path = config.model
        self._safe_mode = config.safe_mode
        self._logits_layer = config.logits_layer
        self._smooth_samples = config.smooth_samples
        self._smooth_noise = config.smooth_noise

    def setup(self) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import fullgrad
        from fullgrad import variants

        model = fullgrad.load_model(self._model_path, safe_mode=self._safe_mode)
        self._model = variants.expose_for(model, self._logits_layer)
        self._methods = variants.evaluation_methods(
            self._model, smooth_samples=self._smooth_samples, smooth_noise=self._smooth_noise,
            seed=SEED,
        )

    def process(self, batch: list[dict]) -> Iterator[EvaluationTotals]:
        from fullgrad import evaluation

        images = np.stack([item["image"] for item in batch])
        targets = np.array([item["target"] for item in batch], np.int32)
        totals = EvaluationTotals()
        evaluation.evaluate(
            self._model, images, self._methods, targets=targets, classes=targets,
            batch_size=len(batch), tie_break_seed=SEED, totals=totals,
        )
        yield totals


class MergeTotalsFn(beam.CombineFn):
    """Merges ``EvaluationTotals``; outputs the ``evaluation.json`` dictionary.

    Example:
        >>> summary = totals | beam.CombineGlobally(MergeTotalsFn())
    """

    def create_accumulator(self) -> EvaluationTotals:
        return EvaluationTotals()

    def add_input(self, accumulator: EvaluationTotals, totals: EvaluationTotals
                  ) -> EvaluationTotals:
        return accumulator.merge(totals)

    def merge_accumulators(self, accumulators: Any) -> EvaluationTotals:
        merged = EvaluationTotals()
        for accumulator in accumulators:
            merged = merged.merge(accumulator)
        return merged

    def extract_output(self, accumulator: EvaluationTotals) -> dict[str, Any]:
        return accumulator.summary()


class EvaluateFaithfulness(beam.PTransform):
    """``RunInference`` results -> ``evaluation.json`` and ``evaluation.html`` in ``--output``.

    Args:
        config: The job's settings (``evaluate_images``, ``evaluate_batch_size``,
            ``num_classes``, the model and the map settings).

    Example Usage:
        >>> _ = results | "Evaluate" >> EvaluateFaithfulness(config)
    """

    def __init__(self, config: JobConfig) -> None:
        super().__init__()
        self._config = config

    def expand(self, results: beam.PCollection) -> beam.PCollection:
        config = self._config
        size = int(config.evaluate_batch_size)
        output, map_kind, limit = config.output, config.map, int(config.evaluate_images)

        def write(summary: dict[str, Any]) -> dict[str, str]:
            from fullgrad.audit.evaluation_report import write_evaluation

            return write_evaluation(
                {**summary, "map": map_kind, "sample": {"limit": limit, "seed": SEED}}, output
            )

        return (
            results
            | "SampleEntries" >> beam.FlatMap(sample_entry)
            # Without the class count (no check_model), every class may fill the whole sample.
            | "Sample" >> beam.CombineGlobally(StratifiedSampleFn(limit, config.num_classes or 1))
            | "SampleItems" >> beam.FlatMap(lambda items: items)
            | "SpreadSample" >> beam.Reshuffle()
            | "SampleBatches" >> beam.BatchElements(min_batch_size=size, max_batch_size=size)
            | "EvaluateBatches" >> beam.ParDo(EvaluateBatches(config))
            | "MergeTotals" >> beam.CombineGlobally(MergeTotalsFn())
            | "WriteEvaluation" >> beam.Map(write)
        )
