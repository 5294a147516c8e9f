"""The components and the pipeline run for real with kfp.local (SubprocessRunner, no venv).

Each task is a subprocess of this interpreter running the component's code as the cluster would
(``python -m kfp.dsl.executor_main`` on the compiled function); it imports ``fullgrad`` from
this checkout through PYTHONPATH. The data is a tiny Parquet of PNGs (with one corrupt row) and
a tiny .keras model, both written by the fixtures.
"""

# No ``from __future__ import annotations``: kfp reads the pipelines' annotations as objects.
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def local_kfp(tmp_path, monkeypatch):
    """kfp.local with a SubprocessRunner in this environment; tasks import this checkout."""
    from kfp import local

    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), path])))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    root = tmp_path / "pipeline_root"
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        raise_on_error=True,
    )
    with warnings.catch_warnings():
        # The runner warns that the image name lacks "python": the image is ours, by design.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        yield root


def _read_parquet_folder(folder: Path, prefix: str) -> pa.Table:
    files = sorted(folder.glob(f"{prefix}*.parquet"))
    assert files, f"no {prefix}*.parquet in {folder}: {sorted(os.listdir(folder))}"
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by("id")


def test_explain_component_writes_maps_dead_letters_and_counts(local_kfp, tiny_dataset, tiny_model):
    from typing import NamedTuple

    from kfp import dsl

    from fullgrad.kfp.components import explain_op

    class Outputs(NamedTuple):
        maps: dsl.Dataset
        dead_letters: dsl.Dataset
        counts: dsl.Metrics

    # Artifacts enter a local run only through an importer, as in the real pipeline.
    @dsl.pipeline
    def explain_only(dataset_uri: str, model_uri: str) -> Outputs:
        images = dsl.importer(artifact_uri=dataset_uri, artifact_class=dsl.Dataset)
        model = dsl.importer(artifact_uri=model_uri, artifact_class=dsl.Model)
        task = explain_op(
            images=images.output,
            model=model.output,
            image_size=32,
            preprocess="unit",
            batch_size=4,
            extra_args=["--map-size", "16", "--top-k", "2"],
        )
        return Outputs(task.outputs["maps"], task.outputs["dead_letters"], task.outputs["counts"])

    task = explain_only(dataset_uri=str(tiny_dataset), model_uri=str(tiny_model))

    maps_dir = Path(task.outputs["maps"].path)
    maps = _read_parquet_folder(maps_dir, "maps-")
    assert maps.column("id").to_pylist() == [f"img-{i}" for i in range(8)]
    stored = np.stack([np.asarray(m) for m in maps.column("map").to_pylist()]).reshape(8, 16, 16)
    assert stored.min() >= 0 and stored.max() <= 1 and stored.reshape(8, -1).max(1).min() > 0
    assert all(len(k) == 2 for k in maps.column("topk_classes").to_pylist())

    dead = _read_parquet_folder(Path(task.outputs["dead_letters"].path), "dead_letter")
    assert dead.column("id").to_pylist() == ["broken"]
    assert dead.column("stage").to_pylist() == ["decode"]
    assert not list(maps_dir.glob("dead_letter*")), "dead letters must move out of the maps"

    counts = task.outputs["counts"].metadata
    assert (counts["input"], counts["explained"], counts["failed"]) == (9, 8, 1)
    assert counts["failed_decode"] == 1 and counts["images_per_s"] > 0
    summary = json.loads((maps_dir / "summary.json").read_text())
    assert summary["explained"] == 8 and summary["config"]["map_size"] == 16
