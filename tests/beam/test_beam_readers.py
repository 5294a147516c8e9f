"""Datasets as users store them (issue 12): class folders, Hugging Face Parquet, WebDataset.

Each layout runs through the whole job on the local runner with real files and bad inputs;
ids and labels are checked row by row, and every input ends as a map or a dead letter.
"""

from __future__ import annotations

import json
import os

import pytest
from beamdata import SIZE, read_output
from readerdata import (
    FOLDER_FILES,
    FOLDERS_DEAD,
    FOLDERS_EXPECTED,
    HF_DEAD,
    HF_EXPECTED,
    HF_NAMES,
    WDS_DEAD,
    WDS_EXPECTED,
    check_outputs,
    copy_hf,
    copy_shards,
    write_class_folders,
)

from fullgrad.audit.settings import AuditSettings
from fullgrad.beam import job
from fullgrad.beam.audit_job import run_audit
from fullgrad.beam.config import JobConfig, format_of
from fullgrad.beam.io import huggingface_class_names
from fullgrad.beam.io_images import fixed_prefix, relative_id
from fullgrad.beam.io_webdataset import sample_key


def config(pattern: str, output: str, model_path: str, **overrides) -> JobConfig:
    settings = {"input": pattern, "model": model_path, "output": output, "image_size": SIZE,
                "preprocess": "unit", "batch_size": 4, "target": "label", "progress_every": 0}
    settings.update(overrides)
    return JobConfig(**settings)


def check_summary(output: str, explained: int, failed: int, names: list | None, source) -> dict:
    """summary.json's counts add up, and it names the classes and where they came from."""
    with open(os.path.join(output, "summary.json")) as handle:
        summary = json.load(handle)
    assert summary["explained"] == explained and summary["failed"] == failed
    assert summary["input"] == summary["explained"] + summary["failed"]
    assert summary["class_names"] == names and summary["class_names_from"] == source
    return summary


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("train"))
    return folder, write_class_folders(folder)


def test_class_folders_label_like_keras_and_ids_are_relative_paths(folders, model_path, tmp_path):
    folder, keras_labels = folders
    assert keras_labels == {p: v for p, v in FOLDERS_EXPECTED.items() if p in keras_labels}
    assert len(keras_labels) == 4  # the PNG, JPEG and BMP files Keras lists
    output = str(tmp_path / "out")
    job.run(config(f"{folder}/*/*", output, model_path, format="images", audit=True))
    maps, dead = read_output(output)
    check_outputs(maps, dead, FOLDERS_EXPECTED, FOLDERS_DEAD)
    check_summary(output, len(FOLDERS_EXPECTED), len(FOLDERS_DEAD), HF_NAMES, "folders")
    with open(os.path.join(output, "audit.json")) as handle:
        audit = json.load(handle)
    assert audit["settings"]["class_names"] == HF_NAMES
    assert {key: entry["name"] for key, entry in audit["classes"].items()} == {
        "0": "0 (ant)", "1": "1 (bee)", "2": "2 (cow)"
    }
    with open(os.path.join(output, "report.html")) as handle:
        assert "1 (bee)" in handle.read()


def test_class_names_fix_the_order_and_labels_none_turns_labels_off(folders, model_path,
                                                                    tmp_path):
    folder, _ = folders
    output = str(tmp_path / "named")
    # The Keras order with the empty folder counted; a folder not named is a dead letter.
    job.run(config(f"{folder}/*/*.png,{folder}/*/*.jpg", output, model_path,
                   class_names="cow,bat,ant"))
    maps, dead = read_output(output)
    check_outputs(maps, dead, {"ant/0.png": 2, "ant/1.png": 2},
                  {"bee/0.jpg": ("read", "not among the class names"),
                   "cow/2.png": ("decode", "corrupt")})
    check_summary(output, 2, 2, ["cow", "bat", "ant"], "--class-names")
    # `fullgrad audit` over the maps names the classes from the run's summary.json.
    paths = run_audit(output, str(tmp_path / "audit"), AuditSettings())
    with open(paths["json"]) as handle:
        assert json.load(handle)["classes"]["2"]["name"] == "2 (ant)"

    output = str(tmp_path / "unlabelled")
    job.run(config(f"{folder}/*/*.png", output, model_path, labels="none", target="predicted"))
    maps, _ = read_output(output)
    assert maps.column("id").to_pylist() == ["ant/0.png", "ant/1.png"]
    assert maps.column("label").to_pylist() == [None, None]


