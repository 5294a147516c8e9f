"""The per-image statistics on hand-built maps whose answers are known exactly."""

import math

import numpy as np
import pytest

from fullgrad.audit import stats

RAW = stats.StatisticsOptions(border_fraction=0.1, floor_quantile=0.0)  # the raw-mass formulas


def test_uniform_map_scores_the_no_preference_point():
    flat = np.ones((20, 20))
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True  # a quarter of the area
    result = stats.image_statistics(flat, mask, RAW)
    assert result["concentration"] == pytest.approx(20 / 400)  # ceil(5% of 400) = 20 pixels
    assert result["entropy"] == pytest.approx(1.0)
    # A 2-pixel band on 20x20 leaves a 16x16 inside: 1 - 256/400 of the area.
    assert result["border_energy"] == pytest.approx(1 - 256 / 400)
    assert result["mask_energy"] == pytest.approx(0.25)
    assert result["pointing_hit"] == 0.0  # first argmax on ties is (0, 0): outside the mask


def test_single_bright_pixel():
    saliency = np.zeros((10, 10))
    saliency[4, 6] = 0.7
    mask = np.zeros((10, 10), bool)
    mask[4, 6] = True
    result = stats.image_statistics(saliency, mask)
    assert result["concentration"] == 1.0
    assert result["entropy"] == 0.0
    assert result["border_energy"] == 0.0
    assert result["mask_energy"] == 1.0
    assert result["pointing_hit"] == 1.0


def test_mass_split_between_corner_and_object():
    saliency = np.zeros((32, 32))
    saliency[0:2, 0:2] = 3.0  # 12 units in the top-left corner (inside the border band)
    saliency[14:18, 14:18] = 0.25  # 4 units on the object
    mask = np.zeros((32, 32), bool)
    mask[12:20, 12:20] = True
    result = stats.image_statistics(saliency, mask, RAW)
    assert result["mask_energy"] == pytest.approx(4 / 16)
    assert result["border_energy"] == pytest.approx(12 / 16)
    assert result["pointing_hit"] == 0.0  # the maximum is in the corner
    # Top 5% = ceil(51.2) = 52 pixels: the 4 corner pixels (12) + the 16 object pixels (4).
    assert result["concentration"] == pytest.approx(1.0)
    p = np.array([3.0] * 4 + [0.25] * 16) / 16
    assert result["entropy"] == pytest.approx(-(p * np.log(p)).sum() / math.log(1024))


def test_pointing_tolerance_dilates_the_mask():
    saliency = np.zeros((16, 16))
    saliency[7, 10] = 1.0
    mask = np.zeros((16, 16), bool)
    mask[5:10, 5:10] = True  # column 10 is one pixel right of the mask
    assert stats.pointing_hit(saliency, mask, tolerance=0) == 0.0
    assert stats.pointing_hit(saliency, mask, tolerance=1) == 1.0


def test_negative_nan_and_empty_maps():
    saliency = np.full((8, 8), -1.0)
    saliency[0, 0] = np.nan
    result = stats.image_statistics(saliency)  # no mass: read as uniform
    assert result["entropy"] == pytest.approx(1.0)
    assert math.isnan(result["mask_energy"]) and math.isnan(result["pointing_hit"])
    empty = stats.image_statistics(np.ones((8, 8)), np.zeros((8, 8), bool))
    assert math.isnan(empty["mask_energy"])


def test_border_band_width_and_errors():
    assert stats.border_band((64, 64), 0.1).sum() == 64 * 64 - 52 * 52  # 6-pixel band
    assert stats.border_band((8, 8), 0.01).sum() == 64 - 36  # at least one pixel
    with pytest.raises(ValueError, match="shape"):
        stats.image_statistics(np.ones((4, 4, 3)))
    with pytest.raises(ValueError, match="mask shape"):
        stats.pointing_hit(np.ones((4, 4)), np.ones((5, 5), bool))
    with pytest.raises(ValueError, match="border_fraction"):
        stats.StatisticsOptions(border_fraction=0.6)


def test_floor_quantile_keeps_the_salient_part_only():
    # A broad floor of 0.5 everywhere, 1.0 on 10% of the pixels (the object).
    saliency = np.full((10, 10), 0.5)
    mask = np.zeros((10, 10), bool)
    mask[4:6, 3:8] = True
    saliency[mask] = 1.0
    raw = stats.image_statistics(saliency, mask, RAW)
    assert raw["mask_energy"] == pytest.approx(10 / (10 + 45))  # mostly the floor's area
    salient = stats.image_statistics(saliency, mask, stats.StatisticsOptions(floor_quantile=0.8))
    assert salient["mask_energy"] == pytest.approx(1.0)  # the 80th percentile is the floor
    assert salient["concentration"] == raw["concentration"]  # spread statistics read raw mass
    np.testing.assert_allclose(stats.salient_part(saliency, 0.8), np.where(mask, 0.5, 0.0))


def _reference_statistics(saliency, mask, options):
    """The module docstring's formulas, written the slow, obvious way (np.quantile, dilate)."""
    s = np.where(np.isfinite(saliency) & (saliency > 0), saliency, 0.0).astype(np.float64)
    s = s if s.sum() > 0 else np.ones_like(s)
    floor = np.quantile(s, options.floor_quantile)
    salient = np.where(s - floor > 0, s - floor, 0.0)
    salient = salient if salient.sum() > 0 else np.ones_like(salient)
    k = math.ceil(options.top_fraction * s.size)
    p = s.ravel() / s.sum()
    p = p[p > 0]
    band = max(1, round(options.border_fraction * min(s.shape)))
    frame = np.ones(s.shape, bool)
    frame[band:-band, band:-band] = False
    peak = np.unravel_index(np.argmax(s), s.shape)
    return {
        "concentration": np.sort(s.ravel())[-k:].sum() / s.sum(),
        "entropy": -(p * np.log(p)).sum() / math.log(s.size),
        "border_energy": salient[frame].sum() / salient.sum(),
        "mask_energy": salient[mask].sum() / salient.sum(),
        "pointing_hit": float(stats.dilate(mask, options.pointing_tolerance)[peak]),
    }


@pytest.mark.parametrize("seed", range(6))
def test_statistics_equal_the_obvious_formulas_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(6, 40, size=2))
    saliency = rng.gamma(0.5, size=shape) * (rng.uniform(size=shape) > 0.3)
    saliency[rng.uniform(size=shape) < 0.02] = np.nan
    mask = rng.uniform(size=shape) > 0.85
    options = stats.StatisticsOptions(
        top_fraction=float(rng.uniform(0.01, 0.5)),
        border_fraction=float(rng.uniform(0.02, 0.3)),
        pointing_tolerance=int(rng.integers(0, 4)),
        floor_quantile=float(rng.choice([0.0, 0.5, 0.8, 0.95])),
    )
    result = stats.image_statistics(saliency, mask, options)
    expected = _reference_statistics(saliency, mask, options)
    for name in stats.STATISTICS:
        assert result[name] == pytest.approx(expected[name], rel=1e-12, abs=1e-15), name
    quantile = stats._quantile(saliency[np.isfinite(saliency)], options.floor_quantile)
    assert quantile == np.quantile(saliency[np.isfinite(saliency)], options.floor_quantile)
