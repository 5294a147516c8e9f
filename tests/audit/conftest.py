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


def planted_map(mask: np.ndarray, where: str, rng: np.random.Generator) -> np.ndarray:
    """A ``[SIZE, SIZE]`` map in [0, 1] with its mass at ``where`` (see ``planted_record``)."""
    saliency = rng.uniform(0.0, 0.05, (SIZE, SIZE))
    if where == "object":
        saliency[mask] += rng.uniform(0.5, 1.0, mask.sum())
    elif where == "corner":
        saliency[0:4, 0:4] += rng.uniform(0.5, 1.0, (4, 4))
    elif where == "background":
        saliency[14:20, 2:6] += rng.uniform(0.5, 1.0, (6, 4))  # left of the object, off-band
    elif where == "blurred":  # the object blurred over ~4 pixels, as a coarse map draws it
        padded = np.pad(mask.astype(float), 4)
        saliency += sum(
            np.exp(-(dy * dy + dx * dx) / 8.0) * padded[4 + dy : 4 + dy + SIZE, 4 + dx : 4 + dx + SIZE]
            for dy in range(-4, 5)
            for dx in range(-4, 5)
        )
    else:
        raise ValueError(where)
    return saliency / saliency.max()


def planted_record(
    index: int,
    target: int,
    where: str,
    rng: np.random.Generator,
    input_where: str | None = None,
    thin: bool = False,
) -> dict:
    """One explained record: an object mask in the middle, the map's mass on it or elsewhere.

    ``where``: ``"object"`` (mass on the object), ``"corner"`` (mass in the top-left corner,
    i.e. off the object and on the border), ``"background"`` (off the object, inside), or
    ``"blurred"`` (the object, blurred). The record carries part maps (``fullgrad.parts``): the
    input term at ``input_where`` (default: ``where``), the fine bias terms on the object, the
    mid ones a broad field with no preference, the coarse ones empty (no such layer). ``thin``:
    the object is a 2-pixel line instead of a 7x7 square.
    """
    mask = np.zeros((SIZE, SIZE), bool)
    top, left = rng.integers(7, 11, 2)
    if thin:
        mask[top : top + 2, 3:21] = True
    else:
        mask[top : top + 7, left : left + 7] = True
    saliency = planted_map(mask, where, rng)
    part_maps = np.stack(
        [
            planted_map(mask, input_where or where, rng),
            planted_map(mask, "blurred", rng),
            rng.uniform(0.3, 1.0, (SIZE, SIZE)),
            np.zeros((SIZE, SIZE)),
        ]
    ).astype(np.float32)
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
        "part_maps": part_maps,
    }


def planted_records(
    count: int,
    off_class: int,
    where: str = "corner",
    seed: int = 0,
    input_where: str | None = None,
    thin_class: int | None = None,
) -> list:
    """``count`` records over 4 classes; class ``off_class`` has its maps planted at ``where``
    and its input term at ``input_where`` (90% of its images), every other class on the object.
    ``thin_class``'s objects are thin lines and its maps the blurred object."""
    rng = np.random.default_rng(seed)
    records = []
    for index in range(count):
        target = index % 4
        planted = target == off_class and rng.uniform() < 0.9
        thin = target == thin_class
        where_now = where if planted else "blurred" if thin else "object"
        input_now = (input_where or where) if planted else where_now
        records.append(planted_record(index, target, where_now, rng, input_now, thin))
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
