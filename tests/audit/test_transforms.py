"""The audit's combiners: exact merging, direct numpy agreement, and flags from the maps."""

from __future__ import annotations

import math

import apache_beam as beam
import numpy as np
import pytest

from fullgrad.audit import stats
from fullgrad.audit.transforms import (
    AuditCombineFn,
    AuditSettings,
    ClassStatisticsCombineFn,
    ExtremesCombineFn,
    class_flags,
    finalise_audit,
    with_statistics,
)

from .conftest import planted_records, run_audit

SETTINGS = AuditSettings(examples=5, max_flagged_ids=7)


def combine(fn: beam.CombineFn, items: list, splits: int = 1, seed: int = 0):
    """Runs a CombineFn as a runner would: ``splits`` shuffled partitions, merged."""
    order = np.random.default_rng(seed).permutation(len(items))
    parts = np.array_split(order, splits)
    accumulators = []
    for part in parts:
        accumulator = fn.create_accumulator()
        for index in part:
            accumulator = fn.add_input(accumulator, items[index])
        accumulators.append(accumulator)
    # Merge in two levels, as a runner merging partial results would.
    half = len(accumulators) // 2 or 1
    merged = [fn.merge_accumulators(accumulators[:half])]
    if accumulators[half:]:
        merged.append(fn.merge_accumulators(accumulators[half:]))
    return fn.extract_output(fn.merge_accumulators(merged))


def test_class_statistics_match_numpy_and_merge_exactly(records):
    enriched = [with_statistics(r, SETTINGS) for r in records]
    fn = ClassStatisticsCombineFn(SETTINGS)
    single = combine(fn, enriched, splits=1)
    for splits in (2, 5, 13):
        merged = combine(fn, enriched, splits=splits, seed=splits)
        assert merged.keys() == single.keys()
        for target in single:
            a, b = single[target], merged[target]
            assert a["count"] == b["count"]
            np.testing.assert_allclose(a["mean_map"], b["mean_map"], rtol=1e-12)
            for name, values in a["statistics"].items():
                assert values["histogram"] == b["statistics"][name]["histogram"]
                assert values["mean"] == pytest.approx(
                    b["statistics"][name]["mean"], rel=1e-12, nan_ok=True
                )
            assert a["flagged_images"] == b["flagged_images"]
            assert a["residual"]["max"] == b["residual"]["max"]

    for target in range(4):
        mine = [r for r in records if r["target"] == target]
        direct = [stats.image_statistics(r["map"], r["mask"]) for r in mine]
        out = single[target]
        assert out["count"] == len(mine)
        np.testing.assert_allclose(out["mean_map"], np.mean([r["map"] for r in mine], 0), rtol=1e-6)
        for name in stats.STATISTICS:
            values = np.array([d[name] for d in direct])
            assert out["statistics"][name]["mean"] == pytest.approx(values.mean(), rel=1e-9)
            assert out["statistics"][name]["std"] == pytest.approx(values.std(), rel=1e-6, abs=1e-9)
            low, high = stats.statistic_range(name)
            clipped = np.clip(values, low, high - 1e-12)
            hist, _ = np.histogram(clipped, bins=SETTINGS.bins, range=(low, high))
            assert out["statistics"][name]["histogram"] == hist.tolist()
        residuals = np.array([r["residual"] for r in mine])
        assert out["residual"]["mean"] == pytest.approx(residuals.mean(), rel=1e-9)
        assert out["residual"]["max"] == pytest.approx(residuals.max())
        assert out["accuracy"] == 1.0


def test_extremes_are_split_independent(records):
    enriched = [with_statistics(r, SETTINGS) for r in records]
    fn = ExtremesCombineFn("mask_energy", 6, largest=False, keep=("id", "mask_energy"))
    single = combine(fn, enriched, splits=1)
    expected = sorted(enriched, key=lambda r: (r["mask_energy"], r["id"]))[:6]
    assert [r["id"] for r in single] == [r["id"] for r in expected]
    for splits in (3, 8, 40):
        assert combine(fn, enriched, splits=splits, seed=splits) == single


def test_whole_audit_merges_like_single_pass(records):
    enriched = [with_statistics(r, SETTINGS) for r in records]
    fn = AuditCombineFn(SETTINGS)
    single = finalise_audit(combine(fn, enriched, splits=1), SETTINGS)
    merged = finalise_audit(combine(fn, enriched, splits=7, seed=3), SETTINGS)
    assert single["flagged_classes"] == merged["flagged_classes"]
    assert single["flagged_images"] == merged["flagged_images"]
    assert single["flagged_images_total"] == merged["flagged_images_total"]
    for name in single["examples"]:
        assert [r["id"] for r in single["examples"][name]] == [
            r["id"] for r in merged["examples"][name]
        ]
    flagged = [r for r in enriched if r["flags"]]
    assert single["flagged_images_total"] == len(flagged)
    assert len(single["flagged_images"]) == SETTINGS.max_flagged_ids


