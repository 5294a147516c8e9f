"""`fullgrad run`'s flags, each seen working (or refusing) through the command line.

One multi-process run of the real CLI, in a fresh process, carries most flags at once: two
comma-separated globs, ``--format`` for files whose extension says nothing, a model with a
Lambda layer (``--unsafe-model``) shared by the worker processes (``--large-model``),
``--max-pixels``, ``--write-tfrecord`` and ``--progress-every``; its files and its stderr are
checked by the tests below. The refusals (a bad ``--format``, models that are not
single-output classifiers, a folder as ``--input``) are checked before any pipeline runs.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
from beamdata import (
    SIZE,
    encode,
    good_rows,
    random_image,
    read_output,
    stored_maps,
    write_parquet,
)
from PIL import Image

from fullgrad import cli
from fullgrad.images import decode_image

MAX_PIXELS = 2000  # the rows' images are 40 x 44 = 1760 pixels; "too-big" is 54 x 50


def lambda_model(path: str) -> str:
    """A classifier with a Lambda layer: Keras' safe_mode refuses to load it."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input([SIZE, SIZE, 3])
    x = keras.layers.Lambda(lambda t: t / 255.0)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(3)(x)).save(path)
    return path


def rgba_image() -> tuple[Image.Image, np.ndarray]:
    """An RGBA image and the RGB the job documents for it: alpha dropped, colours kept."""
    rgb = np.zeros([SIZE, SIZE, 3], np.uint8)
    rgb[:, : SIZE // 2] = (200, 40, 10)
    rgb[:, SIZE // 2 :] = (20, 120, 240)
    alpha = np.zeros([SIZE, SIZE, 1], np.uint8)  # the left half fully transparent
    alpha[:, SIZE // 2 :] = 128
    return Image.fromarray(np.concatenate([rgb, alpha], axis=-1), mode="RGBA"), rgb


def palette_image() -> tuple[Image.Image, np.ndarray]:
    """A palette image (index 0 transparent) and its RGB: each index's palette colour."""
    colours = np.array([(250, 0, 0), (0, 250, 0), (0, 0, 250), (255, 255, 0)], np.uint8)
    index = (np.add.outer(np.arange(SIZE) // 8, np.arange(SIZE) // 8) % 4).astype(np.uint8)
    image = Image.frombytes("P", (SIZE, SIZE), index.tobytes())
    image.putpalette(colours.reshape(-1).tolist())
    image.info["transparency"] = 0
    return image, colours[index]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **({"transparency": 0} if image.mode == "P" else {}))
    return buffer.getvalue()


def run_cli(argv: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    """``fullgrad run ARGV`` in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-c", "import sys; from fullgrad.cli import main; sys.exit(main())",
         "run", *argv],
        check=False, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """The run described in the module docstring: ``(folder, rows by id, expected RGB, done)``."""
    tmp = tmp_path_factory.mktemp("flags")
    for folder in ("a", "b", "c"):
        (tmp / "in" / folder).mkdir(parents=True)
    rgba, rgba_rgb = rgba_image()
    palette, palette_rgb = palette_image()
    first = [*good_rows(5), {"id": "too-big", "image": encode(random_image(9, size=50)),
                             "label": 1, "mask": None}]
    second = [*good_rows(3, start=5),
              {"id": "rgba", "image": png(rgba), "label": 2, "mask": None},
              {"id": "palette", "image": png(palette), "label": 0, "mask": None}]
    write_parquet(str(tmp / "in" / "a" / "part.data"), first)
    write_parquet(str(tmp / "in" / "b" / "part.data"), second)
    # Matched by neither glob: must not be read.
    write_parquet(str(tmp / "in" / "c" / "part.data"), good_rows(2, start=50))
    model = lambda_model(str(tmp / "lambda.keras"))
    done = run_cli([
        "--input", f"{tmp}/in/a/*.data, {tmp}/in/b/*.data", "--format", "parquet",
        "--model", model, "--unsafe-model", "--large-model", "--max-pixels", str(MAX_PIXELS),
        "--image-size", str(SIZE), "--preprocess", "none", "--batch-size", "4",
        "--map-dtype", "float32", "--write-tfrecord", "--progress-every", "2",
        "--output", str(tmp / "out"),
        "--direct_num_workers", "2", "--direct_running_mode", "multi_processing",
    ])
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["id"]: row for row in first + second}
    return tmp, rows, {"rgba": rgba_rgb, "palette": palette_rgb}, done


def test_comma_separated_globs_explicit_format_and_max_pixels(cli_run):
    tmp, rows, _, done = cli_run
    summary = json.loads((tmp / "out" / "summary.json").read_text())
    assert json.loads(done.stdout) == {k: v for k, v in summary.items() if k != "config"}
    assert (summary["input"], summary["explained"], summary["failed"]) == (11, 10, 1)
    assert summary["files"] == 2  # one per glob; in/c is matched by neither
    maps, dead = read_output(str(tmp / "out"))
    assert sorted(maps.column("id").to_pylist()) == sorted(set(rows) - {"too-big"})
    (letter,) = dead.to_pylist()
    assert (letter["id"], letter["stage"]) == ("too-big", "decode")
    assert f"54x50 = 2700 pixels exceeds the limit of {MAX_PIXELS}" in letter["error"]


def test_an_unsafe_model_runs_with_the_flag_shared_by_the_workers(cli_run):
    tmp, _, _, done = cli_run
    summary = json.loads((tmp / "out" / "summary.json").read_text())
    progress = re.findall(r"fullgrad: (\d+) images explained by this worker \(pid (\d+)\), "
                          r"[0-9.]+ images/s", done.stderr)
    workers = {pid for _, pid in progress}
    assert len(workers) == 2, done.stderr[-3000:]  # both processes explained images...
    loads = re.findall(r"fullgrad: loaded (\S+) in [0-9.]+ s \(pid (\d+)\)", done.stderr)
    assert len(loads) == 1, done.stderr[-3000:]  # ...with one model (--large-model)
    assert loads[0] == (str(tmp / "lambda.keras"), loads[0][1]) and loads[0][1] in workers
    assert summary["metrics"]["model_loads"] == 1
    assert summary["config"]["safe_mode"] is False and summary["config"]["large_model"] is True


def test_progress_lines_count_each_workers_images(cli_run):
    tmp, _, _, done = cli_run
    progress = re.findall(r"fullgrad: (\d+) images explained by this worker \(pid (\d+)\)",
                          done.stderr)
    by_worker: dict[str, list[int]] = {}
    for count, pid in progress:
        by_worker.setdefault(pid, []).append(int(count))
    for counts in by_worker.values():  # every 2 images (--progress-every 2), in order
        assert counts == list(range(2, 2 * len(counts) + 1, 2)), by_worker
    explained = json.loads((tmp / "out" / "summary.json").read_text())["explained"]
    # Each worker's last line is at most one image (its odd remainder) short of its count.
    logged = sum(counts[-1] for counts in by_worker.values())
    assert explained - len(by_worker) <= logged <= explained, (logged, by_worker)


def test_rgba_and_palette_images_are_their_colours_without_alpha(cli_run):
    tmp, _, expected_rgb, _ = cli_run
    maps, _ = read_output(str(tmp / "out"))
    model = keras.saving.load_model(str(tmp / "lambda.keras"), safe_mode=False, compile=False)
    by_id = {row["id"]: row for row in maps.to_pylist()}
    for name, rgb in expected_rgb.items():
        # The thumbnail (a JPEG of the decoded image) shows the colours: transparent pixels
        # keep theirs, none is blended with black or white.
        thumbnail = np.asarray(Image.open(io.BytesIO(by_id[name]["thumbnail"])), np.float64)
        assert np.abs(thumbnail - rgb).mean() < 4.0, name
        # The model saw exactly those pixels (--preprocess none).
        logits = model.predict(rgb[None].astype(np.float32), verbose=0)[0]
        np.testing.assert_allclose(by_id[name]["logit"], logits[by_id[name]["target"]],
                                   rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("kind", ["rgba", "palette"])
def test_decode_image_drops_alpha_and_keeps_every_pixel(kind):
    image, rgb = rgba_image() if kind == "rgba" else palette_image()
    np.testing.assert_array_equal(decode_image(png(image)), rgb)


def test_every_tfrecord_key_equals_the_parquet_row(cli_run):
    import tensorflow as tf

    tmp, _, _, _ = cli_run
    maps, _ = read_output(str(tmp / "out"))
    rows = {row["id"]: row for row in maps.to_pylist()}
    stored = dict(zip(maps.column("id").to_pylist(), stored_maps(maps), strict=True))
    paths = sorted(glob.glob(str(tmp / "out" / "maps-*.tfrecord")))
    examples = [tf.train.Example.FromString(raw.numpy())
                for raw in tf.data.TFRecordDataset(paths)]
    assert len(examples) == maps.num_rows > 0
    seen = set()
    for example in examples:
        feature = example.features.feature
        record_id = feature["id"].bytes_list.value[0].decode()
        row = rows[record_id]
        seen.add(record_id)
        documented = {"id", "target", "logit", "label", "topk_classes", "topk_logits",
                      "residual", "map", "map/shape", "map/dtype", "thumbnail"}
        if row["mask"] is not None:
            documented.add("mask")
        assert documented <= set(feature) <= set(row) | {"map/shape", "map/dtype"}, record_id
        # The map: raw float32 bytes of the shape and dtype the Example names.
        assert feature["map/dtype"].bytes_list.value[0] == b"float32"
        shape = list(feature["map/shape"].int64_list.value)
        assert shape == [SIZE, SIZE]
        saliency = np.frombuffer(feature["map"].bytes_list.value[0], np.float32).reshape(shape)
        np.testing.assert_array_equal(saliency, stored[record_id])
        # Every other key equals the Parquet column of that name (float32 in both files, so
        # floats are equal to the bit; null columns are left out of the Example).
        for key in set(feature) - {"map", "map/shape", "map/dtype"}:
            value = feature[key]
            got = list(getattr(value, value.WhichOneof("kind")).value)
            want = row[key] if isinstance(row[key], list) else [row[key]]
            want = [w.encode() if isinstance(w, str) else w for w in want]
            assert got == want, (record_id, key, got, want)
    assert seen == set(rows)


# -- refusals, before any data is read --------------------------------------------------------


def _cli(tmp_path, capsys, *argv: str) -> tuple[int, str]:
    status = cli.main(["run", "--output", str(tmp_path / "out"), "--image-size", str(SIZE),
                       *argv])
    return status, capsys.readouterr().err


def test_a_format_outside_the_choices_is_refused(tmp_path, capsys, model_path):
    with pytest.raises(SystemExit) as exit_:
        _cli(tmp_path, capsys, "--input", "x.parquet", "--model", model_path,
             "--format", "csv")
    assert exit_.value.code == 2
    assert "--format: invalid choice: 'csv'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_extension_that_says_nothing_needs_format(tmp_path, capsys, model_path):
    write_parquet(str(tmp_path / "part.data"), good_rows(1))
    status, error = _cli(tmp_path, capsys, "--input", str(tmp_path / "*.data"),
                         "--model", model_path)
    assert status == 2 and "cannot tell the format" in error and "--format" in error, error
    assert not (tmp_path / "out").exists()


def test_a_format_that_does_not_match_the_files_makes_each_file_a_dead_letter(tmp_path,
                                                                               model_path):
    from fullgrad.beam import job
    from fullgrad.beam.config import JobConfig

    (tmp_path / "in").mkdir()
    for index in range(2):
        write_parquet(str(tmp_path / "in" / f"part-{index}.parquet"), good_rows(2))
    summary = job.run(JobConfig(
        input=str(tmp_path / "in" / "*.parquet"), format="tfrecord", model=model_path,
        output=str(tmp_path / "out"), image_size=SIZE, batch_size=4, decode_threads=0,
    ))
    assert (summary["explained"], summary["failed"]) == (0, 2)
    assert summary["failed_by_stage"] == {"read": 2}
    _, dead = read_output(str(tmp_path / "out"))
    for letter in dead.to_pylist():
        assert os.path.basename(letter["id"]).startswith("part-"), letter
        assert "TFRecord" in letter["error"], letter


def test_a_lambda_model_is_refused_without_unsafe_model(tmp_path, capsys):
    model = lambda_model(str(tmp_path / "lambda.keras"))
    status, error = _cli(tmp_path, capsys, "--input", str(tmp_path / "*.parquet"),
                         "--model", model)
    # The CLI names its own flag, not the Python argument (issue 11).
    assert status == 2 and "--unsafe-model" in error and "safe_mode=False" not in error, error
    assert not (tmp_path / "out").exists()


def _two_outputs(path: str) -> str:
    inputs = keras.Input([SIZE, SIZE, 3])
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    keras.Model(inputs, [keras.layers.Dense(3)(x), keras.layers.Dense(2)(x)]).save(path)
    return path


def _two_inputs(path: str) -> str:
    first, second = keras.Input([SIZE, SIZE, 3]), keras.Input([SIZE, SIZE, 3])
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Add()([first, second]))
    keras.Model([first, second], keras.layers.Dense(3)(x)).save(path)
    return path


def _segmenter(path: str) -> str:
    inputs = keras.Input([SIZE, SIZE, 3])
    keras.Model(inputs, keras.layers.Conv2D(3, 1)(inputs)).save(path)
    return path


@pytest.mark.parametrize(
    ("make_model", "message"),
    [
        (_two_outputs, "expected one input and one output"),
        (_two_inputs, "expected one input and one output"),
        (_segmenter, "expected a classifier [batch, classes], got (None, 32, 32, 3)"),
    ],
    ids=["two-outputs", "two-inputs", "not-a-classifier"],
)
def test_models_that_are_not_single_output_classifiers_are_refused(
    tmp_path, capsys, make_model, message
):
    write_parquet(str(tmp_path / "a.parquet"), good_rows(1))
    model = make_model(str(tmp_path / "model.keras"))
    status, error = _cli(tmp_path, capsys, "--input", str(tmp_path / "*.parquet"),
                         "--model", model)
    assert status == 2 and message in error, error
    assert not (tmp_path / "out").exists()


def test_a_folder_as_input_is_refused_with_a_glob_to_use(tmp_path, capsys, model_path):
    (tmp_path / "data.parquet").mkdir()  # a folder whose name looks like a file
    write_parquet(str(tmp_path / "data.parquet" / "part-0.parquet"), good_rows(1))
    status, error = _cli(tmp_path, capsys, "--input", str(tmp_path / "data.parquet"),
                         "--model", model_path)
    folder = tmp_path / "data.parquet"
    assert status == 2 and f"--input {folder} is a folder; pass a glob such as {folder}/*" \
        in error, error
    assert not (tmp_path / "out").exists()
