"""The Beam job end to end on Beam's local runner, over real Parquet and TFRecord files."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from beamdata import (
    CLASSES,
    SIZE,
    encode,
    good_rows,
    random_image,
    read_output,
    write_parquet,
    write_tfrecord,
)
from PIL import Image
from test_beam_images import png_header_only

import fullgrad as ke
from fullgrad.beam import job
from fullgrad.beam.config import JobConfig
from fullgrad.beam.io import safe_file_name
from fullgrad.beam.options import DEFAULT_RUNNER, LOCAL_BUNDLES_IN_FLIGHT, pipeline_options
from fullgrad.images import decode_image, decode_mask, encode_jpeg, preprocess
from fullgrad.record import read_maps

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def engine_reference(model_path: str, rows: list[dict], mode: str, targets=None):
    """FullGrad computed directly by the engine on the same decoded, preprocessed images."""
    model = keras.saving.load_model(model_path, compile=False)
    x = np.stack([decode_image(r["image"], (SIZE, SIZE)).astype(np.float32) for r in rows])
    result = ke.FullGrad(model).compute(preprocess(x, mode), targets)
    return result, x.astype(np.uint8)


def config(tmp, model_path, name="out", **overrides) -> JobConfig:
    settings = {
        "input": str(tmp / "in" / "*.parquet"),
        "model": model_path,
        "output": str(tmp / name),
        "image_size": SIZE,
        "preprocess": "unit",
        "batch_size": 4,
        "map_dtype": "float32",
        "progress_every": 5,
    }
    settings.update(overrides)
    return JobConfig(**settings)


@pytest.fixture(scope="module")
def parquet_run(tmp_path_factory, model_path):
    """12 good rows over 2 Parquet files (several row groups), explained with batch size 4."""
    tmp = tmp_path_factory.mktemp("parquet")
    (tmp / "in").mkdir()
    rows = good_rows(12)
    write_parquet(str(tmp / "in" / "part-0.parquet"), rows[:7], row_group_size=3)
    write_parquet(str(tmp / "in" / "part-1.parquet"), rows[7:])
    summary = job.run(config(tmp, model_path, overlays=3, write_tfrecord=True, top_k=3))
    return tmp, rows, summary


def test_parquet_maps_equal_the_engine_on_the_same_images(parquet_run, model_path):
    tmp, rows, summary = parquet_run
    assert (summary["input"], summary["explained"], summary["failed"]) == (12, 12, 0)
    assert summary["files"] == 2 and summary["images_per_s"] > 0
    # One model load for the whole run (3 batches of 4), metrics under the job's namespace.
    metrics = summary["metrics"]
    assert metrics["model_loads"] == 1 and metrics["load_model_latency_milli_secs"]["count"] == 1
    assert metrics["images_explained"] == metrics["num_inferences"] == 12
    assert metrics["inference_request_batch_size"]["max"] == 4
    assert (
        metrics["inference_batch_latency_micro_secs"]["count"]
        == metrics["inference_request_batch_size"]["count"]
    )
    maps, dead = read_output(str(tmp / "out"))
    assert dead.num_rows == 0
    assert maps.column("id").to_pylist() == [r["id"] for r in rows]
    expected, decoded = engine_reference(model_path, rows, "unit")
    stored = read_maps(maps)
    assert stored.shape == (12, SIZE, SIZE)
    np.testing.assert_allclose(stored, expected.maps[..., 0], atol=1e-5)
    np.testing.assert_array_equal(maps.column("target").to_numpy(), expected.targets[:, 0])
    np.testing.assert_allclose(maps.column("logit").to_numpy(), expected.logits[:, 0], rtol=1e-5)
    np.testing.assert_allclose(maps.column("residual").to_numpy(), expected.residual[:, 0],
                               atol=1e-5)
    assert maps.column("residual").to_numpy().max() < 1e-4  # ReLU + BatchNorm: complete
    order = np.argsort(-expected.all_logits, axis=1)[:, :3]
    assert maps.column("topk_classes").to_pylist() == order.tolist()
    assert [t[0] for t in maps.column("topk_classes").to_pylist()] == list(expected.targets[:, 0])
    assert maps.column("label").to_pylist() == [r["label"] for r in rows]
    for index, row in enumerate(maps.to_pylist()):
        # The thumbnail is the decoded input (at map size, here the image size) as a JPEG.
        assert row["thumbnail"] == encode_jpeg(decoded[index])
        thumbnail = np.asarray(Image.open(io.BytesIO(row["thumbnail"])), np.float64)
        assert np.abs(thumbnail - decoded[index]).mean() < 10.0  # random pixels: JPEG's worst
        mask = np.asarray(Image.open(io.BytesIO(row["mask"]))) > 0
        np.testing.assert_array_equal(mask, decode_mask(rows[index]["mask"], (SIZE, SIZE)))


def test_part_maps_and_part_statistics_are_written_on_request(parquet_run, model_path):
    from fullgrad.parts import PARTS
    from fullgrad.record import PART_STATISTIC_COLUMNS, from_table

    tmp, rows, _ = parquet_run
    plain, _ = read_output(str(tmp / "out"))
    # Without --audit or --part-maps: no parts work, per-part columns null.
    assert "part_maps" not in plain.column_names
    assert plain.column("input_border_lift").null_count == len(rows)

    job.run(config(tmp, model_path, name="audited", audit=True, write_tfrecord=True))
    audited, _ = read_output(str(tmp / "audited"))
    assert "part_maps" not in audited.column_names  # explained for the audit, not stored
    assert all(audited.column(n).null_count < len(rows) for n in PART_STATISTIC_COLUMNS[:2])
    # The maps do not change when the parts come along (float32 storage: bit for bit).
    np.testing.assert_array_equal(read_maps(audited), read_maps(plain))
    with open(tmp / "audited" / "audit.json") as handle:
        audit = json.load(handle)
    assert all(set(c["parts"]) == set(PARTS) for c in audit["classes"].values())
    import tensorflow as tf

    first = next(iter(tf.data.TFRecordDataset(sorted((tmp / "audited").glob("*.tfrecord")))))
    assert "part_maps" not in tf.train.Example.FromString(first.numpy()).features.feature

    job.run(config(tmp, model_path, name="parts", part_maps=True, map_dtype="uint8"))
    stored, _ = read_output(str(tmp / "parts"))
    assert stored.schema.field("part_maps").type.shape == [len(PARTS), SIZE, SIZE]
    model = keras.saving.load_model(model_path, compile=False)
    x = np.stack([decode_image(r["image"], (SIZE, SIZE)).astype(np.float32) for r in rows])
    parts = ke.FullGrad(model).compute(preprocess(x, "unit"), parts=True).parts[..., 0]
    order = {r["id"]: i for i, r in enumerate(rows)}
    for record in from_table(stored):
        np.testing.assert_allclose(record["part_maps"], parts[order[record["id"]]], atol=0.6 / 255)
    for name in PART_STATISTIC_COLUMNS[:2]:
        np.testing.assert_allclose(
            stored.column(name).to_numpy(), audited.column(name).to_numpy(), atol=0.02
        )


def test_parquet_run_writes_the_documented_layout(parquet_run):
    tmp, rows, _ = parquet_run
    out = tmp / "out"
    names = sorted(os.listdir(out))
    assert "summary.json" in names and "counts.json" not in names
    assert any(n.startswith("maps-") and n.endswith(".parquet") for n in names)
    assert any(n.startswith("dead_letter-") and n.endswith(".parquet") for n in names)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input"] == summary["explained"] + summary["failed"]
    schema = pq.read_schema(str(next(out.glob("maps-*.parquet"))))
    assert isinstance(schema.field("map").type, pa.FixedShapeTensorType)
    assert schema.field("map").type.shape == [SIZE, SIZE]
    overlays = sorted(os.listdir(out / "overlays"))
    index = json.loads((out / "overlays" / "index.json").read_text())
    assert sorted(index.values()) == [r["id"] for r in rows[:3]]  # the smallest ids
    assert overlays == sorted([*index, "index.json"])
    picture = np.asarray(Image.open(out / "overlays" / safe_file_name("img-0000")))
    assert picture.shape == (SIZE, SIZE, 3) and picture.std() > 0
    # The TFRecord copy holds the same maps.
    import tensorflow as tf

    records = list(tf.data.TFRecordDataset([str(p) for p in out.glob("maps-*.tfrecord")]))
    assert len(records) == 12
    maps, _ = read_output(str(out))
    by_id = dict(zip(maps.column("id").to_pylist(), read_maps(maps), strict=True))
    for raw in records:
        example = tf.train.Example.FromString(raw.numpy())
        feature = example.features.feature
        shape = list(feature["map/shape"].int64_list.value)
        stored = np.frombuffer(feature["map"].bytes_list.value[0], np.float32).reshape(shape)
        np.testing.assert_array_equal(stored, by_id[feature["id"].bytes_list.value[0].decode()])


def test_outputs_are_equal_across_batch_sizes_and_decode_threads(parquet_run, model_path):
    tmp, _, _ = parquet_run  # that run: batch 4, decoding 2 threads ahead; this one: 1, inline
    summary = job.run(config(tmp, model_path, name="batch1", batch_size=1, top_k=3,
                             decode_threads=0))
    assert summary["explained"] == 12
    one, _ = read_output(str(tmp / "batch1"))
    four, _ = read_output(str(tmp / "out"))
    np.testing.assert_allclose(read_maps(one), read_maps(four), atol=1e-5)
    for column in ("id", "target", "label", "topk_classes", "thumbnail", "mask"):
        assert one.column(column).to_pylist() == four.column(column).to_pylist(), column
    np.testing.assert_allclose(one.column("logit").to_numpy(), four.column("logit").to_numpy(),
                               rtol=1e-5)


def test_multi_process_run_through_the_entry_script(parquet_run, model_path):
    tmp, _, _ = parquet_run
    output = tmp / "multi"
    command = [
        sys.executable, os.path.join(REPO, "pipelines", "beam_job.py"),
        "--input", str(tmp / "in" / "*.parquet"), "--model", model_path, "--output", str(output),
        "--image-size", str(SIZE), "--preprocess", "unit", "--batch-size", "4",
        "--map-dtype", "uint8", "--top-k", "3",
        # Beam's own flags, passed through to PipelineOptions:
        "--direct_num_workers", "2", "--direct_running_mode", "multi_processing",
    ]
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        command, check=False, capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((output / "summary.json").read_text())
    assert (summary["input"], summary["explained"], summary["failed"]) == (12, 12, 0)
    # Two worker processes, each loading the model once.
    assert summary["metrics"]["load_model_latency_milli_secs"]["count"] == 2
    assert summary["metrics"]["model_loads"] == 2
    multi, _ = read_output(str(output))
    single, _ = read_output(str(tmp / "out"))
    assert multi.schema.metadata[b"fullgrad.map_dtype"] == b"uint8"
    assert multi.schema.field("map").type.value_type == pa.uint8()
    # uint8 storage: within half a step of 1/255 of the float32 maps of the in-process run.
    np.testing.assert_allclose(read_maps(multi), read_maps(single), atol=0.5 / 255 + 1e-5)
    assert multi.column("target").to_pylist() == single.column("target").to_pylist()


def test_bad_inputs_become_dead_letters_and_the_run_continues(tmp_path, model_path):
    (tmp_path / "in").mkdir()
    good = good_rows(3)
    png = encode(random_image(50))
    bad = [
        {"id": "../../x", "image": png, "label": 1, "mask": None},
        {"id": "empty", "image": b"", "label": 1, "mask": None},
        {"id": "corrupt", "image": png[:80], "label": 1, "mask": None},
        {"id": "gif", "image": encode(random_image(2), "GIF"), "label": 1, "mask": None},
        {"id": "bomb", "image": png_header_only(9000, 9000), "label": 1, "mask": None},
        {"id": "text", "image": b"<html>not an image</html>", "label": 1, "mask": None},
        {"id": "null-image", "image": None, "label": 1, "mask": None},
        {"id": None, "image": png, "label": 1, "mask": None},
        {"id": "bad-mask", "image": png, "label": 1, "mask": b"\x00\x01"},
    ]
    write_parquet(str(tmp_path / "in" / "a-bytes.parquet"), good + bad)
    pixels = np.random.default_rng(0).uniform(0, 255, [3, SIZE, SIZE, 3])
    pixels[1, 4, 5, 2] = np.nan
    pixels[2] = 3e38  # finite input that overflows inside the network: a NaN map
    write_parquet(
        str(tmp_path / "in" / "b-pixels.parquet"),
        [{"id": f"pixels-{i}", "image": pixels[i].tolist()} for i in range(3)],
    )
    write_parquet(str(tmp_path / "in" / "c-nocolumn.parquet"),
                  [{"id": "no-image-1", "picture": png}, {"id": "no-image-2", "picture": png}])
    (tmp_path / "in" / "d-broken.parquet").write_bytes(b"PAR1 this is not parquet")

    summary = job.run(config(tmp_path, model_path, overlays=10, preprocess="none"))
    maps, dead = read_output(str(tmp_path / "out"))
    explained = sorted(maps.column("id").to_pylist())
    assert explained == sorted(["../../x", "pixels-0", *[r["id"] for r in good]])
    failures = {row["id"]: (row["stage"], row["error"]) for row in dead.to_pylist()}
    expected = {
        "empty": ("decode", "empty image bytes"),
        "corrupt": ("decode", "corrupt"),
        "gif": ("decode", "unsupported image format GIF"),
        "bomb": ("decode", "decompression bomb"),
        "text": ("decode", "not PNG, JPEG, WebP, BMP or TIFF"),
        "null-image": ("decode", "image is null"),
        "a-bytes.parquet#10": ("read", "null 'id'"),
        "bad-mask": ("decode", "mask"),
        "pixels-1": ("preprocess", "NaN"),
        "pixels-2": ("explain", "NaN/inf"),
        "no-image-1": ("read", "missing column(s) ['image']"),
        "no-image-2": ("read", "missing column(s) ['image']"),
    }
    broken = [i for i in failures if i.endswith("d-broken.parquet")]
    assert len(broken) == 1 and failures.pop(broken[0])[0] == "read"
    assert set(failures) == set(expected)
    for record_id, (stage, text) in expected.items():
        assert failures[record_id][0] == stage, record_id
        assert text in failures[record_id][1], (record_id, failures[record_id])
    assert summary["input"] == 18 == summary["explained"] + summary["failed"]
    assert summary["failed_by_stage"] == {"decode": 7, "explain": 1, "preprocess": 1, "read": 4}
    metrics = summary["metrics"]
    assert metrics["failures"] == 13 and metrics["images_explained"] == 5
    assert {k: v for k, v in metrics.items() if k.startswith("failures_")} == {
        "failures_decode": 7, "failures_explain": 1, "failures_preprocess": 1, "failures_read": 4
    }
    # The id "../../x" stays data: its overlay is inside overlays/, under a sanitised name.
    overlays = tmp_path / "out" / "overlays"
    assert (overlays / safe_file_name("../../x")).is_file()
    assert json.loads((overlays / "index.json").read_text())[safe_file_name("../../x")] == "../../x"
    assert not (tmp_path / "x").exists() and not (tmp_path.parent / "x").exists()
    assert sorted(os.listdir(tmp_path)) == ["in", "out"]


def test_tfrecord_with_configured_keys_and_label_targets(tmp_path, model_path):
    (tmp_path / "in").mkdir()
    keys = {"id": "key", "image": "png", "label": "class", "mask": "object"}
    rows = good_rows(6)
    extra = [
        {"id": "no-image", "label": 1},
        {"id": "corrupt", "image": b"\xff\xd8\xff\xe0 broken jpeg", "label": 1},
        {"id": "label-out-of-range", "image": rows[0]["image"], "label": CLASSES + 2},
        {"id": "no-label", "image": rows[0]["image"]},
    ]
    write_tfrecord(str(tmp_path / "in" / "a.tfrecord"), rows[:3] + extra[:2], keys)
    write_tfrecord(str(tmp_path / "in" / "b.tfrecord"), rows[3:] + extra[2:], keys)
    summary = job.run(
        config(
            tmp_path, model_path, input=str(tmp_path / "in" / "*.tfrecord"), target="label",
            id_column="key", image_column="png", label_column="class", mask_column="object",
            preprocess="tf", map_size=16, map_dtype="float16",
        )
    )
    assert (summary["input"], summary["explained"], summary["failed"]) == (10, 6, 4)
    maps, dead = read_output(str(tmp_path / "out"))
    assert maps.column("target").to_pylist() == [r["label"] for r in rows]
    assert maps.column("label").to_pylist() == [r["label"] for r in rows]
    stages = {d["id"]: (d["stage"], d["error"]) for d in dead.to_pylist()}
    assert stages["no-image"][0] == "read" and "missing key(s) ['png']" in stages["no-image"][1]
    assert stages["corrupt"][0] == "decode"
    assert stages["label-out-of-range"] == (
        "preprocess", "target class 7 is outside the model's 5"
    )
    assert stages["no-label"] == ("preprocess", "--target label, but this record has no label")
    stored = read_maps(maps)
    assert stored.shape == (6, 16, 16) and maps.schema.field("map").type.value_type == pa.float16()
    expected, _ = engine_reference(model_path, rows, "tf", targets=[r["label"] for r in rows])
    np.testing.assert_allclose(maps.column("logit").to_numpy(), expected.logits[:, 0], rtol=1e-5)
    from fullgrad.images import resize_map

    reference = np.stack([resize_map(m, (16, 16)) for m in expected.maps[..., 0]])
    np.testing.assert_allclose(stored, reference, atol=1e-3)  # float16 storage


def test_tfrecord_files_with_broken_framing_keep_their_readable_records(tmp_path, model_path):
    import gzip

    (tmp_path / "in").mkdir()
    rows = good_rows(9, with_mask=False)
    write_tfrecord(str(tmp_path / "in" / "good.tfrecord"), rows[:3])
    bad_crc = tmp_path / "in" / "bad-crc.tfrecord"
    write_tfrecord(str(bad_crc), rows[3:6])
    data = bytearray(bad_crc.read_bytes())
    data[-10] ^= 0xFF  # inside the last record's payload: its CRC no longer matches
    bad_crc.write_bytes(bytes(data))
    truncated = tmp_path / "in" / "truncated.tfrecord"
    write_tfrecord(str(truncated), rows[6:8])
    truncated.write_bytes(truncated.read_bytes()[:-7])
    zipped = tmp_path / "in" / "zipped.tfrecord.gz"
    write_tfrecord(str(tmp_path / "plain.tfrecord"), rows[8:])
    zipped.write_bytes(gzip.compress((tmp_path / "plain.tfrecord").read_bytes()))
    broken_zip = bytearray(gzip.compress(bad_crc.read_bytes()))
    broken_zip[len(broken_zip) // 2 :] = b"\x00" * (len(broken_zip) - len(broken_zip) // 2)
    (tmp_path / "in" / "broken-zip.tfrecord.gz").write_bytes(bytes(broken_zip))
    summary = job.run(config(tmp_path, model_path, input=str(tmp_path / "in" / "*.tfrecord*")))
    maps, dead = read_output(str(tmp_path / "out"))
    errors = dict(zip(dead.column("id").to_pylist(), dead.column("error").to_pylist(), strict=True))
    assert set(dead.column("stage").to_pylist()) == {"read"}
    assert "2 records read" in errors.pop("bad-crc.tfrecord#record-2-onwards")
    assert "Fewer than" in errors.pop("truncated.tfrecord#record-1-onwards")
    ((zip_id, zip_error),) = errors.items()  # a gzip stream zeroed half-way: zlib or framing
    assert zip_id.startswith("broken-zip.tfrecord.gz#record-") and "corrupt TFRecord" in zip_error
    read_before_break = int(zip_id.split("#record-")[1].split("-")[0])
    explained = rows[:5] + rows[6:7] + rows[8:]
    assert maps.num_rows == len(explained) + read_before_break
    assert {r["id"] for r in explained} <= set(maps.column("id").to_pylist())
    assert summary["input"] == summary["explained"] + summary["failed"] == maps.num_rows + 3


def _main(argv: list[str]) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    job.add_arguments(parser)
    args, extra = parser.parse_known_args(argv)
    return job.main(args, extra), ""


def _unsafe_model(path: str) -> str:
    inputs = keras.Input([SIZE, SIZE, 3])
    x = keras.layers.Lambda(lambda t: t * 2.0)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(3)(x)).save(path)
    return path


def _wide_model(path: str) -> str:
    inputs = keras.Input([64, 64, 3])
    x = keras.layers.Conv2D(2, 3)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(3)(x)).save(path)
    return path


@pytest.mark.parametrize(
    ("make_model", "message"),
    [
        (lambda tmp: str(tmp / "missing.keras"), "model file not found"),
        (lambda tmp: _unsafe_model(str(tmp / "lambda.keras")), "safe_mode"),
        (lambda tmp: _wide_model(str(tmp / "wide.keras")), "takes 64x64 images, but the job resizes to 32x32: set --image-size 64"),
    ],
    ids=["missing", "unsafe", "wrong-input-shape"],
)
def test_bad_models_fail_before_any_data_is_read(tmp_path, capsys, make_model, message):
    model = make_model(tmp_path)
    # The input does not exist: an error about the model proves the data was never reached.
    argv = ["--input", str(tmp_path / "nowhere" / "*.parquet"), "--model", model,
            "--output", str(tmp_path / "out"), "--image-size", str(SIZE)]
    status, _ = _main(argv)
    error = capsys.readouterr().err
    assert status == 2
    assert error.startswith("fullgrad run: error: --model") and message in error, error
    assert not (tmp_path / "out").exists()


def test_a_target_class_out_of_range_and_an_empty_glob_are_refused(tmp_path, model_path):
    settings = config(tmp_path, model_path, target="9")
    with pytest.raises(job.JobError, match="--target 9 is out of range for a model with 5"):
        job.run(settings)
    with pytest.raises(job.JobError, match="matches no file"):
        job.run(config(tmp_path, model_path))


def test_reruns_refuse_or_replace_but_never_mix(tmp_path, model_path):
    (tmp_path / "in").mkdir()
    write_parquet(str(tmp_path / "in" / "first.parquet"),
                  [{"key": r["id"], "png": r["image"]} for r in good_rows(5)])
    first = config(tmp_path, model_path, id_column="key", image_column="png", overlays=2)
    assert job.run(first)["explained"] == 5
    (tmp_path / "out" / "notes.txt").write_text("mine")
    (tmp_path / "out" / "report.html").write_text("an earlier run's audit report")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}

    with pytest.raises(job.JobError, match="already holds a run's outputs.*--overwrite"):
        job.run(first)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == before

    # Earlier outputs under names the 1-shard rerun never writes: --overwrite must remove them.
    stale = ["maps-00007-of-00009.parquet", "dead_letter-00003-of-00004.parquet",
             "maps-00002-of-00003.tfrecord", "audit.json"]
    for name in stale:
        (tmp_path / "out" / name).write_bytes(b"stale")
    os.remove(tmp_path / "in" / "first.parquet")
    write_parquet(str(tmp_path / "in" / "second.parquet"),
                  [{"key": f"new-{i}", "png": r["image"]} for i, r in enumerate(good_rows(2))])
    second = config(tmp_path, model_path, id_column="key", image_column="png", overwrite=True)
    summary = job.run(second)
    maps, dead = read_output(str(tmp_path / "out"))
    assert maps.column("id").to_pylist() == ["new-0", "new-1"] and dead.num_rows == 0
    assert summary["input"] == 2
    assert not (tmp_path / "out" / "overlays").exists()  # the first run's overlays are gone
    assert not (tmp_path / "out" / "report.html").exists()  # and its audit report
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"  # not ours: kept
    assert not [name for name in stale if (tmp_path / "out" / name).exists()]


def test_a_crashed_runs_temporary_folder_is_refused_then_removed(tmp_path, model_path):
    # A run that died mid-write leaves Beam's temporary folder and no summary.json.
    (tmp_path / "in").mkdir()
    write_parquet(str(tmp_path / "in" / "a.parquet"), good_rows(2))
    leftover = tmp_path / "out" / "beam-temp-maps-00000-of-00001-0123abcd"
    leftover.mkdir(parents=True)
    (leftover / "part.parquet").write_bytes(b"half a file")
    with pytest.raises(job.JobError, match="beam-temp-maps.*--overwrite"):
        job.run(config(tmp_path, model_path))
    assert job.run(config(tmp_path, model_path, overwrite=True))["explained"] == 2
    assert not leftover.exists()
    assert not [name for name in os.listdir(tmp_path / "out") if name.startswith("beam-temp")]


def test_the_default_runner_is_pinned_and_flags_pass_through():
    options = pipeline_options(["--direct_num_workers", "2", "--job_name", "x"])
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    assert options.view_as(StandardOptions).runner == DEFAULT_RUNNER
    assert options.view_as(DirectOptions).direct_num_workers == 2
    chosen = pipeline_options(["--runner", "DataflowRunner"])
    assert chosen.view_as(StandardOptions).runner == "DataflowRunner"
    assert chosen.view_as(DirectOptions).direct_num_workers == 1  # other runners: untouched


def test_the_default_local_runner_explains_in_several_bundles_with_one_model(parquet_run):
    tmp, _, summary = parquet_run
    # 4 row groups over the runner's 3 bundles: each bundle writes its own maps shard...
    shards = [name for name in os.listdir(tmp / "out") if name.startswith("maps-")
              and name.endswith(".parquet")]
    assert 1 < len(shards) <= LOCAL_BUNDLES_IN_FLIGHT, shards
    # ...and all of them used the one model the process loaded.
    assert summary["metrics"]["model_loads"] == 1


def test_the_default_local_runner_runs_bundles_in_threads_unless_told_otherwise():
    from apache_beam.options.pipeline_options import DirectOptions

    def direct(*flags, **overrides):
        options = pipeline_options(list(flags), **overrides).view_as(DirectOptions)
        return options.direct_running_mode, options.direct_num_workers

    assert LOCAL_BUNDLES_IN_FLIGHT > 1
    assert direct() == ("multi_threading", LOCAL_BUNDLES_IN_FLIGHT)
    assert direct("--job_name", "x") == ("multi_threading", LOCAL_BUNDLES_IN_FLIGHT)
    # Either flag, in either spelling, or a keyword override, leaves both to the user.
    assert direct("--direct_num_workers", "1") == ("in_memory", 1)
    assert direct("--direct_running_mode=in_memory") == ("in_memory", 1)
    assert direct("--direct_running_mode", "multi_processing", "--direct_num_workers=2") == (
        "multi_processing", 2)
    assert direct(direct_num_workers=1) == ("in_memory", 1)
    parser = argparse.ArgumentParser()
    job.add_arguments(parser)
    args, extra = parser.parse_known_args(
        ["--input", "a.tfrecord", "--model", "m.keras", "--output", "o", "--target", "3",
         "--decode-threads", "0", "--runner", "FlinkRunner", "--flink_master", "localhost:8081"]
    )
    assert extra == ["--runner", "FlinkRunner", "--flink_master", "localhost:8081"]
    settings = job.config_from_args(args)
    assert settings.resolved_format() == "tfrecord" and settings.target_index() == 3
    assert settings.columns().image == "image/encoded" and settings.decode_threads == 0
    with pytest.raises(ValueError, match="--decode-threads"):
        JobConfig(input="a.parquet", model="m", output="o", decode_threads=-1)


def test_a_model_shared_across_processes_gives_the_same_maps(parquet_run, model_path):
    # model_copies=1: Beam hosts the model in one process (multi_process_shared) and the
    # workers call it through a proxy, numpy in and out.
    tmp, _, _ = parquet_run
    summary = job.run(config(tmp, model_path, name="shared", model_copies=1, top_k=3))
    assert summary["explained"] == 12
    shared, _ = read_output(str(tmp / "shared"))
    single, _ = read_output(str(tmp / "out"))
    np.testing.assert_allclose(read_maps(shared), read_maps(single), atol=1e-5)
    assert shared.column("topk_classes").to_pylist() == single.column("topk_classes").to_pylist()


def test_progress_lines_count_one_jobs_images_over_its_bundles_threads(caplog):
    """The local runner's bundles run in threads, each with its own ``ToRecords`` copy: the
    progress lines still give one ordered count per process, and another job starts at 0."""
    import pickle
    import threading

    from apache_beam.ml.inference.base import PredictionResult

    from fullgrad.beam.transforms import ToRecords

    settings = JobConfig(input="a.parquet", model="m.keras", output="o", image_size=8,
                         map_size=8, progress_every=3)
    result = PredictionResult(
        {"id": "a", "label": None, "mask": None, "thumbnail": np.zeros([8, 8, 3], np.uint8)},
        {"map": np.full([8, 8], 0.5, np.float32), "target": 1, "logit": 2.0, "residual": 0.0,
         "topk_classes": np.array([1]), "topk_logits": np.array([2.0])},
    )

    def explain_in_threads(records: ToRecords, threads: int, each: int) -> list[int]:
        copies = [pickle.loads(pickle.dumps(records)) for _ in range(threads)]  # as the runner
        for copy in copies:
            copy.setup()
        caplog.clear()
        workers = [threading.Thread(target=lambda c=c: [list(c.process(result))
                                                       for _ in range(each)])
                   for c in copies]
        with caplog.at_level("INFO", logger="fullgrad.beam.transforms"):
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
        pattern = r"fullgrad: (\d+) images explained by this worker \(pid (\d+)\)"
        found = [re.match(pattern, record.getMessage()) for record in caplog.records]
        assert all(found) and {m.group(2) for m in found} == {str(os.getpid())}
        return [int(m.group(1)) for m in found]

    records = ToRecords(settings)
    assert explain_in_threads(records, threads=3, each=40) == list(range(3, 121, 3))
    assert explain_in_threads(records, threads=2, each=3) == [123, 126]  # the same job: on
    assert explain_in_threads(ToRecords(settings), threads=2, each=3) == [3, 6]  # a new one
