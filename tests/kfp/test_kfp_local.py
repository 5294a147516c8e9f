"""The components and the pipeline run for real with kfp.local (SubprocessRunner, no venv).

Each task is a subprocess of this interpreter running the component's code as the cluster would
(``python -m kfp.dsl.executor_main`` on the compiled function); it imports ``fullgrad`` from
this checkout through PYTHONPATH. The data is a tiny Parquet of PNGs (with one corrupt row) and
a tiny .keras model, both written by the fixtures.
"""

# No ``from __future__ import annotations``: kfp reads the pipelines' annotations as objects.
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
CPU_PIPELINE = REPO / "pipelines" / "fullgrad_explain_audit_cpu.yaml"


def _tensorflow_sees_a_gpu() -> bool:
    """Whether TensorFlow finds a GPU here, asked in a fresh process (as a task would be), so
    this process's TensorFlow state plays no part."""
    probe = "import tensorflow as tf; print(len(tf.config.list_physical_devices('GPU')))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=120,
                          check=False)  # fmt: skip
    lines = done.stdout.split()
    return done.returncode == 0 and bool(lines) and lines[-1].isdigit() and int(lines[-1]) > 0


@pytest.fixture(scope="module")
def task_env():
    """The environment kfp.local's task subprocesses inherit: this checkout on PYTHONPATH,
    and, on a machine without a GPU, CUDA hidden (each task would otherwise probe for one)."""
    with pytest.MonkeyPatch.context() as patch:
        path = os.environ.get("PYTHONPATH", "")
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), path])))
        patch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
        if not _tensorflow_sees_a_gpu():
            patch.setenv("CUDA_VISIBLE_DEVICES", "")
        yield


def _init_local(root: Path) -> None:
    """kfp.local with its SubprocessRunner (no venv, this environment) under ``root``."""
    from kfp import local

    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        raise_on_error=True,
    )


@pytest.fixture()
def local_kfp(task_env, tmp_path):
    """kfp.local under a fresh pipeline root, for tests that run pipelines their own way."""
    root = tmp_path / "pipeline_root"
    _init_local(root)
    with warnings.catch_warnings():
        # The runner warns that the image name lacks "python": the image is ours, by design.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        yield root


def _run_locally(pipeline, root: Path, **arguments) -> list[warnings.WarningMessage]:
    """Runs ``pipeline`` with kfp.local under ``root``; returns the warnings it raised."""
    _init_local(root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # The runner warns that the image name lacks "python": the image is ours, by design.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        pipeline(**arguments)
    return list(caught)


#: The tiny run's arguments, the same for every pipeline variant.
def _arguments(dataset: Path, model: Path) -> dict:
    return {
        "dataset_uri": str(dataset),
        "model_uri": str(model),
        "image_size": 32,
        "preprocess": "unit",
        "target": "label",
        "batch_size": 4,
        "explain_args": ["--map-size", "16", "--top-k", "2"],  # `fullgrad run` flags
        "audit_args": ["--class-names", "dark,mid,bright"],
    }


@pytest.fixture(scope="module")
def gpu_pipeline_run(task_env, tiny_dataset, tiny_model, tmp_path_factory):
    """The production pipeline as built in Python (explain asks for 1 nvidia.com/gpu)."""
    from fullgrad.kfp.pipeline import build_pipeline

    root = tmp_path_factory.mktemp("gpu") / "pipeline_root"
    caught = _run_locally(build_pipeline(), root, **_arguments(tiny_dataset, tiny_model))
    return root, caught


@pytest.fixture(scope="module")
def cpu_yaml_run(task_env, tiny_dataset, tiny_model, tmp_path_factory):
    """The committed CPU pipeline YAML, loaded as a cluster would load it."""
    from kfp import components

    pipeline = components.load_component_from_file(str(CPU_PIPELINE))
    root = tmp_path_factory.mktemp("cpu") / "pipeline_root"
    caught = _run_locally(pipeline, root, **_arguments(tiny_dataset, tiny_model))
    return root, caught


def _read_parquet_folder(folder: Path, prefix: str) -> pa.Table:
    files = sorted(folder.glob(f"{prefix}*.parquet"))
    assert files, f"no {prefix}*.parquet in {folder}: {sorted(os.listdir(folder))}"
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by("id")


def _task_dir(root: Path, task: str) -> Path:
    (run,) = [p for p in root.iterdir() if p.is_dir()]  # <pipeline name>-<timestamp>
    return run / task


def _executor_output(root: Path, task: str) -> dict:
    (path,) = _task_dir(root, task).rglob("executor_output.json")
    return json.loads(path.read_text())


def _accelerator_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "['accelerator'] have no effect" in str(w.message)]


