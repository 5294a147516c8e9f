"""The map kinds: simple FullGrad by hand, smooth FullGrad's limits, the baselines' records."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import fullgrad as ke
from fullgrad import baselines, variants

from .conftest import randomise


@pytest.fixture(scope="module")
def flat_model() -> keras.Model:
    """Every bias layer at the input's resolution, so the simple map needs no resizing."""
    keras.utils.set_random_seed(5)
    model = keras.Sequential(
        [
            keras.Input((10, 10, 3)),
            keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(5, 3, padding="same", activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ]
    )
    return randomise(model, seed=2)


def _minmax(maps: np.ndarray) -> np.ndarray:
    low = maps.min(axis=(1, 2), keepdims=True)
    high = maps.max(axis=(1, 2), keepdims=True)
    return (maps - low) / (high - low + 1e-6)


def test_simple_is_the_minmax_of_the_summed_magnitudes(flat_model, rng):
    images = rng.normal(size=(4, 10, 10, 3)).astype(np.float32)
    parts = ke.decompose(flat_model, images)
    spatial = [term for term in (parts.input, *parts.biases) if term.ndim == 4]
    assert len(spatial) == 3  # the input and both convolutions; the dense bias is not a map
    expected = _minmax(sum(np.abs(term).sum(axis=-1) for term in spatial))

    maps = ke.FullGrad(flat_model, variant="simple").explain(images)

    np.testing.assert_allclose(maps, expected, atol=1e-5)
    plain = ke.FullGrad(flat_model).explain(images)
    assert np.abs(maps - plain).max() > 0.05  # the per-term min-max does change the map


def test_simple_shares_the_logits_and_residual(sequential_model, rng):
    images = rng.normal(size=(3, 20, 20, 3)).astype(np.float32)
    plain = ke.FullGrad(sequential_model).compute(images)
    simple = ke.FullGrad(sequential_model, variant="simple").compute(images)
    np.testing.assert_array_equal(simple.targets, plain.targets)
    np.testing.assert_allclose(simple.logits, plain.logits, rtol=1e-6)
    np.testing.assert_allclose(simple.residual, plain.residual, atol=1e-7)
    assert simple.maps.min() >= 0 and simple.maps.max() <= 1


def test_unknown_variant_is_refused(flat_model):
    with pytest.raises(ValueError, match="variant"):
        ke.FullGrad(flat_model, variant="smoothest")


def test_smooth_without_noise_is_fullgrad(sequential_model, rng):
    images = rng.normal(size=(3, 20, 20, 3)).astype(np.float32)
    engine = ke.FullGrad(sequential_model)
    smooth = variants.SmoothFullGrad(engine, samples=1, noise=0.0).compute(images)
    plain = engine.compute(images)
    np.testing.assert_allclose(smooth.maps, plain.maps, atol=1e-5)
    np.testing.assert_array_equal(smooth.targets, plain.targets)
    np.testing.assert_allclose(smooth.residual, plain.residual)


def test_smooth_is_seeded_per_image_and_differs_from_fullgrad(sequential_model, rng):
    images = rng.normal(size=(4, 20, 20, 3)).astype(np.float32)
    smooth = variants.explainer_for(sequential_model, "smooth", smooth_samples=4)
    together = smooth.explain(images)
    apart = np.concatenate([smooth.explain(images[:1]), smooth.explain(images[1:])])
    np.testing.assert_allclose(together, apart, atol=1e-6)  # batching does not change noise
    other_seed = variants.explainer_for(sequential_model, "smooth", smooth_samples=4, seed=1)
    assert np.abs(other_seed.explain(images) - together).max() > 1e-3
    assert np.abs(together - ke.FullGrad(sequential_model).explain(images)).max() > 1e-2


@pytest.mark.parametrize("kind", ["input_x_gradient", "gradcam"])
def test_baselines_record_logits_and_a_nan_residual(sequential_model, rng, kind):
    images = rng.normal(size=(3, 20, 20, 3)).astype(np.float32)
    result = variants.explainer_for(sequential_model, kind).compute(images, [-1, 2, -1])
    logits = baselines.logits_model(sequential_model)(images).numpy()
    expected = np.array([logits[0].argmax(), 2, logits[2].argmax()])
    np.testing.assert_array_equal(result.targets[:, 0], expected)
    np.testing.assert_allclose(result.logits[:, 0], logits[np.arange(3), expected], rtol=1e-5)
    assert np.isnan(result.residual).all()
    method = baselines.InputXGradient if kind == "input_x_gradient" else baselines.GradCAM
    np.testing.assert_allclose(
        result.maps[..., 0], method(sequential_model).explain(images, expected), atol=1e-6
    )


def test_every_kind_is_built(sequential_model, rng):
    images = rng.normal(size=(2, 20, 20, 3)).astype(np.float32)
    for kind in variants.MAP_KINDS:
        result = variants.explainer_for(sequential_model, kind, smooth_samples=2).compute(images)
        assert result.maps.shape == (2, 20, 20, 1), kind
        assert np.isfinite(result.maps).all(), kind
    with pytest.raises(ValueError, match="unknown map"):
        variants.explainer_for(sequential_model, "lime")


def test_a_named_logits_layer_is_honoured(sequential_model, rng):
    images = rng.normal(size=(2, 20, 20, 3)).astype(np.float32)
    name = sequential_model.layers[-1].name
    for kind in ("fullgrad", "gradcam"):
        named = variants.explainer_for(sequential_model, kind, logits_layer=name).compute(images)
        found = variants.explainer_for(sequential_model, kind).compute(images)
        np.testing.assert_allclose(named.maps, found.maps, atol=1e-6)
    with pytest.raises(ValueError):
        variants.explainer_for(sequential_model, "fullgrad", logits_layer="no_such_layer")
