"""Attribution drift on synthetic per-class summaries whose answers are known."""

import math
import statistics as pystatistics

import numpy as np
import pytest

from fullgrad.audit import drift, stats

SIZE = 32


def _maps(rng, n, where):
    """``n`` blob maps: ``centre`` (a blob near the middle, jittered) or ``corner`` (top-left)."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    out = []
    for _ in range(n):
        if where == "centre":
            cy, cx = rng.uniform(11, 21, 2)
        else:
            cy, cx = rng.uniform(1, 5, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 3.0**2))
        out.append(blob + 0.1 * rng.uniform(size=(SIZE, SIZE)))
    return np.array(out)


def _summary(maps):
    rows = [stats.image_statistics(m) for m in maps]
    names = ("border_energy", "border_lift", "concentration", "entropy")
    return drift.ClassSummary(
        count=len(maps),
        mean_map=maps.mean(axis=0),
        samples={name: np.array([r[name] for r in rows]) for name in names},
    )


def _run(seed, corner_class=None, n=60):
    rng = np.random.default_rng(seed)
    return {
        k: _summary(_maps(rng, n, "corner" if k == corner_class else "centre")) for k in range(4)
    }


def test_a_run_against_itself_does_not_drift():
    run = _run(1)
    result = drift.attribution_drift(run, run, "runs/a")
    assert result["baseline"] == "runs/a" and result["drifted_classes"] == []
    assert set(result) == {"baseline", "classes", "drifted_classes"}
    for entry in result["classes"].values():
        assert entry["map_distance"] == pytest.approx(0.0, abs=1e-12)
        assert entry["drifted"] is False and entry["reasons"] == []
        for shift in entry["shifts"].values():
            assert shift["shift"] == 0.0


def test_a_class_whose_maps_moved_to_a_corner_drifts_and_the_others_do_not():
    baseline, current = _run(1), _run(2, corner_class=3)  # new images for every class
    result = drift.attribution_drift(baseline, current, "old")
    assert result["drifted_classes"] == ["3"]
    moved = result["classes"]["3"]
    assert moved["drifted"] is True and moved["map_distance"] > 1.0  # anti-correlated
    assert moved["reasons"][0].startswith("mean map moved")
    assert any(r.startswith("border_energy") for r in moved["reasons"])
    assert moved["shifts"]["border_energy"]["low"] > 0.3
    for key in ("0", "1", "2"):  # the same distribution, other images
        assert result["classes"][key]["map_distance"] < 0.1
        assert result["classes"][key]["reasons"] == []


def test_the_bootstrap_interval_is_reproducible_and_matches_the_normal_width():
    rng = np.random.default_rng(5)
    old, new = rng.normal(0.3, 0.1, 400), rng.normal(0.35, 0.2, 300)
    first = drift.shift_interval(old, new, seed=[0, 3])
    assert first == drift.shift_interval(old, new, seed=[0, 3])
    assert first != drift.shift_interval(old, new, seed=[1, 3])
    assert first["shift"] == pytest.approx(new.mean() - old.mean())
    normal = 1.96 * math.sqrt(old.var() / 400 + new.var() / 300)
    assert (first["high"] - first["low"]) / 2 == pytest.approx(normal, rel=0.1)
    assert first["low"] < first["shift"] < first["high"]
    assert math.isnan(drift.shift_interval([0.1], new)["low"])


def test_moments_only_baseline_uses_the_normal_interval():
    current = _run(2)[0]
    values = current.samples["border_energy"]
    old = drift.ClassSummary(count=50, mean_map=current.mean_map,
                             moments={"border_energy": (50, 0.2, 0.05)})
    result = drift.attribution_drift({0: old}, {0: current})["classes"]["0"]
    shift = result["shifts"]["border_energy"]
    assert set(result["shifts"]) == {"border_energy", "predicted_share"}  # common statistics
    width = pystatistics.NormalDist().inv_cdf(0.975) * math.sqrt(
        0.05**2 / 50 + values.std() ** 2 / values.size)
    assert shift["shift"] == pytest.approx(values.mean() - 0.2)
    assert shift["high"] - shift["shift"] == pytest.approx(width)


def test_predicted_share_and_mix():
    m = np.ones((4, 4))
    old = {0: drift.ClassSummary(80, m, predicted={0: 70, 1: 10}),
           1: drift.ClassSummary(20, m, predicted={1: 20})}
    new = {0: drift.ClassSummary(50, m, predicted={0: 40, 1: 40}),
           1: drift.ClassSummary(50, m, predicted={1: 20})}
    result = drift.attribution_drift(old, new)
    share = result["classes"]["0"]["shifts"]["predicted_share"]
    assert (share["baseline"], share["current"], share["shift"]) == (0.8, 0.5, pytest.approx(-0.3))
    assert result["classes"]["0"]["mix_distance"] == pytest.approx(0.5 * (0.375 + 0.375))
    assert result["classes"]["1"]["mix_distance"] == 0.0
    assert result["drifted_classes"] == ["0", "1"]  # both shares moved by 30 points
    assert any(r.startswith("predicted mix") for r in result["classes"]["0"]["reasons"])


def test_classes_in_one_run_only_and_small_classes():
    m = np.ones((4, 4))
    result = drift.attribution_drift({0: drift.ClassSummary(9, m), 1: drift.ClassSummary(3, m)},
                                     {0: drift.ClassSummary(9, m), 2: drift.ClassSummary(9, m)})
    assert result["classes"]["2"]["reasons"] == ["only in this run"]
    assert result["classes"]["1"]["drifted"] is False  # 3 images: too few for a verdict
    assert result["drifted_classes"] == ["2"]


def test_coarse_map_and_distances_against_their_formulas():
    array = np.random.default_rng(0).uniform(size=(16, 24))
    blocks = array.reshape(8, 2, 8, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(stats.coarse_map(array, 8), blocks)
    odd = np.random.default_rng(1).uniform(size=(13, 7))
    assert stats.coarse_map(odd, 4).mean() == pytest.approx(odd.mean())  # area-weighted
    a, b = np.random.default_rng(2).uniform(size=(2, 8, 8))
    assert drift.map_distance(a, b) == pytest.approx(1 - np.corrcoef(a.ravel(), b.ravel())[0, 1])
    assert drift.map_distance(a, 3 * a + 1) == pytest.approx(0.0, abs=1e-12)
    assert drift.map_distance(a, -a) == pytest.approx(2.0)
    assert drift.map_distance(np.ones((8, 8)), np.full((8, 8), 2.0)) == 0.0
    assert drift.map_distance(np.ones((8, 8)), a) == 1.0
    assert drift.total_variation({0: 8, 1: 2}, {0: 5, 1: 5}) == pytest.approx(0.3)
    assert drift.total_variation({0: 1}, {1: 3}) == 1.0
