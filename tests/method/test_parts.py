"""The map's parts (``compute(..., parts=True)``): the input term and the bias groups."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

import fullgrad as ke
from fullgrad.parts import PARTS, part_of_resolution


def _minmax(array: np.ndarray) -> np.ndarray:
    return (array - array.min()) / (array.max() - array.min() + 1e-6)


def _post_processed(term: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The authors' ``psi``: ``upsample(sum_c minmax(|t|))`` of one image's ``[h, w, c]`` term."""
    summed = _minmax(np.abs(term)).sum(axis=-1)
    if summed.shape == size:
        return summed
    resized = tf.raw_ops.ResizeBilinear(
        images=summed[None, ..., None].astype(np.float32), size=size, align_corners=True,
        half_pixel_centers=False,
    )
    return resized.numpy()[0, ..., 0]


def test_part_of_resolution_bounds():
    assert part_of_resolution((64, 64), (64, 64)) == "bias_fine"
    assert part_of_resolution((16, 16), (64, 64)) == "bias_fine"
    assert part_of_resolution((15, 16), (64, 64)) == "bias_mid"
    assert part_of_resolution((8, 8), (64, 64)) == "bias_mid"
    assert part_of_resolution((7, 7), (64, 64)) == "bias_coarse"


def test_parts_follow_their_formula_from_the_decomposition(sequential_model, rng):
    x = rng.uniform(-1, 1, (3, 20, 20, 3)).astype(np.float32)
    engine = ke.FullGrad(sequential_model)
    result = engine.compute(x, parts=True)
    terms = engine.decompose(x)
    assert result.parts.shape == (3, len(PARTS), 20, 20, 1)
    for image in range(3):
        expected = {name: np.zeros((20, 20)) for name in PARTS}
        expected["input"] = _post_processed(terms.input[image], (20, 20))
        for bias in terms.biases:
            if bias.ndim != 4:
                continue  # dense terms are in no map
            group = part_of_resolution(bias.shape[1:3], (20, 20))
            expected[group] += _post_processed(bias[image], (20, 20))
        for index, name in enumerate(PARTS):
            np.testing.assert_allclose(
                result.parts[image, index, ..., 0], _minmax(expected[name]), atol=2e-5,
                err_msg=name,
            )
    # This model has layers at 20, 10 (fine) and 4 (mid) pixels, none coarse: an empty group
    # is an all-zero part.
    assert result.parts[:, PARTS.index("bias_mid")].max() > 0.99
    assert result.parts[:, PARTS.index("bias_coarse")].max() == 0.0


def test_parts_leave_the_maps_bit_identical_and_the_default_without_parts(sequential_model, rng):
    x = rng.uniform(-1, 1, (4, 20, 20, 3)).astype(np.float32)
    engine = ke.FullGrad(sequential_model)
    plain = engine.compute(x, batch_size=3)
    with_parts = engine.compute(x, batch_size=3, parts=True)
    assert plain.parts is None
    np.testing.assert_array_equal(plain.maps, with_parts.maps)
    np.testing.assert_array_equal(plain.residual, with_parts.residual)
    assert with_parts.parts.shape == (4, len(PARTS), 20, 20, 1)
    # Two traced steps: the default one never computes parts.
    assert sorted(key[0] for key in engine._steps) == ["compute", "parts"]


def test_parts_for_several_units(sequential_model, rng):
    x = rng.uniform(-1, 1, (2, 20, 20, 3)).astype(np.float32)
    engine = ke.FullGrad(sequential_model)
    both = engine.compute(x, np.array([[0, 1], [2, 3]]), parts=True)
    single = engine.compute(x, np.array([[1], [3]]), parts=True)
    assert both.parts.shape == (2, len(PARTS), 20, 20, 2)
    np.testing.assert_allclose(both.parts[..., 1], single.parts[..., 0], atol=1e-6)
