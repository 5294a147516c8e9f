"""The audit of the map's parts and the lift-based flags, end to end through the combiners."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fullgrad.audit import stats
from fullgrad.audit.parts import part_statistics, reason_text, verdict_text
from fullgrad.audit.transforms import AuditSettings, with_statistics
from fullgrad.parts import PARTS
from fullgrad.record import PART_STATISTIC_COLUMNS

from .conftest import planted_records, run_audit

SETTINGS = AuditSettings(examples=3)


def _salient(saliency: np.ndarray, q: float = 0.8) -> np.ndarray:
    """``max(s - quantile(s, q), 0)``: the module docstring's salient part, written directly."""
    return np.maximum(saliency - np.quantile(saliency, q), 0.0)


def test_part_statistics_follow_their_formulas_on_random_maps():
    rng = np.random.default_rng(3)
    part_maps = rng.uniform(size=(len(PARTS), 30, 30))
    part_maps[PARTS.index("bias_coarse")] = 0.0  # a group without layers
    mask = np.zeros((30, 30), bool)
    mask[5:17, 8:26] = True
    out = part_statistics(part_maps, mask)
    assert set(out) == set(PART_STATISTIC_COLUMNS)
    band = np.ones((30, 30), bool)
    band[3:27, 3:27] = False  # 10% of 30 pixels
    band_chance, mask_chance = band.mean(), mask.mean()
    for part, saliency in zip(PARTS[:-1], part_maps[:-1], strict=True):
        salient = _salient(saliency)
        border = salient[band].sum() / salient.sum()
        inside = salient[mask].sum() / salient.sum()
        assert out[f"{part}_border_energy"] == pytest.approx(border, rel=1e-9)
        assert out[f"{part}_mask_energy"] == pytest.approx(inside, rel=1e-9)
        lift = (border - band_chance) / (1 - band_chance)
        assert out[f"{part}_border_lift"] == pytest.approx(lift, rel=1e-9)
        lift = (inside - mask_chance) / (1 - mask_chance)
        assert out[f"{part}_mask_lift"] == pytest.approx(lift, rel=1e-9)
    # A part with no mass has nothing to measure; the full map's uniform reading does not apply.
    assert all(math.isnan(out[f"bias_coarse_{name}"]) for name in ("border_lift", "mask_lift"))
    assert all(math.isnan(v) for v in part_statistics(None, mask).values())
    no_mask = part_statistics(part_maps, None)
    assert math.isnan(no_mask["input_mask_lift"]) and math.isfinite(no_mask["input_border_lift"])


def test_a_uniform_part_scores_its_chance_levels():
    mask = np.zeros((20, 20), bool)
    mask[4:9, 4:15] = True
    out = part_statistics(np.ones((len(PARTS), 20, 20)), mask)
    chance = stats.chance_levels((20, 20), mask)
    assert out["input_mask_energy"] == pytest.approx(chance["mask_energy"])
    assert out["bias_mid_border_energy"] == pytest.approx(chance["border_energy"])
    assert out["input_mask_lift"] == pytest.approx(0.0, abs=1e-12)


def test_thin_objects_are_not_flagged_and_a_corner_mark_still_is():
    records = planted_records(160, off_class=3, where="corner", thin_class=1, seed=4)
    audit = run_audit(records, SETTINGS)
    classes = audit["classes"]
    assert audit["flagged_classes"] == ["3"]
    assert {"off_object", "on_border"} <= set(classes["3"]["reasons"])
    # The thin class's raw mask energy is half the others' (the old ratio rule flagged it);
    # its lift over its small area share is well above the threshold.
    others = np.median([classes[t]["mask_energy"] for t in ("0", "2")])
    assert classes["1"]["mask_energy"] < 0.6 * others
    assert classes["1"]["mask_lift"] > SETTINGS.class_mask_lift_min
    assert classes["1"]["mask_chance"] < classes["0"]["mask_chance"]
    assert classes["1"]["verdict"] == "ok"


def test_a_border_shortcut_in_the_input_term_alone_is_flagged_and_named():
    records = planted_records(120, off_class=1, where="object", input_where="corner", seed=6)
    audit = run_audit(records, SETTINGS)
    one = audit["classes"]["1"]
    assert audit["flagged_classes"] == ["1"]
    # The full map is on the object: only the input term shows the shortcut.
    assert "on_border" not in one["reasons"] and "off_object" not in one["reasons"]
    assert "input:on_border" in one["reasons"]
    assert "input term on the border" in one["verdict"]
    assert one["parts"]["input"]["border_lift"] > 0.3
    assert audit["mean_part_maps"]["1"].shape == (len(PARTS), 24, 24)


def test_stored_part_columns_are_kept_without_part_maps(records):
    measured = with_statistics(records[0], SETTINGS)
    stored = {name: measured[name] for name in PART_STATISTIC_COLUMNS}
    bare = {**records[0], "part_maps": None, **stored}
    again = with_statistics(bare, SETTINGS)
    assert {name: again[name] for name in PART_STATISTIC_COLUMNS} == stored
    assert math.isfinite(stored["input_border_lift"])


def test_reason_wording():
    assert reason_text("input:on_border") == "input term on the border"
    assert reason_text("bias_coarse:off_object") == "coarse bias terms off the object"
    assert verdict_text([]) == "ok"