def test_compute_audit_flags_the_class_whose_maps_are_off_object(records):
    audit = run_audit(records, SETTINGS)
    assert audit["images"] == len(records)
    assert audit["flagged_classes"] == ["2"]
    classes = audit["classes"]
    assert set(classes["2"]["reasons"]) >= {"off_object", "on_border"}
    clean = [classes[t]["mask_energy"] for t in ("0", "1", "3")]
    assert classes["2"]["mask_energy"] < 0.5 * min(clean)
    assert all(not classes[t]["flagged"] for t in ("0", "1", "3"))
    flagged_ids = {r["id"] for r in audit["flagged_images"]}
    assert all(r["target"] == 2 for r in audit["flagged_images"])
    assert len(flagged_ids) == len(audit["flagged_images"])
    least = audit["examples"]["least_on_object"]
    assert len(least) == SETTINGS.examples and all(r["target"] == 2 for r in least)
    assert least[0]["thumbnail"].shape == (24, 24, 3)


@pytest.mark.parametrize("off_class", [0, 3])
def test_flags_follow_the_maps_not_the_class_index(off_class):
    audit = run_audit(planted_records(120, off_class=off_class, seed=off_class), SETTINGS)
    assert audit["flagged_classes"] == [str(off_class)]


def test_off_object_inside_the_image_is_not_called_border():
    audit = run_audit(planted_records(120, off_class=1, where="background", seed=5), SETTINGS)
    assert audit["flagged_classes"] == ["1"]
    assert "off_object" in audit["classes"]["1"]["reasons"]
    assert "on_border" not in audit["classes"]["1"]["reasons"]


def test_clean_dataset_flags_nothing_and_small_classes_are_not_judged():
    clean = planted_records(120, off_class=-1, seed=9)
    tiny = planted_records(8, off_class=0, seed=2)[:3]  # 3 off-object images of a new class
    for index, record in enumerate(tiny):
        record.update(id=f"tiny-{index}", target=7)
    audit = run_audit(clean + tiny, SETTINGS)
    assert audit["flagged_classes"] == []
    assert audit["classes"]["7"]["count"] == 3 and not audit["classes"]["7"]["flagged"]


def test_records_without_masks_get_no_mask_verdict(records):
    bare = [{**r, "mask": None} for r in records]
    audit = run_audit(bare, SETTINGS)
    assert math.isnan(audit["classes"]["0"]["mask_energy"])
    # Without masks the corner maps are still caught, by their border energy.
    assert audit["flagged_classes"] == ["2"]
    assert audit["classes"]["2"]["reasons"][0] == "on_border"


def _summary(mask_lift, border=-0.2, count=50, parts=None):
    """A class summary as ClassStatisticsCombineFn gives it, with the means that flags read."""
    statistics = {"mask_lift": {"mean": mask_lift}, "border_lift": {"mean": border}}
    for name, value in (parts or {}).items():
        statistics[name] = {"mean": value}
    return {"count": count, "statistics": statistics, "flagged_images": {"any": 0}}


def test_class_flags_read_the_lifts():
    settings = AuditSettings(class_mask_lift_min=0.25, class_border_lift_margin=0.3)
    classes = {0: _summary(0.60), 1: _summary(0.50), 2: _summary(0.55), 3: _summary(0.20)}
    assert class_flags(classes, settings)[3] == ["off_object"]  # 0.20 < 0.25
    classes[3] = _summary(0.30)
    assert not any(class_flags(classes, settings).values())
    classes[3] = _summary(0.30, border=0.15)  # 0.15 - (-0.2) > 0.3, and above chance
    assert class_flags(classes, settings)[3] == ["on_border"]
    classes[3] = _summary(0.30, border=0.26)  # above class_border_lift_max itself
    assert class_flags(classes, settings)[3] == ["on_border"]


def test_part_flags_are_relative_to_the_other_classes_same_part():
    settings = AuditSettings(part_lift_margin=0.3)
    # Every class's coarse part sits on the border (zero padding): no class stands out.
    coarse = {"bias_coarse_border_lift": 0.6, "bias_coarse_mask_lift": -0.1}
    classes = {t: _summary(0.6, parts={**coarse, "input_border_lift": 0.0}) for t in range(4)}
    assert not any(class_flags(classes, settings).values())
    classes[2] = _summary(0.6, parts={**coarse, "input_border_lift": 0.45})
    assert class_flags(classes, settings)[2] == ["input:on_border"]
    classes[2] = _summary(
        0.6, parts={**coarse, "input_border_lift": 0.0, "input_mask_lift": 0.1}
    )
    for t in (0, 1, 3):
        classes[t]["statistics"]["input_mask_lift"] = {"mean": 0.7}
    assert class_flags(classes, settings)[2] == ["input:off_object"]


def test_settings_are_validated():
    with pytest.raises(ValueError, match="image_mask_lift_min"):
        AuditSettings(image_mask_lift_min=1.5)
    with pytest.raises(ValueError, match="part_lift_margin"):
        AuditSettings(part_lift_margin=-0.1)
    with pytest.raises(ValueError, match="border_fraction"):
        AuditSettings(border_fraction=0.0)


def test_accumulator_size_does_not_grow_with_the_data():
    import pickle

    # The strategy sample grows to its capacity, then stays: a capacity the data fills.
    settings = AuditSettings(examples=4, max_flagged_ids=10, strategy_capacity=40)
    fn = AuditCombineFn(settings)
    sizes = []
    accumulator = fn.create_accumulator()
    records = planted_records(600, off_class=1, seed=11)
    for index, record in enumerate(records, start=1):
        accumulator = fn.add_input(accumulator, with_statistics(record, settings))
        if index in (200, 600):
            sizes.append(len(pickle.dumps(fn.merge_accumulators([accumulator]))))
    assert sizes[1] < 1.05 * sizes[0], sizes
