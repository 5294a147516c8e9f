"""Strategy discovery wired into the audit: maps without masks, through ``fullgrad audit``."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from fullgrad import record
from fullgrad.audit.settings import AuditSettings
from fullgrad.beam.audit_job import run_audit
from tests.audit.test_strategies import SIZE, _records

SETTINGS = AuditSettings(strategy_capacity=80, strategy_exemplars=3)


def _write_maps(folder, planted, files=2):
    """The synthetic classes of test_strategies (class 3: every other map also looks at a
    top-right mark when ``planted``) as a maps folder, without masks, in ``files`` files."""
    rng = np.random.default_rng(5)
    rows = [
        {"id": image_id, "target": target, "logit": 1.0, "label": target,
         "topk_classes": [target], "topk_logits": [1.0], "residual": 1e-7,
         "map": saliency.astype(np.float32), "mask": None,
         "thumbnail": rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)}
        for image_id, target, saliency, _ in _records(planted, seed=0, per_class=100)
    ]
    folder.mkdir()
    schema = record.schema(SIZE, "float32")
    for part in range(files):
        table = record.to_table(rows[part::files], schema)
        pq.write_table(table, folder / f"maps-{part:05d}-of-{files:05d}.parquet")
    return folder


def _audit(tmp_path, name, planted, extra=()):
    maps = tmp_path / f"maps-{name}"
    if not maps.exists():
        _write_maps(maps, planted)
    paths = run_audit(str(maps), str(tmp_path / name), SETTINGS, list(extra))
    return json.loads(Path(paths["json"]).read_text()), Path(paths["html"]).read_text()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return _audit(tmp_path_factory.mktemp("planted"), "one", planted=True)


def test_the_planted_corner_strategy_is_found_without_masks(planted):
    audit, html = planted
    strategies = audit["strategies"]
    assert strategies["flagged_classes"] == ["3"]
    (verdict,) = strategies["verdicts"]
    assert " of class 3 (" in verdict and verdict.endswith("saliency in the top-right corner")
    (cluster,) = [c for c in strategies["classes"]["3"]["clusters"] if c["flagged"]]
    assert 0.35 <= cluster["share"] <= 0.65
    # No masks, so no mask energy per cluster; the border energy shows the mark.
    assert "mask_energy" not in cluster["statistics"]
    assert cluster["statistics"]["border_energy"] > max(
        c["statistics"]["border_energy"] for c in strategies["classes"]["3"]["clusters"]
        if not c["flagged"])
    # Exemplar overlays of the flagged cluster: marked images, listed among the examples.
    exemplars = audit["examples"][f"strategy:3:{cluster['cluster']}"]
    assert 1 <= len(exemplars) <= 3 and all("-m-" in i for i in exemplars)
    assert "Strategies (SpRAy clusters)" in html and verdict in html
    assert audit["comparison"]["classes"]["3"]["coarse_map"] is not None
    assert len(audit["comparison"]["classes"]["3"]["samples"]["border_energy"]) == 80


def test_no_strategy_in_the_control(tmp_path):
    audit, html = _audit(tmp_path, "control", planted=False)
    assert audit["strategies"]["verdicts"] == [] and audit["strategies"]["flagged_classes"] == []
    assert "No class has a strategy of its own." in html


def test_the_same_clusters_at_one_and_two_workers(tmp_path, planted):
    two, _ = _audit(tmp_path, "two", planted=True, extra=[
        "--direct_num_workers", "2", "--direct_running_mode", "multi_processing"])
    one = planted[0]
    assert two["strategies"] == one["strategies"]
    strategy_examples = {k: v for k, v in one["examples"].items() if k.startswith("strategy:")}
    assert {k: v for k, v in two["examples"].items() if k.startswith("strategy:")} == \
        strategy_examples


def test_classes_of_different_sizes_are_compared_with_each_other():
    """Regression: other classes count as references whatever their sample size (a class
    compared with nothing has all its saliency 'where nothing else looks')."""
    from fullgrad.audit import strategies

    records = _records(planted=False, seed=1, per_class=100)
    reservoirs = {}
    for image_id, target, saliency, statistics in records:
        if int(image_id.rsplit("-", 1)[1]) < 40 + 20 * target:  # 40, 60, 80, 100 per class
            reservoirs.setdefault(target, strategies.MapReservoir(200, 16)).add(
                image_id, saliency, statistics)
    found = strategies.discover_strategies(reservoirs)
    assert [found["classes"][str(k)]["sample"] for k in range(4)] == [40, 60, 80, 100]
    assert found["verdicts"] == []
    assert max(c["excess"] for v in found["classes"].values() for c in v["clusters"]) < 0.25


def test_with_masks_each_cluster_reports_its_mask_energy(records):
    """conftest's records (masks, class 2's maps mostly in a corner): each cluster's mean mask
    energy is reported, and the corner strategy's is low."""
    from tests.audit.conftest import run_audit as run_in_process

    audit = run_in_process(records, SETTINGS)
    clusters = [c for v in audit["strategies"]["classes"].values() for c in v["clusters"]]
    assert clusters and all(0.0 <= c["statistics"]["mask_energy"] <= 1.0 for c in clusters)
    corner = max(audit["strategies"]["classes"]["2"]["clusters"], key=lambda c: c["size"])
    others = [c for k, v in audit["strategies"]["classes"].items() if k != "2"
              for c in v["clusters"]]
    assert corner["statistics"]["mask_energy"] < min(c["statistics"]["mask_energy"]
                                                      for c in others)
