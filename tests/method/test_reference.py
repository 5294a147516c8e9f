"""fullgrad's maps equal an independent, plainly written FullGrad, map for map."""

from __future__ import annotations

import numpy as np
import pytest

import fullgrad as ke
from tests.method.reference import reference_decomposition, reference_fullgrad


@pytest.mark.parametrize("per_channel", [False, True])
def test_maps_equal_reference(sequential_model, rng, per_channel):
    x = rng.uniform(-1, 1, (6, 20, 20, 3)).astype(np.float32)
    targets = rng.integers(0, 5, size=(6, 1))
    ref_logits, ref_maps, ref_gap = reference_fullgrad(
        sequential_model, x, targets, per_channel=per_channel
    )
    logits, maps = ke.full_gradients(
        sequential_model, x, targets, normalize_channels=per_channel
    )
    assert maps.shape == (6, 20, 20, 1)
    np.testing.assert_allclose(logits[:, 0], ref_logits[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(maps[..., 0], ref_maps, atol=2e-5)
    # The reference is itself complete, so both are checked against the paper's identity.
    assert ref_gap < 1e-4 * np.abs(ref_logits).max() + 1e-5


def test_per_channel_normalisation_changes_the_map(sequential_model, rng):
    x = rng.uniform(-1, 1, (2, 20, 20, 3)).astype(np.float32)
    _, per_term = ke.full_gradients(sequential_model, x)
    _, per_channel = ke.full_gradients(sequential_model, x, normalize_channels=True)
    assert np.abs(per_term - per_channel).max() > 1e-2


def test_decomposition_terms_equal_reference_terms(sequential_model, rng):
    x = rng.uniform(-1, 1, (3, 20, 20, 3)).astype(np.float32)
    parts = ke.decompose(sequential_model, x, targets=[0, 1, 2])
    ref_logits, ref_input, ref_biases, ref_logits_bias = reference_decomposition(
        sequential_model, x, np.array([[0], [1], [2]])
    )
    np.testing.assert_allclose(parts.logits, ref_logits[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(parts.targets, [0, 1, 2])
    # seven bias layers besides the classifier: conv, BN, depthwise, conv, BN, BN, dense
    assert len(parts.biases) == len(ref_biases) == 7
    assert_terms_equal(parts, ref_input, ref_biases, ref_logits_bias)


def assert_terms_equal(parts, ref_input, ref_biases, ref_logits_bias, atol=1e-6):
    """Every term of ``parts`` equals the reference's, in the same layer order."""
    scale = max(np.abs(ref_input).max(), *(np.abs(t).max() for t in ref_biases), 1e-12)
    np.testing.assert_allclose(parts.input, ref_input, rtol=1e-5, atol=atol * scale)
    assert len(parts.biases) == len(ref_biases)
    for name, term, ref in zip(parts.layer_names, parts.biases, ref_biases, strict=True):
        assert term.shape == ref.shape, name
        np.testing.assert_allclose(term, ref, rtol=1e-5, atol=atol * scale, err_msg=name)
    np.testing.assert_allclose(parts.logits_bias, ref_logits_bias, rtol=1e-6, atol=1e-7)