def test_pipeline_end_to_end(gpu_pipeline_run):
    """The production pipeline (GPU request included) over the tiny data: maps, report, metrics."""
    root, caught = gpu_pipeline_run
    # kfp.local cannot grant the GPU request, and says so: the request is in the spec.
    (warning,) = _accelerator_warnings(caught)
    assert warning.startswith("Task 'explain': settings")
    _assert_pipeline_outputs(root)


def test_cpu_pipeline_yaml_end_to_end(cpu_yaml_run):
    """The committed CPU pipeline YAML runs the same tasks to the same outputs, and asks for
    no accelerator."""
    root, caught = cpu_yaml_run
    assert _accelerator_warnings(caught) == []
    _assert_pipeline_outputs(root)


def _assert_pipeline_outputs(local_kfp: Path) -> None:
    from fullgrad.audit.stats import image_statistics
    from fullgrad.images import decode_mask
    from fullgrad.record import read_maps

    # explain: maps of the 8 good images, the corrupt row as a dead letter, the counts.
    maps_dir = _task_dir(local_kfp, "explain") / "maps"
    maps = _read_parquet_folder(maps_dir, "maps-")
    assert maps.column("id").to_pylist() == [f"img-{i}" for i in range(8)]
    assert maps.column("target").to_pylist() == [i % 3 for i in range(8)]  # target=label
    assert all(len(k) == 2 for k in maps.column("topk_classes").to_pylist())
    stored = read_maps(maps)
    assert stored.shape == (8, 16, 16)
    assert stored.min() >= 0 and stored.max() <= 1 and stored.reshape(8, -1).max(1).min() > 0
    assert json.loads((maps_dir / "summary.json").read_text())["explained"] == 8

    dead = _read_parquet_folder(_task_dir(local_kfp, "explain") / "dead_letters", "dead_letter")
    assert dead.column("id").to_pylist() == ["broken"]
    assert dead.column("stage").to_pylist() == ["decode"]
    assert not list(maps_dir.glob("dead_letter*")), "dead letters move out of the maps"
    explain_out = _executor_output(local_kfp, "explain")["artifacts"]
    counts = explain_out["counts"]["artifacts"][0]["metadata"]
    assert (counts["input"], counts["explained"], counts["failed"]) == (9, 8, 1)
    assert counts["failed_decode"] == 1 and counts["images_per_s"] > 0

    # audit: the report, the Markdown summary and the metrics.
    audit_dir = _task_dir(local_kfp, "audit")
    report = (audit_dir / "report").read_text()
    assert report.lstrip().lower().startswith("<!doctype html") or "<html" in report[:200].lower()
    assert "data:image/png;base64," in report  # pictures are inlined: one self-contained file
    summary = (audit_dir / "summary").read_text()
    rows = [line for line in summary.splitlines() if line.startswith("| ") and "---" not in line]
    cells = [row.strip("| ").split(" | ") for row in rows[1:]]
    # One row per class in class order, named by the audit's --class-names (passed through).
    assert [(c[0].split()[-1].strip("()"), c[1]) for c in cells] == [
        ("dark", "3"),
        ("mid", "3"),
        ("bright", "2"),
    ]
    metrics = _executor_output(local_kfp, "audit")["artifacts"]["metrics"]["artifacts"][0]
    values = metrics["metadata"]

    # Each class's mask energy is the mean over its images of the share of saliency on the
    # object, measured here from the maps the explain task wrote and the masks in the data.
    masks = [decode_mask(m, stored.shape[1:]) for m in maps.column("mask").to_pylist()]
    for k in range(3):
        expected = np.mean(
            [image_statistics(stored[i], masks[i])["mask_energy"] for i in range(k, 8, 3)]
        )
        assert values[f"mask_energy_class_{k}"] == pytest.approx(expected, abs=1e-6)
        assert 0 < values[f"mask_energy_class_{k}"] < 1
    flagged = [row for row in rows[1:] if not row.endswith("| no |")]
    assert values["flagged_classes"] == len(flagged)
    assert values["images"] == 8