def test_hugging_face_parquet_bytes_paths_and_class_names(model_path, tmp_path):
    data = copy_hf(str(tmp_path / "hf"))
    output = str(tmp_path / "out")
    job.run(config(f"{data}/*.parquet", output, model_path, audit=True))
    maps, dead = read_output(output)
    check_outputs(maps, dead, HF_EXPECTED, HF_DEAD)
    assert "FileNotFoundError" in dead.to_pylist()[0]["error"]
    check_summary(output, len(HF_EXPECTED), len(HF_DEAD), HF_NAMES, "huggingface")
    with open(os.path.join(output, "audit.json")) as handle:
        assert json.load(handle)["classes"]["2"]["name"] == "2 (cow)"
    # A rerun gives the same ids; --audit-class-names wins over the file's names.
    again = str(tmp_path / "again")
    job.run(config(f"{data}/*.parquet", again, model_path, audit=True,
                   audit_options={"class_names": ["x", "y", "z"]}))
    assert read_output(again)[0].column("id") == maps.column("id")
    with open(os.path.join(again, "audit.json")) as handle:
        assert json.load(handle)["classes"]["2"]["name"] == "2 (z)"


def test_an_absolute_image_path_and_a_named_id_column_that_is_missing(model_path, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = copy_hf(str(tmp_path / "hf"))
    image = os.path.join(data, "images", "000.png")
    # Hugging Face's ClassLabel metadata, where -1 means "no label".
    metadata = pq.read_schema(os.path.join(data, "embedded.parquet")).metadata
    table = pa.table({"image": [{"bytes": None, "path": image}] * 2, "label": [1, -1]})
    pq.write_table(table.replace_schema_metadata(metadata), str(tmp_path / "abs.parquet"))
    output = str(tmp_path / "out")
    job.run(config(str(tmp_path / "abs.parquet"), output, model_path, target="predicted"))
    maps, dead = read_output(output)
    assert maps.column("label").to_pylist() == [1, None] and dead.num_rows == 0
    assert maps.column("id").to_pylist() == ["abs.parquet#0", "abs.parquet#1"]
    output = str(tmp_path / "named")
    job.run(config(str(tmp_path / "abs.parquet"), output, model_path, id_column="key"))
    check_outputs(*read_output(output), {}, {"abs.parquet#0": ("read", "missing column(s)"),
                                            "abs.parquet#1": ("read", "missing column(s)")})


def test_webdataset_shards_with_a_corrupt_image_and_a_truncated_shard(model_path, tmp_path):
    shards = copy_shards(str(tmp_path / "shards"))
    output = str(tmp_path / "out")
    job.run(config(f"{shards}/*.tar", output, model_path))
    maps, dead = read_output(output)
    check_outputs(maps, dead, WDS_EXPECTED, WDS_DEAD)
    assert maps.column("mask_energy").null_count == 0  # every sample has its .mask.png
    check_summary(output, len(WDS_EXPECTED), len(WDS_DEAD), None, None)


def test_an_empty_folder_is_refused_before_anything_runs(model_path, tmp_path):
    (tmp_path / "empty").mkdir()
    for pattern, fmt in (("*/*.jpg", None), ("*.tar", None), ("*", "images")):
        with pytest.raises(job.JobError, match="matches no file"):
            job.run(config(str(tmp_path / "empty" / pattern), str(tmp_path / "o"), model_path,
                           format=fmt))
    assert not (tmp_path / "o" / "summary.json").exists()


def test_formats_prefixes_keys_and_metadata():
    assert format_of("gs://b/train/*/*.JPEG") == "images"
    assert format_of("s3://b/shards/train-*.tar.gz") == "webdataset"
    assert JobConfig(input="t/*/*.png", model="m", output="o").folder_labels()
    assert not JobConfig(input="t/cat/*.png", model="m", output="o").folder_labels()
    assert fixed_prefix("gs://b/train/*/*.jpg") == "gs://b/train/"
    assert relative_id("gs://b/train/cat/1.jpg", "gs://b/train/") == "cat/1.jpg"
    assert sample_key("d/0001.mask.png") == ("d/0001", "mask.png")
    assert huggingface_class_names({b"huggingface": b'{"info": {"features": {"label": '
                                    b'{"_type": "Value"}}}}'}, "label") is None
    with pytest.raises(ValueError, match="repeats"):
        JobConfig(input="t/*/*.png", model="m", output="o", class_names="a,b,a")
    assert set(FOLDER_FILES) == set(FOLDERS_EXPECTED)


def test_tfrecord_without_an_id_key_gets_file_and_record_ids(model_path, tmp_path):
    from beamdata import good_rows, write_tfrecord

    rows = good_rows(3)
    keys = {"image": "image/encoded", "label": "image/class/label"}
    write_tfrecord(str(tmp_path / "train.tfrecord"), rows, keys=keys)
    output = str(tmp_path / "out")
    job.run(config(str(tmp_path / "train.tfrecord"), output, model_path))
    check_outputs(*read_output(output), {f"train.tfrecord#{i}": rows[i]["label"] for i in range(3)},
                  {})
