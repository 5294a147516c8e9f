"""fullgrad.kfp.tasks without Kubeflow: where the data is read from, and the runner flags."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fullgrad.kfp.tasks import (
    RunnerSettings,
    artifact_location,
    audit_markdown,
    audit_metrics,
    dataset_input,
    explain_parameters,
    model_file,
)


@dataclasses.dataclass
class Artifact:
    """What kfp hands a component: a URI, its local path, metadata."""

    uri: str
    path: str
    metadata: dict = dataclasses.field(default_factory=dict)


def local(path: Path) -> Artifact:
    return Artifact(uri=str(path), path=str(path))


def test_local_runner_needs_no_options_and_refuses_dataflow_settings():
    assert RunnerSettings("local").pipeline_options() == {}
    assert RunnerSettings("FlinkRunner").pipeline_options() == {"runner": "FlinkRunner"}
    # Portable runners take their image as --environment_config, through extra_args.
    flink = RunnerSettings("FlinkRunner", sdk_container_image="reg/fullgrad:1")
    assert flink.pipeline_options() == {"runner": "FlinkRunner"}
    with pytest.raises(ValueError, match=r"\['project', 'worker_accelerator'\] only apply"):
        RunnerSettings("local", project="p", worker_accelerator="nvidia-l4").pipeline_options()


def test_dataflow_options_with_gpu_workers():
    options = RunnerSettings(
        "DataflowRunner",
        project="my-project",
        region="europe-west4",
        temp_location="gs://bucket/tmp",
        worker_accelerator="nvidia-tesla-t4",
        worker_accelerator_count=2,
        machine_type="n1-standard-8",
        sdk_container_image="europe-west4-docker.pkg.dev/my-project/ml/fullgrad:0.1.0",
    ).pipeline_options()
    assert options == {
        "runner": "DataflowRunner",
        "project": "my-project",
        "region": "europe-west4",
        "temp_location": "gs://bucket/tmp",
        "machine_type": "n1-standard-8",
        "sdk_container_image": "europe-west4-docker.pkg.dev/my-project/ml/fullgrad:0.1.0",
        "sdk_location": "container",
        "dataflow_service_options": [
            "worker_accelerator=type:nvidia-tesla-t4;count:2;install-nvidia-driver"
        ],
    }
    # The keywords are Beam's: its own options read them back, as the job builds them.
    from apache_beam.options.pipeline_options import GoogleCloudOptions, WorkerOptions

    from fullgrad.beam.options import pipeline_options

    built = pipeline_options([], **options)
    cloud = built.view_as(GoogleCloudOptions)
    assert (cloud.project, cloud.region) == ("my-project", "europe-west4")
    assert cloud.dataflow_service_options == options["dataflow_service_options"]
    assert built.view_as(WorkerOptions).machine_type == "n1-standard-8"


def test_dataflow_without_its_required_settings_is_refused():
    with pytest.raises(ValueError, match=r"needs \['region', 'temp_location'\]"):
        RunnerSettings("DataflowRunner", project="p").pipeline_options()


def test_explain_parameters_come_from_the_declarations():
    """Every JobConfig setting marked for Kubeflow, then every RunnerSettings field, typed."""
    from fullgrad.beam.config import JobConfig, settings_fields

    names = [p.name for p in explain_parameters()]
    exposed = [f for f in settings_fields() if f.metadata["setting"].kfp]
    assert len(names) == len(set(names)) == len(exposed) + len(dataclasses.fields(RunnerSettings))
    assert {"input", "model", "output", "overwrite"}.isdisjoint(names)
    by_name = {p.name: p for p in explain_parameters()}
    assert by_name["input_format"].field == "format" and by_name["input_format"].default == ""
    assert by_name["batch_size"].annotation is int and by_name["audit"].annotation is bool
    assert by_name["batch_size"].default == JobConfig.__dataclass_fields__["batch_size"].default


def test_dataset_folder_becomes_a_glob_on_the_path_or_the_uri(tmp_path):
    (tmp_path / "part-0.parquet").write_bytes(b"x")
    (tmp_path / "part-1.parquet").write_bytes(b"x")
    (tmp_path / "_SUCCESS").write_bytes(b"")
    assert dataset_input(local(tmp_path), local=True) == (f"{tmp_path}/*.parquet", "parquet")
    # A distributed runner gets the bucket URI; the folder is inspected through the pod's path.
    mounted = Artifact(uri="gs://bucket/images", path=str(tmp_path))
    assert dataset_input(mounted, local=False) == ("gs://bucket/images/*.parquet", "parquet")


def test_dataset_file_tfrecords_and_ambiguity(tmp_path):
    shard = tmp_path / "train.tfrecord-00000-of-00002"
    shard.write_bytes(b"x")
    assert dataset_input(local(shard), local=True) == (str(shard), "tfrecord")
    assert dataset_input(local(tmp_path), local=True) == (f"{tmp_path}/*.tfrecord*", "tfrecord")
    (tmp_path / "more.parquet").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"several formats \['parquet', 'tfrecord'\]"):
        dataset_input(local(tmp_path), local=True)
    assert dataset_input(local(tmp_path), True, "parquet") == (f"{tmp_path}/*.parquet", "parquet")
    with pytest.raises(ValueError, match="input_format must be"):
        dataset_input(local(tmp_path), True, "csv")


def test_dataset_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset artifact not found at"):
        dataset_input(local(tmp_path / "missing"), local=True)
    with pytest.raises(ValueError, match=r"no dataset files \(parquet, tfrecord, images, webdataset\) and no class folders"):
        dataset_input(local(tmp_path), local=True)
    with pytest.raises(ValueError, match="local path"):
        dataset_input(local(tmp_path), local=False)  # remote workers cannot read the pod's disk


def test_dataset_folder_of_class_folders_or_shards(tmp_path):
    for name in ("cat/1.jpg", "cat/2.JPG", "dog/1.png", "dog/notes.txt"):
        (tmp_path / "train" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "train" / name).write_bytes(b"x")
    train = tmp_path / "train"
    assert dataset_input(local(train), local=True) == (
        f"{train}/*/*.JPG,{train}/*/*.jpg,{train}/*/*.png", "images"
    )
    mounted = Artifact(uri="gs://bucket/train", path=str(train))
    assert dataset_input(mounted, local=False)[0].startswith("gs://bucket/train/*/*.")
    (tmp_path / "shards").mkdir()
    for index in range(2):
        (tmp_path / "shards" / f"train-{index:05d}.tar").write_bytes(b"x")
    assert dataset_input(local(tmp_path / "shards"), local=True) == (
        f"{tmp_path}/shards/*.tar", "webdataset"
    )
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="no class folders of images"):
        dataset_input(local(tmp_path / "empty"), local=True)


def test_model_file_in_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .keras or .h5 file"):
        model_file(local(tmp_path), local=True)
    (tmp_path / "classifier.keras").write_bytes(b"x")
    (tmp_path / "README").write_bytes(b"x")
    assert model_file(local(tmp_path), local=True) == f"{tmp_path}/classifier.keras"
    mounted = Artifact(uri="gs://b/models/prod/", path=str(tmp_path))
    assert model_file(mounted, local=False) == "gs://b/models/prod/classifier.keras"
    (tmp_path / "old.h5").write_bytes(b"x")
    with pytest.raises(ValueError, match="several model files"):
        model_file(local(tmp_path), local=True)


def test_artifact_location():
    artifact = Artifact(uri="gs://b/x", path="/gcs/b/x")
    assert artifact_location(artifact, local=True) == "/gcs/b/x"
    assert artifact_location(artifact, local=False) == "gs://b/x"


AUDIT = {
    "images": 30,
    "classes": {
        "10": {"name": "truck", "count": 5, "mask_energy": 0.61, "border_energy": 0.2,
               "concentration": 0.3, "flagged": False, "reasons": []},
        "2": {"name": "cat|dog", "count": 15, "mask_energy": 0.18, "border_energy": 0.55,
              "concentration": 0.4, "flagged": True, "reasons": ["off_object", "on_border"]},
        "0": {"name": "0", "count": 10, "mask_energy": None, "border_energy": 0.1,
              "concentration": float("nan"), "flagged": False, "reasons": []},
    },
    "flagged_classes": ["2"],
    "flagged_images": [{"id": "a"}, {"id": "b"}],
    "flagged_images_total": 7,
}  # fmt: skip


def test_audit_metrics_per_class_and_flag_counts():
    assert audit_metrics(AUDIT) == {
        "border_energy_class_0": 0.1,
        "mask_energy_class_2": 0.18,
        "border_energy_class_2": 0.55,
        "mask_energy_class_10": 0.61,
        "border_energy_class_10": 0.2,
        "flagged_classes": 1.0,
        "flagged_images": 7.0,  # the total, not the capped list
        "images": 30.0,
    }
    assert list(audit_metrics(AUDIT))[:3] == [
        "border_energy_class_0",  # no mask energy without masks: left out, not NaN
        "mask_energy_class_2",
        "border_energy_class_2",
    ]


def test_audit_markdown_table():
    lines = audit_markdown(AUDIT).splitlines()
    assert lines[0] == "# FullGrad audit"
    rows = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert rows == [
        "| 0 | 10 | n/a | 0.100 | n/a | no |",
        "| cat\\|dog | 15 | 0.180 | 0.550 | 0.400 | **off_object, on_border** |",
        "| truck | 5 | 0.610 | 0.200 | 0.300 | no |",
    ]
    assert "Flagged classes: 2." in lines and "Flagged images: 7." in lines


def test_audit_task_files_the_audit_the_job_already_wrote(tmp_path):
    """explain_args=["--audit"] audits in the Beam pass; the audit task then only files it."""
    import json

    from kfp import dsl

    from fullgrad.kfp.tasks import run_audit

    maps_dir = tmp_path / "maps"
    maps_dir.mkdir()
    (maps_dir / "audit.json").write_text(json.dumps({**AUDIT, "classes": {
        k: {**v, "concentration": None} for k, v in AUDIT["classes"].items()}}))  # fmt: skip
    (maps_dir / "report.html").write_text("<!doctype html><title>audit</title>")
    # No maps-*.parquet here: recomputing would fail, so passing proves nothing was re-read.
    report = dsl.HTML(uri=str(tmp_path / "out" / "report"))
    summary = dsl.Markdown(uri=str(tmp_path / "out" / "summary"))
    metrics = dsl.Metrics(uri=str(tmp_path / "out" / "metrics"))
    values = run_audit(
        maps=dsl.Dataset(uri=str(maps_dir)), report=report, summary=summary, metrics=metrics
    )
    assert Path(report.path).read_text() == "<!doctype html><title>audit</title>"
    assert "| truck | 5 | 0.610 | 0.200 | n/a | no |" in Path(summary.path).read_text()
    assert metrics.metadata == values
    assert values["mask_energy_class_2"] == 0.18 and values["flagged_images"] == 7
    assert report.metadata["flagged_classes"] == ["2"]

    # Settings of its own make the task recompute from the maps, which are missing here.
    with pytest.raises(FileNotFoundError, match="no maps-"):
        run_audit(maps=dsl.Dataset(uri=str(maps_dir)), report=report, summary=summary,
                  metrics=metrics, extra_args=["--min-class-count", "1"])  # fmt: skip