def test_scheduled_runs_compare_with_the_previous_one(local_kfp, tiny_dataset, tiny_model, tmp_path):
    """Two runs with one history_uri, as a schedule makes them: the second compares with the
    first (found through HISTORY/latest.json, no parameter edited) and finds no drift."""
    from fullgrad.kfp.pipeline import build_pipeline

    history = tmp_path / "history"
    pipeline = build_pipeline(accelerator_limit=0)
    arguments = {
        "dataset_uri": str(tiny_dataset), "model_uri": str(tiny_model), "image_size": 32,
        "preprocess": "unit", "target": "label", "batch_size": 4,
        "explain_args": ["--map-size", "16"], "audit_args": ["--min-class-count", "2"],
        "history_uri": str(history),
    }
    pipeline(**arguments)
    first = json.loads((history / "latest.json").read_text())
    first_audit = json.loads(Path(first["audit"]).read_text())
    assert "drift" not in first_audit  # nothing to compare with yet
    assert first_audit["comparison"]["classes"]["0"]["coarse_map"] is not None

    pipeline(**arguments)
    second = json.loads((history / "latest.json").read_text())
    assert second["run"] != first["run"]
    assert sorted(p.name for p in history.iterdir()) == sorted(
        ["latest.json", Path(first["run"]).name, Path(second["run"]).name])
    audit = json.loads(Path(second["audit"]).read_text())
    drift = audit["drift"]
    assert drift["baseline"] == first["audit"]
    assert sorted(drift["classes"]) == ["0", "1", "2"]
    # The same model over the same images: the same maps, so no class drifts.
    assert drift["drifted_classes"] == []
    assert all(c["map_distance"] == pytest.approx(0.0, abs=1e-9) for c in drift["classes"].values())
    assert "Drift against the baseline" in Path(second["report"]).read_text()


def test_pipeline_over_class_folders(local_kfp, tiny_model, tmp_path):
    """dataset_uri a folder of class folders: folder labels, path ids, folder class names."""
    from PIL import Image

    from fullgrad.kfp.pipeline import build_pipeline

    rng = np.random.default_rng(2)
    folder = tmp_path / "train"
    for name in ("a_low", "b_mid", "c_high"):
        (folder / name).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 255, [32, 32, 3], dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i}.png")
    (folder / "c_high" / "2.png").write_bytes(b"\x89PNG not really")
    build_pipeline(accelerator_limit=0)(
        dataset_uri=str(folder), model_uri=str(tiny_model), image_size=32, preprocess="unit",
        target="label", batch_size=4,
    )
    maps = _read_parquet_folder(_task_dir(local_kfp, "explain") / "maps", "maps-")
    assert maps.column("id").to_pylist() == [f"{n}/{i}.png" for n in ("a_low", "b_mid", "c_high")
                                             for i in range(2)]
    assert maps.column("label").to_pylist() == [0, 0, 1, 1, 2, 2]
    dead = _read_parquet_folder(_task_dir(local_kfp, "explain") / "dead_letters", "dead_letter")
    assert dead.column("id").to_pylist() == ["c_high/2.png"]
    summary = (_task_dir(local_kfp, "audit") / "summary").read_text()
    assert all(f"({name})" in summary for name in ("a_low", "b_mid", "c_high")), summary
