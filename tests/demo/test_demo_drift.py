"""Drift between the demo's shortcut run and its control run (``--shortcut-fraction 0``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.demo.conftest import EPOCHS, EXPLAIN_IMAGES, SEED, SIZE, TRAIN_IMAGES


@pytest.fixture(scope="session")
def control_run(tmp_path_factory) -> dict:
    """The demo's control: the same generator and sizes, nothing planted (a model of its own)."""
    from fullgrad.demo.command import run_demo

    output = str(tmp_path_factory.mktemp("demo-control"))
    result = run_demo(output, size=SIZE, train_images=TRAIN_IMAGES,
                      explain_images=EXPLAIN_IMAGES, epochs=EPOCHS, seed=SEED,
                      shortcut_fraction=0.0)
    return {**result, "output": output}


def _drift(maps: str, baseline: str, output: str) -> dict:
    from fullgrad.audit.settings import AuditSettings
    from fullgrad.beam.audit_job import run_audit

    paths = run_audit(maps, output, AuditSettings(), baseline=baseline)
    with open(paths["json"]) as handle:
        audit = json.load(handle)
    assert "Drift against the baseline" in Path(paths["html"]).read_text()
    return audit["drift"]


def test_the_shortcut_class_drifts_from_the_control_and_no_other(demo_run, control_run, tmp_path):
    drift = _drift(demo_run["output"], control_run["output"], str(tmp_path / "vs-control"))
    assert drift["baseline"] == control_run["output"] + "/audit.json"
    classes = drift["classes"]
    assert "3" in drift["drifted_classes"], json.dumps(classes, indent=1)
    shortcut = classes["3"]
    # Its mean map moved to the corner mark: the coarse maps no longer correlate, and its
    # saliency left the object for the border.
    assert shortcut["map_distance"] > 0.3
    assert any(r.startswith("mean map moved") for r in shortcut["reasons"])
    assert any(r.startswith("mask_energy") for r in shortcut["reasons"])
    assert any(r.startswith("border_energy") for r in shortcut["reasons"])
    # No other class's attribution drifts: its maps and statistics stay. The control is another
    # model, though, and at this size (30 images a class) it confuses the other classes
    # differently: their predicted mix may move (measured: total variation 0.33 for class 0,
    # 0.37 for class 1, against 0.20 at the demo's default size), and that is reported as
    # drift too, rightly: the predictions did change.
    for key in ("0", "1", "2"):
        attribution = [r for r in classes[key]["reasons"] if not r.startswith("predicted mix")]
        assert attribution == [], (key, classes[key]["reasons"])
        assert classes[key]["map_distance"] < 0.3


def test_a_run_against_itself_does_not_drift(demo_run, tmp_path):
    drift = _drift(demo_run["output"], demo_run["output"], str(tmp_path / "self"))
    assert drift["drifted_classes"] == []
    for entry in drift["classes"].values():
        assert entry["map_distance"] == pytest.approx(0.0, abs=1e-9)
        assert all(abs(s["shift"]) < 1e-9 for s in entry["shifts"].values())
        assert entry["mix_distance"] == pytest.approx(0.0)
