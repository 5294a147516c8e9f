"""The job over classifiers saved by Keras 2 (tf_keras 2.21, tests/data/make_legacy_models.py).

``legacy_allconv.h5``: Rescaling with an offset, DepthwiseConv2D, Activation layers and the
all-convolutional head Conv2D(5) -> GlobalAveragePooling2D -> Activation('softmax');
``legacy_grey_xception.hdf5``: one input channel, bias-free SeparableConv2D residual blocks,
the same kind of head. Neither was written by this project's Keras.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from beamdata import encode, random_image, read_output, write_parquet

import fullgrad as ke
from fullgrad.beam import job
from fullgrad.beam.config import JobConfig
from fullgrad.images import decode_image
from fullgrad.record import read_maps

DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data")


@pytest.mark.parametrize(
    ("filename", "channels"), [("legacy_allconv.h5", 3), ("legacy_grey_xception.hdf5", 1)]
)
def test_the_job_explains_a_keras2_hdf5_classifier(tmp_path, filename, channels):
    model_path = os.path.join(DATA, filename)
    rows = [{"id": f"img-{i}", "image": encode(random_image(i, size=20))} for i in range(6)]
    (tmp_path / "in").mkdir()
    write_parquet(str(tmp_path / "in" / "a.parquet"), rows)
    summary = job.run(JobConfig(input=str(tmp_path / "in" / "*.parquet"), model=model_path,
                                output=str(tmp_path / "out"), image_size=16, batch_size=4,
                                map_dtype="float32"))
    assert (summary["explained"], summary["failed"]) == (6, 0)
    maps, _ = read_output(str(tmp_path / "out"))
    fed = np.stack([decode_image(r["image"], (16, 16), channels=channels) for r in rows])
    # The head found through GlobalAveragePooling2D: its logits, not the softmax.
    expected = ke.FullGrad(ke.load_model(model_path)).compute(fed.astype(np.float32))
    np.testing.assert_allclose(read_maps(maps), expected.maps[..., 0], atol=1e-5)
    np.testing.assert_allclose(maps.column("logit").to_pylist(), expected.logits[:, 0],
                               rtol=1e-5, atol=1e-5)
    # Piecewise linear, with Rescaling's offset and the head's bias as bias terms: complete.
    assert max(maps.column("residual").to_pylist()) < 1e-5
