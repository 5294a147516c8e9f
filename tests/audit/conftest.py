"""Synthetic explained records whose maps are planted where the test wants them."""

from __future__ import annotations

import os
import pickle
import tempfile

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to

from fullgrad.audit.transforms import AuditSettings, ComputeAudit

SIZE = 24


def planted_record(index: int, target: int, where: str, rng: np.random.Generator) -> dict:
    """One explained record: an object mask in the middle, the map's mass on it or elsewhere.

    ``where``: ``"object"`` (mass on the object), ``"corner"`` (mass in the top-left corner,
    i.e. off the object and on the border), or ``"background"`` (off the object, inside).
    """
    mask = np.zeros((SIZE, SIZE), bool)
    top, left = rng.integers(7, 11, 2)
    mask[top : top + 7, left : left + 7] = True
    saliency = rng.uniform(0.0, 0.05, (SIZE, SIZE))
    if where == "object":
        saliency[mask] += rng.uniform(0.5, 1.0, mask.sum())
    elif where == "corner":
        saliency[0:4, 0:4] += rng.uniform(0.5, 1.0, (4, 4))
    else:
        saliency[14:20, 2:6] += rng.uniform(0.5, 1.0, (6, 4))  # left of the object, off-band
    saliency /= saliency.max()
    return {
        "id": f"img-{index:04d}",
        "target": target,
        "logit": float(rng.normal()),
        "label": target,
        "topk_classes": [target],
        "topk_logits": [1.0],
        "residual": float(10 ** rng.uniform(-8, -6)),
        "map": saliency.astype(np.float32),
        "mask": mask,
        "thumbnail": rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8),
    }


def planted_records(count: int, off_class: int, where: str = "corner", seed: int = 0) -> list:
    """``count`` records over 4 classes; class ``off_class`` has its maps planted at ``where``
    (90% of its images), every other class on the object."""
    rng = np.random.default_rng(seed)
    records = []
    for index in range(count):
        target = index % 4
        planted = target == off_class and rng.uniform() < 0.9
        records.append(planted_record(index, target, where if planted else "object", rng))
    return records


@pytest.fixture(scope="session")
def records() -> list:
    return planted_records(160, off_class=2)


def run_audit(records: list, settings: AuditSettings) -> dict:
    """ComputeAudit on Beam's in-process portable runner (offline); the audit comes back
    through a pickle file, since the pipeline's functions run on pickled copies."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "audit.pickle")

        def save(audit: dict) -> None:
            with open(path, "wb") as handle:
                pickle.dump(audit, handle)

        with beam.Pipeline(runner=FnApiRunner()) as pipeline:
            audits = pipeline | beam.Create(records, reshuffle=False) | ComputeAudit(settings)
            assert_that(audits | beam.combiners.Count.Globally(), equal_to([1]))
            _ = audits | beam.Map(save)
        with open(path, "rb") as handle:
            return pickle.load(handle)
