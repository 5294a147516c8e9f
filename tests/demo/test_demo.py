"""The demo end to end, and evidence that its maps mean something.

- the demo's audit flags the shortcut class and no other, from the maps alone;
- the pointing game on clean classes beats random maps by far;
- the model-randomisation sanity check (Adebayo et al., NeurIPS 2018): maps of the trained model
  and of the same architecture re-initialised are weakly rank-correlated;
- a control model trained without the shortcut is not flagged.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pyarrow.parquet as pq

import fullgrad
from fullgrad.audit import stats
from fullgrad.audit.transforms import AuditCombineFn, AuditSettings, finalise_audit, with_statistics
from fullgrad.cli import main as cli_main
from fullgrad.demo import data
from fullgrad.demo import model as demo_model

from .conftest import SIZE


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps (ties are rare in float maps)."""
    rank_a = np.argsort(np.argsort(a.ravel())).astype(float)
    rank_b = np.argsort(np.argsort(b.ravel())).astype(float)
    return float(np.corrcoef(rank_a, rank_b)[0, 1])


def test_demo_flags_the_shortcut_class_and_no_clean_class(demo_run):
    audit = demo_run["audit"]
    with open(os.path.join(demo_run["output"], "demo.json")) as handle:
        planted = json.load(handle)["shortcut_class"]
    assert audit["flagged_classes"] == [str(planted)]
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
    assert spearman(trained[0], trained[0]) == 1.0


def demo_model_like(model, seed: int):
    """The demo architecture with fresh (untrained) weights."""
    return demo_model.build_model(model.input_shape[1], model.output_shape[-1], seed=seed)


def test_control_model_without_the_shortcut_is_not_flagged(control):
    model, (images, masks, labels, marked) = control
    assert not marked.any()
    x = images.astype(np.float32)
    logits = model.predict(x, verbose=0)
    predicted = logits.argmax(axis=1)
    accuracy = (predicted == labels).mean()
    print(f"control accuracy {accuracy:.3f}")
    assert accuracy > 0.4  # it learned the shapes (chance: 0.25)
    maps = fullgrad.FullGrad(model).explain(x, predicted)
    settings = AuditSettings()
    combiner = AuditCombineFn(settings)
    accumulator = combiner.create_accumulator()
    for index in range(len(x)):
        record = {
            "id": f"c-{index}",
            "target": int(predicted[index]),
            "label": int(labels[index]),
            "map": maps[index],
            "mask": masks[index],
            "thumbnail": images[index],
            "residual": 0.0,
        }
        accumulator = combiner.add_input(accumulator, with_statistics(record, settings))
    audit = finalise_audit(combiner.extract_output(accumulator), settings)
    print("control:", {t: round(c["mask_energy"], 3) for t, c in audit["classes"].items()})
    assert audit["flagged_classes"] == []
    energies = [info["mask_energy"] for info in audit["classes"].values()]
    assert min(energies) > 0.7 * np.median(energies)
