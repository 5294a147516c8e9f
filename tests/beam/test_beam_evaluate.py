"""--map and --evaluate in the Beam job: every map kind runs; evaluation.json is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from beamdata import CLASSES, SIZE, good_rows, read_output, write_parquet

from fullgrad import evaluation
from fullgrad.beam import job
from fullgrad.beam.config import JobConfig
from fullgrad.beam.evaluate import EvaluateBatches, MergeTotalsFn, StratifiedSampleFn
from fullgrad.variants import FULLGRAD_KINDS, MAP_KINDS


def _config(tmp, model_path, **overrides) -> JobConfig:
    settings = {
        "input": str(tmp / "in" / "*.parquet"),
        "model": model_path,
        "output": str(tmp / "out"),
        "image_size": SIZE,
        "preprocess": "unit",
        "batch_size": 4,
        "map_dtype": "float32",
        "smooth_samples": 2,
    }
    settings.update(overrides)
    return JobConfig(**settings)


@pytest.mark.parametrize("kind", MAP_KINDS)
def test_the_job_writes_each_map_kind(tmp_path, model_path, kind):
    (tmp_path / "in").mkdir()
    write_parquet(str(tmp_path / "in" / "part-0.parquet"), good_rows(5))
    summary = job.run(_config(tmp_path, model_path, map=kind))
    maps, dead = read_output(str(tmp_path / "out"))
    assert (summary["explained"], summary["failed"], dead.num_rows) == (5, 0, 0)
    assert summary["config"]["map"] == kind
    residual = np.array(maps.column("residual").to_pylist(), np.float64)
    if kind in FULLGRAD_KINDS:
        assert np.all(residual < 1e-4)  # the plain logit's decomposition, whatever the map
    else:
        assert np.isnan(residual).all()  # a baseline has no decomposition


def test_the_sample_is_stratified_and_independent_of_merging():
    rng = np.random.default_rng(0)
    ids = [f"img-{i}" for i in range(30)]
    labels = rng.integers(0, 3, len(ids))
    entries = [
        (str(label), evaluation.sample_key(i), i, {"id": i}) for i, label in zip(ids, labels)
    ]
    fn = StratifiedSampleFn(limit=7, classes=3)

    def accumulate(part):
        accumulator = fn.create_accumulator()
        for entry in part:
            accumulator = fn.add_input(accumulator, entry)
        return accumulator

    whole = fn.extract_output(accumulate(entries))
    parts = [accumulate(entries[i::4]) for i in range(4)]
    merged = fn.extract_output(fn.merge_accumulators(parts[::-1]))
    assert [item["id"] for item in merged] == [item["id"] for item in whole]
    assert [item["id"] for item in whole] == evaluation.stratified_sample(ids, labels, 7)


def test_evaluation_totals_do_not_depend_on_the_batch_size(tmp_path, model_path):
    rng = np.random.default_rng(3)
    items = [
        {"id": str(i), "image": rng.uniform(0, 1, (SIZE, SIZE, 3)).astype(np.float32),
         "target": i % CLASSES}
        for i in range(8)
    ]
    evaluate = EvaluateBatches(_config(tmp_path, model_path))
    evaluate.setup()
    merge = MergeTotalsFn()

    def summary(size):
        totals = [t for i in range(0, 8, size) for t in evaluate.process(items[i : i + size])]
        accumulator = merge.merge_accumulators([merge.add_input(merge.create_accumulator(), t)
                                                for t in totals])
        return merge.extract_output(accumulator)

    one, eight = summary(1), summary(8)
    assert one["images"] == eight["images"] == 8
    assert set(one["methods"]) == {*MAP_KINDS, "random", "blurred_random"}
    for name, result in one["methods"].items():
        for key in ("deletion_auc", "insertion_auc"):
            assert result[key] == pytest.approx(eight["methods"][name][key], abs=1e-5), name


def test_evaluate_writes_evaluation_json_and_keeps_every_input(tmp_path, model_path):
    (tmp_path / "in").mkdir()
    write_parquet(str(tmp_path / "in" / "part-0.parquet"), good_rows(12))
    config = _config(tmp_path, model_path, map="simple", target="label", evaluate=True,
                     evaluate_images=8, evaluate_batch_size=3, audit=True)
    summary = job.run(config)
    maps, dead = read_output(str(tmp_path / "out"))
    assert summary["input"] == 12 == maps.num_rows + dead.num_rows == summary["explained"]

    report = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert report["images"] == 8 and report["map"] == "simple"
    assert report["fractions"] == list(evaluation.FRACTIONS)
    assert set(report["methods"]) == {*MAP_KINDS, "random", "blurred_random"}
    for result in report["methods"].values():
        assert result["images"] == 8
        assert len(result["deletion_curve"]) == len(result["insertion_curve"]) == 11
        assert 0 <= result["deletion_auc"] <= 1 and 0 <= result["insertion_auc"] <= 1
    # 12 images labelled i % 5, explained on their labels: 2 per class, 8 in turn.
    assert {k: v["fullgrad"]["images"] for k, v in report["classes"].items()} == {
        "0": 2, "1": 2, "2": 2, "3": 1, "4": 1
    }
    assert "deletion" in (tmp_path / "out" / "evaluation.html").read_text()
    assert json.loads((tmp_path / "out" / "audit.json").read_text())["map"] == "simple"

    # evaluation.json is the run's own: a rerun refuses it, --overwrite removes it.
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "evaluation.json").write_text("{}")
    (alone / "notes.txt").write_text("not ours")
    with pytest.raises(job.JobError, match="evaluation.json"):
        job.prepare_output(_config(tmp_path, model_path, output=str(alone)))
    job.prepare_output(_config(tmp_path, model_path, output=str(alone), overwrite=True))
    assert sorted(p.name for p in alone.iterdir()) == ["notes.txt"]
