"""The demo end to end (``fullgrad demo`` through the CLI), and evidence that its maps mean
something.

- the demo's audit flags the shortcut class and no other, from the maps alone;
- the same command gives the same numbers again (on one machine: see ``test_the_same_command``);
- the pointing game on clean classes beats random maps by far;
- the model-randomisation sanity check (Adebayo et al., NeurIPS 2018): maps of the trained model
  and of the same architecture re-initialised are weakly rank-correlated;
- the control, ``fullgrad demo --shortcut-fraction 0``, flags nothing.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

import fullgrad
from fullgrad.audit import stats
from fullgrad.cli import main as cli_main
from fullgrad.demo import data
from fullgrad.demo import model as demo_model
from fullgrad.images import decode_image

from .conftest import SIZE


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps (ties are rare in float maps)."""
    rank_a = np.argsort(np.argsort(a.ravel())).astype(float)
    rank_b = np.argsort(np.argsort(b.ravel())).astype(float)
    return float(np.corrcoef(rank_a, rank_b)[0, 1])


def marked_images(output: str) -> int:
    """How many explained images carry the corner mark (its magenta centre), read back from
    the Parquet the demo wrote."""
    table = pq.read_table(os.path.join(output, "data", "explain.parquet"))
    top, left, bottom, right = data.mark_box(SIZE)
    centre = ((top + bottom) // 2, (left + right) // 2)
    pixels = [decode_image(png)[centre] for png in table.column("image").to_pylist()]
    return sum(tuple(int(v) for v in p[:3]) == (255, 0, 255) for p in pixels)


def test_demo_flags_the_shortcut_class_and_no_clean_class(demo_run):
    assert demo_run["status"] == 0
    audit = demo_run["audit"]
    planted = demo_run["demo"]["shortcut_class"]
    assert marked_images(demo_run["output"]) > 0
    assert audit["flagged_classes"] == [str(planted)]
    # What the command prints: one FLAGGED row (the big disc), the list, the report's path.
    rows = {name: line for line in demo_run["stdout"].splitlines()
            for k, name in enumerate(data.CLASS_NAMES) if line.startswith(f"{k} ({name}) ")}  # fmt: skip
    assert [name for name, row in rows.items() if "FLAGGED" in row] == ["big disc"]
    assert len(rows) == 4
    assert f"flagged classes: ['{planted}']" in demo_run["stdout"]
    assert f"report: {os.path.abspath(demo_run['report'])}" in demo_run["stdout"]
    classes = audit["classes"]
    clean = [info["mask_energy"] for name, info in classes.items() if name != str(planted)]
    print("demo:", {t: round(c["mask_energy"], 3) for t, c in classes.items()})
    assert classes[str(planted)]["mask_energy"] < 0.6 * min(clean)
    assert classes[str(planted)]["border_energy"] > 2 * max(
        info["border_energy"] for name, info in classes.items() if name != str(planted)
    )
    with open(demo_run["report"]) as handle:
        page = handle.read()
    assert page.count("data:image/png;base64,") > 10 and "big disc" in page
    assert demo_run["summary"]["explained"] == demo_run["summary"]["input"]


def test_maps_carry_the_statistics_and_fullgrad_audit_reproduces_the_audit(demo_run, tmp_path):
    table = pq.read_table(glob.glob(os.path.join(demo_run["output"], "maps-*.parquet")))
    for name in ("mask_energy", "border_energy", "concentration", "pointing_hit"):
        assert table.column(name).null_count == 0
    energies = np.array(table.column("mask_energy").to_pylist())
    targets = np.array(table.column("target").to_pylist())
    job = demo_run["audit"]["classes"]
    for target, info in job.items():
        stored = float(np.mean(energies[targets == int(target)]))
        assert abs(stored - info["mask_energy"]) < 1e-6  # float32 columns, float64 audit
    assert cli_main(["audit", "--maps", demo_run["output"], "--output", str(tmp_path)]) == 0
    with open(tmp_path / "audit.json") as handle:
        again = json.load(handle)
    assert again["flagged_classes"] == demo_run["audit"]["flagged_classes"]
    for target, info in job.items():
        assert abs(again["classes"][target]["mask_energy"] - info["mask_energy"]) < 1e-3


def test_pointing_game_on_clean_classes_beats_random_maps(demo_model, held_out):
    images, masks, labels, _ = held_out
    clean = labels != data.SHORTCUT_CLASS
    maps = fullgrad.FullGrad(demo_model).explain(images[clean].astype(np.float32), labels[clean])
    hits = np.mean([stats.pointing_hit(m, k) for m, k in zip(maps, masks[clean], strict=True)])
    rng = np.random.default_rng(0)
    random_hits = np.mean(
        [stats.pointing_hit(rng.uniform(size=(SIZE, SIZE)), k) for k in masks[clean]]
    )
    expected = np.mean([stats.dilate(k, 1).mean() for k in masks[clean]])  # chance level
    assert random_hits < expected + 0.1
    print(f"pointing game: FullGrad {hits:.3f}, random maps {random_hits:.3f}, area {expected:.3f}")
    assert hits > max(random_hits, expected) + 0.3


def test_model_randomisation_changes_the_maps(demo_model, held_out):
    """Adebayo et al. 2018: a method whose maps survive re-initialising the weights explains
    the input, not the model. Here the trained and re-initialised maps must differ."""
    images, _, labels, _ = held_out
    x = images.astype(np.float32)
    trained = fullgrad.FullGrad(demo_model).explain(x, labels)
    fresh = demo_model_like(demo_model, seed=1234)
    randomised = fullgrad.FullGrad(fresh).explain(x, labels)
    rho = np.array([spearman(a, b) for a, b in zip(trained, randomised, strict=True)])
    print(f"Spearman trained vs re-initialised: mean {rho.mean():.3f}, max {rho.max():.3f}")
    assert np.mean(np.abs(rho)) < 0.4
    # The measure can show agreement: the trained model's maps of the same images under faint
    # noise (sigma 2 on 0-255 pixels) stay strongly rank-correlated with the originals.
    noise = np.random.default_rng(0).normal(0.0, 2.0, x.shape).astype(np.float32)
    again = fullgrad.FullGrad(demo_model).explain(np.clip(x + noise, 0, 255), labels)
    stable = np.array([spearman(a, b) for a, b in zip(trained, again, strict=True)])
    print(f"Spearman trained vs trained under noise: mean {stable.mean():.3f}")
    assert stable.mean() > 0.8 and stable.mean() > np.mean(np.abs(rho)) + 0.4


def demo_model_like(model, seed: int):
    """The demo architecture with fresh (untrained) weights."""
    return demo_model.build_model(model.input_shape[1], model.output_shape[-1], seed=seed)


def test_the_same_command_gives_the_same_numbers(demo_run, demo_rerun):
    """Seeded data and training: on one machine, the same command gives the same model bit for
    bit, so the same accuracy, maps and audit. (Across machines the trained weights differ:
    oneDNN picks kernels by CPU instruction set, and thread counts change summation order.)"""
    assert demo_rerun["status"] == 0
    first = demo_model_weights(demo_run["output"])
    second = demo_model_weights(demo_rerun["output"])
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert demo_rerun["accuracy"] == demo_run["accuracy"]
    # The printed table, less the timings line and the report's path.
    assert demo_rerun["stdout"].splitlines()[1:-1] == demo_run["stdout"].splitlines()[1:-1]
    maps = [pq.read_table(glob.glob(os.path.join(r["output"], "maps-*.parquet")))
            for r in (demo_run, demo_rerun)]  # fmt: skip
    assert maps[0].column("id").to_pylist() == maps[1].column("id").to_pylist()
    # Batches may group images differently between runs, which moves float32 sums by an ulp.
    first_maps, second_maps = (m.column("map").combine_chunks().to_numpy_ndarray() for m in maps)
    assert first_maps.shape == (len(first_maps), SIZE, SIZE)
    np.testing.assert_allclose(first_maps, second_maps, atol=1e-6)
    for target, info in demo_run["audit"]["classes"].items():
        again = demo_rerun["audit"]["classes"][target]
        assert again["count"] == info["count"] and again["flagged"] == info["flagged"]
        for key in ("mask_energy", "border_energy", "concentration"):
            assert again[key] == pytest.approx(info[key], abs=1e-6), (target, key)


def demo_model_weights(output: str) -> list[np.ndarray]:
    return fullgrad.load_model(os.path.join(output, "model.keras")).get_weights()


def test_control_run_flags_nothing(control_run):
    """``fullgrad demo --shortcut-fraction 0``: no mark anywhere, nothing flagged."""
    assert control_run["status"] == 0
    assert control_run["demo"]["shortcut_fraction"] == 0
    assert marked_images(control_run["output"]) == 0
    print(f"control accuracy {control_run['accuracy']:.3f}")
    assert control_run["accuracy"] > 0.4  # it learned the shapes (chance: 0.25)
    audit = control_run["audit"]
    print("control:", {t: round(c["mask_energy"], 3) for t, c in audit["classes"].items()})
    assert audit["flagged_classes"] == []
    assert not any(info["flagged"] for info in audit["classes"].values())
    assert "flagged classes: none" in control_run["stdout"]
    assert "FLAGGED" not in control_run["stdout"]
    energies = [info["mask_energy"] for info in audit["classes"].values()]
    assert len(energies) == 4 and min(energies) > 0.7 * np.median(energies)
